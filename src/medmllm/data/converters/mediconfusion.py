"""MediConfusion (Sepehri et al. 2024, MShahabSepehri/MediConfusion) -> paired multiple-choice records.

Official layout under ``src`` (the repository, after its ``scripts/download.py``; the ``data``
folder itself is accepted too)::

    data/dataset.json           {"<pair id>": {im_1, im_2 (ROCO paths "train/radiology/images/ROCO_28778.jpg"),
                                  im_1_local, im_2_local (download ids), question, option_A, option_B,
                                  im_1_correct, im_2_correct ("A"/"B"), category_1, category_2, ...}}
    data/images/<im_k_local>.jpg   images as ``download.py`` saves them, or
    roco-dataset/data/<im_k>       a ROCO copy (``data_path/roco-dataset/data`` in their scripts)

Each pair is one question with two options asked about two images; the right option differs
between the images (the benchmark's "set" score counts a pair only when both are right; see
the ``pairs`` trust suite and ``meta.extra.pair_id``). Assumptions (checked per pair; a pair
that breaks them is skipped whole and listed): both ``im_k_correct`` are "A" or "B" and differ,
``question`` and both options are non-empty, both images exist.

Records (split "test"): two per pair, ids ``mediconfusion-<pair id>-1`` / ``-2``; user message =
image + question stem (task templates add the options); ``meta.choices`` = [option_A,
option_B], ``meta.answer`` the letter, ``meta.extra`` = pair_id, image (1 or 2), roco_path,
categories. Captions are not copied (they state the answer).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Sequence

from medmllm.errors import InputError, RecordError
from medmllm.data.converters.base import (Skip, SkipItem, check_src, find_file, load_json, req_text,
                                          select_splits)
from medmllm.data.records import make_record, media

DATASET = "mediconfusion"
SPLITS = {"test": "test"}


def _annotation(src: Path) -> tuple[Path, Path]:
    """(dataset.json, data folder)."""
    for data in (src / "data", src):
        if (data / "dataset.json").is_file():
            return data / "dataset.json", data
    raise InputError(src / "data" / "dataset.json", f"expected data/dataset.json (or dataset.json) in {src}; not found")


def _image(src: Path, data: Path, item: dict, k: int, rid: str) -> tuple[Path, str]:
    roco = str(item.get(f"im_{k}") or "").strip()
    local = str(item.get(f"im_{k}_local") or "").strip()
    cands = []
    if local:
        cands += [data / "images" / f"{local}.jpg", src / "images" / f"{local}.jpg"]
    if roco:
        cands += [src / "roco-dataset" / "data" / roco, data / "roco-dataset" / "data" / roco, src / roco]
    if not cands:
        raise SkipItem(f"fields 'im_{k}' / 'im_{k}_local': both empty", rid)
    found = find_file(cands)
    if found is None:
        raise SkipItem(f"image {k} not found: {cands[0]}", rid)
    return found, roco


def _pair(src: Path, data: Path, pair_id: str, item: Any) -> list[dict]:
    rid = f"{DATASET}-{pair_id}"
    if not isinstance(item, dict):
        raise SkipItem(f"malformed pair: expected an object, got {type(item).__name__}", rid)
    question = req_text(item, "question", rid)
    choices = [req_text(item, "option_A", rid), req_text(item, "option_B", rid)]
    answers = [req_text(item, f"im_{k}_correct", rid).upper() for k in (1, 2)]
    if any(a not in ("A", "B") for a in answers) or answers[0] == answers[1]:
        raise SkipItem(f"fields 'im_1_correct' / 'im_2_correct': expected 'A' and 'B' (different), got {answers}", rid)
    recs = []
    for k in (1, 2):
        image, roco = _image(src, data, item, k, rid)
        cats = item.get(f"category_{k}")
        extra = {"pair_id": pair_id, "image": k, "roco_path": roco, "answer_text": choices["AB".index(answers[k - 1])]}
        if isinstance(cats, list) and all(isinstance(c, str) for c in cats):
            extra["categories"] = cats
        meta = {"dataset": DATASET, "split": "test", "task": "mcq", "answer_type": "choice", "answer": answers[k - 1],
                "choices": choices, "extra": extra}
        recs.append(make_record(f"{rid}-{k}", [media("image", str(image)), question], answers[k - 1], meta))
    return recs


def convert_mediconfusion(src: Path, *, splits: Sequence[str] | str | None = None) -> Iterator[dict | Skip]:
    """Yield two records per pair (image 1, image 2), or one Skip for a pair that cannot be converted."""
    src = check_src(src)
    select_splits(splits, SPLITS)
    path, data = _annotation(src)
    pairs = load_json(path, dict)
    for pair_id in sorted(pairs, key=lambda k: (len(k), k)):
        where = f"{path.name}[{pair_id!r}]"
        try:
            yield from _pair(src, data, str(pair_id), pairs[pair_id])
        except SkipItem as exc:
            yield Skip(f"{exc.item_id} ({where})" if exc.item_id else where, exc.reason)
        except RecordError as exc:
            yield Skip(where, f"record invalid: {exc.reason}")
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            yield Skip(where, f"malformed item: {type(exc).__name__}: {exc}")

"""MedXpertQA, multimodal subset (Zuo et al. 2025, TsinghuaC3I/MedXpertQA) -> multiple-choice records.

Official layout under ``src`` (the dataset repository, with ``images.zip`` extracted)::

    MM/test.jsonl, MM/dev.jsonl     one JSON object per line: {id ("MM-26"), question (stem followed by
                                    "Answer Choices: (A) ... (E) ..."), options {"A": text, ..., "E": text},
                                    label ("C"), images (["MM-26-a.jpeg", ...]), medical_task,
                                    body_system, question_type}
    images/<name>                   (``MM/images/<name>`` or ``<name>`` directly under src are accepted too)

``dev.jsonl`` (the few-shot examples) -> split "validation", ``test.jsonl`` -> "test"; with
``splits=None`` only the test file is converted (what the ``medxpertqa_mm`` task evaluates;
ask for ``splits=["dev"]`` or ``["dev", "test"]`` for the rest). The Text subset is not
converted (no images).

Assumptions (checked per item; an item that breaks them is skipped and listed): ``options``
is an object whose keys are consecutive letters from ``A``; ``label`` is one of them;
``images`` is a non-empty list of file names that all exist. A line that is not JSON, or not
an object, is skipped and listed with its line number.

Records: the user message holds every image, then the question *stem* (the trailing
"Answer Choices:" block is cut, since task templates add the options; the full text stays in
``meta.extra.question_with_choices``); ``meta.choices`` the option texts, ``meta.answer`` the
letter, ``meta.extra`` medical_task, body_system, question_type, images; ids
``medxpertqa_mm-<id>``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterator, Sequence

from medmllm.errors import InputError
from medmllm.data.converters.base import (MAX_ANNOTATION_BYTES, Skip, SkipItem, check_src, iter_items, need_image,
                                          plain_extra, req_text, select_splits)
from medmllm.data.records import make_record, media

DATASET = "medxpertqa_mm"
FILES = {"validation": "MM/dev.jsonl", "test": "MM/test.jsonl"}
SPLITS = {"dev": "validation", "validation": "validation", "val": "validation", "test": "test"}
IMAGE_DIRS = ("images", "MM/images", "")
EXTRA_KEYS = ("id", "medical_task", "body_system", "question_type", "images")
LETTERS = "ABCDEFGHIJ"
_CHOICES_BLOCK = re.compile(r"\s*Answer Choices\s*:\s*\(A\).*\Z", re.DOTALL | re.IGNORECASE)


def question_stem(question: str) -> str:
    """The question without its trailing "Answer Choices: (A) ... " block (unchanged when there is none)."""
    return _CHOICES_BLOCK.sub("", question).strip() or question.strip()


def _lines(path: Path) -> list[Any]:
    """JSONL lines parsed; a bad line becomes a marker that the item builder skips with its line number."""
    size = path.stat().st_size
    if size > MAX_ANNOTATION_BYTES:
        raise InputError(path, f"annotation file is {size} bytes, above the limit of {MAX_ANNOTATION_BYTES}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(path, f"cannot read: {type(exc).__name__}: {exc}") from None
    out: list[Any] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as exc:
            out.append(_BadLine(lineno, f"line {lineno}: not valid JSON ({exc.msg} at column {exc.colno})"))
    return out


class _BadLine:
    def __init__(self, lineno: int, reason: str):
        self.lineno, self.reason = lineno, reason


def _options(item: dict, rid: str) -> list[str]:
    opts = item.get("options")
    if not isinstance(opts, dict) or len(opts) < 2:
        raise SkipItem(f"field 'options': expected an object of 2+ letter -> text, got {opts!r}"[:200], rid)
    keys = sorted(str(k).strip().upper() for k in opts)
    if keys != list(LETTERS[:len(keys)]):
        raise SkipItem(f"field 'options': expected consecutive letters from A, got {sorted(opts)}", rid)
    by_letter = {str(k).strip().upper(): v for k, v in opts.items()}
    texts = [str(by_letter[L]).strip() if by_letter[L] is not None else "" for L in keys]
    if not all(texts):
        raise SkipItem(f"field 'options': empty option text in {texts}"[:200], rid)
    return texts


def _split_files(src: Path, wanted: list[str]) -> list[tuple[str, Path]]:
    """(split, file) pairs; a requested file that is missing is an InputError naming it."""
    for s in wanted:
        if not (src / FILES[s]).is_file():
            raise InputError(src / FILES[s], f"expected source file {FILES[s]!r} in the source folder {src}; not found")
    return [(s, src / FILES[s]) for s in wanted]


def convert_medxpertqa(src: Path, *, splits: Sequence[str] | str | None = None) -> Iterator[dict | Skip]:
    """Yield one multiple-choice record per MM question of the chosen splits (or a Skip)."""
    src = check_src(src)
    wanted = select_splits(splits, SPLITS, default=("test",))
    for split, path in _split_files(src, wanted):

        def build(_i: int, item: Any, split: str = split, fname: str = FILES[split]) -> dict:
            if isinstance(item, _BadLine):
                raise SkipItem(item.reason)
            rid = f"{DATASET}-{req_text(item, 'id')}"
            question = req_text(item, "question", rid)
            choices = _options(item, rid)
            label = req_text(item, "label", rid).upper()
            if label not in LETTERS[:len(choices)]:
                raise SkipItem(f"field 'label': expected one of {list(LETTERS[:len(choices)])}, got {label!r}", rid)
            names = item.get("images")
            if not isinstance(names, list) or not names or not all(isinstance(n, str) and n.strip() for n in names):
                raise SkipItem(f"field 'images': expected a non-empty list of file names, got {names!r}"[:200], rid)
            images = [need_image([src / d / n.strip() for d in IMAGE_DIRS] + [src / d / Path(n).name for d in IMAGE_DIRS],
                                 rid) for n in names]
            extra = {"source_file": fname, "question_with_choices": question,
                     "answer_text": choices[LETTERS.index(label)], **plain_extra(item, EXTRA_KEYS)}
            meta = {"dataset": DATASET, "split": split, "task": "mcq", "answer_type": "choice", "answer": label,
                    "choices": choices, "extra": extra}
            parts = [media("image", str(p)) for p in images] + [question_stem(question)]
            return make_record(rid, parts, label, meta)

        yield from iter_items(_lines(path), FILES[split], build)

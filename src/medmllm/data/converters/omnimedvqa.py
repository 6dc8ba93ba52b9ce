"""OmniMedVQA (Hu et al. 2024) -> multiple-choice records (evaluation only: split "test").

Official layout under ``src`` (the ``OmniMedVQA`` folder of the release; a folder holding
``OmniMedVQA/`` is accepted too)::

    QA_information/Open-access/<Dataset>.json        lists of {question_id, question_type, question,
    QA_information/Restricted-access/<Dataset>.json   gt_answer, option_A, option_B[, option_C][, option_D],
                                                      image_path, modality_type, dataset}
    Images/<Dataset>/...                              ``image_path`` ("Images/ACRIMA/x.png") is relative to src

Assumptions (checked per item; an item that breaks them is skipped and listed): options are
``option_A`` .. ``option_D`` without gaps (2-4 of them); ``gt_answer`` is the text of exactly
one option (compared case- and whitespace-insensitively; a bare letter is accepted too); the
modality key is ``modality_type`` (one release file spells it ``modality``: accepted).
A JSON file whose top level is not a list is an InputError naming the file.

``access``: "open" (default, the public part), "restricted" or "both". Records: user text is the
question stem only (task templates add the options), ``meta.choices`` the option texts,
``meta.answer`` the letter, ``meta.modality`` a normalised name (xray, ct, mr, us, fundus, oct,
dermoscopy, microscopy, endoscopy, ...; see :func:`normalize_modality`), ids
``omnimedvqa-<question_id>``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterator, Sequence

from medmllm.errors import ConfigError, InputError
from medmllm.data.converters.base import (Skip, SkipItem, check_src, iter_items, load_json, need_image,
                                          plain_extra, req_text, select_splits)
from medmllm.data.records import make_record, media

DATASET = "omnimedvqa"
SPLITS = {"test": "test"}
ACCESS = {"open": ("Open-access",), "restricted": ("Restricted-access",), "both": ("Open-access", "Restricted-access")}
LETTERS = "ABCD"
EXTRA_KEYS = ("question_id", "question_type", "modality_type", "modality", "dataset", "image_path")
_WS = re.compile(r"\s+")
_MODALITY_RULES = (  # (regex on the lower-cased name, medmllm modality), first match wins
    (r"^\s*ct\b|computed tomography", "ct"), (r"^\s*mr\b|^\s*mri\b|magnetic", "mr"), (r"x[\s-]?ray", "xray"),
    (r"ultrasound|^\s*us\b", "us"), (r"^\s*oct\b|optical coherence", "oct"), (r"fundus", "fundus"),
    (r"dermoscop", "dermoscopy"), (r"microscop|patholog|histolog", "microscopy"), (r"endoscop", "endoscopy"),
    (r"colposcop", "colposcopy"), (r"infrared", "infrared"),
)


def normalize_modality(name: str) -> str:
    """``"CT(Computed Tomography)"`` -> ``"ct"``, ``"X-Ray"`` -> ``"xray"``; unknown names lower-cased."""
    low = name.strip().lower()
    for pattern, out in _MODALITY_RULES:
        if re.search(pattern, low):
            return out
    return _WS.sub(" ", low)


def _norm(s: str) -> str:
    return _WS.sub(" ", s).strip().casefold()


def options_of(item: dict, item_id: str, keys: Sequence[str] | None = None) -> list[str]:
    """Option texts in letter order from ``option_A``.. (or ``keys``); SkipItem on a gap or < 2 options."""
    keys = keys or [f"option_{L}" for L in LETTERS]
    texts = [str(item.get(k)).strip() if item.get(k) is not None else "" for k in keys]
    while texts and not texts[-1]:
        texts.pop()
    if len(texts) < 2 or not all(texts):
        raise SkipItem(f"options: expected 2+ non-empty options without gaps in {list(keys)}, got {texts}"[:300],
                       item_id)
    return texts


def letter_of(answer: str, choices: list[str], item_id: str) -> str:
    """The letter of the option whose text is ``answer`` (or ``answer`` itself when it is a valid letter)."""
    hits = [LETTERS[i] for i, c in enumerate(choices) if _norm(c) == _norm(answer)]
    if len(hits) == 1:
        return hits[0]
    if not hits and answer.strip().upper() in LETTERS[:len(choices)] and len(answer.strip()) == 1:
        return answer.strip().upper()
    raise SkipItem(f"gt_answer matches {'several' if hits else 'none'} of the options: {answer!r} vs {choices}"[:300],
                   item_id)


def _root(src: Path) -> Path:
    if (src / "QA_information").is_dir():
        return src
    if (src / "OmniMedVQA" / "QA_information").is_dir():
        return src / "OmniMedVQA"
    raise InputError(src / "QA_information", f"expected the OmniMedVQA folder with QA_information/ in {src}; not found")


def _files(root: Path, access: str) -> list[tuple[str, Path]]:
    if access not in ACCESS:
        raise ConfigError(f"omnimedvqa access: expected one of {sorted(ACCESS)}, got {access!r}")
    out = []
    for folder in ACCESS[access]:
        d = root / "QA_information" / folder
        if not d.is_dir():
            raise InputError(d, f"expected the folder QA_information/{folder} for access={access!r}; not found")
        out += [(folder, p) for p in sorted(d.glob("*.json"))]
    if not out:
        raise InputError(root / "QA_information", f"no <Dataset>.json files for access={access!r}")
    return out


def convert_omnimedvqa(src: Path, *, splits: Sequence[str] | str | None = None,
                       access: str = "open") -> Iterator[dict | Skip]:
    """Yield one multiple-choice record per question of the chosen access part (or a Skip)."""
    src = check_src(src)
    select_splits(splits, SPLITS)
    root = _root(src)
    for folder, path in _files(root, access):
        items = load_json(path, list)

        def build(i: int, item: Any, folder: str = folder, fname: str = path.name) -> dict:
            qid = req_text(item, "question_id")
            rid = f"{DATASET}-{qid}"
            question = req_text(item, "question", rid)
            choices = options_of(item, rid)
            letter = letter_of(req_text(item, "gt_answer", rid), choices, rid)
            image = need_image([root / req_text(item, "image_path", rid)], rid)
            extra = {"source_file": f"{folder}/{fname}", "access": folder, "answer_text": choices[LETTERS.index(letter)],
                     **plain_extra(item, EXTRA_KEYS)}
            meta = {"dataset": DATASET, "split": "test", "task": "mcq", "answer_type": "choice", "answer": letter,
                    "choices": choices, "extra": extra}
            modality = str(item.get("modality_type") or item.get("modality") or "").strip()
            if modality:
                meta["modality"] = normalize_modality(modality)
            return make_record(rid, [media("image", str(image)), question], letter, meta)

        yield from iter_items(items, f"{folder}/{path.name}", build)

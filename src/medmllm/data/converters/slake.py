"""SLAKE (Slake1.0, Liu et al. 2021) -> instruction records.

Official layout under ``src``::

    train.json, validate.json, test.json   lists of {img_id, img_name ("xmlab102/source.jpg"),
                                            question, answer, q_lang ("en"/"zh"), location,
                                            modality ("X-Ray"/"CT"/"MRI"), answer_type
                                            ("OPEN"/"CLOSED"), base_type, content_type, triple, qid}
    imgs/<img_name>

``validate.json`` -> split "validation". ``lang`` keeps "en", "zh" or both (None / "both").
With ``splits=None`` every split file present is converted (at least one must exist).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Sequence

from medmllm.errors import ConfigError
from medmllm.data.converters.base import (Skip, SkipItem, check_src, iter_items, load_json, need_image,
                                          plain_extra, req_text, require_file, select_splits)
from medmllm.data.records import make_record, media

DATASET = "slake"
FILES = {"train": "train.json", "validation": "validate.json", "test": "test.json"}
SPLITS = {"train": "train", "validation": "validation", "validate": "validation", "val": "validation", "test": "test"}
IMAGE_DIR = "imgs"
ANSWER_TYPES = {"CLOSED": "closed", "OPEN": "open"}
MODALITIES = {"X-RAY": "xray", "XRAY": "xray", "CT": "ct", "MRI": "mr", "MR": "mr"}
LANGS = ("en", "zh")
EXTRA_KEYS = ("qid", "img_id", "img_name", "location", "modality", "base_type", "content_type", "triple", "q_lang")


def _langs(lang: str | None) -> tuple[str, ...]:
    if lang is None or lang == "both":
        return LANGS
    if lang not in LANGS:
        raise ConfigError(f"slake lang: expected 'en', 'zh' or 'both', got {lang!r}")
    return (lang,)


def _split_files(src: Path, wanted: list[str], explicit: bool) -> list[tuple[str, Path]]:
    """(split, file) pairs; an explicitly requested missing file, or no file at all, is an InputError."""
    present = [(s, src / FILES[s]) for s in wanted if (src / FILES[s]).is_file()]
    if explicit or not present:
        return [(s, require_file(src, FILES[s])) for s in wanted]
    return present


def convert_slake(src: Path, *, splits: Sequence[str] | str | None = None,
                  lang: str | None = None) -> Iterator[dict | Skip]:
    """Yield one VQA record per question of the selected splits and languages (or a Skip)."""
    src = check_src(src)
    wanted = select_splits(splits, SPLITS)
    langs = _langs(lang)
    img_dir = src / IMAGE_DIR
    for split, path in _split_files(src, wanted, explicit=splits is not None):
        items = load_json(path, list)

        def build(_i: int, item: Any, split: str = split) -> dict | None:
            rid = f"{DATASET}-{split}-{req_text(item, 'qid')}"
            q_lang = req_text(item, "q_lang", rid).lower()
            if q_lang not in langs:
                return None
            question = req_text(item, "question", rid)
            answer = req_text(item, "answer", rid)
            atype = ANSWER_TYPES.get(req_text(item, "answer_type", rid).upper())
            if atype is None:
                raise SkipItem(f"field 'answer_type': expected CLOSED or OPEN, got {item['answer_type']!r}", rid)
            image = need_image([img_dir / req_text(item, "img_name", rid)], rid)
            meta = {"dataset": DATASET, "split": split, "task": "vqa", "answer_type": atype,
                    "answer": answer, "lang": q_lang, "extra": plain_extra(item, EXTRA_KEYS)}
            modality = str(item.get("modality") or "").strip()
            if modality:
                meta["modality"] = MODALITIES.get(modality.upper(), modality.lower())
            organ = str(item.get("location") or "").strip()
            if organ:
                meta["organ"] = organ.lower()
            return make_record(rid, [media("image", str(image)), question], answer, meta)

        yield from iter_items(items, path.name, build)

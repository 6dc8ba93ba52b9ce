"""IU-Xray (Demner-Fushman et al. 2016) in the R2Gen layout -> report-generation records.

Layout under ``src`` (as distributed with R2Gen, Chen et al. 2020)::

    annotation.json   {"train": [...], "val": [...], "test": [...]}; each item
                      {"id": "CXR2384_IM-0942", "report": "...",
                       "image_path": ["CXR2384_IM-0942/0.png", "CXR2384_IM-0942/1.png"], "split": "train"}
    images/<image_path>

The split is the top-level key ("val" -> "validation"). Items whose images are all
missing are skipped; an item with some images present keeps those (order kept).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Sequence

from medmllm.errors import InputError
from medmllm.data.converters.base import (Skip, SkipItem, check_src, find_file, iter_items, load_json, req_text,
                                          require_file, select_splits)
from medmllm.data.records import make_record, media

DATASET = "iu_xray"
ANNOTATION = "annotation.json"
IMAGE_DIR = "images"
KEYS = {"train": "train", "validation": "val", "test": "test"}
SPLITS = {"train": "train", "validation": "validation", "val": "validation", "validate": "validation", "test": "test"}
PROMPT = "Write the findings of the radiology report for these chest X-ray images."


def convert_iu_xray(src: Path, *, splits: Sequence[str] | str | None = None) -> Iterator[dict | Skip]:
    """Yield one report-generation record per study of the selected splits (or a Skip)."""
    src = check_src(src)
    wanted = select_splits(splits, SPLITS)
    ann = require_file(src, ANNOTATION)
    data = load_json(ann, dict)
    if not any(KEYS[s] in data for s in wanted):
        raise InputError(ann, f"expected top-level key(s) {[KEYS[s] for s in wanted]}, found {sorted(data)}")
    for split in wanted:
        items = data.get(KEYS[split], [])
        if not isinstance(items, list):
            raise InputError(ann, f"key {KEYS[split]!r}: expected a list of items, got {type(items).__name__}")

        def build(_i: int, item: Any, split: str = split) -> dict:
            item_id = req_text(item, "id")
            rid = f"{DATASET}-{item_id}"
            report = req_text(item, "report", rid)
            paths = item.get("image_path")
            if not isinstance(paths, list) or not paths or not all(isinstance(p, str) and p for p in paths):
                raise SkipItem(f"field 'image_path': expected a non-empty list of paths, got {paths!r}"[:200], rid)
            found = [(p, f) for p in paths if (f := find_file([src / IMAGE_DIR / p])) is not None]
            if not found:
                raise SkipItem(f"image file not found: {src / IMAGE_DIR / paths[0]}", rid)
            meta = {"dataset": DATASET, "split": split, "task": "report", "answer_type": "report",
                    "modality": "xray", "organ": "chest", "answer": report,
                    "extra": {"case_id": item_id.split("_")[0], "image_path": [p for p, _ in found]}}
            user = [media("image", str(f)) for _, f in found] + [PROMPT]
            return make_record(rid, user, report, meta)

        yield from iter_items(items, f"{ANNOTATION}[{KEYS[split]!r}]", build)

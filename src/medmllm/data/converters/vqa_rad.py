"""VQA-RAD (Lau et al. 2018, OSF release) -> instruction records.

Official layout under ``src``::

    VQA_RAD Dataset Public.json     list of {qid, image_name, image_case_url, image_organ,
                                      answer, answer_type ("CLOSED"/"OPEN"), question_type,
                                      question, phrase_type, evaluation, qid_linked_id, ...}
    VQA_RAD Image Folder/<image_name>

Split: ``phrase_type`` starting with "test" (test_freeform, test_para) -> "test", else "train".
Closed answers are lower-cased (the original is kept in ``meta.extra.answer_original``).
VQA-RAD has no modality field, so ``meta.modality`` is the generic "radiology".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Sequence

from medmllm.data.converters.base import (Skip, SkipItem, check_src, iter_items, load_json, need_image,
                                          plain_extra, req_text, require_file, select_splits)
from medmllm.data.records import make_record, media

DATASET = "vqa_rad"
ANNOTATION = "VQA_RAD Dataset Public.json"
IMAGE_DIR = "VQA_RAD Image Folder"
SPLITS = {"train": "train", "test": "test"}
ANSWER_TYPES = {"CLOSED": "closed", "OPEN": "open"}
ORGANS = {"HEAD": "head", "CHEST": "chest", "ABD": "abdomen"}
EXTRA_KEYS = ("qid", "image_name", "image_case_url", "image_organ", "question_type", "phrase_type",
              "evaluation", "qid_linked_id", "question_rephrase", "question_relation", "question_frame")


def convert_vqa_rad(src: Path, *, splits: Sequence[str] | str | None = None) -> Iterator[dict | Skip]:
    """Yield one VQA record per question (or a Skip). See the module docstring for the layout."""
    src = check_src(src)
    wanted = select_splits(splits, SPLITS)
    ann = require_file(src, ANNOTATION)
    items = load_json(ann, list)
    img_dir = src / IMAGE_DIR

    def build(_i: int, item: Any) -> dict | None:
        qid = req_text(item, "qid")
        rid = f"{DATASET}-{qid}"
        phrase = req_text(item, "phrase_type", rid)
        split = "test" if phrase.lower().startswith("test") else "train"
        if split not in wanted:
            return None
        question = req_text(item, "question", rid)
        answer = req_text(item, "answer", rid)
        atype = ANSWER_TYPES.get(req_text(item, "answer_type", rid).upper())
        if atype is None:
            raise SkipItem(f"field 'answer_type': expected CLOSED or OPEN, got {item['answer_type']!r}", rid)
        image = need_image([img_dir / req_text(item, "image_name", rid)], rid)
        organ_raw = str(item.get("image_organ") or "").strip()
        meta = {"dataset": DATASET, "split": split, "task": "vqa", "answer_type": atype,
                "modality": "radiology", "answer": answer.lower() if atype == "closed" else answer,
                "extra": {**plain_extra(item, EXTRA_KEYS), "answer_original": item["answer"]}}
        if organ_raw:
            meta["organ"] = ORGANS.get(organ_raw.upper(), organ_raw.lower())
        return make_record(rid, [media("image", str(image)), question], meta["answer"], meta)

    yield from iter_items(items, ANNOTATION, build)

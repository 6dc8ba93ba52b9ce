"""VQA-RAD converter: official JSON + image folder -> records, splits by phrase_type."""

from __future__ import annotations

import pytest

from medmllm.data.converters import convert
from medmllm.errors import InputError

from .fixtures import (assert_paths_resolve, assert_stable, assistant_text, by_id, convert_and_load, image_paths,
                       make_vqa_rad, user_text)


@pytest.fixture
def src(tmp_path):
    return make_vqa_rad(tmp_path / "VQA_RAD")


def test_counts_splits_and_skips(src, tmp_path):
    report, records, manifest = convert_and_load("vqa_rad", src, tmp_path / "out" / "vqa_rad.jsonl")
    assert report.kept == {"train": 2, "test": 2}
    assert sorted(r["id"] for r in records) == ["vqa_rad-0", "vqa_rad-1", "vqa_rad-2", "vqa_rad-3"]
    assert manifest["datasets"] == ["vqa_rad"]
    assert manifest["splits"]["train"]["ids"] == ["vqa_rad-0", "vqa_rad-1"]
    assert manifest["splits"]["test"]["ids"] == ["vqa_rad-2", "vqa_rad-3"]
    reasons = dict(report.skipped)
    assert len(report.skipped) == 3
    assert "image file not found" in reasons["vqa_rad-4 (VQA_RAD Dataset Public.json[4])"]
    assert "synpic999.jpg" in reasons["vqa_rad-4 (VQA_RAD Dataset Public.json[4])"]
    assert "'question'" in reasons["vqa_rad-5 (VQA_RAD Dataset Public.json[5])"]
    assert "expected an object" in reasons["VQA_RAD Dataset Public.json[6]"]
    assert "kept 4 records" in str(report) and "skipped 3" in str(report)


def test_meta_and_answers(src, tmp_path):
    out = tmp_path / "out" / "vqa_rad.jsonl"
    _, records, _ = convert_and_load("vqa_rad", src, out)
    recs = by_id(records)
    r0 = recs["vqa_rad-0"]
    assert r0["meta"] == {
        "dataset": "vqa_rad", "split": "train", "task": "vqa", "answer_type": "closed", "modality": "radiology",
        "organ": "head", "answer": "yes",
        "extra": {"qid": 0, "image_name": "synpic100.jpg", "image_case_url": "https://medpix.nlm.nih.gov/case?id=0",
                  "image_organ": "HEAD", "question_type": "PRES", "phrase_type": "freeform",
                  "evaluation": "not evaluated", "qid_linked_id": "link-0", "question_rephrase": "NULL",
                  "question_relation": "NULL", "question_frame": "NULL", "answer_original": "Yes"}}
    assert user_text(r0) == "Are regions of the brain infarcted?"
    assert assistant_text(r0) == "yes"
    assert image_paths(r0, out.parent)[0].samefile(src / "VQA_RAD Image Folder" / "synpic100.jpg")
    # closed answer lower-cased and stripped; the original kept
    assert recs["vqa_rad-2"]["meta"]["answer"] == "no"
    assert recs["vqa_rad-2"]["meta"]["extra"]["answer_original"] == " NO"
    assert recs["vqa_rad-2"]["meta"]["split"] == "test"
    # open answers keep their case; numbers become text; ABD -> abdomen
    assert recs["vqa_rad-1"]["meta"]["answer"] == "Left lung"
    assert recs["vqa_rad-1"]["meta"]["answer_type"] == "open"
    assert recs["vqa_rad-3"]["meta"]["answer"] == "5"
    assert recs["vqa_rad-3"]["meta"]["organ"] == "abdomen"
    assert recs["vqa_rad-3"]["meta"]["extra"]["question_type"] == "COUNT"
    assert_paths_resolve(records, out.parent)


def test_split_selection(src, tmp_path):
    report, records, _ = convert_and_load("vqa_rad", src, tmp_path / "test.jsonl", splits=["test"])
    assert report.kept == {"test": 2}
    assert {r["meta"]["split"] for r in records} == {"test"}


def test_stable(src, tmp_path):
    assert_stable("vqa_rad", src, tmp_path)


def test_missing_annotation(tmp_path):
    (tmp_path / "VQA_RAD Image Folder").mkdir()
    with pytest.raises(InputError) as ei:
        convert("vqa_rad", tmp_path, tmp_path / "out.jsonl")
    assert "VQA_RAD Dataset Public.json" in str(ei.value) and str(tmp_path) in str(ei.value)
    assert not (tmp_path / "out.jsonl").exists()


def test_invalid_json(tmp_path):
    (tmp_path / "VQA_RAD Dataset Public.json").write_text("[{\"qid\": 0,", encoding="utf-8")
    with pytest.raises(InputError, match="not valid JSON"):
        convert("vqa_rad", tmp_path, tmp_path / "out.jsonl")

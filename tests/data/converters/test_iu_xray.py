"""IU-Xray converter (R2Gen annotation.json layout) -> one report record per study."""

from __future__ import annotations

import json

import pytest

from medmllm.data.converters import convert
from medmllm.errors import InputError

from .fixtures import (assert_paths_resolve, assert_stable, assistant_text, by_id, convert_and_load, image_paths,
                       make_iu_xray, user_text)


@pytest.fixture
def src(tmp_path):
    return make_iu_xray(tmp_path / "iu_xray")


def test_counts_and_skips(src, tmp_path):
    out = tmp_path / "iu.jsonl"
    report, records, manifest = convert_and_load("iu_xray", src, out)
    assert report.kept == {"train": 2, "validation": 1}  # both test items skipped
    assert sorted(manifest["splits"]) == ["train", "validation"]
    reasons = dict(report.skipped)
    assert len(reasons) == 2
    assert "image file not found" in reasons["iu_xray-CXR4_1_IM-0004 (annotation.json['test'][0])"]
    assert "'report'" in reasons["iu_xray-CXR5_1_IM-0005 (annotation.json['test'][1])"]
    assert_paths_resolve(records, out.parent)


def test_record(src, tmp_path):
    out = tmp_path / "iu.jsonl"
    _, records, _ = convert_and_load("iu_xray", src, out)
    recs = by_id(records)
    r = recs["iu_xray-CXR1_1_IM-0001"]
    assert r["meta"] == {"dataset": "iu_xray", "split": "train", "task": "report", "answer_type": "report",
                         "modality": "xray", "organ": "chest",
                         "answer": "The heart is normal in size. The lungs are clear.",
                         "extra": {"case_id": "CXR1", "image_path": ["CXR1_1_IM-0001/0.png", "CXR1_1_IM-0001/1.png"]}}
    assert assistant_text(r) == r["meta"]["answer"] and "chest X-ray" in user_text(r)
    assert [p.resolve() for p in image_paths(r, out.parent)] == [
        (src / "images" / "CXR1_1_IM-0001" / f"{k}.png").resolve() for k in (0, 1)]
    # one of two images missing: the present one is kept
    r2 = recs["iu_xray-CXR2_1_IM-0002"]
    assert r2["meta"]["extra"]["image_path"] == ["CXR2_1_IM-0002/0.png"] and len(image_paths(r2, out.parent)) == 1
    assert recs["iu_xray-CXR3_1_IM-0003"]["meta"]["split"] == "validation"


def test_stable(src, tmp_path):
    assert_stable("iu_xray", src, tmp_path)


def test_missing_and_bad_annotation(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(InputError) as ei:
        convert("iu_xray", tmp_path, tmp_path / "x.jsonl")
    assert "annotation.json" in str(ei.value) and str(tmp_path) in str(ei.value)
    (tmp_path / "annotation.json").write_text(json.dumps([{"id": "x"}]))
    with pytest.raises(InputError, match="JSON dict"):
        convert("iu_xray", tmp_path, tmp_path / "x.jsonl")
    (tmp_path / "annotation.json").write_text(json.dumps({"training": []}))
    with pytest.raises(InputError, match="top-level key"):
        convert("iu_xray", tmp_path, tmp_path / "x.jsonl")

"""SLAKE converter: train/validate/test JSON + imgs/ -> records; language filter; modality names."""

from __future__ import annotations

import pytest

from medmllm.data.converters import convert
from medmllm.errors import ConfigError, InputError

from .fixtures import (assert_paths_resolve, assert_stable, assistant_text, by_id, convert_and_load, image_paths,
                       make_slake, user_text)


@pytest.fixture
def src(tmp_path):
    return make_slake(tmp_path / "Slake1.0")


def test_counts_and_skips(src, tmp_path):
    out = tmp_path / "slake.jsonl"
    report, records, manifest = convert_and_load("slake", src, out)
    assert report.kept == {"train": 2, "validation": 1, "test": 1}
    assert set(manifest["splits"]) == {"train", "validation", "test"}
    assert manifest["splits"]["validation"]["ids"] == ["slake-validation-10"]
    reasons = dict(report.skipped)
    assert len(reasons) == 2
    assert "image file not found" in reasons["slake-train-3 (train.json[2])"]
    assert "answer_type" in reasons["slake-test-21 (test.json[1])"] and "MAYBE" in reasons["slake-test-21 (test.json[1])"]
    assert_paths_resolve(records, out.parent)


def test_meta_fields(src, tmp_path):
    out = tmp_path / "slake.jsonl"
    _, records, _ = convert_and_load("slake", src, out)
    recs = by_id(records)
    r = recs["slake-train-1"]
    assert r["meta"] == {
        "dataset": "slake", "split": "train", "task": "vqa", "answer_type": "closed", "answer": "Yes", "lang": "en",
        "modality": "xray", "organ": "lung",
        "extra": {"qid": 1, "img_id": 1, "img_name": "xmlab1/source.jpg", "location": "Lung", "modality": "X-Ray",
                  "base_type": "vqa", "content_type": "Abnormality", "triple": ["vhead", "_", "_"], "q_lang": "en"}}
    assert user_text(r) == "Is the lung healthy?" and assistant_text(r) == "Yes"
    assert image_paths(r, out.parent)[0].samefile(src / "imgs" / "xmlab1" / "source.jpg")
    zh = recs["slake-train-2"]
    assert (zh["meta"]["lang"], zh["meta"]["modality"], zh["meta"]["organ"]) == ("zh", "ct", "腹部")
    assert assistant_text(zh) == "肝脏" and user_text(zh) == "图中最大的器官是什么?"
    assert recs["slake-validation-10"]["meta"]["modality"] == "mr"


@pytest.mark.parametrize("lang, expected", [("en", {"slake-train-1"}), ("zh", {"slake-train-2"}),
                                            ("both", {"slake-train-1", "slake-train-2"})])
def test_lang_filter(src, tmp_path, lang, expected):
    report, records, _ = convert_and_load("slake", src, tmp_path / "l.jsonl", splits=["train"], lang=lang)
    assert {r["id"] for r in records} == expected
    assert all(r["meta"]["lang"] == lang for r in records) or lang == "both"


def test_bad_lang_and_split(src, tmp_path):
    with pytest.raises(ConfigError, match="lang"):
        convert("slake", src, tmp_path / "x.jsonl", lang="fr")
    with pytest.raises(ConfigError, match="unknown split"):
        convert("slake", src, tmp_path / "x.jsonl", splits=["dev"])


def test_validate_alias(src, tmp_path):
    report, _, _ = convert_and_load("slake", src, tmp_path / "v.jsonl", splits="validate")
    assert report.kept == {"validation": 1}


def test_stable(src, tmp_path):
    assert_stable("slake", src, tmp_path)


def test_missing_files(src, tmp_path):
    (src / "test.json").unlink()
    # default: the present split files are converted
    report, _, _ = convert_and_load("slake", src, tmp_path / "a.jsonl")
    assert set(report.kept) == {"train", "validation"}
    # an explicitly requested split whose file is missing names the file
    with pytest.raises(InputError) as ei:
        convert("slake", src, tmp_path / "b.jsonl", splits=["test"])
    assert "test.json" in str(ei.value) and str(src) in str(ei.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="train.json"):
        convert("slake", empty, tmp_path / "c.jsonl")

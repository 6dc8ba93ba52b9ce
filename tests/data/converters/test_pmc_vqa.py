"""PMC-VQA converter: CSV sources -> multiple-choice records; test vs test_clean kept apart."""

from __future__ import annotations

import pytest

from medmllm.data.converters import convert
from medmllm.data.converters.pmc_vqa import answer_letter, strip_choice
from medmllm.data.records import to_hf_dataset
from medmllm.errors import ConfigError, InputError

from .fixtures import (assert_paths_resolve, assert_stable, assistant_text, by_id, convert_and_load, image_paths,
                       make_pmc_vqa, user_text)


@pytest.fixture
def src(tmp_path):
    return make_pmc_vqa(tmp_path / "PMC-VQA")


def test_default_sources_and_skips(src, tmp_path):
    out = tmp_path / "pmc.jsonl"
    report, records, manifest = convert_and_load("pmc_vqa", src, out)
    assert report.kept == {"train": 2, "test": 1}
    assert manifest["splits"]["test"]["ids"] == ["pmc_vqa-test-000000"]
    reasons = dict(report.skipped)
    assert len(reasons) == 2
    assert "image file not found" in reasons["pmc_vqa-train-000002 (train.csv[2])"]
    assert "matches none of the choices" in reasons["pmc_vqa-train-000003 (train.csv[3])"]
    assert_paths_resolve(records, out.parent)


def test_meta_prompt_and_letters(src, tmp_path):
    out = tmp_path / "pmc.jsonl"
    _, records, _ = convert_and_load("pmc_vqa", src, out)
    recs = by_id(records)
    r = recs["pmc_vqa-train-000000"]
    assert r["meta"] == {"dataset": "pmc_vqa", "split": "train", "task": "mcq", "answer_type": "choice",
                         "answer": "B", "choices": ["Axial view", "Coronal view", "Sagittal view", "Oblique view"],
                         "extra": {"source_file": "train.csv", "row": 0, "figure_path": "PMC1_F1.jpg",
                                   "answer_text": "Coronal view", "caption": "Axial CT, contrast.",
                                   "split_column": "train"}}
    prompt = user_text(r)
    assert prompt.startswith("Which view is shown?\nA: Axial view\nB: Coronal view\nC: Sagittal view\nD: Oblique view")
    assert assistant_text(r) == "B"
    assert image_paths(r, out.parent)[0].samefile(src / "images" / "PMC1_F1.jpg")
    assert recs["pmc_vqa-train-000001"]["meta"]["answer"] == "C"           # Answer given as a letter
    assert recs["pmc_vqa-test-000000"]["meta"]["answer"] == "D"            # "D:Oblique"
    # image found under figures/
    assert image_paths(recs["pmc_vqa-test-000000"], out.parent)[0].samefile(src / "figures" / "PMC3_F3.jpg")


def test_test_clean_is_its_own_test_set(src, tmp_path):
    _, test, m_test = convert_and_load("pmc_vqa", src, tmp_path / "t.jsonl", splits=["test"])
    rep, clean, m_clean = convert_and_load("pmc_vqa", src, tmp_path / "tc.jsonl", splits=["test_clean"])
    assert rep.kept == {"test": 1}
    (c,) = clean
    assert c["id"] == "pmc_vqa-test_clean-000000"
    assert c["meta"]["split"] == "test" and c["meta"]["extra"]["source_file"] == "test_clean.csv"
    assert c["meta"]["answer"] == "A" and c["meta"]["extra"]["answer_label"] == "A"
    assert test[0]["meta"]["extra"]["source_file"] == "test.csv"
    assert m_test["splits"]["test"]["hash"] != m_clean["splits"]["test"]["hash"]
    with pytest.raises(ConfigError, match="test_clean"):
        convert("pmc_vqa", src, tmp_path / "both.jsonl", splits=["test", "test_clean"])


def test_hf_dataset(src, tmp_path):
    out = tmp_path / "pmc.jsonl"
    _, records, _ = convert_and_load("pmc_vqa", src, out)
    ds = to_hf_dataset(records)
    assert len(ds) == 3
    row = ds[[r["id"] for r in records].index("pmc_vqa-train-000000")]
    assert row["meta"]["choices"] == ["Axial view", "Coronal view", "Sagittal view", "Oblique view"]
    assert row["meta"]["answer"] == "B"


@pytest.mark.parametrize("cell, letter, expected", [
    ("A:Axial view", "A", "Axial view"), (" A: CT", "A", "CT"), ("a：MRI", "A", "MRI"),
    ("C. difficile colitis", "C", "C. difficile colitis"), ("B:PET", "A", "B:PET"), ("Plain", "D", "Plain"),
])
def test_strip_choice(cell, letter, expected):
    assert strip_choice(cell, letter) == expected


def test_answer_letter():
    choices = ["Axial", "Coronal", "C. difficile", "Oblique"]
    assert answer_letter("coronal ", "", choices) == "B"
    assert answer_letter("C. difficile", "", choices) == "C"
    assert answer_letter("d", "", choices) == "D"
    assert answer_letter("A:Axial", "", choices) == "A"
    assert answer_letter("whatever", "b", choices) == "B"


def test_stable(src, tmp_path):
    assert_stable("pmc_vqa", src, tmp_path)


def test_missing_csv(src, tmp_path):
    (src / "test_clean.csv").unlink()
    with pytest.raises(InputError) as ei:
        convert("pmc_vqa", src, tmp_path / "x.jsonl", splits=["test_clean"])
    assert "test_clean.csv" in str(ei.value) and str(src) in str(ei.value)


def test_missing_column(src, tmp_path):
    (src / "test.csv").write_text("Figure_path,Question,Answer\nx.jpg,q,a\n", encoding="utf-8")
    with pytest.raises(InputError, match="Choice A"):
        convert("pmc_vqa", src, tmp_path / "x.jsonl", splits=["test"])

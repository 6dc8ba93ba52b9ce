"""MedXpertQA MM converter: MM/{dev,test}.jsonl + images/ -> choice records with the stem only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medmllm.data.converters import convert
from medmllm.data.converters.medxpertqa import question_stem
from medmllm.errors import ConfigError, InputError
from medmllm.eval.protocols import PROTOCOLS
from medmllm.eval.tasks import load_task

from .fixtures import (assert_paths_resolve, assert_stable, assistant_text, by_id, convert_and_load, image_paths,
                       user_text, write_image)

OPTS = {"A": "Osteosarcoma", "B": "Ewing sarcoma", "C": "Osteochondroma", "D": "Enchondroma", "E": "Giant cell tumor"}
STEM = "A 14-year-old boy presents with knee pain. Based on the radiograph, what is the most likely diagnosis?"
FULL = STEM + "\nAnswer Choices: (A) Osteosarcoma (B) Ewing sarcoma (C) Osteochondroma (D) Enchondroma (E) Giant cell tumor"


def _item(i, label="A", images=None, options=OPTS, question=FULL, **kw):
    d = {"id": f"MM-{i}", "question": question, "options": options, "label": label,
         "images": images if images is not None else [f"MM-{i}-a.jpeg"], "medical_task": "Diagnosis",
         "body_system": "Skeletal", "question_type": "Reasoning"}
    d.update(kw)
    return d


def make_medxpertqa(root: Path) -> Path:
    """test: MM-0 (1 image), MM-1 (2 images, one under MM/images), MM-2 (image missing), MM-3 (label F),
    MM-4 (options B..F), a non-JSON line; dev: MM-100 (question without a choices block)."""
    write_image(root / "images" / "MM-0-a.jpeg", 70)
    write_image(root / "images" / "MM-1-a.jpeg", 71)
    write_image(root / "MM" / "images" / "MM-1-b.png", 72)
    write_image(root / "images" / "MM-100-a.jpeg", 73)
    lines = [json.dumps(_item(0, "C")), json.dumps(_item(1, "E", images=["MM-1-a.jpeg", "MM-1-b.png"])), "",
             json.dumps(_item(2)), json.dumps(_item(3, "F")),
             json.dumps(_item(4, options={k: v for k, v in zip("BCDEF", OPTS.values())})), "{not json"]
    (root / "MM").mkdir(parents=True, exist_ok=True)
    (root / "MM" / "test.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (root / "MM" / "dev.jsonl").write_text(json.dumps(_item(100, "B", question="What is shown?")) + "\n",
                                           encoding="utf-8")
    return root


@pytest.fixture
def src(tmp_path):
    return make_medxpertqa(tmp_path / "MedXpertQA")


def test_counts_and_skips(src, tmp_path):
    out = tmp_path / "mx.jsonl"
    report, records, manifest = convert_and_load("medxpertqa_mm", src, out, splits=["dev", "test"])
    assert report.kept == {"validation": 1, "test": 2}
    assert manifest["splits"]["test"]["ids"] == ["medxpertqa_mm-MM-0", "medxpertqa_mm-MM-1"]
    reasons = dict(report.skipped)
    assert len(reasons) == 4
    assert "image file not found" in reasons["medxpertqa_mm-MM-2 (MM/test.jsonl[2])"]
    assert "'label'" in reasons["medxpertqa_mm-MM-3 (MM/test.jsonl[3])"]
    assert "consecutive letters from A" in reasons["medxpertqa_mm-MM-4 (MM/test.jsonl[4])"]
    assert "line 7: not valid JSON" in reasons["MM/test.jsonl[5]"]          # 7th line (the blank 3rd counts)
    assert_paths_resolve(records, out.parent)


def test_record_fields(src, tmp_path):
    out = tmp_path / "mx.jsonl"
    _, records, _ = convert_and_load("medxpertqa_mm", src, out, splits="dev,test")
    recs = by_id(records)
    r = recs["medxpertqa_mm-MM-0"]
    assert user_text(r) == STEM                                              # "Answer Choices:" block cut
    assert r["meta"]["extra"]["question_with_choices"] == FULL
    assert r["meta"]["choices"] == list(OPTS.values()) and r["meta"]["answer"] == "C" == assistant_text(r)
    assert {k: r["meta"]["extra"][k] for k in ("medical_task", "body_system", "question_type")} == \
        {"medical_task": "Diagnosis", "body_system": "Skeletal", "question_type": "Reasoning"}
    two = image_paths(recs["medxpertqa_mm-MM-1"], out.parent)
    assert [p.name for p in two] == ["MM-1-a.jpeg", "MM-1-b.png"]
    assert two[1].samefile(src / "MM" / "images" / "MM-1-b.png")
    dev = recs["medxpertqa_mm-MM-100"]
    assert dev["meta"]["split"] == "validation" and user_text(dev) == "What is shown?"


def test_split_selection(src, tmp_path):
    report, _, _ = convert_and_load("medxpertqa_mm", src, tmp_path / "t.jsonl")      # default: test only
    assert report.kept == {"test": 2}
    (src / "MM" / "dev.jsonl").unlink()
    with pytest.raises(InputError, match="MM/dev.jsonl"):
        convert("medxpertqa_mm", src, tmp_path / "d.jsonl", splits=["dev"])
    with pytest.raises(ConfigError, match="unknown split"):
        convert("medxpertqa_mm", src, tmp_path / "d.jsonl", splits=["train"])
    assert_stable("medxpertqa_mm", src, tmp_path)


def test_missing_source(tmp_path):
    with pytest.raises(InputError, match="MM/"):
        convert("medxpertqa_mm", tmp_path, tmp_path / "x.jsonl")


@pytest.mark.parametrize("q, stem", [(FULL, STEM), ("Plain question?", "Plain question?"),
                                     ("Q?\nanswer choices: (A) x (B) y", "Q?")])
def test_question_stem(q, stem):
    assert question_stem(q) == stem


def test_task_yaml_reads_the_records(src, tmp_path):
    task = load_task("medxpertqa_mm")
    _, records, _ = convert_and_load("medxpertqa_mm", src, tmp_path / task.data.records)
    assert records and task.select(records) == records
    r = by_id(records)["medxpertqa_mm-MM-0"]
    assert task.build_prompt(r) == (STEM + "\nA. Osteosarcoma\nB. Ewing sarcoma\nC. Osteochondroma\nD. Enchondroma\n"
                                    "E. Giant cell tumor\nAnswer with the option's letter from the given choices "
                                    "directly.")
    assert PROTOCOLS.get("mcq").score("The answer is C.", r["meta"])["correct"] == 1

"""OmniMedVQA converter: QA_information/<access>/<Dataset>.json + Images/ -> choice records the task reads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medmllm.data.converters import convert
from medmllm.data.converters.omnimedvqa import normalize_modality
from medmllm.errors import ConfigError, InputError
from medmllm.eval.protocols import PROTOCOLS
from medmllm.eval.tasks import load_task

from .fixtures import (assert_paths_resolve, assert_stable, assistant_text, by_id, convert_and_load, image_paths,
                       user_text, write_image)


def _item(qid, dataset, answer, opts, image, modality="X-Ray", question="What is shown?", key="modality_type"):
    d = {"dataset": dataset, "question_id": qid, "question_type": "Disease Diagnosis", "question": question,
         "gt_answer": answer, "image_path": image, key: modality}
    d.update({f"option_{L}": o for L, o in zip("ABCD", opts)})
    return d


def make_omnimedvqa(root: Path) -> Path:
    """Open-access: Chest.json (3 good incl. a 2-option one, 1 missing image, 1 answer not an option,
    1 gap in the options), Fundus.json (1 good, `modality` spelling); Restricted-access: Path.json (1 good)."""
    for seed, rel in enumerate(["Images/Chest/a.png", "Images/Chest/b.png", "Images/Fundus/f.jpg",
                                "Images/Path/p.png"]):
        write_image(root / rel, 60 + seed)
    gap = _item("Chest_0005", "Chest", "Yes", ["Yes", "No"], "Images/Chest/a.png")
    gap["option_C"], gap["option_D"] = "", "Maybe"
    chest = [
        _item("Chest_0000", "Chest", "Pneumonia", ["Normal", "pneumonia ", "Effusion", "Nodule"], "Images/Chest/a.png",
              question="What disease is shown in this chest X-ray?"),
        _item("Chest_0001", "Chest", "No", ["Yes", "No"], "Images/Chest/b.png", question="Is this image normal?"),
        _item("Chest_0002", "Chest", "CT", ["MR", "X-ray", "CT"], "Images/Chest/a.png",
              modality="CT(Computed Tomography)"),
        _item("Chest_0003", "Chest", "Normal", ["Normal", "Abnormal"], "Images/Chest/zzz.png"),
        _item("Chest_0004", "Chest", "Cancer", ["Normal", "Abnormal"], "Images/Chest/a.png"),
        gap,
    ]
    (root / "QA_information" / "Open-access").mkdir(parents=True)
    (root / "QA_information" / "Restricted-access").mkdir(parents=True)
    (root / "QA_information" / "Open-access" / "Chest.json").write_text(json.dumps(chest), encoding="utf-8")
    (root / "QA_information" / "Open-access" / "Fundus.json").write_text(json.dumps([
        _item("Fundus_0000", "Fundus", "Glaucoma", ["Glaucoma", "Normal"], "Images/Fundus/f.jpg",
              modality="Fundus Photography", key="modality")]), encoding="utf-8")
    (root / "QA_information" / "Restricted-access" / "Path.json").write_text(json.dumps([
        _item("Path_0000", "Path", "Tumor", ["Normal", "Tumor"], "Images/Path/p.png",
              modality="Microscopy Images")]), encoding="utf-8")
    return root


@pytest.fixture
def src(tmp_path):
    return make_omnimedvqa(tmp_path / "OmniMedVQA")


def test_counts_skips_and_paths(src, tmp_path):
    out = tmp_path / "omni" / "test.jsonl"
    report, records, manifest = convert_and_load("omnimedvqa", src, out)
    assert report.kept == {"test": 4}
    assert manifest["splits"]["test"]["ids"] == ["omnimedvqa-Chest_0000", "omnimedvqa-Chest_0001",
                                                 "omnimedvqa-Chest_0002", "omnimedvqa-Fundus_0000"]
    reasons = dict(report.skipped)
    assert len(reasons) == 3
    assert "image file not found" in reasons["omnimedvqa-Chest_0003 (Open-access/Chest.json[3])"]
    assert "matches none of the options" in reasons["omnimedvqa-Chest_0004 (Open-access/Chest.json[4])"]
    assert "without gaps" in reasons["omnimedvqa-Chest_0005 (Open-access/Chest.json[5])"]
    assert_paths_resolve(records, out.parent)


def test_record_fields(src, tmp_path):
    out = tmp_path / "test.jsonl"
    _, records, _ = convert_and_load("omnimedvqa", src, out)
    recs = by_id(records)
    r = recs["omnimedvqa-Chest_0000"]
    assert r["meta"]["answer"] == "B" and assistant_text(r) == "B"    # "Pneumonia" == "pneumonia " (case, spaces)
    assert r["meta"]["choices"] == ["Normal", "pneumonia", "Effusion", "Nodule"]
    assert (r["meta"]["split"], r["meta"]["answer_type"], r["meta"]["modality"]) == ("test", "choice", "xray")
    assert r["meta"]["extra"]["question_type"] == "Disease Diagnosis"
    assert r["meta"]["extra"]["source_file"] == "Open-access/Chest.json"
    assert user_text(r) == "What disease is shown in this chest X-ray?"        # stem only, no options
    assert image_paths(r, out.parent)[0].samefile(src / "Images" / "Chest" / "a.png")
    assert recs["omnimedvqa-Chest_0001"]["meta"]["choices"] == ["Yes", "No"]
    assert recs["omnimedvqa-Chest_0002"]["meta"]["answer"] == "C"
    assert recs["omnimedvqa-Chest_0002"]["meta"]["modality"] == "ct"
    assert recs["omnimedvqa-Fundus_0000"]["meta"]["modality"] == "fundus"     # read from the `modality` spelling


def test_access_option(src, tmp_path):
    report, records, _ = convert_and_load("omnimedvqa", src, tmp_path / "r.jsonl", access="restricted")
    assert [r["id"] for r in records] == ["omnimedvqa-Path_0000"]
    assert records[0]["meta"]["modality"] == "microscopy" and records[0]["meta"]["answer"] == "B"
    report, _, _ = convert_and_load("omnimedvqa", src, tmp_path / "b.jsonl", access="both")
    assert report.kept == {"test": 5}
    with pytest.raises(ConfigError, match="access"):
        convert("omnimedvqa", src, tmp_path / "x.jsonl", access="public")
    with pytest.raises(ConfigError, match="split"):
        convert("omnimedvqa", src, tmp_path / "x.jsonl", splits=["train"])


def test_parent_folder_accepted_and_stable(src, tmp_path):
    report, _, _ = convert_and_load("omnimedvqa", src.parent, tmp_path / "p.jsonl")
    assert report.total == 4
    assert_stable("omnimedvqa", src, tmp_path)


def test_whole_file_problems(tmp_path):
    with pytest.raises(InputError, match="QA_information"):
        convert("omnimedvqa", tmp_path, tmp_path / "x.jsonl")
    bad = tmp_path / "bad"
    (bad / "QA_information" / "Open-access").mkdir(parents=True)
    (bad / "QA_information" / "Open-access" / "X.json").write_text('{"not": "a list"}', encoding="utf-8")
    with pytest.raises(InputError, match=r"X\.json.*expected a JSON list"):
        convert("omnimedvqa", bad, tmp_path / "x.jsonl")


def test_task_yaml_reads_the_records(src, tmp_path):
    """tasks/omnimedvqa.yaml: split test, choice records, prompt = stem + lettered options; mcq scores the gold."""
    task = load_task("omnimedvqa")
    _, records, _ = convert_and_load("omnimedvqa", src, tmp_path / task.data.records)
    assert all(r["meta"]["split"] == task.data.split for r in records)
    assert task.select(records) == records
    r = by_id(records)["omnimedvqa-Chest_0001"]
    assert task.build_prompt(r) == ("Is this image normal?\nA. Yes\nB. No\n"
                                    "Answer with the option's letter from the given choices directly.")
    mcq = PROTOCOLS.get("mcq")
    assert mcq.score("B", r["meta"])["correct"] == 1 and mcq.score("A", r["meta"])["correct"] == 0


@pytest.mark.parametrize("name, expected", [("CT(Computed Tomography)", "ct"), ("MR (Mag-netic Resonance Imaging)", "mr"),
                                            ("X-Ray", "xray"), ("ultrasound", "us"), ("Dermoscopy", "dermoscopy"),
                                            ("OCT (Optical Coherence Tomography", "oct"),
                                            ("Microscopy Images", "microscopy"), ("Something  New", "something new")])
def test_normalize_modality(name, expected):
    assert normalize_modality(name) == expected

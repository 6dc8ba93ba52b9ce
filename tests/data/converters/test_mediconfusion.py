"""MediConfusion converter: data/dataset.json + data/images/<local>.jpg -> two choice records per pair."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medmllm.data.converters import convert
from medmllm.errors import InputError
from medmllm.eval.tasks import load_task

from .fixtures import assert_paths_resolve, assert_stable, by_id, convert_and_load, image_paths, user_text, write_image


def _pair(im1, im2, l1, l2, c1="A", c2="B", question="What is the primary abnormality visible in the image?"):
    return {"im_1": im1, "im_2": im2, "im_1_local": l1, "im_2_local": l2, "cap_1": "caption one says A",
            "cap_2": "caption two says B", "category_1": ["Cerebral", "Vascular"], "category_2": ["Cerebral"],
            "BiomedCLIP_sim": 0.92, "DINO_sim": 0.67, "question": question,
            "option_A": "Total occlusion", "option_B": "Aneurysm", "im_1_correct": c1, "im_2_correct": c2,
            "AI_question": question, "AI_option_A": "Total occlusion", "AI_option_B": "Aneurysm"}


def make_mediconfusion(root: Path) -> Path:
    """10001 (local images), 10002 (ROCO copy only, answers B/A), 10003 (image 2 missing),
    10004 (both answers A), 10010 ("option_B" empty)."""
    data = root / "data"
    write_image(data / "images" / "20192.jpg", 90)
    write_image(data / "images" / "20053.jpg", 91)
    write_image(root / "roco-dataset" / "data" / "train" / "radiology" / "images" / "ROCO_38225.jpg", 92)
    write_image(root / "roco-dataset" / "data" / "test" / "radiology" / "images" / "ROCO_43209.jpg", 93)
    bad_opt = _pair("train/radiology/images/ROCO_28778.jpg", "train/radiology/images/ROCO_62117.jpg", 20192, 20053)
    bad_opt["option_B"] = ""
    pairs = {
        "10001": _pair("train/radiology/images/ROCO_28778.jpg", "train/radiology/images/ROCO_62117.jpg", 20192, 20053),
        "10002": _pair("train/radiology/images/ROCO_38225.jpg", "test/radiology/images/ROCO_43209.jpg", 29999, 29998,
                       "B", "A", question="Which vessel is affected?"),
        "10003": _pair("train/radiology/images/ROCO_28778.jpg", "train/radiology/images/ROCO_00000.jpg", 20192, 29997),
        "10004": _pair("train/radiology/images/ROCO_28778.jpg", "train/radiology/images/ROCO_62117.jpg", 20192, 20053,
                       "A", "A"),
        "10010": bad_opt,
    }
    (data / "dataset.json").write_text(json.dumps(pairs, indent=1), encoding="utf-8")
    return root


@pytest.fixture
def src(tmp_path):
    return make_mediconfusion(tmp_path / "MediConfusion")


def test_counts_and_skips(src, tmp_path):
    out = tmp_path / "mc.jsonl"
    report, records, manifest = convert_and_load("mediconfusion", src, out)
    assert report.kept == {"test": 4}
    assert manifest["splits"]["test"]["ids"] == ["mediconfusion-10001-1", "mediconfusion-10001-2",
                                                 "mediconfusion-10002-1", "mediconfusion-10002-2"]
    reasons = dict(report.skipped)
    assert len(reasons) == 3                                       # a broken pair is skipped whole
    assert "image 2 not found" in reasons["mediconfusion-10003 (dataset.json['10003'])"]
    assert "different" in reasons["mediconfusion-10004 (dataset.json['10004'])"]
    assert "option_B" in reasons["mediconfusion-10010 (dataset.json['10010'])"]
    assert_paths_resolve(records, out.parent)


def test_pair_records(src, tmp_path):
    out = tmp_path / "mc.jsonl"
    _, records, _ = convert_and_load("mediconfusion", src, out)
    recs = by_id(records)
    a, b = recs["mediconfusion-10001-1"], recs["mediconfusion-10001-2"]
    assert (a["meta"]["answer"], b["meta"]["answer"]) == ("A", "B")
    assert a["meta"]["choices"] == b["meta"]["choices"] == ["Total occlusion", "Aneurysm"]
    assert user_text(a) == user_text(b) == "What is the primary abnormality visible in the image?"
    assert a["meta"]["extra"]["pair_id"] == b["meta"]["extra"]["pair_id"] == "10001"
    assert (a["meta"]["extra"]["image"], b["meta"]["extra"]["image"]) == (1, 2)
    assert a["meta"]["extra"]["categories"] == ["Cerebral", "Vascular"]
    assert "caption" not in json.dumps(a["meta"])                    # captions state the answer: not copied
    assert image_paths(a, out.parent)[0].samefile(src / "data" / "images" / "20192.jpg")
    roco = image_paths(recs["mediconfusion-10002-2"], out.parent)[0]
    assert roco.samefile(src / "roco-dataset" / "data" / "test" / "radiology" / "images" / "ROCO_43209.jpg")
    assert (recs["mediconfusion-10002-1"]["meta"]["answer"], recs["mediconfusion-10002-2"]["meta"]["answer"]) == \
        ("B", "A")


def test_data_folder_accepted_and_stable(src, tmp_path):
    # the data/ folder itself: images under data/images still found, ROCO copies under src/ are not
    report, _, _ = convert_and_load("mediconfusion", src / "data", tmp_path / "d.jsonl")
    assert report.kept == {"test": 2}
    assert_stable("mediconfusion", src, tmp_path)


def test_missing_or_bad_annotation(tmp_path):
    with pytest.raises(InputError, match="dataset.json"):
        convert("mediconfusion", tmp_path, tmp_path / "x.jsonl")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "dataset.json").write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(InputError, match="expected a JSON dict"):
        convert("mediconfusion", tmp_path, tmp_path / "x.jsonl")


def test_task_yaml_reads_the_records(src, tmp_path):
    task = load_task("mediconfusion")
    _, records, _ = convert_and_load("mediconfusion", src, tmp_path / task.data.records)
    assert task.select(records) == records and all(r["meta"]["split"] == task.data.split for r in records)
    assert task.build_prompt(records[0]) == ("What is the primary abnormality visible in the image?\n"
                                             "A. Total occlusion\nB. Aneurysm\n"
                                             "Answer with the option's letter from the given choices directly.")

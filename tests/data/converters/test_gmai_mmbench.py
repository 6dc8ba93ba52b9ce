"""GMAI-MMBench converter: VLMEvalKit TSV (base64 images) -> choice records; images decoded once."""

from __future__ import annotations

import base64
import csv
import io
from pathlib import Path

import numpy as np
import pytest

from medmllm.data.converters import convert
from medmllm.errors import InputError
from medmllm.eval.protocols import PROTOCOLS
from medmllm.eval.tasks import load_task

from .fixtures import assert_paths_resolve, assert_stable, by_id, convert_and_load, image_paths, user_text

HEADER = ["index", "question", "A", "B", "C", "D", "E", "answer", "image", "category", "clinical VQA task",
          "department", "perceptual granularity", "modality"]


def _png_b64(seed: int, fmt: str = "PNG") -> tuple[str, bytes]:
    from PIL import Image

    arr = np.random.default_rng(seed).integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode(), buf.getvalue()


IMG0, IMG0_BYTES = _png_b64(80)
IMG1, IMG1_BYTES = _png_b64(81, "JPEG")


def _row(index, question, opts, answer, image, modality="CT", header=HEADER):
    cells = {"index": index, "question": question, "answer": answer, "image": image, "category": "Lung",
             "clinical VQA task": "Disease Diagnosis", "department": "Pulmonary Medicine",
             "perceptual granularity": "Image Level", "modality": modality}
    cells.update({L: o for L, o in zip("ABCDE", opts)})
    return [cells.get(h, "") for h in header]


def _write_tsv(path: Path, header: list[str], rows: list[list]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, delimiter="\t")
        w.writerow(header)
        w.writerows(rows)


def make_gmai(root: Path) -> Path:
    """VAL: 0 (PNG, 4 options, answer B), 1 (JPEG, 2 options, MR), 2 (reference to index 0's image,
    answer "A,C"), 3 (answer E not an option), 4 (undecodable image), 5 (gap in options);
    TEST part 1: 10 (no answer column)."""
    _write_tsv(root / "GMAI-MMBench_VAL.tsv", HEADER, [
        _row(0, "Which disease is shown in this CT image?", ["Pneumonia", "Nodule", "Normal", "Effusion"], "B", IMG0),
        _row(1, "Which organ is shown?", ["Brain", "Liver"], "A", IMG1, modality="MR"),
        _row(2, "Which findings are present?", ["Nodule", "Effusion", "Mass"], "A,C", "0"),
        _row(3, "Which one?", ["x", "y"], "E", IMG0),
        _row(4, "Which one?", ["x", "y"], "A", "bm90IGFuIGltYWdl" * 8),
        _row(5, "Which one?", ["x", "", "z"], "A", IMG0),
    ])
    test_header = [h for h in HEADER if h != "answer"]
    _write_tsv(root / "GMAI_mm_bench_TEST_part_1.tsv", test_header,
               [_row(10, "Which view?", ["Axial", "Coronal"], None, IMG1, header=test_header)])
    return root


@pytest.fixture
def src(tmp_path):
    return make_gmai(tmp_path / "GMAI-MMBench")


def test_validation_counts_skips_and_images(src, tmp_path):
    out = tmp_path / "gmai.jsonl"
    report, records, manifest = convert_and_load("gmai_mmbench", src, out)
    assert report.kept == {"validation": 3}
    assert manifest["splits"]["validation"]["ids"] == ["gmai_mmbench-validation-0", "gmai_mmbench-validation-1",
                                                       "gmai_mmbench-validation-2"]
    reasons = dict(report.skipped)
    assert len(reasons) == 3
    assert "'answer'" in reasons["gmai_mmbench-validation-3 (GMAI-MMBench_VAL.tsv[3])"]
    assert "PNG or JPEG" in reasons["gmai_mmbench-validation-4 (GMAI-MMBench_VAL.tsv[4])"]
    assert "without gaps" in reasons["gmai_mmbench-validation-5 (GMAI-MMBench_VAL.tsv[5])"]
    assert_paths_resolve(records, out.parent)
    recs = by_id(records)
    img_dir = src / "images" / "GMAI-MMBench_VAL"
    p0 = image_paths(recs["gmai_mmbench-validation-0"], out.parent)[0]
    assert p0.samefile(img_dir / "0.png") and p0.read_bytes() == IMG0_BYTES       # decoded bytes, unchanged
    assert image_paths(recs["gmai_mmbench-validation-1"], out.parent)[0].read_bytes() == IMG1_BYTES
    assert (img_dir / "1.jpg").is_file()
    assert image_paths(recs["gmai_mmbench-validation-2"], out.parent)[0].samefile(img_dir / "0.png")  # reference


def test_record_fields(src, tmp_path):
    out = tmp_path / "gmai.jsonl"
    _, records, _ = convert_and_load("gmai_mmbench", src, out)
    r = by_id(records)["gmai_mmbench-validation-0"]
    assert user_text(r) == "Which disease is shown in this CT image?"
    assert r["meta"]["choices"] == ["Pneumonia", "Nodule", "Normal", "Effusion"] and r["meta"]["answer"] == "B"
    assert r["meta"]["modality"] == "ct"
    assert r["meta"]["extra"] == {"source_file": "GMAI-MMBench_VAL.tsv", "index": "0", "category": "Lung",
                                  "clinical vqa task": "Disease Diagnosis", "department": "Pulmonary Medicine",
                                  "perceptual granularity": "Image Level", "modality": "CT"}
    multi = by_id(records)["gmai_mmbench-validation-2"]
    assert multi["meta"]["answer"] == "A,C"
    mcq = PROTOCOLS.get("mcq")
    assert mcq.score("A and C", multi["meta"])["correct"] == 1 and mcq.score("A", multi["meta"])["correct"] == 0


def test_test_split_has_no_answers(src, tmp_path):
    report, records, _ = convert_and_load("gmai_mmbench", src, tmp_path / "t.jsonl", splits="test")
    assert report.kept == {"test": 1}
    (r,) = records
    assert r["id"] == "gmai_mmbench-test-10" and "answer" not in r["meta"]
    assert [m["role"] for m in r["messages"]] == ["user"]


def test_image_dir_option_and_stability(src, tmp_path):
    elsewhere = tmp_path / "decoded"
    _, records, _ = convert_and_load("gmai_mmbench", src, tmp_path / "o.jsonl", image_dir=elsewhere)
    assert image_paths(records[0], tmp_path)[0].samefile(elsewhere / "0.png")
    assert not (src / "images").exists()                                 # nothing written into src this time
    assert_stable("gmai_mmbench", src, tmp_path)


def test_missing_column_and_file(src, tmp_path):
    bad = tmp_path / "bad"
    _write_tsv(bad / "GMAI-MMBench_VAL.tsv", ["index", "question", "A", "B", "answer"], [[0, "q", "x", "y", "A"]])
    with pytest.raises(InputError, match=r"GMAI-MMBench_VAL\.tsv.*image or image_path"):
        convert("gmai_mmbench", bad, tmp_path / "x.jsonl")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="GMAI-MMBench_VAL.tsv"):
        convert("gmai_mmbench", tmp_path / "empty", tmp_path / "x.jsonl")


def test_task_yaml_reads_the_records(src, tmp_path):
    task = load_task("gmai_mmbench")
    _, records, _ = convert_and_load("gmai_mmbench", src, tmp_path / task.data.records, splits=task.data.split)
    assert all(r["meta"]["split"] == task.data.split for r in records) and task.select(records) == records
    r = by_id(records)["gmai_mmbench-validation-1"]
    assert task.build_prompt(r) == ("Which organ is shown?\nA. Brain\nB. Liver\n"
                                    "Answer with the option's letter from the given choices directly.")

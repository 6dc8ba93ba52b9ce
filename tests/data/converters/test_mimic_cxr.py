"""MIMIC-CXR converter: reports + split/metadata CSVs + JPG/DICOM images -> one report record per study."""

from __future__ import annotations

import gzip

import pytest

from medmllm.data.converters import convert
from medmllm.data.converters.mimic_cxr import parse_sections, report_answer
from medmllm.errors import ConfigError, InputError

from .fixtures import (REPORT_BOTH, assert_paths_resolve, assert_stable, assistant_text, by_id, convert_and_load,
                       image_paths, make_mimic_cxr, user_text)

BOTH = ("FINDINGS: There is no focal consolidation, pleural effusion or pneumothorax. The cardiomediastinal "
        "silhouette is normal. IMPRESSION: No acute cardiopulmonary process.")


@pytest.fixture
def src(tmp_path):
    return make_mimic_cxr(tmp_path / "mimic")


def test_counts_and_skips(src, tmp_path):
    out = tmp_path / "mimic.jsonl"
    report, records, manifest = convert_and_load("mimic_cxr", src, out)
    assert report.kept == {"train": 1, "validation": 1, "test": 1}
    assert manifest["splits"]["test"]["ids"] == ["mimic_cxr-s57375967"]
    reasons = dict(report.skipped)
    assert len(reasons) == 3
    assert "no FINDINGS or IMPRESSION section" in reasons["mimic_cxr-s50000001 (study[3])"]
    assert "no image file found" in reasons["mimic_cxr-s50000002 (study[4])"]
    assert reasons["study[5]"].startswith("malformed row: line 9") and "holdout" in reasons["study[5]"]
    assert_paths_resolve(records, out.parent)


def test_study_record(src, tmp_path):
    out = tmp_path / "mimic.jsonl"
    _, records, _ = convert_and_load("mimic_cxr", src, out)
    recs = by_id(records)
    r = recs["mimic_cxr-s50414267"]
    assert r["meta"] == {"dataset": "mimic_cxr", "split": "train", "task": "report", "answer_type": "report",
                         "modality": "xray", "organ": "chest", "answer": BOTH, "patient_id": "10000032",
                         "extra": {"study_id": "50414267", "dicom_ids": ["d2-pa", "d3-ap"],
                                   "view_positions": ["PA", "AP"], "report_file": "files/p10/p10000032/s50414267.txt",
                                   "section": "both"}}
    assert assistant_text(r) == BOTH
    assert "findings and impression" in user_text(r)
    sdir = src / "files" / "p10" / "p10000032" / "s50414267"
    # frontal views first (PA, then AP), the lateral dropped by the 2-image cap
    assert [p.resolve() for p in image_paths(r, out.parent)] == [(sdir / "d2-pa.jpg").resolve(),
                                                                  (sdir / "d3-ap.jpg").resolve()]
    v = recs["mimic_cxr-s53189527"]
    assert v["meta"]["split"] == "validation"
    assert v["meta"]["answer"] == "FINDINGS: Mild cardiomegaly. Lungs are clear."  # NOTIFICATION excluded
    assert v["meta"]["extra"]["report_file"] == "mimic-cxr-reports/files/p10/p10000032/s53189527.txt"
    assert image_paths(v, out.parent)[0].name == "d4-ap.dcm"
    assert recs["mimic_cxr-s57375967"]["meta"]["answer"] == "IMPRESSION: Small left pleural effusion."


def test_section_options(src, tmp_path):
    rep, recs, _ = convert_and_load("mimic_cxr", src, tmp_path / "f.jsonl", section="findings")
    assert rep.kept == {"train": 1, "validation": 1}
    assert by_id(recs)["mimic_cxr-s53189527"]["meta"]["answer"] == "Mild cardiomegaly. Lungs are clear."
    assert "no FINDINGS section" in dict(rep.skipped)["mimic_cxr-s57375967 (study[2])"]
    rep, recs, _ = convert_and_load("mimic_cxr", src, tmp_path / "i.jsonl", section="impression", max_images=3)
    r = by_id(recs)["mimic_cxr-s50414267"]
    assert assistant_text(r) == "No acute cardiopulmonary process."
    assert r["meta"]["extra"]["dicom_ids"] == ["d2-pa", "d3-ap", "d1-lat"]
    with pytest.raises(ConfigError, match="section"):
        convert("mimic_cxr", src, tmp_path / "x.jsonl", section="summary")


def test_parse_sections():
    s = parse_sections(REPORT_BOTH)
    assert s == {"findings": "There is no focal consolidation, pleural effusion or pneumothorax. "
                             "The cardiomediastinal silhouette is normal.",
                 "impression": "No acute cardiopulmonary process."}
    assert parse_sections("findings: a\nb\nImpression:c") == {"findings": "a b", "impression": "c"}
    assert parse_sections("FINDINGS:\n\nIMPRESSION: x") == {"impression": "x"}   # empty section is absent
    assert parse_sections("No headers at all.\nDr. Smith at 10:30.") == {}
    assert report_answer({"impression": "x"}, "findings") is None
    assert report_answer({"findings": "a", "impression": "b"}, "both") == "FINDINGS: a IMPRESSION: b"


def test_gzipped_csvs_and_no_metadata(src, tmp_path):
    csv_path = src / "mimic-cxr-2.0.0-split.csv"
    (src / "mimic-cxr-2.0.0-split.csv.gz").write_bytes(gzip.compress(csv_path.read_bytes()))
    csv_path.unlink()
    (src / "mimic-cxr-2.0.0-metadata.csv").unlink()
    rep, recs, _ = convert_and_load("mimic_cxr", src, tmp_path / "g.jsonl", splits=["train"])
    assert rep.kept == {"train": 1}
    # without metadata the views are unknown: images ordered by dicom_id
    assert recs[0]["meta"]["extra"]["dicom_ids"] == ["d1-lat", "d2-pa"]


def test_stable(src, tmp_path):
    assert_stable("mimic_cxr", src, tmp_path)


def test_missing_split_csv(src, tmp_path):
    (src / "mimic-cxr-2.0.0-split.csv").unlink()
    with pytest.raises(InputError) as ei:
        convert("mimic_cxr", src, tmp_path / "x.jsonl")
    assert "mimic-cxr-2.0.0-split.csv" in str(ei.value) and str(src) in str(ei.value)

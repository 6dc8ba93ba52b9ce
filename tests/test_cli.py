"""The `medmllm` command as a user runs it: exit codes, outputs, and error messages."""

import json

import pytest
from typer.testing import CliRunner

from medmllm.cli import app

runner = CliRunner()


def test_read_dicom_prints_shape_and_metadata():
    from pydicom.data import get_testdata_file

    path = get_testdata_file("CT_small.dcm")
    res = runner.invoke(app, ["read", path, "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    assert info["shape"] == [128, 128] and info["meta"]["format"] == "dicom"
    assert info["meta"]["modality"] == "CT"


def test_read_bad_file_exits_2_naming_the_file(tmp_path):
    bad = tmp_path / "broken.dcm"
    bad.write_bytes(b"DICM but not really")
    res = runner.invoke(app, ["read", str(bad)])
    assert res.exit_code == 2
    assert "broken.dcm" in res.output and "error:" in res.output


def test_convert_vqa_rad_fixture(tmp_path):
    from tests.data.converters.fixtures import make_vqa_rad

    src = make_vqa_rad(tmp_path / "src")
    out = tmp_path / "out" / "vqa_rad.jsonl"
    res = runner.invoke(app, ["convert", "vqa_rad", "--src", str(src), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert out.exists() and (out.parent / "vqa_rad.manifest.json").exists()
    assert len(out.read_text().splitlines()) == 4  # 4 good items in the fixture
    assert "skipped" in res.output.lower()


def test_convert_unknown_dataset_and_missing_src(tmp_path):
    res = runner.invoke(app, ["convert", "vqa_radd", "--src", str(tmp_path), "--out", str(tmp_path / "o.jsonl")])
    assert res.exit_code == 2 and "unknown converter 'vqa_radd'" in res.output
    res = runner.invoke(app, ["convert", "slake", "--src", str(tmp_path / "nope"), "--out", str(tmp_path / "o.jsonl")])
    assert res.exit_code == 2 and "nope" in res.output


def test_phantoms_small_build(tmp_path):
    out = tmp_path / "ph"
    res = runner.invoke(app, ["phantoms", "--out", str(out), "--n", "25", "--seed", "3", "--workers", "1"])
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n"] == 25 and sum(summary["modalities"].values()) == 25
    assert (out / "DATASHEET.md").exists() and (out / "records" / "train.jsonl").exists()
    assert "25 cases (seed 3)" in res.output
    assert (out / "gallery.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_phantoms_modalities_restricts_the_build(tmp_path):
    out = tmp_path / "ct3d"
    res = runner.invoke(app, ["phantoms", "--out", str(out), "--n", "6", "--workers", "1", "--no-gallery",
                              "--modalities", "ct3d"])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "summary.json").read_text())["modalities"] == {"ct3d": 6}
    res = runner.invoke(app, ["phantoms", "--out", str(tmp_path / "bad"), "--n", "2", "--modalities", "pet"])
    assert res.exit_code != 0 and "pet" in res.output

"""The converter driver: registry, output paths, manifests, skips, limits and errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from medmllm.data.converters import CONVERTERS, ConvertReport, convert
from medmllm.data.converters import base
from medmllm.data.converters.base import Skip, SkipItem, iter_items, read_csv, run, select_splits
from medmllm.data.records import make_record, media, read_records, to_hf_dataset
from medmllm.errors import ConfigError, InputError

from .fixtures import assert_paths_resolve, make_vqa_rad, write_image


def test_registry_names():
    assert CONVERTERS.names() == ["gmai_mmbench", "iu_xray", "mediconfusion", "medxpertqa_mm", "mimic_cxr", "omnimedvqa", "pathvqa",
                                 "pmc_vqa", "slake", "vqa_rad"]
    with pytest.raises(ConfigError, match="unknown converter 'VQA-RAD'"):
        convert("VQA-RAD", ".", "x.jsonl")


def test_unknown_option(tmp_path):
    src = make_vqa_rad(tmp_path / "src")
    with pytest.raises(ConfigError, match="lang"):
        convert("vqa_rad", src, tmp_path / "x.jsonl", lang="en")


def test_paths_relative_to_output_folder(tmp_path):
    src = make_vqa_rad(tmp_path / "data" / "VQA_RAD")
    out = tmp_path / "runs" / "deep" / "vqa_rad.jsonl"
    report = convert("vqa_rad", src, out)
    assert report.out == str(out) and report.manifest == str(out.parent / "vqa_rad.manifest.json")
    records, _ = read_records(out, on_error="raise")
    first = records[0]["messages"][0]["content"][0]["path"]
    assert first == "../../data/VQA_RAD/VQA_RAD Image Folder/synpic100.jpg"
    assert_paths_resolve(records, out.parent)


def test_absolute_path_when_no_relative_path(tmp_path, monkeypatch):
    def no_relpath(*a):
        raise ValueError("path is on mount 'D:', start on mount 'C:'")

    monkeypatch.setattr(base.os.path, "relpath", no_relpath)
    assert base.relative_to("/a/b/c.png", Path("/x")) == "/a/b/c.png"


def test_manifest_tracks_image_bytes(tmp_path):
    src = make_vqa_rad(tmp_path / "src")
    out = tmp_path / "out" / "v.jsonl"
    man_path = out.parent / "v.manifest.json"
    convert("vqa_rad", src, out)
    m1 = json.loads(man_path.read_text())
    convert("vqa_rad", src, out)
    assert json.loads(man_path.read_text()) == m1
    write_image(src / "VQA_RAD Image Folder" / "synpic300.jpg", seed=999)   # used by qid 3 (test) only
    convert("vqa_rad", src, out)
    m2 = json.loads(man_path.read_text())
    assert m2["splits"]["train"]["hash"] == m1["splits"]["train"]["hash"]
    assert m2["splits"]["test"]["hash"] != m1["splits"]["test"]["hash"]
    i = m1["splits"]["test"]["ids"].index("vqa_rad-3")
    assert m2["splits"]["test"]["record_hashes"][i] != m1["splits"]["test"]["record_hashes"][i]
    # without file hashing, the image bytes do not enter the manifest
    convert("vqa_rad", src, tmp_path / "a" / "v.jsonl", hash_files=False)
    write_image(src / "VQA_RAD Image Folder" / "synpic300.jpg", seed=1000)
    convert("vqa_rad", src, tmp_path / "b" / "v.jsonl", hash_files=False)
    ma = json.loads((tmp_path / "a" / "v.manifest.json").read_text())
    mb = json.loads((tmp_path / "b" / "v.manifest.json").read_text())
    assert ma == mb


def _rec(rid: str, split: str, image: Path) -> dict:
    return make_record(rid, [media("image", str(image)), "q?"], "a", {"dataset": "toy", "split": split})


def _toy(items):
    def convert_toy(src: Path, *, splits=None):
        yield from items
    return convert_toy


def test_run_duplicates_limit_and_report(tmp_path):
    img = write_image(tmp_path / "img.png", 1)
    items = [_rec("toy-1", "train", img), Skip("toy.json[1]", "image file not found: x.png"),
             _rec("toy-1", "train", img), _rec("toy-2", "test", img), _rec("toy-3", "test", img)]
    rep = run(_toy(items), "toy", tmp_path, tmp_path / "o" / "toy.jsonl")
    assert isinstance(rep, ConvertReport)
    assert rep.kept == {"train": 1, "test": 2} and rep.total == 3
    assert rep.skipped == [("toy.json[1]", "image file not found: x.png"),
                           ("toy-1", "duplicate id: an earlier item has the same id")]
    text = str(rep)
    assert "toy: kept 3 records (train 1, test 2), skipped 2" in text and "toy.json[1]" in text
    rep = run(_toy(items), "toy", tmp_path, tmp_path / "o" / "lim.jsonl", limit=2)
    assert rep.total == 2 and [r["id"] for r in read_records(tmp_path / "o" / "lim.jsonl")[0]] == ["toy-1", "toy-2"]
    with pytest.raises(ConfigError, match="limit"):
        run(_toy(items), "toy", tmp_path, tmp_path / "x.jsonl", limit=0)


def test_nothing_converted_writes_nothing(tmp_path):
    out = tmp_path / "none.jsonl"
    with pytest.raises(InputError, match="no record could be converted.*image file not found"):
        run(_toy([Skip("a[0]", "image file not found: a.png")]), "toy", tmp_path, out)
    assert not out.exists() and not (tmp_path / "none.manifest.json").exists()


def test_failure_midway_keeps_previous_output(tmp_path):
    img = write_image(tmp_path / "img.png", 1)
    out = tmp_path / "toy.jsonl"
    run(_toy([_rec("toy-1", "train", img)]), "toy", tmp_path, out)
    before = out.read_bytes()

    def broken(src, *, splits=None):
        yield _rec("toy-9", "train", img)
        raise InputError(src / "b.json", "not valid JSON")

    with pytest.raises(InputError, match="b.json"):
        run(broken, "toy", tmp_path, out)
    assert out.read_bytes() == before


def test_source_folder_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        convert("vqa_rad", tmp_path / "nowhere", tmp_path / "x.jsonl")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(InputError, match="got a file"):
        convert("vqa_rad", tmp_path / "file.txt", tmp_path / "x.jsonl")
    src = make_vqa_rad(tmp_path / "src")
    with pytest.raises(InputError, match="folder"):
        convert("vqa_rad", src, tmp_path)


def test_select_splits():
    known = {"train": "train", "val": "validation", "validation": "validation", "test": "test"}
    assert select_splits(None, known) == ["train", "validation", "test"]
    assert select_splits(None, known, default=["train"]) == ["train"]
    assert select_splits("test,val", known) == ["test", "validation"]
    assert select_splits(["val", "validation"], known) == ["validation"]
    with pytest.raises(ConfigError, match="unknown split 'dev'"):
        select_splits(["dev"], known)


def test_iter_items_turns_failures_into_skips():
    def build(i, item):
        if item == "skip":
            raise SkipItem("image file not found: a.png", "toy-1")
        if item is None:
            return None
        return {"id": f"toy-{item['n']}"}

    out = list(iter_items(["skip", None, {"m": 1}, {"n": 3}], "f.json", build))
    assert out == [Skip("toy-1 (f.json[0])", "image file not found: a.png"),
                   Skip("f.json[2]", "malformed item: KeyError: 'n'"), {"id": "toy-3"}]


def test_iter_items_lets_source_errors_through(tmp_path):
    def build(i, item):
        raise InputError(tmp_path / "ann.json", "not valid JSON")

    with pytest.raises(InputError, match="ann.json"):
        list(iter_items([1], "f.json", build))


def test_read_csv_bom_and_missing_column(tmp_path):
    p = tmp_path / "a.csv"
    p.write_bytes("\ufeffa, b\n1,2\n".encode())
    assert read_csv(p, ["a", "b"]) == [{"a": "1", "b": "2"}]
    with pytest.raises(InputError, match="lacks column"):
        read_csv(p, ["c"])


def test_hf_dataset_from_converter_output(tmp_path):
    src = make_vqa_rad(tmp_path / "src")
    out = tmp_path / "v.jsonl"
    convert("vqa_rad", src, out)
    records, _ = read_records(out, on_error="raise")
    ds = to_hf_dataset(records)
    assert len(ds) == 4
    row = ds[[r["id"] for r in records].index("vqa_rad-0")]
    assert row["meta"]["answer"] == "yes" and row["meta"]["split"] == "train"
    assert json.loads(row["meta"]["extra"])["answer_original"] == "Yes"
    image = row["messages"][0]["content"][0]
    assert image["type"] == "image" and (out.parent / image["path"]).is_file()
    assert os.path.basename(image["path"]) == "synpic100.jpg"

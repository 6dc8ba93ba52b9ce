"""PathVQA converter: pickled QA lists -> records; the pickle loader only rebuilds builtins."""

from __future__ import annotations

import pickle
from collections import OrderedDict

import pytest

from medmllm.data.converters import convert
from medmllm.data.converters.pathvqa import safe_load_pickle
from medmllm.errors import InputError

from .fixtures import (assert_paths_resolve, assert_stable, assistant_text, by_id, convert_and_load, image_paths,
                       make_pathvqa, unsafe_pickle_bytes, user_text)


@pytest.fixture
def src(tmp_path):
    return make_pathvqa(tmp_path / "pvqa")


def test_counts_and_skips(src, tmp_path):
    out = tmp_path / "pathvqa.jsonl"
    report, records, _ = convert_and_load("pathvqa", src, out)
    assert report.kept == {"train": 2, "validation": 1, "test": 1}
    reasons = dict(report.skipped)
    assert len(reasons) == 2
    assert "image file not found" in reasons["pathvqa-train-000002 (train_vqa.pkl[2])"]
    assert "train_0404" in reasons["pathvqa-train-000002 (train_vqa.pkl[2])"]
    assert "'question'" in reasons["pathvqa-train-000003 (train_vqa.pkl[3])"]
    assert_paths_resolve(records, out.parent)


def test_meta_and_answer_types(src, tmp_path):
    out = tmp_path / "pathvqa.jsonl"
    _, records, _ = convert_and_load("pathvqa", src, out)
    recs = by_id(records)
    r = recs["pathvqa-train-000000"]
    assert r["meta"] == {"dataset": "pathvqa", "split": "train", "task": "vqa", "answer_type": "closed",
                         "modality": "pathology", "answer": "yes", "extra": {"image": "train_0001", "index": 0}}
    assert user_text(r) == "Is there fibrosis?" and assistant_text(r) == "yes"
    assert image_paths(r, out.parent)[0].samefile(src / "split" / "images" / "train" / "train_0001.jpg")
    assert recs["pathvqa-train-000001"]["meta"]["answer_type"] == "open"
    assert recs["pathvqa-validation-000000"]["meta"]["answer"] == "hematoxylin and eosin"
    # "No" (protocol-0 pickle) is a yes/no answer whatever its case
    assert recs["pathvqa-test-000000"]["meta"]["answer_type"] == "closed"


def test_src_may_be_the_split_folder(src, tmp_path):
    report, _, _ = convert_and_load("pathvqa", src / "split", tmp_path / "p.jsonl", splits=["val"])
    assert report.kept == {"validation": 1}


def test_stable(src, tmp_path):
    assert_stable("pathvqa", src, tmp_path)


def test_refuses_code_execution_payload(src, tmp_path):
    marker = tmp_path / "pwned"
    bad = src / "split" / "qas" / "train_vqa.pkl"
    bad.write_bytes(unsafe_pickle_bytes(marker))
    with pytest.raises(InputError) as ei:
        safe_load_pickle(bad)
    assert "os.system" in str(ei.value) and str(bad) in str(ei.value)
    with pytest.raises(InputError, match="os.system"):
        convert("pathvqa", src, tmp_path / "out.jsonl")
    assert not marker.exists()
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize("payload", [
    b"cbuiltins\neval\n(S'1+1'\ntR.",                       # a builtin, but not a data type
    pickle.dumps(OrderedDict(a=1), protocol=2),              # a harmless but non-builtin class
    b"\x80\x04\x95",                                         # truncated
])
def test_refuses_other_payloads(tmp_path, payload):
    p = tmp_path / "x.pkl"
    p.write_bytes(payload)
    with pytest.raises(InputError):
        safe_load_pickle(p)


def test_loads_plain_data(tmp_path):
    data = [{"image": "a", "question": "q?", "answer": "yes", "n": 1, "f": 0.5, "t": (1, 2)}]
    p = tmp_path / "ok.pkl"
    for proto in (0, 2, 5):
        p.write_bytes(pickle.dumps(data, protocol=proto))
        assert safe_load_pickle(p) == data


def test_missing_pickle(tmp_path):
    (tmp_path / "split" / "images").mkdir(parents=True)
    with pytest.raises(InputError) as ei:
        convert("pathvqa", tmp_path, tmp_path / "out.jsonl")
    assert "train_vqa.pkl" in str(ei.value) and str(tmp_path) in str(ei.value)

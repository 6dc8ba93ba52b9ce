import json

import pytest

from medmllm.io import atomic_open, write_json, write_jsonl


def test_atomic_write_replaces_only_on_success(tmp_path):
    target = tmp_path / "out.json"
    write_json(target, {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_open(target) as fh:
            fh.write("partial")
            raise RuntimeError("killed mid-write")
    # the old content survives and no temp file is left behind
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_write_jsonl_is_byte_stable(tmp_path):
    rows = [{"b": 2, "a": 1}, {"z": [1, 2], "y": "é"}]
    n = write_jsonl(tmp_path / "a.jsonl", rows)
    write_jsonl(tmp_path / "b.jsonl", [dict(reversed(list(r.items()))) for r in rows])
    assert n == 2
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    assert [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()] == rows

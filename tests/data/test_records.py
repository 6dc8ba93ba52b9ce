import json

import pytest

from medmllm.errors import RecordError
from medmllm.data import records as R


def _rec(**over):
    rec = R.make_record("x-1", [R.media("image", "img/a.png"), "Is there a nodule?"], "yes",
                        {"dataset": "toy", "split": "test", "answer_type": "closed", "answer": "yes"})
    rec.update(over)
    return rec


def test_make_record_layout():
    rec = _rec()
    assert rec["stage"] == "instruction"
    assert [m["role"] for m in rec["messages"]] == ["user", "assistant"]
    assert rec["messages"][0]["content"][0] == {"type": "image", "path": "img/a.png"}
    assert rec["messages"][1]["content"] == [{"type": "text", "text": "yes"}]


@pytest.mark.parametrize("mutate, field", [
    (lambda r: r.update(id=""), "id"),
    (lambda r: r.update(stage="pretrain"), "stage"),
    (lambda r: r["messages"][0].update(role="doctor"), "messages[0].role"),
    (lambda r: r["messages"][0]["content"][0].update(type="img"), "messages[0].content[0].type"),
    (lambda r: r["messages"][0]["content"][0].pop("path"), "messages[0].content[0]"),
    (lambda r: r["meta"].pop("split"), "meta.split"),
    (lambda r: r["meta"].update(answer_type="yesno"), "meta.answer_type"),
    (lambda r: r["meta"].update(colour="red"), "meta"),
])
def test_validation_names_the_field(mutate, field):
    rec = _rec()
    mutate(rec)
    with pytest.raises(RecordError) as info:
        R.validate_record(rec, "f.jsonl:3")
    assert "f.jsonl:3" in str(info.value)
    assert f"{field}:" in str(info.value) and "expected" in str(info.value)


def test_preference_and_rl_stage_rules():
    pref = _rec(stage="preference")
    with pytest.raises(RecordError, match="chosen"):
        R.validate_record(pref)
    pref["chosen"] = [R.message("assistant", "yes")]
    pref["rejected"] = [R.message("assistant", "no")]
    assert R.validate_record(pref) is pref
    rl = R.make_record("r", ["2+2?"], None, {"dataset": "toy", "split": "train", "answer": "4"}, stage="rl")
    assert [m["role"] for m in rl["messages"]] == ["user"]
    with pytest.raises(RecordError, match="meta.answer"):
        R.make_record("r", ["2+2?"], None, {"dataset": "toy", "split": "train"}, stage="rl")


def test_choice_needs_choices():
    with pytest.raises(RecordError, match="meta.choices"):
        R.make_record("c", ["Q?"], "A", {"dataset": "t", "split": "test", "answer_type": "choice"})


def test_tolerant_load_skips_and_reports_bad_lines(tmp_path):
    good = _rec()
    path = tmp_path / "r.jsonl"
    lines = [json.dumps(good), "{not json", json.dumps({**good, "id": ""}), "", json.dumps({**good, "id": "x-2"})]
    path.write_text("\n".join(lines) + "\n")
    recs, report = R.read_records(path, on_error="skip")
    assert [r["id"] for r in recs] == ["x-1", "x-2"]
    assert report.kept == 2 and report.skipped == 2
    assert f"{path}:2" in report.errors[0] and "not valid JSON" in report.errors[0]
    assert f"{path}:3" in report.errors[1]
    with pytest.raises(RecordError, match=":2"):
        R.read_records(path, on_error="raise")


def test_write_then_read_roundtrip(tmp_path):
    recs = [_rec(), _rec(id="x-2")]
    assert R.write_records(tmp_path / "o.jsonl", recs) == 2
    back, report = R.read_records(tmp_path / "o.jsonl")
    assert back == recs and report.skipped == 0


def test_manifest_hash_tracks_ids_and_file_bytes(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(b"one")
    recs = [_rec(), _rec(id="x-0")]
    m1 = R.split_manifest(recs, tmp_path)
    m2 = R.split_manifest(list(reversed(recs)), tmp_path)
    assert m1 == m2  # order-independent
    assert m1["splits"]["test"]["ids"] == ["x-0", "x-1"] and m1["splits"]["test"]["count"] == 2
    (tmp_path / "img" / "a.png").write_bytes(b"two")
    assert R.split_manifest(recs, tmp_path)["splits"]["test"]["hash"] != m1["splits"]["test"]["hash"]
    assert R.split_manifest(recs[:1], tmp_path)["splits"]["test"]["hash"] != m1["splits"]["test"]["hash"]


def test_trl_and_llamafactory_layouts(tmp_path):
    rec = _rec()
    trl = R.to_trl(rec, tmp_path)
    assert trl["messages"][0]["content"] == [{"type": "image"}, {"type": "text", "text": "Is there a nodule?"}]
    assert trl["images"] == [str(tmp_path / "img/a.png")]
    lf = R.to_llamafactory(rec, tmp_path)
    assert lf["messages"][0]["content"] == "<image>Is there a nodule?"
    assert lf["messages"][0]["content"].count("<image>") == len(lf["images"]) == 1


def test_hf_dataset_mixes_modalities():
    recs = [_rec(), R.make_record("e", [R.media("ehr", data={"vitals": {"hr": 90}}), "Fever?"], "no",
                                  {"dataset": "toy", "split": "train", "extra": {"k": 1}})]
    ds = R.to_hf_dataset(recs)
    assert len(ds) == 2
    assert ds[1]["messages"][0]["content"][0]["type"] == "ehr"
    assert json.loads(ds[1]["messages"][0]["content"][0]["data"]) == {"vitals": {"hr": 90}}
    assert json.loads(ds[1]["meta"]["extra"]) == {"k": 1}
    assert ds[0]["meta"]["answer"] == "yes"

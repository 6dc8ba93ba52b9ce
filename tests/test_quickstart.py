"""The quickstart's scoring rules and baseline (hand-worked), and a micro end-to-end run (slow)."""

import json

import pytest

from medmllm.quickstart import QuickstartPlan, oversampled, prior_baseline, score, summarise


@pytest.mark.parametrize("pred, meta, expected", [
    ("Yes.", {"answer_type": "closed", "answer": "yes"}, 1),
    ("  no ", {"answer_type": "closed", "answer": "yes"}, 0),
    ("nodule", {"answer_type": "closed", "answer": "no"}, 0),           # no substring credit
    ("left", {"answer_type": "open", "answer": "Left"}, 1),
    ("left upper", {"answer_type": "open", "answer": "left"}, 0),
    ("B", {"answer_type": "choice", "answer": "B"}, 1),
    ("(c) liver", {"answer_type": "choice", "answer": "C"}, 1),
    ("Answer: D", {"answer_type": "choice", "answer": "B"}, 0),
    ("", {"answer_type": "closed", "answer": "no"}, 0),
    (None, {"answer_type": "choice", "answer": "A"}, 0),
])
def test_score(pred, meta, expected):
    assert score(pred, meta) == expected


def _rec(tpl, modality, atype, answer):
    return {"meta": {"modality": modality, "answer_type": atype, "answer": answer, "extra": {"template": tpl}}}


def test_summary_groups_and_prior_baseline():
    train = [_rec("xray_nodule_yn", "xray", "closed", a) for a in ("yes", "yes", "no")]
    test = [_rec("xray_nodule_yn", "xray", "closed", a) for a in ("yes", "no", "no", "no")]
    prior = prior_baseline(train, test)
    assert prior == ["yes"] * 4                        # most frequent training answer of the template
    s = summarise(test, prior)
    assert s["by_modality_answer_type"]["xray/closed"] == {"accuracy": 0.25, "n": 4}
    assert s["headline"]["closed_image_yes_no"] == {"accuracy": 0.25, "n": 4}
    assert s["headline"]["ehr_rules"] == {"accuracy": None, "n": 0}


def test_headline_keeps_the_choice_format_apart_from_the_rhythm_figure():
    test = [_rec("ecg_rhythm", "ecg", "open", "sinus bradycardia"), _rec("ecg_rhythm", "ecg", "open", "st elevation"),
            _rec("ecg_rhythm_choice", "ecg", "choice", "B"), _rec("ct_organ_choice", "ct", "choice", "A")]
    s = summarise(test, ["sinus bradycardia", "normal sinus rhythm", "B", "C"])
    assert s["headline"]["ecg_rhythm"] == {"accuracy": 0.5, "n": 2}           # the rhythm asked in words
    assert s["headline"]["multiple_choice_letter"] == {"accuracy": 0.5, "n": 2}   # letters, every modality


def test_oversampled_writes_the_modalities_records_next_to_the_file(tmp_path):
    from medmllm.data.records import read_records

    def rec(i, modality):
        return {"id": f"r{i}", "messages": [{"role": "user", "content": [{"type": "text", "text": "q?"}]},
                                            {"role": "assistant", "content": [{"type": "text", "text": "yes"}]}],
                "meta": {"modality": modality, "task": "vqa", "split": "train", "answer_type": "closed", "answer": "yes",
                         "dataset": "t", "extra": {"template": "t"}}}

    records = tmp_path / "records" / "train.jsonl"
    records.parent.mkdir()
    records.write_text("".join(json.dumps(rec(i, m)) + "\n" for i, m in enumerate(["xray", "ct3d", "ecg", "ct3d"])))
    assert oversampled(records, ()) == [records]
    files = oversampled(records, ("ct3d",))
    assert files == [records, tmp_path / "records" / "train_ct3d.jsonl"]       # next to it: media paths resolve
    assert [r["id"] for r in read_records(files[1])[0]] == ["r1", "r3"]
    files[1].write_text(json.dumps(rec(9, "ct3d")) + "\n")                  # an existing copy is kept (resume)
    assert [r["id"] for r in read_records(oversampled(records, ("ct3d",))[1])[0]] == ["r9"]


@pytest.mark.slow
def test_micro_quickstart_end_to_end(tmp_path):
    from medmllm.quickstart import quickstart

    plan = QuickstartPlan(n_cases=40, encoder_steps=4, encoder_batch=8, align_steps=2, instruct_steps=4,
                          batch_size=8, eval_limit=16, eval_batch=16)
    res = quickstart(tmp_path / "qs", plan=plan, progress=False)
    saved = json.loads((tmp_path / "qs" / "results.json").read_text())
    assert saved["protocol"]["name"] == "medphantom-exact"
    assert set(saved["headline"]) >= {"closed_image_yes_no", "volume_lesion_presence", "ecg_rhythm", "ehr_rules"}
    assert (tmp_path / "qs" / "report.md").exists() and (tmp_path / "qs" / "accuracy.png").exists()
    assert (tmp_path / "qs" / "instruct" / "model" / "config.json").exists()
    assert res["ask_example"]["command"].startswith("medmllm ask --model")

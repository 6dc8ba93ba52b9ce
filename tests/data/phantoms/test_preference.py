"""Preference pairs from a MedPhantom build: true answers vs hallucinated findings, checked against the truth."""

import json
from collections import Counter

import pytest

from medmllm.data.records import read_records, resolve_path


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    from medmllm.data.phantoms.build import build_phantoms
    from medmllm.data.phantoms.preference import build_preference

    out = tmp_path_factory.getbasetemp() / "medphantom40_seed0"   # shared by the modules of a session (cached)
    build_phantoms(out, 40, seed=0, workers=1, progress=False)
    summary = build_preference(out, seed=0)
    cases = {c["case_id"]: c for c in map(json.loads, (out / "cases.jsonl").read_text().splitlines())}
    return out, summary, cases


def _present(case, finding):
    """The truth, read directly from cases.jsonl (not through the module under test)."""
    t = case["truth"]
    return {"nodule": lambda: t["findings"]["nodule"]["present"],
            "effusion": lambda: t["findings"]["effusion"]["present"],
            "cardiomegaly": lambda: t["findings"]["cardiomegaly"]["present"],
            "lesion": lambda: t["findings"]["lesion"]["present"],
            "atrial fibrillation": lambda: t["rhythm"] == "atrial fibrillation",
            "st elevation": lambda: t["st_elevation_mm"] > 0,
            "fever": lambda: t["flags"]["fever"],
            "hypotension": lambda: t["flags"]["hypotension"]}[finding]()


# what the statement says when the finding is there (and the true statement must not say)
ASSERTS = {("xray", "nodule"): "mm nodule in the", ("xray", "effusion"): "costophrenic angle",
           ("xray", "cardiomegaly"): "The heart is enlarged", ("ct", "lesion"): "focal lesion on the patient's",
           ("ct3d", "lesion"): "visible on axial slices", ("ecg", "atrial fibrillation"): "atrial fibrillation at",
           ("ecg", "st elevation"): "ST elevation", ("ehr", "fever"): "fever", ("ehr", "hypotension"): "hypotension"}


def test_records_are_valid_preference_records_of_train_patients(build):
    out, summary, cases = build
    recs, report = read_records(out / "records" / "preference.jsonl")   # raises on any invalid record
    assert report.skipped == 0 and len(recs) == summary["pairs"] > 0
    assert summary["path"] == "records/preference.jsonl"                        # relative: the build can move
    assert len({r["id"] for r in recs}) == len(recs)
    assert all(r["stage"] == "preference" and r["meta"]["split"] == "train" for r in recs)
    assert {c["split"] for c in cases.values()} > {"train"}                     # other splits exist and are left out
    assert summary["cases"] == sum(c["split"] == "train" for c in cases.values())
    assert set(summary["by_modality"]) == {"xray", "ct", "ct3d", "ecg", "ehr"}
    for r in recs:
        assert r["meta"]["patient_id"] == cases[r["meta"]["extra"]["case_id"]]["patient_id"]
        part = r["messages"][0]["content"][0]
        assert resolve_path(part, out / "records").exists(), part
        assert r["chosen"][0]["role"] == r["rejected"][0]["role"] == "assistant"


def test_yes_no_pairs_follow_the_ground_truth(build):
    out, summary, cases = build
    recs = read_records(out / "records" / "preference.jsonl")[0]
    kinds = {"hallucination": 0, "omission": 0}
    for r in recs:
        x = r["meta"]["extra"]
        if x["pair_kind"] not in ("hallucination", "omission"):
            continue
        present = _present(cases[x["case_id"]], x["finding"])
        chosen, rejected = r["chosen"][0]["content"][0]["text"], r["rejected"][0]["content"][0]["text"]
        if x["pair_kind"] == "hallucination":   # asks about an absent finding; "yes" would be a hallucination
            assert not present and (chosen, rejected) == ("no", "yes"), r["id"]
        else:                                   # asks about a present finding; "no" would be a miss
            assert present and (chosen, rejected) == ("yes", "no"), r["id"]
        assert r["meta"]["answer"] == chosen and r["meta"]["answer_type"] == "closed"
        kinds[x["pair_kind"]] += 1
    assert kinds["hallucination"] > 0 and kinds["omission"] > 0
    assert summary["by_kind"]["hallucination"] == kinds["hallucination"]


def _exists(case, key):
    """Existence-question truth read directly from cases.jsonl: ``<finding>_<side>``, ``lesion_<organ>``,
    ``cardiomegaly``; any other key is a finding MedPhantom never draws (absent)."""
    f, mod = case["truth"]["findings"], case["modality"]
    if key == "cardiomegaly":
        return f["cardiomegaly"]["present"]
    name, _, where = key.partition("_")
    if mod in ("xray", "ct") and name in f and where in ("left", "right"):
        return f[name]["present"] and f[name]["side"] == where
    if mod == "ct3d" and name == "lesion" and where:
        organ, side = f["lesion"].get("organ"), f["lesion"].get("side")
        names = {organ, f"{side} {organ}"} if side else {organ}
        return f["lesion"]["present"] and where.replace("_", " ") in names
    return False


def test_existence_pairs_are_balanced_and_follow_the_ground_truth(build):
    out, summary, cases = build
    recs = [r for r in read_records(out / "records" / "preference.jsonl")[0]
            if r["meta"]["extra"]["pair_kind"].startswith("existence")]
    kinds = Counter(r["meta"]["extra"]["pair_kind"] for r in recs)
    assert kinds["existence_present"] == kinds["existence_absent"] > 0
    assert summary["by_kind"]["existence_absent"] == kinds["existence_absent"]
    assert {r["meta"]["modality"] for r in recs} <= {"xray", "ct", "ct3d"}
    for r in recs:
        x = r["meta"]["extra"]
        chosen, rejected = r["chosen"][0]["content"][0]["text"], r["rejected"][0]["content"][0]["text"]
        truth = _exists(cases[x["case_id"]], x["finding"])
        assert (chosen, rejected) == (("yes", "no") if truth else ("no", "yes")), r["id"]
        assert truth == (x["pair_kind"] == "existence_present"), r["id"]
        q = r["messages"][0]["content"][-1]["text"]
        assert q.endswith("?") and ("Is there" in q or "show" in q or "see" in q)
    # POPE's own objects are not trained on: no question names one of the trust suite's never-drawn findings
    from medmllm.eval.trust import POPE_NEVER

    pope_phrases = {p for per in POPE_NEVER.values() for p in per.values()}
    assert not any(p in r["messages"][0]["content"][-1]["text"] for r in recs for p in pope_phrases)


def test_statement_pairs_add_exactly_one_absent_finding(build):
    from medmllm.data.phantoms.questions import caption, ct3d_report, ct_report, xray_report

    out, _, cases = build
    recs = [r for r in read_records(out / "records" / "preference.jsonl")[0]
            if r["meta"]["extra"]["pair_kind"] == "statement"]
    assert {r["meta"]["modality"] for r in recs} == {"xray", "ct", "ct3d", "ecg", "ehr"}
    for r in recs:
        case = cases[r["meta"]["extra"]["case_id"]]
        finding = r["meta"]["extra"]["finding"]
        chosen, rejected = r["chosen"][0]["content"][0]["text"], r["rejected"][0]["content"][0]["text"]
        truth = {"xray": lambda: xray_report(case["truth"]), "ct": lambda: ct_report(case["truth"]),
                 "ct3d": lambda: ct3d_report(case["truth"]), "ecg": lambda: caption(case),
                 "ehr": lambda: caption(case)}[case["modality"]]()
        assert chosen == truth                                   # the build's own true text
        assert not _present(case, finding)                       # the added finding is not in the case
        said = ASSERTS[(case["modality"], finding)]
        assert said in rejected and said not in chosen, (r["id"], rejected)


def test_deterministic_for_a_seed(build, tmp_path):
    from medmllm.data.phantoms.preference import build_preference

    out, _, _ = build
    path = out / "records" / "preference.jsonl"
    first = path.read_bytes()
    build_preference(out, seed=0)
    assert path.read_bytes() == first
    build_preference(out, seed=1)
    assert path.read_bytes() != first                            # other draws (which finding, which side...)
    build_preference(out, seed=0)


def test_missing_build_is_a_clear_error(tmp_path):
    from medmllm.data.phantoms.preference import build_preference
    from medmllm.errors import InputError

    with pytest.raises(InputError, match="cases.jsonl"):
        build_preference(tmp_path, seed=0)


def test_open_answer_pairs_reject_a_bare_yes_or_no(build):
    out, summary, cases = build
    recs = [r for r in read_records(out / "records" / "preference.jsonl")[0]
            if r["meta"]["extra"]["pair_kind"] == "open_answer"]
    gold = {r["id"]: r for r in read_records(out / "records" / "train.jsonl")[0]}
    assert recs and summary["by_kind"]["open_answer"] == len(recs)
    for r in recs:
        src = gold[r["id"].removesuffix("-pref_open_answer")]          # the instruction record it came from
        assert src["meta"]["answer_type"] == "open" and cases[src["meta"]["extra"]["case_id"]]["split"] == "train"
        assert r["messages"] == src["messages"][:1] and r["chosen"] == src["messages"][1:2]
        assert r["chosen"][0]["content"][0]["text"].lower() not in ("yes", "no")
        assert r["rejected"][0]["content"][0]["text"] in ("yes", "no")

"""The MedPhantom reasoning split: answers recomputed from the ground truth, splits by patient, gold traces."""

import json
import re

import pytest

from medmllm.data.records import read_records


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    from medmllm.data.phantoms.build import build_phantoms
    from medmllm.data.phantoms.reasoning import build_reasoning

    out = tmp_path_factory.getbasetemp() / "medphantom40_seed0"   # shared by the modules of a session (cached)
    build_phantoms(out, 40, seed=0, workers=1, progress=False)
    summary = build_reasoning(out, seed=0)
    cases = {c["case_id"]: c for c in map(json.loads, (out / "cases.jsonl").read_text().splitlines())}
    recs = {s: read_records(out / "records" / f"reasoning_{s}.jsonl")[0] for s in ("train", "validation", "test")}
    return out, summary, cases, recs


def _all(recs):
    return [r for v in recs.values() for r in v]


def test_splits_follow_the_builds_patients(build):
    out, summary, cases, recs = build
    assert summary["splits"] == {s: len(v) for s, v in recs.items()} and min(summary["splits"].values()) > 0
    assert summary["paths"] == {s: f"records/reasoning_{s}.jsonl" for s in recs}   # relative: the build can move
    manifest = json.loads((out / summary["manifest"]).read_text())
    assert {s: sorted(m["ids"]) for s, m in manifest["splits"].items()} == {
        s: sorted(r["id"] for r in rs) for s, rs in recs.items() if rs}       # the eval task's manifest
    for split, rs in recs.items():
        for r in rs:
            case = cases[r["meta"]["extra"]["case_id"]]
            assert r["meta"]["split"] == case["split"] == split and r["meta"]["patient_id"] == case["patient_id"]
            assert not case["counterfactual_of"]                      # twins are left out
    patients = {s: {r["meta"]["patient_id"] for r in rs} for s, rs in recs.items()}
    assert not patients["train"] & patients["test"] and not patients["train"] & patients["validation"]
    ids = [r["id"] for r in _all(recs)]
    assert len(ids) == len(set(ids))
    assert set(summary["templates"]) == {"reason_xray_two_findings", "reason_xray_finding_count",
                                         "reason_xray_nodule_mm", "reason_ct_lesion_mm", "reason_ct3d_lesion_extent",
                                         "reason_ecg_heart_rate", "reason_ehr_qsofa", "reason_ehr_sepsis_screen"}


def _xray_present(truth, words):
    key = {"a lung nodule": "nodule", "a pleural effusion": "effusion", "cardiomegaly": "cardiomegaly"}[words]
    return truth["findings"][key]["present"]


def _expected(r, case, out):
    """The answer recomputed from the truth (and the EHR file) without the module under test."""
    t, q = case["truth"], r["messages"][0]["content"][1]["text"]
    tpl = r["meta"]["extra"]["template"]
    if tpl == "reason_xray_two_findings":
        m = re.search(r"show (both|either) (.+?) (?:and|or) (.+?)\?", q)
        a, b = _xray_present(t, m.group(2)), _xray_present(t, m.group(3))
        return "yes" if ((a and b) if m.group(1) == "both" else (a or b)) else "no"
    if tpl == "reason_xray_finding_count":
        return str(sum(t["findings"][k]["present"] for k in ("nodule", "effusion", "cardiomegaly")))
    if tpl == "reason_xray_nodule_mm":
        assert f"{t['pixel_spacing_mm']:g} mm" in q                 # the spacing is given in the question
        return str(round(t["findings"]["nodule"]["diameter_px"] * t["pixel_spacing_mm"]))
    if tpl == "reason_ct_lesion_mm":
        return str(round(t["findings"]["lesion"]["diameter_mm"]))
    if tpl == "reason_ct3d_lesion_extent":
        first, last = t["findings"]["lesion"]["slice_range"]
        return str(round((last - first + 1) * t["spacing_mm"][0]))
    if tpl == "reason_ecg_heart_rate":
        rr = t["rr_intervals_s"]
        return 60.0 / (sum(rr) / len(rr))                             # compared with the tolerance below
    ehr = json.loads((out / case["files"]["json"]).read_text())
    v, note = ehr["vitals"], " ".join(ehr["notes"])
    altered = bool(re.search(r"confus|disoriented|GCS 1[0-4]\b", note))
    qsofa = int(v["resp_rate"]["value"] >= 22) + int(v["sbp"]["value"] <= 100) + int(altered)
    assert qsofa == t["flags"]["qsofa"]
    if tpl == "reason_ehr_qsofa":
        return str(qsofa)
    assert tpl == "reason_ehr_sepsis_screen"
    both = "both" in q
    a, b = qsofa >= 2, v["temp_c"]["value"] >= 38.0
    return "yes" if ((a and b) if both else (a or b)) else "no"


def test_answers_match_the_ground_truth(build):
    out, _, cases, recs = build
    for r in _all(recs):
        want = _expected(r, cases[r["meta"]["extra"]["case_id"]], out)
        got = r["meta"]["answer"]
        if isinstance(want, float):                                   # heart rate from rounded RR intervals
            assert abs(float(got) - want) <= 1.0, r["id"]
            assert r["meta"]["extra"]["tolerance"] == 5.0 and r["meta"]["extra"]["unit"] == "bpm"
        else:
            assert got == want, (r["id"], got, want)


def test_numeric_answers_carry_a_tolerance_of_one_pixel_or_slice(build):
    _, _, cases, recs = build
    for r in _all(recs):
        t, x = cases[r["meta"]["extra"]["case_id"]]["truth"], r["meta"]["extra"]
        if x["template"] in ("reason_xray_nodule_mm", "reason_ct_lesion_mm"):
            assert x["tolerance"] == pytest.approx(max(1.0, t["pixel_spacing_mm"]), abs=1e-3) and x["unit"] == "mm"
        elif x["template"] == "reason_ct3d_lesion_extent":
            assert x["tolerance"] == t["spacing_mm"][0]
        elif x["template"] in ("reason_xray_finding_count", "reason_ehr_qsofa"):
            assert x["tolerance"] == 0.0
        elif x["template"] == "reason_ecg_heart_rate":
            assert x["tolerance"] == 5.0
        else:
            assert "tolerance" not in x and r["meta"]["answer"] in ("yes", "no")


def test_gold_traces_follow_the_format_and_earn_full_reward(build):
    from medmllm.data.phantoms.reasoning import COT_INSTRUCTION
    from medmllm.train.rewards import accuracy, format_ok

    _, _, _, recs = build
    for r in _all(recs):
        assert r["messages"][0]["content"][1]["text"].endswith(COT_INSTRUCTION)
        target = r["messages"][-1]["content"][0]["text"]
        assert target == f"<think>{r['meta']['extra']['cot']}</think><answer>{r['meta']['answer']}</answer>"
        assert format_ok(target) and accuracy(target, r) == 1.0, r["id"]
    answers = [r["meta"]["answer"] for r in _all(recs) if r["meta"]["extra"]["template"] == "reason_xray_two_findings"]
    assert {"yes", "no"} <= set(answers)


def test_deterministic_for_a_seed(build):
    from medmllm.data.phantoms.reasoning import build_reasoning

    out = build[0]
    path = out / "records" / "reasoning_train.jsonl"
    first = path.read_bytes()
    build_reasoning(out, seed=0)
    assert path.read_bytes() == first

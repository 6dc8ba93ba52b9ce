"""Instruction records from MedPhantom cases: format, answers from the truth, balanced letters."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from medmllm.data.phantoms.ecg import generate_ecg
from medmllm.data.phantoms.ehr import generate_ehr
from medmllm.data.phantoms.questions import LETTERS, TEMPLATES, caption, case_records, choice, reposition_choice
from medmllm.data.records import validate_record


def _xray_truth(nodule=True, effusion=False, cardio=False):
    return {"modality": "xray", "organ": "chest", "view": "PA", "pixel_spacing_mm": 3.0,
            "findings": {"nodule": {"present": nodule, "side": "right" if nodule else None,
                                    "zone": "upper" if nodule else None, "diameter_px": 2.0 if nodule else None,
                                    "diameter_mm": 6.2 if nodule else None, "contrast": 0.2 if nodule else None,
                                    "center_rc": [40, 30] if nodule else None},
                         "effusion": {"present": effusion, "side": "left" if effusion else None},
                         "cardiomegaly": {"present": cardio, "ctr": 0.58 if cardio else 0.41}},
            "normal": not (nodule or effusion or cardio)}


def _ct_truth(lesion=True):
    return {"modality": "ct", "organ": "abdomen", "pixel_spacing_mm": 2.5, "window": "abdomen",
            "findings": {"lesion": {"present": lesion, "side": "left" if lesion else None,
                                    "diameter_mm": 14.6 if lesion else None, "hu_delta": -25.0 if lesion else None,
                                    "center_rc": [60, 80] if lesion else None}}, "normal": not lesion}


def _ct3d_truth(lesion=True):
    return {"modality": "ct3d", "spacing_mm": [5.0, 1.5, 1.5], "shape": [32, 64, 64],
            "findings": {"lesion": {"present": lesion, "organ": "liver" if lesion else None,
                                    "side": "right" if lesion else None, "slice_range": [10, 13] if lesion else None,
                                    "diameter_mm": 18.0 if lesion else None,
                                    "center_dhw": [11, 30, 20] if lesion else None}}, "normal": not lesion}


def _case(modality, truth, files, **kw):
    case = {"case_id": "case000001", "index": 1, "patient_id": "MP0-000001", "split": "test",
            "modality": modality, "truth": truth, "files": files}
    case.update(kw)
    return case


XRAY_FILES = {"png": "xray/case000001.png", "dicom": "xray/case000001.dcm"}


def _by_template(recs):
    return {r["meta"]["extra"]["template"]: r for r in recs}


def _assistant(rec):
    return rec["messages"][-1]["content"][0]["text"]


def test_xray_records_follow_the_truth():
    recs = case_records(_case("xray", _xray_truth(nodule=True, effusion=True), XRAY_FILES), np.random.default_rng(0))
    t = _by_template(recs)
    for r in recs:
        validate_record(r)
        m = r["meta"]
        assert m["dataset"] == "medphantom" and m["split"] == "test" and m["patient_id"] == "MP0-000001"
        assert m["modality"] == "xray" and m["organ"] == "chest" and m["extra"]["case_id"] == "case000001"
        assert m["answer"] == _assistant(r)
        assert r["messages"][0]["content"][0] == {"type": "image", "path": "../xray/case000001.png"}
    assert t["xray_nodule_yn"]["meta"]["answer"] == "yes"
    assert t["xray_effusion_yn"]["meta"]["answer"] == "yes"
    assert t["xray_cardiomegaly_yn"]["meta"]["answer"] == "no"
    assert t["xray_nodule_side"]["meta"]["answer"] == "right"
    assert t["xray_nodule_zone"]["meta"]["answer"] == "upper"
    assert t["xray_effusion_side"]["meta"]["answer"] == "left"
    assert t["xray_nodule_size"]["meta"]["answer"] == "6"
    ch = t["xray_nodule_location_choice"]["meta"]
    assert ch["answer_type"] == "choice" and len(ch["choices"]) == 4
    assert ch["choices"][LETTERS.index(ch["answer"])] == "right upper zone"
    assert sorted(ch["choices"]) == sorted(f"{s} {z} zone" for s in ("left", "right") for z in ("upper", "lower"))
    rep = t["xray_report"]["meta"]
    assert rep["task"] == "report" and rep["answer_type"] == "report"
    assert "FINDINGS:" in rep["answer"] and "IMPRESSION:" in rep["answer"]
    assert "right upper" in rep["answer"] and "left pleural effusion" in rep["answer"].lower()
    cap = t["xray_caption"]
    assert cap["stage"] == "alignment" and cap["meta"]["answer_type"] == "caption" and cap["meta"]["task"] == "caption"
    assert cap["meta"]["answer"] == ("Chest radiograph, PA view, with a small right upper zone nodule and a left "
                                     "pleural effusion.")


def test_absent_findings_ask_only_presence():
    recs = case_records(_case("xray", _xray_truth(nodule=False), XRAY_FILES), np.random.default_rng(1))
    t = _by_template(recs)
    assert t["xray_nodule_yn"]["meta"]["answer"] == "no"
    assert not {"xray_nodule_side", "xray_nodule_zone", "xray_nodule_size", "xray_effusion_side"} & set(t)
    assert "No acute cardiopulmonary abnormality." in t["xray_report"]["meta"]["answer"]
    assert t["xray_caption"]["meta"]["answer"] == "Chest radiograph, PA view, with no abnormality."


def test_ct_and_ct3d_records():
    ct = _by_template(case_records(_case("ct", _ct_truth(), {"dicom": "ct/c.dcm", "png": "ct/c.png"}),
                                   np.random.default_rng(2)))
    assert ct["ct_lesion_yn"]["messages"][0]["content"][1]["text"] == "Is there a focal lesion in the abdomen?"
    assert ct["ct_lesion_yn"]["meta"]["answer"] == "yes" and ct["ct_organ"]["meta"]["answer"] == "abdomen"
    assert ct["ct_lesion_side"]["meta"]["answer"] == "left" and ct["ct_lesion_size"]["meta"]["answer"] == "15"
    part = ct["ct_lesion_yn"]["messages"][0]["content"][0]
    assert part == {"type": "image", "path": "../ct/c.dcm", "options": {"window": "abdomen"}}
    m = ct["ct_organ_choice"]["meta"]
    assert m["choices"][LETTERS.index(m["answer"])] == "abdomen"
    v = _by_template(case_records(_case("ct3d", _ct3d_truth(), {"nifti": "ct3d/v.nii", "dicom_series": "ct3d/v"}),
                                  np.random.default_rng(3)))
    assert v["ct3d_lesion_yn"]["meta"]["answer"] == "yes" and v["ct3d_lesion_organ"]["meta"]["answer"] == "liver"
    kidney = _ct3d_truth()
    kidney["findings"]["lesion"].update(organ="kidney", side="left")
    k = _by_template(case_records(_case("ct3d", kidney, {"nifti": "v.nii"}), np.random.default_rng(3)))
    assert k["ct3d_lesion_organ"]["meta"]["answer"] == "left kidney"  # paired organs carry the side
    mk = k["ct3d_organ_choice"]["meta"]
    assert mk["choices"][LETTERS.index(mk["answer"])] == "left kidney"
    assert v["ct3d_lesion_slices"]["meta"]["answer"] == "10-13"
    assert v["ct3d_lesion_yn"]["messages"][0]["content"][0] == {"type": "volume", "path": "../ct3d/v.nii"}
    assert v["ct3d_lesion_yn"]["meta"]["organ"] == "liver"
    assert "slices 10-13" in v["ct3d_report"]["meta"]["answer"]
    v0 = _by_template(case_records(_case("ct3d", _ct3d_truth(False), {"nifti": "ct3d/v.nii"}), np.random.default_rng(3)))
    assert v0["ct3d_lesion_yn"]["meta"]["answer"] == "no" and "ct3d_lesion_organ" not in v0


def test_ecg_and_ehr_records_match_generator_truth():
    for i in range(30):
        sig, truth = generate_ecg(np.random.default_rng([1, i]))
        t = _by_template(case_records(_case("ecg", truth, {"hea": "ecg/e.hea"}), np.random.default_rng(i)))
        assert t["ecg_af_yn"]["meta"]["answer"] == ("yes" if truth["rhythm"] == "atrial fibrillation" else "no")
        assert t["ecg_st_elevation_yn"]["meta"]["answer"] == ("yes" if truth["rhythm"] == "st elevation" else "no")
        assert t["ecg_rhythm"]["meta"]["answer"] == truth["rhythm"]
        assert int(t["ecg_heart_rate"]["meta"]["answer"]) == round(truth["heart_rate_bpm"])
        m = t["ecg_rhythm_choice"]["meta"]
        assert m["choices"][LETTERS.index(m["answer"])] == truth["rhythm"] and len(set(m["choices"])) == 4
        assert t["ecg_af_yn"]["messages"][0]["content"][0] == {"type": "signal", "path": "../ecg/e.hea"}
    rec, truth = generate_ehr(np.random.default_rng(5))
    t = _by_template(case_records(_case("ehr", truth, {"json": "ehr/h.json"}), np.random.default_rng(0)))
    fl = truth["flags"]
    assert t["ehr_fever_yn"]["meta"]["answer"] == ("yes" if rec["vitals"]["temp_c"]["value"] >= 38.0 else "no")
    assert t["ehr_hypotension_yn"]["meta"]["answer"] == ("yes" if rec["vitals"]["sbp"]["value"] < 90 else "no")
    assert t["ehr_qsofa_ge2_yn"]["meta"]["answer"] == ("yes" if fl["qsofa"] >= 2 else "no")
    assert t["ehr_qsofa"]["meta"]["answer"] == str(fl["qsofa"])
    assert t["ehr_abnormal_labs"]["meta"]["answer"] == (", ".join(fl["abnormal_labs"]) or "none")


def test_every_template_is_declared_and_ids_unique():
    recs = []
    for k, (mod, truth, files) in enumerate([("xray", _xray_truth(True, True, True), XRAY_FILES),
                                             ("ct", _ct_truth(), {"dicom": "a.dcm"}),
                                             ("ct3d", _ct3d_truth(), {"nifti": "a.nii"})]):
        for seed in range(8):  # some seeds draw the multi-turn record
            recs += case_records(_case(mod, truth, files, case_id=f"c{k}-{seed}"), np.random.default_rng(seed))
    ids = [r["id"] for r in recs]
    assert len(ids) == len(set(ids))
    for r in recs:
        tpl = TEMPLATES[r["meta"]["extra"]["template"]]
        assert (tpl.modality, tpl.task, tpl.answer_type) == (r["meta"]["modality"], r["meta"]["task"],
                                                            r["meta"]["answer_type"])
    multi = [r for r in recs if r["meta"]["extra"]["template"] == "xray_multiturn"]
    assert multi, "expected some multi-turn records over 8 seeds (p=0.25 each)"
    roles = [m["role"] for m in multi[0]["messages"]]
    assert roles == ["user", "assistant"] * 3
    assert [m["content"][0]["text"] for m in multi[0]["messages"][1::2]] == ["yes", "yes", "yes"]


def test_choice_letter_is_uniform_and_options_distinct():
    rng = np.random.default_rng(0)
    letters = Counter()
    for _ in range(2000):
        opts, letter = choice(rng, "b", ["a", "b", "c", "d", "e"])
        assert len(set(opts)) == 4 and opts[LETTERS.index(letter)] == "b"
        letters[letter] += 1
    for letter in LETTERS:  # expected 500 each, sd ~19
        assert 420 <= letters[letter] <= 580, letters
    opts, letter = choice(np.random.default_rng(1), "x", ["x", "y"])  # short pool: fillers
    assert len(set(opts)) == 4 and opts[LETTERS.index(letter)] == "x"


def test_counterfactual_twin_asks_only_the_flipped_finding():
    twin = _case("xray", _xray_truth(nodule=False), XRAY_FILES, case_id="case000001-cf",
                 counterfactual_of="case000001", counterfactual_finding="nodule")
    recs = case_records(twin, np.random.default_rng(0))
    assert len(recs) == 1
    m = recs[0]["meta"]
    assert m["extra"]["template"] == "xray_nodule_yn" and m["answer"] == "no"
    assert m["extra"]["counterfactual_of"] == "case000001" and m["extra"]["case_id"] == "case000001-cf"
    orig = _case("xray", _xray_truth(nodule=True), XRAY_FILES, counterfactual_twin_finding="nodule")
    t = _by_template(case_records(orig, np.random.default_rng(0)))
    assert t["xray_nodule_yn"]["meta"]["extra"]["counterfactual_pair"] == m["extra"]["counterfactual_pair"]
    assert "counterfactual_pair" not in t["xray_effusion_yn"]["meta"]["extra"]


def test_ecg_caption_and_unknown_modality():
    _, truth = generate_ecg(np.random.default_rng(2))
    text = caption(_case("ecg", truth, {}))
    assert text.startswith("12-lead ECG, 10 s") and str(round(truth["heart_rate_bpm"])) in text
    with pytest.raises(ValueError):
        caption(_case("mri", {}, {}))


def test_reposition_choice_moves_only_the_correct_option():
    _, truth = generate_ecg(np.random.default_rng(7))
    rec = _by_template(case_records(_case("ecg", truth, {"hea": "e.hea"}), np.random.default_rng(0)))["ecg_rhythm_choice"]
    old = rec["meta"]["choices"]
    for pos in range(4):
        new = reposition_choice(rec, pos)
        m = new["meta"]
        assert m["answer"] == LETTERS[pos] == _assistant(new)
        assert m["choices"][pos] == truth["rhythm"]
        assert [o for o in m["choices"] if o != truth["rhythm"]] == [o for o in old if o != truth["rhythm"]]
        prompt = new["messages"][0]["content"][-1]["text"]
        assert f"{LETTERS[pos]}. {truth['rhythm']}" in prompt.splitlines()
        assert new["messages"][0]["content"][0] == rec["messages"][0]["content"][0]
    assert rec["meta"]["choices"] == old  # the input is not modified

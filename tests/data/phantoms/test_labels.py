"""Structured labels of MedPhantom cases: hand-made truths -> labels worked out by hand; record parts."""

from __future__ import annotations

import json

import pytest
import torch

from medmllm.data.dataset import PartLoader
from medmllm.data.phantoms.build import build_phantoms
from medmllm.data.phantoms.labels import (LABEL_CLASSES, LABEL_TASKS, REGION_TASKS, case_labels, case_part,
                                          case_regions)
from medmllm.errors import InputError


def _case(modality: str, truth: dict, **files) -> dict:
    return {"case_id": f"c-{modality}", "modality": modality, "truth": truth, "files": files, "split": "train"}


def _xray(nodule: dict | None = None, effusion: dict | None = None, cardio: bool = False) -> dict:
    nodule = nodule or {"present": False, "side": None, "zone": None, "center_rc": None, "diameter_px": None}
    effusion = effusion or {"present": False, "side": None}
    return {"modality": "xray", "findings": {"nodule": nodule, "effusion": effusion,
                                             "cardiomegaly": {"present": cardio, "ctr": 0.5}}}


def test_class_orders_the_hand_values_below_rely_on():
    assert LABEL_CLASSES["image"]["nodule_side"] == ("left", "right")
    assert LABEL_CLASSES["image"]["nodule_zone"] == ("lower", "upper")
    assert LABEL_CLASSES["image"]["ct_organ"] == ("abdomen", "chest", "head")
    assert LABEL_CLASSES["volume"]["lesion_organ"] == ("left kidney", "left lung", "liver", "right kidney",
                                                       "right lung", "spleen")
    assert LABEL_CLASSES["volume"]["lesion_band"] == ("lower", "middle", "upper")
    assert LABEL_CLASSES["signal"]["rhythm"][2] == "sinus bradycardia"
    assert LABEL_TASKS["signal"]["heart_rate"] == 0 and LABEL_TASKS["signal"]["rhythm"] == 5
    assert LABEL_TASKS["ehr"]["qsofa_vitals"] == 3


def test_xray_labels_and_ct_tasks_not_applicable():
    nod = {"present": True, "side": "left", "zone": "upper", "center_rc": [32.0, 96.0], "diameter_px": 4.0}
    kind, labels = case_labels(_case("xray", _xray(nodule=nod, cardio=True)))
    assert kind == "image"
    assert labels == {"nodule_present": 1, "nodule_side": 0, "nodule_zone": 1, "effusion_present": 0,
                      "effusion_side": None, "cardiomegaly": 1, "ct_lesion_present": None,
                      "ct_lesion_side": None, "ct_organ": None}
    kind, labels = case_labels(_case("xray", _xray(effusion={"present": True, "side": "right"})))
    assert (labels["nodule_present"], labels["nodule_side"], labels["effusion_present"], labels["effusion_side"],
            labels["cardiomegaly"]) == (0, None, 1, 1, 0)


def test_ct_slice_labels():
    truth = {"modality": "ct", "organ": "head", "window": "brain", "pixel_spacing_mm": 2.0,
             "findings": {"lesion": {"present": True, "side": "right", "diameter_mm": 10.0, "center_rc": [64, 40]}}}
    kind, labels = case_labels(_case("ct", truth))
    assert kind == "image"
    assert (labels["ct_lesion_present"], labels["ct_lesion_side"], labels["ct_organ"]) == (1, 1, 2)
    assert all(labels[t] is None for t in ("nodule_present", "nodule_side", "nodule_zone", "effusion_present",
                                            "effusion_side", "cardiomegaly"))
    truth["findings"]["lesion"] = {"present": False, "side": None, "diameter_mm": None, "center_rc": None}
    truth["organ"] = "abdomen"
    assert case_labels(_case("ct", truth))[1] == {**labels, "ct_lesion_present": 0, "ct_lesion_side": None,
                                                  "ct_organ": 0}


def test_volume_labels_organ_with_side_and_band():
    lesion = {"present": True, "organ": "kidney", "side": "left", "slice_range": [20, 25], "center_dhw": [22, 30, 40]}
    truth = {"modality": "ct3d", "shape": [32, 64, 64], "findings": {"lesion": lesion}}
    kind, labels = case_labels(_case("ct3d", truth))
    # centre slice 22 of 32: 22.5 / 32 = 0.70 of the depth -> upper third (index 2)
    assert (kind, labels) == ("volume", {"lesion_present": 1, "lesion_organ": 0, "lesion_band": 2})
    lesion.update(organ="liver", side="right", center_dhw=[5, 30, 20])          # 5.5 / 32 = 0.17 -> lower
    assert case_labels(_case("ct3d", truth))[1] == {"lesion_present": 1, "lesion_organ": 2, "lesion_band": 0}
    lesion.update(center_dhw=None, slice_range=[14, 17])                      # centre 15.5 -> 0.5 -> middle
    assert case_labels(_case("ct3d", truth))[1]["lesion_band"] == 1
    truth["findings"]["lesion"] = {"present": False, "organ": None, "side": None, "slice_range": None,
                                   "center_dhw": None}
    assert case_labels(_case("ct3d", truth))[1] == {"lesion_present": 0, "lesion_organ": None, "lesion_band": None}


def test_ecg_labels_rhythm_index_and_scaled_rate():
    kind, labels = case_labels(_case("ecg", {"modality": "ecg", "rhythm": "sinus bradycardia", "heart_rate_bpm": 50.0}))
    assert kind == "signal"
    assert labels["rhythm"] == 2
    assert labels["heart_rate"] == pytest.approx(-1.0)                          # (50 - 80) / 30


def test_ehr_labels_from_flags_and_missing_labs():
    flags = {"fever": True, "hypotension": False, "tachypnea": True, "altered_mentation": True, "qsofa": 3,
             "qsofa_ge_2": True, "abnormal_labs": ["wbc"]}
    kind, labels = case_labels(_case("ehr", {"modality": "ehr", "flags": flags, "missing": ["labs.sodium"]}))
    assert kind == "ehr"
    # qsofa 3 = tachypnoea + altered mentation + sbp <= 100; the vitals show two of them
    assert labels == {"fever": 1, "hypotension": 0, "tachypnea": 1, "low_sbp": 1, "qsofa_vitals": 2,
                      "lab_wbc": 1, "lab_lactate": 0, "lab_creatinine": 0, "lab_sodium": None,
                      "lab_potassium": 0, "lab_hemoglobin": 0}
    flags.update(tachypnea=False, altered_mentation=True, qsofa=1, fever=False, hypotension=False, abnormal_labs=[])
    labels = case_labels(_case("ehr", {"modality": "ehr", "flags": flags, "missing": []}))[1]
    assert (labels["low_sbp"], labels["qsofa_vitals"], labels["fever"], labels["lab_sodium"]) == (0, 0, 0, 0)


def test_regions_in_fractions_of_the_image_and_depth():
    nod = {"present": True, "side": "left", "zone": "upper", "center_rc": [32.0, 96.0], "diameter_px": 4.0}
    kind, regions = case_regions(_case("xray", _xray(nodule=nod)))
    assert kind == "image" and set(regions) == set(REGION_TASKS["image"])
    # pixel 32 covers [31.5, 32.5) -> fraction 32.5 / 128 at its centre; radius 2 px
    assert regions["nodule_where"] == pytest.approx((30.5 / 128, 94.5 / 128, 34.5 / 128, 98.5 / 128))
    assert regions["ct_lesion_where"] is None
    assert case_regions(_case("xray", _xray()))[1]["nodule_where"] == ()
    ct = {"modality": "ct", "organ": "head", "pixel_spacing_mm": 2.0,
          "findings": {"lesion": {"present": True, "side": "right", "diameter_mm": 10.0, "center_rc": [64, 40]}}}
    # radius 10 mm / 2 / 2 mm per px = 2.5 px
    assert case_regions(_case("ct", ct))[1]["ct_lesion_where"] == pytest.approx((62 / 128, 38 / 128, 67 / 128, 43 / 128))
    # sphere of 12 mm diameter, 2 mm in-plane voxels -> radius 3 voxels around voxel (30, 40) of 64 x 64
    lesion = {"present": True, "slice_range": [20, 25], "center_dhw": [22, 30, 40], "diameter_mm": 12.0}
    vol = {"modality": "ct3d", "shape": [32, 64, 64], "spacing_mm": [4.0, 2.0, 2.0], "findings": {"lesion": lesion}}
    assert case_regions(_case("ct3d", vol))[1]["lesion_where"] == pytest.approx(
        (20 / 32, 27.5 / 64, 37.5 / 64, 26 / 32, 33.5 / 64, 43.5 / 64))
    assert case_regions(_case("ecg", {}))[1] == {}


def test_bad_cases_raise_input_error():
    with pytest.raises(InputError, match="modality"):
        case_labels({"case_id": "x", "modality": "mri", "truth": {}})
    with pytest.raises(InputError, match="truth"):
        case_labels(_case("ecg", {"modality": "ecg"}))
    with pytest.raises(InputError, match="rhythm"):
        case_labels(_case("ecg", {"modality": "ecg", "rhythm": "torsades", "heart_rate_bpm": 200.0}))


# ----------------------------------------------------------------------------- on a real build

@pytest.fixture(scope="module")
def build(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantoms")
    build_phantoms(out, 40, seed=0, workers=1, progress=False)
    return out


def _record_parts(build) -> dict[str, dict]:
    """case_id -> the modality part of its instruction records (one part per case)."""
    parts: dict[str, dict] = {}
    for f in ("train", "validation", "test"):
        for line in (build / "records" / f"{f}.jsonl").read_text().splitlines():
            rec = json.loads(line)
            part = next(p for p in rec["messages"][0]["content"] if p["type"] != "text")
            parts.setdefault(rec["meta"]["extra"]["case_id"], part)
    return parts


def test_case_part_is_the_records_part_and_loads(build):
    cases = [json.loads(line) for line in (build / "cases.jsonl").read_text().splitlines()]
    record_parts = _record_parts(build)
    loader = PartLoader()
    want = {"image": (1, 128, 128), "volume": (1, 32, 64, 64), "signal": (12, 2500), "ehr": (12, 2)}
    seen = set()
    for case in cases:
        part = case_part(case)
        assert (build / part["path"]).is_file()
        rec = record_parts[case["case_id"]]
        assert {**part, "path": "../" + part["path"]} == rec          # records live in records/
        tensor, _ = loader(part, build)
        assert tuple(tensor.shape) == want[part["type"]] and tensor.dtype == torch.float32
        seen.add(case["modality"])
        kind, labels = case_labels(case)
        assert kind == part["type"] and set(labels) == set(LABEL_TASKS[kind])
    assert seen == {"xray", "ct", "ct3d", "ecg", "ehr"}
    ct = next(c for c in cases if c["modality"] == "ct")
    assert case_part(ct)["options"] == {"window": ct["truth"]["window"]}

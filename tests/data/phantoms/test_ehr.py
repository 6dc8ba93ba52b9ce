"""Synthetic EHR snapshots: flags recomputed from the stored values by the stated rules."""

from __future__ import annotations

import json
import re
from collections import Counter

import numpy as np
import pytest

from medmllm.data.phantoms.ehr import generate_ehr

UNITS = {"heart_rate": "bpm", "resp_rate": "/min", "sbp": "mmHg", "dbp": "mmHg", "temp_c": "Cel", "spo2": "%",
         "wbc": "10*9/L", "lactate": "mmol/L", "creatinine": "mg/dL", "sodium": "mmol/L", "potassium": "mmol/L",
         "hemoglobin": "g/dL"}
VITALS = ("heart_rate", "resp_rate", "sbp", "dbp", "temp_c", "spo2")
LABS = ("wbc", "lactate", "creatinine", "sodium", "potassium", "hemoglobin")
# Adult reference ranges, written down here from the contract/datasheet (not imported).
RANGES = {"wbc": (4.0, 11.0), "lactate": (0.5, 2.0), "creatinine": (0.6, 1.3), "sodium": (135, 145),
          "potassium": (3.5, 5.0), "hemoglobin": (12.0, 17.5)}
ALTERED = re.compile(r"confus|disoriented|GCS 1[0-4]\b", re.IGNORECASE)


@pytest.fixture(scope="module")
def cases():
    return [generate_ehr(np.random.default_rng([4, i]), patient_id=f"P{i}") for i in range(500)]


def _flags(rec: dict) -> dict:
    v = {k: x["value"] for k, x in rec["vitals"].items()}
    altered = bool(ALTERED.search(" ".join(rec["notes"])))
    qsofa = (v["resp_rate"] >= 22) + (v["sbp"] <= 100) + altered
    return {"fever": v["temp_c"] >= 38.0, "hypotension": v["sbp"] < 90, "tachypnea": v["resp_rate"] >= 22,
            "altered_mentation": altered, "qsofa": qsofa, "qsofa_ge_2": qsofa >= 2,
            "abnormal_labs": sorted(k for k, x in rec["labs"].items()
                                    if x["value"] < RANGES[k][0] or x["value"] > RANGES[k][1])}


def test_format_and_json(cases):
    rec, truth = cases[0]
    assert rec["patient_id"] == "P0"
    assert set(rec) == {"patient_id", "vitals", "labs", "demographics", "notes"}
    assert 18 <= rec["demographics"]["age"] <= 95 and rec["demographics"]["sex"] in ("F", "M")
    assert isinstance(rec["notes"], list) and rec["notes"] and all(isinstance(n, str) for n in rec["notes"])
    assert json.loads(json.dumps([rec, truth])) == [rec, truth]
    assert truth["modality"] == "ehr"


def test_flags_recomputed_from_values(cases):
    for rec, truth in cases:
        assert truth["flags"] == _flags(rec)


def test_units_and_missing_values_are_absent_not_zero(cases):
    n_missing = 0
    for rec, truth in cases:
        for group, names in (("vitals", VITALS), ("labs", LABS)):
            assert set(rec[group]) <= set(names)
            for name, entry in rec[group].items():
                assert entry["unit"] == UNITS[name]
                assert isinstance(entry["value"], (int, float)) and not isinstance(entry["value"], bool)
                assert entry["value"] > 0
            absent = {f"{group}.{k}" for k in names if k not in rec[group]}
            n_missing += len(absent)
            assert absent <= set(truth["missing"])
        assert {"temp_c", "sbp", "resp_rate"} <= set(rec["vitals"])  # the flags' inputs are always there
        assert len(truth["missing"]) == sum(k.split(".")[1] not in rec[k.split(".")[0]] for k in truth["missing"])
    assert n_missing > 0.05 * len(cases) * 9  # some values really are missing


def test_flags_balanced(cases):
    for flag in ("fever", "qsofa_ge_2", "altered_mentation", "tachypnea"):
        share = np.mean([t["flags"][flag] for _, t in cases])
        assert 0.4 <= share <= 0.6, (flag, share)
    assert 0.33 <= np.mean([t["flags"]["hypotension"] for _, t in cases]) <= 0.55  # designed 0.425
    qsofa = Counter(t["flags"]["qsofa"] for _, t in cases)
    assert set(qsofa) == {0, 1, 2, 3} and all(90 <= k <= 160 for k in qsofa.values()), qsofa  # uniform, 125 each
    # sbp 91-100: a qSOFA point without hypotension occurs
    assert any(91 <= r["vitals"]["sbp"]["value"] <= 100 for r, _ in cases)
    assert any(t["flags"]["abnormal_labs"] for _, t in cases) and any(not t["flags"]["abnormal_labs"] for _, t in cases)


def test_deterministic():
    assert generate_ehr(np.random.default_rng(9)) == generate_ehr(np.random.default_rng(9))
    assert generate_ehr(np.random.default_rng(9)) != generate_ehr(np.random.default_rng(10))

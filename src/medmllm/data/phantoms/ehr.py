"""Synthetic EHR snapshots (vitals, labs, demographics, a short note) with sepsis-screen flags.

The record is medmllm's EHR JSON::

    {"patient_id": "...",
     "vitals": {"heart_rate": {"value": 88, "unit": "bpm"}, "resp_rate": {"value": 24, "unit": "/min"}, ...},
     "labs": {"wbc": {"value": 13.2, "unit": "10*9/L"}, ...},
     "demographics": {"age": 71, "sex": "F"},
     "notes": ["71-year-old woman presenting with cough. Patient is confused."]}

Missing values are absent keys (never 0 or null). The three vitals the flags need
(temp_c, sbp, resp_rate) are always present; every other vital and lab is missing
with probability MISSING_P. Flags are computed from the stored (rounded) values:

* fever           temp_c >= 38.0
* hypotension     sbp < 90
* tachypnea       resp_rate >= 22
* altered_mentation  the note says so (confused / disoriented / GCS below 15)
* qsofa           (resp_rate >= 22) + (sbp <= 100) + altered_mentation, 0..3
* qsofa_ge_2      qsofa >= 2
* abnormal_labs   present labs outside REFERENCE_RANGES (value < low or value > high), sorted

Prevalences: fever 0.5; the qSOFA score is uniform over 0..3 (so qsofa_ge_2 is 0.5) and its
met criteria a uniform subset, so tachypnoea, sbp <= 100 and altered mentation are 0.5 each;
hypotension is 0.85 of the sbp <= 100 cases (0.425), the rest have sbp 91-100 (a qSOFA point
without hypotension). Each lab is abnormal with probability 0.3.
"""

from __future__ import annotations

import numpy as np

VITAL_UNITS = {"heart_rate": "bpm", "resp_rate": "/min", "sbp": "mmHg", "dbp": "mmHg", "temp_c": "Cel", "spo2": "%"}
LAB_UNITS = {"wbc": "10*9/L", "lactate": "mmol/L", "creatinine": "mg/dL", "sodium": "mmol/L",
             "potassium": "mmol/L", "hemoglobin": "g/dL"}
# Adult reference ranges (inclusive), same units as LAB_UNITS.
REFERENCE_RANGES = {"wbc": (4.0, 11.0), "lactate": (0.5, 2.0), "creatinine": (0.6, 1.3), "sodium": (135.0, 145.0),
                    "potassium": (3.5, 5.0), "hemoglobin": (12.0, 17.5)}
# Where abnormal values are drawn: (low side range, high side range); None = that side is not drawn.
_ABNORMAL = {"wbc": ((1.0, 3.5), (12.0, 25.0)), "lactate": (None, (2.3, 8.0)), "creatinine": (None, (1.5, 4.5)),
             "sodium": ((120.0, 132.0), (148.0, 160.0)), "potassium": ((2.6, 3.2), (5.3, 6.5)),
             "hemoglobin": ((6.0, 11.0), (18.0, 20.0))}
_DECIMALS = {"wbc": 1, "lactate": 1, "creatinine": 2, "sodium": 0, "potassium": 1, "hemoglobin": 1}
REQUIRED_VITALS = ("temp_c", "sbp", "resp_rate")
MISSING_P = 0.15
HYPOTENSIVE_GIVEN_LOW_SBP = 0.85  # share of the sbp <= 100 criterion met with sbp < 90
ALTERED_PHRASES = ("On examination the patient is confused.", "Patient is disoriented to time and place.",
                   "Family reports new confusion; GCS 14.", "Drowsy and confused, GCS 13.")
ALERT_PHRASES = ("Patient is alert and oriented.", "GCS 15, alert and oriented.", "Alert, answering questions appropriately.")
_COMPLAINTS = ("cough", "shortness of breath", "abdominal pain", "dysuria", "a fall at home", "weakness",
               "chest discomfort", "vomiting")


def _value(rng: np.random.Generator, lo: float, hi: float, decimals: int = 0) -> float | int:
    v = round(float(rng.uniform(lo, hi)), decimals)
    return int(v) if decimals == 0 else v


def _vitals(rng: np.random.Generator) -> tuple[dict, bool]:
    """Vital values (before missingness) and the drawn altered-mentation state.

    The qSOFA score is drawn first, uniform over 0..3, then which of its three criteria
    (resp_rate >= 22, sbp <= 100, altered mentation) are met; so qsofa_ge_2 has p = 0.5.
    """
    fever = rng.random() < 0.5
    score = int(rng.integers(4))
    met = set(int(k) for k in rng.permutation(3)[:score])   # 0: tachypnoea, 1: sbp <= 100, 2: mentation
    temp = _value(rng, 38.0, 40.5, 1) if fever else _value(rng, 36.0, 37.7, 1)
    if 1 in met and rng.random() < HYPOTENSIVE_GIVEN_LOW_SBP:
        sbp = _value(rng, 70, 89.4)
    elif 1 in met:
        sbp = _value(rng, 90.6, 100.4)   # rounds to 91..100: a qSOFA point, not hypotension
    else:
        sbp = _value(rng, 101, 165)
    rr = _value(rng, 22, 34.4) if 0 in met else _value(rng, 12, 21.4)
    hr = _value(rng, 60, 100) + (_value(rng, 10, 30) if fever else 0)
    vit = {"heart_rate": hr, "resp_rate": rr, "sbp": sbp, "dbp": int(round(sbp * rng.uniform(0.55, 0.7))),
           "temp_c": temp, "spo2": _value(rng, 88, 100)}
    return vit, 2 in met


def _labs(rng: np.random.Generator) -> dict:
    labs = {}
    for name, (lo, hi) in REFERENCE_RANGES.items():
        d = _DECIMALS[name]
        if rng.random() < 0.3:
            sides = [s for s in _ABNORMAL[name] if s is not None]
            a, b = sides[int(rng.integers(len(sides)))]
            labs[name] = _value(rng, a, b, d)
        else:  # inside the range with a margin of 5 % of its width
            m = 0.05 * (hi - lo)
            labs[name] = _value(rng, lo + m, hi - m, d)
    return labs


def compute_flags(record: dict) -> dict:
    """Flags from a record's stored values (the rules in the module docstring)."""
    v = {k: x["value"] for k, x in record["vitals"].items()}
    note = " ".join(record.get("notes", []))
    altered = any(p in note for p in ALTERED_PHRASES)
    qsofa = int(v["resp_rate"] >= 22) + int(v["sbp"] <= 100) + int(altered)
    abnormal = sorted(n for n, x in record["labs"].items()
                      if not REFERENCE_RANGES[n][0] <= x["value"] <= REFERENCE_RANGES[n][1])
    return {"fever": bool(v["temp_c"] >= 38.0), "hypotension": bool(v["sbp"] < 90),
            "tachypnea": bool(v["resp_rate"] >= 22), "altered_mentation": altered, "qsofa": qsofa,
            "qsofa_ge_2": qsofa >= 2, "abnormal_labs": abnormal}


def generate_ehr(rng: np.random.Generator, patient_id: str = "anonymous") -> tuple[dict, dict]:
    """Draw one EHR snapshot -> ``(record, truth)``.

    record: medmllm EHR JSON (see module docstring); truth = {"modality": "ehr", "flags": {...},
    "missing": [sorted "vitals.x" / "labs.y" keys left out]}. Pure function of ``rng``.
    """
    vit, altered = _vitals(rng)
    labs = _labs(rng)
    age, sex = int(rng.integers(18, 96)), ("F", "M")[int(rng.integers(2))]
    missing = []
    for name in list(vit):
        if name not in REQUIRED_VITALS and rng.random() < MISSING_P:
            del vit[name]
            missing.append(f"vitals.{name}")
    for name in list(labs):
        if rng.random() < MISSING_P:
            del labs[name]
            missing.append(f"labs.{name}")
    phrases = ALTERED_PHRASES if altered else ALERT_PHRASES
    person = {"F": "woman", "M": "man"}[sex]
    note = (f"{age}-year-old {person} presenting with {_COMPLAINTS[int(rng.integers(len(_COMPLAINTS)))]}. "
            f"{phrases[int(rng.integers(len(phrases)))]}")
    record = {
        "patient_id": str(patient_id),
        "vitals": {k: {"value": x, "unit": VITAL_UNITS[k]} for k, x in vit.items()},
        "labs": {k: {"value": x, "unit": LAB_UNITS[k]} for k, x in labs.items()},
        "demographics": {"age": age, "sex": sex},
        "notes": [note],
    }
    truth = {"modality": "ehr", "flags": compute_flags(record), "missing": sorted(missing)}
    return record, truth

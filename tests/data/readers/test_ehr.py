"""EHR readers: medmllm JSON, CSV (long and wide) and FHIR R4 Bundles, on fixtures written by hand."""

from __future__ import annotations

import base64
import json
import math
from pathlib import Path

import numpy as np
import pytest

from medmllm.data.readers import base, detect, read
from medmllm.data.readers.ehr import read_ehr_csv, read_ehr_json, read_fhir_bundle
from medmllm.errors import InputError


def _write(tmp_path: Path, name: str, content) -> Path:
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def _col(table: np.ndarray, meta: dict, name: str) -> np.ndarray:
    return table[:, meta["features"].index(name)]


# ----------------------------------------------------------------------------- JSON

SNAPSHOT = {
    "patient_id": "P0007",
    "vitals": {"heart_rate": {"value": 112, "unit": "bpm"}, "temp_c": "38.5",
               "sbp": {"value": 88, "unit": "mmHg", "code": "8480-6"}, "spo2": None},
    "labs": {"lactate": {"value": "2.4", "unit": "mmol/L"}},
    "demographics": {"age": 71, "sex": "F"},
    "notes": ["Confused overnight.", "Family at bedside."],
}


def test_json_snapshot_values_units_and_missing(tmp_path):
    path = _write(tmp_path, "snap.json", SNAPSHOT)
    assert detect(path) == "ehr_json"
    table, meta = read(path)
    assert table.shape == (1, 6) and table.dtype == np.float32
    assert meta["features"] == ["age", "heart_rate", "lactate", "sbp", "spo2", "temp_c"]
    np.testing.assert_array_equal(table[0], np.array([71, 112, 2.4, 88, np.nan, 38.5], np.float32))
    assert meta["units"] == [None, "bpm", "mmol/L", "mmHg", None, None]
    assert meta["codes"] == [None, None, None, "8480-6", None, None]
    assert meta["groups"] == ["demographics", "vitals", "labs", "vitals", "vitals", "vitals"]
    assert meta["times"] == [None] and meta["patient_id"] == "P0007"
    assert meta["categorical"] == {"sex": "F"} and meta["notes"] == SNAPSHOT["notes"]
    assert meta["kind"] == "ehr" and meta["format"] == "ehr_json"


def test_json_encounters_sorted_with_nan_for_absent(tmp_path):
    doc = {"patient_id": "P1", "demographics": {"age": 50, "sex": "M"},
           "encounters": [
               {"time": "2024-03-02T08:00:00", "vitals": {"heart_rate": 90}, "note": "Day 2."},
               {"time": "2024-03-01T08:00:00", "vitals": {"heart_rate": 80, "resp_rate": 24},
                "labs": {"wbc": {"value": 13.1, "unit": "10*9/L"}}},
           ]}
    table, meta = read_ehr_json(_write(tmp_path, "enc.json", doc))
    assert meta["times"] == ["2024-03-01T08:00:00", "2024-03-02T08:00:00"]
    assert meta["features"] == ["age", "heart_rate", "resp_rate", "wbc"]
    expected = np.array([[50, 80, 24, 13.1], [50, 90, np.nan, np.nan]], np.float32)
    np.testing.assert_array_equal(table, expected)
    assert meta["notes"] == ["Day 2."] and meta["note_times"] == ["2024-03-02T08:00:00"]


@pytest.mark.parametrize("doc, field", [
    ({"vitals": {"heart_rate": "abc"}}, "vitals.heart_rate: expected a number, got 'abc'"),
    ({"labs": {"wbc": {"value": True}}}, "labs.wbc: expected a number, got True"),
    ({"encounters": [{}, {"labs": {"wbc": [1]}}]}, r"encounters\[1\]\.labs\.wbc: expected a number"),
    ({"vitals": [1, 2]}, "vitals: expected an object"),
    ({"time": "yesterday", "vitals": {"hr": 1}}, "time: expected an ISO 8601 time"),
    ({"notes": [1]}, "notes: expected a string or a list of strings"),
])
def test_json_bad_values_name_the_field(tmp_path, doc, field):
    with pytest.raises(InputError, match=field):
        read_ehr_json(_write(tmp_path, "bad.json", doc))


def test_json_unit_conflict_and_top_level(tmp_path):
    doc = {"encounters": [{"time": 1, "vitals": {"t": {"value": 37, "unit": "Cel"}}},
                          {"time": 2, "vitals": {"t": {"value": 99, "unit": "[degF]"}}}]}
    with pytest.raises(InputError, match=r"encounters\[1\]\.vitals\.t.*unit"):
        read_ehr_json(_write(tmp_path, "units.json", doc))
    with pytest.raises(InputError, match="JSON object"):
        read_ehr_json(_write(tmp_path, "list.json", [1, 2]))
    with pytest.raises(InputError, match="invalid JSON"):
        read_ehr_json(_write(tmp_path, "broken.json", '{"vitals": '))


def test_size_limit(tmp_path, monkeypatch):
    path = _write(tmp_path, "snap.json", SNAPSHOT)
    monkeypatch.setattr(base, "MAX_TEXT_BYTES", 100)
    with pytest.raises(InputError, match="larger than the limit"):
        read_ehr_json(path)


# ----------------------------------------------------------------------------- CSV


def test_csv_long_format(tmp_path):
    text = ("name,value,unit,time\n"
            "heart_rate,88,bpm,2024-03-01T09:00:00\n"
            "heart_rate,95,bpm,2024-03-01T08:00:00\n"
            "lactate,,mmol/L,2024-03-01T09:00:00\n"
            "sex,F,,\n"
            "note,Patient drowsy,,2024-03-01T08:00:00\n")
    path = _write(tmp_path, "long.csv", text)
    assert detect(path) == "ehr_csv"
    table, meta = read(path)
    assert meta["features"] == ["heart_rate", "lactate"] and meta["units"] == ["bpm", "mmol/L"]
    assert meta["times"] == ["2024-03-01T08:00:00", "2024-03-01T09:00:00"]
    np.testing.assert_array_equal(table, np.array([[95, np.nan], [88, np.nan]], np.float32))
    assert meta["categorical"] == {"sex": "F"} and meta["notes"] == ["Patient drowsy"]


def test_csv_wide_format(tmp_path):
    text = ("patient_id,charttime,heart_rate [bpm],sbp (mmHg),sex,notes\n"
            "P9,2024-01-01T10:00:00Z,101,,M,\n"
            "P9,2024-01-01T06:00:00Z,92,118,M,stable\n")
    table, meta = read(_write(tmp_path, "wide.csv", text))
    assert meta["features"] == ["heart_rate", "sbp"] and meta["units"] == ["bpm", "mmHg"]
    assert meta["times"] == ["2024-01-01T06:00:00Z", "2024-01-01T10:00:00Z"]
    np.testing.assert_array_equal(table, np.array([[92, 118], [101, np.nan]], np.float32))
    assert meta["patient_id"] == "P9" and meta["categorical"] == {"sex": "M"} and meta["notes"] == ["stable"]


def test_csv_wide_single_row_without_time(tmp_path):
    table, meta = read_ehr_csv(_write(tmp_path, "one.csv", "hr,spo2,temp\n70,,36.6\n"))
    np.testing.assert_array_equal(table, np.array([[70, np.nan, 36.6]], np.float32))
    assert meta["times"] == [None]


@pytest.mark.parametrize("text, message", [
    ("hr,spo2\n70,95\n72,abc\n", "several|rows cannot be ordered"),
    ("time,hr,spo2\n1,70,95\n2,72,abc\n", r"line 3, column 'spo2': expected a number, got 'abc'"),
    ("name,value\nhr,70\nhr,fast\n", r"line 3, column 'value' \(hr\): expected a number, got 'fast'"),
    ("name,value,unit\nhr,70,bpm\nhr,72,/min\n", r"line 3.*unit '/min' differs from 'bpm'"),
    ("patient_id,hr\nA,1\n", None),
    ("patient_id,time,hr\nA,1,1\nB,2,2\n", "second patient 'B'"),
])
def test_csv_errors(tmp_path, text, message):
    path = _write(tmp_path, "e.csv", text)
    if message is None:
        assert read_ehr_csv(path)[1]["patient_id"] == "A"
        return
    with pytest.raises(InputError, match=message):
        read_ehr_csv(path)


# ----------------------------------------------------------------------------- FHIR

NOTE_TEXT = "Pt confused, RR 24. Suspect sepsis."


def _obs(code, display, value=None, unit=None, when="2024-03-01T08:00:00Z", **extra):
    res = {"resourceType": "Observation", "status": "final",
           "code": {"coding": [{"system": "http://loinc.org", "code": code, "display": display}]},
           "effectiveDateTime": when}
    if value is not None:
        res["valueQuantity"] = {"value": value, "unit": unit, "system": "http://unitsofmeasure.org"}
    res.update(extra)
    return {"resource": res}


def _bundle() -> dict:
    bp = _obs("85354-9", "Blood pressure panel", component=[
        {"code": {"coding": [{"system": "http://loinc.org", "code": "8480-6", "display": "Systolic blood pressure"}]},
         "valueQuantity": {"value": 87, "unit": "mm[Hg]"}},
        {"code": {"coding": [{"system": "http://loinc.org", "code": "8462-4", "display": "Diastolic blood pressure"}]},
         "valueQuantity": {"value": 52, "unit": "mm[Hg]"}},
    ])
    return {"resourceType": "Bundle", "type": "collection", "entry": [
        {"resource": {"resourceType": "Patient", "id": "pat-42", "gender": "female", "birthDate": "1950-02-03"}},
        _obs("8867-4", "Heart rate", 118, "/min"),
        _obs("8867-4", "Heart rate", 96, "/min", when="2024-03-01T12:00:00Z"),
        bp,
        _obs("2524-7", "Lactate", 3.1, "mmol/L", note=[{"text": "repeat in 2h"}]),
        {"resource": {"resourceType": "Observation", "status": "final", "code": {"text": "Mental status"},
                      "effectiveDateTime": "2024-03-01T08:00:00Z", "valueString": "confused"}},
        _obs("9279-1", "Respiratory rate", "fast", "/min"),  # bad entry: skipped, not fatal
        "not even an object",
        {"resource": {"resourceType": "Condition", "id": "c1"}},
        {"resource": {"resourceType": "DocumentReference", "status": "current", "date": "2024-03-01T09:00:00Z",
                      "content": [{"attachment": {"contentType": "text/plain",
                                                  "data": base64.b64encode(NOTE_TEXT.encode()).decode()}}]}},
    ]}


def test_fhir_bundle(tmp_path):
    path = _write(tmp_path, "bundle.json", _bundle())
    assert detect(path) == "fhir"
    table, meta = read(path)
    assert meta["format"] == "fhir" and meta["kind"] == "ehr"
    # the blood-pressure panel has no value of its own: only its components become features
    assert meta["features"] == ["Diastolic blood pressure", "Heart rate", "Lactate", "Systolic blood pressure"]
    assert meta["codes"] == ["8462-4", "8867-4", "2524-7", "8480-6"]
    assert meta["units"] == ["mm[Hg]", "/min", "mmol/L", "mm[Hg]"]
    assert meta["times"] == ["2024-03-01T08:00:00Z", "2024-03-01T12:00:00Z"]
    np.testing.assert_array_equal(_col(table, meta, "Heart rate"), [118, 96])
    np.testing.assert_array_equal(_col(table, meta, "Systolic blood pressure"), [87, np.nan])
    np.testing.assert_array_equal(_col(table, meta, "Diastolic blood pressure"), [52, np.nan])
    np.testing.assert_array_equal(_col(table, meta, "Lactate"), np.array([3.1, np.nan], np.float32))
    assert meta["patient_id"] == "pat-42"
    assert meta["categorical"] == {"Mental status": "confused", "birth_date": "1950-02-03", "sex": "female"}
    assert meta["notes"] == ["repeat in 2h", NOTE_TEXT]
    assert [s["entry"] for s in meta["skipped"]] == [6, 7]
    assert "entry[6].resource.valueQuantity.value" in meta["skipped"][0]["reason"]
    assert "'fast'" in meta["skipped"][0]["reason"]
    assert meta["ignored_resources"] == {"Condition": 1}


def test_fhir_document_title_and_bad_base64(tmp_path):
    doc = {"resourceType": "Bundle", "entry": [
        {"resource": {"resourceType": "DocumentReference",
                      "content": [{"attachment": {"contentType": "application/pdf", "data": "JVBERi0=",
                                                  "title": "Discharge summary"}}]}},
        {"resource": {"resourceType": "DocumentReference",
                      "content": [{"attachment": {"contentType": "text/plain", "data": "%%%not base64"}}]}},
    ]}
    table, meta = read_fhir_bundle(_write(tmp_path, "docs.json", doc))
    assert table.shape == (1, 0) and meta["times"] == [None]
    assert meta["notes"] == ["Discharge summary"]
    assert meta["skipped"][0]["entry"] == 1 and "content[0].attachment.data" in meta["skipped"][0]["reason"]


@pytest.mark.parametrize("doc, message", [
    ({"resourceType": "Patient", "id": "x"}, "resourceType: expected 'Bundle', got 'Patient'"),
    ([{"resourceType": "Bundle"}], "expected a FHIR Bundle object"),
    ({"resourceType": "Bundle", "entry": {"a": 1}}, "entry: expected a list"),
    ({"resourceType": "Bundle", "entry": []}, "no entries"),
    ({"resourceType": "Bundle", "entry": [{"resource": {"resourceType": "Observation", "code": {}}}]},
     r"entry\[0\]\.resource\.code"),
])
def test_fhir_fatal_errors(tmp_path, doc, message):
    with pytest.raises(InputError, match=message):
        read_fhir_bundle(_write(tmp_path, "b.json", doc))


def test_fhir_code_text_fallback_and_loinc_from_any_coding(tmp_path):
    doc = {"resourceType": "Bundle", "entry": [{"resource": {
        "resourceType": "Observation", "effectiveDateTime": "2024-05",
        "code": {"coding": [{"system": "http://snomed.info/sct", "code": "271649006"},
                            {"system": "http://loinc.org", "code": "8480-6"}], "text": "SBP"},
        "valueQuantity": {"value": 140, "code": "mm[Hg]"}}}]}
    table, meta = read_fhir_bundle(_write(tmp_path, "b.json", doc))
    assert meta["features"] == ["SBP"] and meta["codes"] == ["8480-6"] and meta["units"] == ["mm[Hg]"]
    assert meta["times"] == ["2024-05"] and table[0, 0] == 140 and not math.isnan(table[0, 0])

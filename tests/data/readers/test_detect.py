import pytest

from medmllm.data.readers import detect
from medmllm.errors import InputError, UnsupportedFormatError


@pytest.mark.parametrize("name, text, expected", [
    ("sig.csv", "# fs=500\nI,II\n0.1,0.2\n", "signal_csv"),
    ("sig.csv", "time,I,II\n0.000,0.1,0.2\n0.002,0.1,0.2\n", "signal_csv"),
    ("ehr.csv", "time,name,value\n2024-01-01T10:00,heart_rate,80\n", "ehr_csv"),
    ("ehr.csv", "time,heart_rate,sbp\n2024-01-01T10:00,80,120\n", "ehr_csv"),
    ("ehr.csv", "name,value,unit\nheart_rate,80,bpm\n", "ehr_csv"),
    ("e.json", '{"resourceType": "Bundle", "entry": []}', "fhir"),
    ("e.json", '{"vitals": {"heart_rate": 80}}', "ehr_json"),
])
def test_detect_text_formats(tmp_path, name, text, expected):
    p = tmp_path / name
    p.write_text(text)
    assert detect(p) == expected


def test_detect_refuses_unknown_and_empty(tmp_path):
    unknown = tmp_path / "x.bin"
    unknown.write_bytes(b"\x00\x01garbage")
    with pytest.raises(UnsupportedFormatError, match="x.bin"):
        detect(unknown)
    empty = tmp_path / "e.png"
    empty.write_bytes(b"")
    with pytest.raises(InputError, match="empty"):
        detect(empty)
    with pytest.raises(InputError, match="does not exist"):
        detect(tmp_path / "missing.dcm")

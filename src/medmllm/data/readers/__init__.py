"""One reader interface for every file format: ``read(path) -> (array, meta)``.

The reader is chosen from the file's content (magic bytes) first and its suffix
second; pass ``reader="name"`` to force one. Heavy libraries (pydicom, nibabel,
wfdb) are imported inside the reader that needs them.

>>> arr, meta = read("scan.dcm")          # doctest: +SKIP
>>> meta["format"], arr.shape              # doctest: +SKIP
('dicom', (512, 512))
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

from medmllm.errors import InputError, UnsupportedFormatError
from medmllm.data.readers.base import ReadResult, check_file
from medmllm.registry import Registry

# name -> "module:function"; resolved lazily so `import medmllm` stays light.
_READER_TARGETS = {
    "dicom": "medmllm.data.readers.dicom:read_dicom",
    "dicom_series": "medmllm.data.readers.dicom:read_dicom_series",
    "nifti": "medmllm.data.readers.nifti:read_nifti",
    "image": "medmllm.data.readers.image:read_image",
    "wfdb": "medmllm.data.readers.waveform:read_wfdb",
    "signal_csv": "medmllm.data.readers.waveform:read_signal_csv",
    "ehr_csv": "medmllm.data.readers.ehr:read_ehr_csv",
    "ehr_json": "medmllm.data.readers.ehr:read_ehr_json",
    "fhir": "medmllm.data.readers.ehr:read_fhir_bundle",
}

READERS: Registry[str] = Registry("reader")
for _name, _target in _READER_TARGETS.items():
    READERS.register(_name, _target)

_IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"II*\x00", b"MM\x00*", b"BM", b"GIF8")
_SIGNAL_CSV_FIRST_COLUMNS = {"time", "t", "time_s", "seconds", "sample"}


def get_reader(name: str):
    """Return the reader function registered under ``name`` (exact name)."""
    module, func = READERS.get(name).split(":")
    return getattr(importlib.import_module(module), func)


def _is_nifti_header(head: bytes) -> bool:
    if len(head) < 4:
        return False
    return any(int.from_bytes(head[:4], order) in (348, 540) for order in ("little", "big"))


def _float(cell: str) -> bool:
    try:
        float(cell)
        return True
    except ValueError:
        return False


def _detect_csv(p: Path, sep: str) -> str:
    """Signal CSV: a ``# fs=`` comment, or a time/sample first column with numeric data and no
    name/value columns. Everything else is EHR (long or wide format)."""
    with open(p, "rb") as fh:
        head = fh.read(8192).decode("utf-8", "replace").lstrip("\ufeff")
    lines = [ln for ln in head.splitlines() if ln.strip()]
    comments = [ln for ln in lines if ln.lstrip().startswith("#")]
    rows = [[c.strip().strip('"').lower() for c in ln.split(sep)] for ln in lines if not ln.lstrip().startswith("#")]
    if any("fs=" in c.replace(" ", "").lower() for c in comments):
        return "signal_csv"
    if not rows:
        return "ehr_csv"
    header = rows[0]
    long_format = "name" in header and "value" in header
    numeric_first = len(rows) > 1 and _float(rows[1][0])
    if header[0] in _SIGNAL_CSV_FIRST_COLUMNS and numeric_first and not long_format:
        return "signal_csv"
    return "ehr_csv"


def detect(path: str | os.PathLike) -> str:
    """Name of the reader for ``path``, from content first, then suffix.

    Raises UnsupportedFormatError (an InputError) when nothing matches.
    """
    p = Path(path)
    if p.is_dir():
        return "dicom_series"
    check_file(p)
    name = p.name.lower()
    with open(p, "rb") as fh:
        head = fh.read(512)
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    if any(head.startswith(m) for m in _IMAGE_MAGIC):
        return "image"
    if head[:2] == b"\x1f\x8b":
        if name.endswith((".nii.gz", ".nii")):
            return "nifti"
        raise UnsupportedFormatError(p, "gzip-compressed file that is not .nii.gz; only NIfTI may be gzipped")
    if name.endswith((".nii", ".hdr", ".img")) or _is_nifti_header(head) and not name.endswith((".csv", ".json", ".hea")):
        return "nifti"
    if name.endswith(".hea") or (name.endswith(".dat") and p.with_suffix(".hea").exists()):
        return "wfdb"
    if name.endswith(".dcm") or name.endswith(".dicom"):
        return "dicom"  # DICOM without the 128-byte preamble
    if name.endswith(".json"):
        stripped = head.lstrip()
        return "fhir" if b'"resourceType"' in head and b"Bundle" in head and stripped[:1] == b"{" else "ehr_json"
    if name.endswith((".csv", ".tsv")):
        return _detect_csv(p, "," if name.endswith(".csv") else "\t")
    raise UnsupportedFormatError(
        p, "unrecognised format: expected DICOM, NIfTI, PNG/JPEG/TIFF, WFDB (.hea), CSV or JSON/FHIR"
    )


def read(path: str | os.PathLike, reader: str | None = None, **options) -> ReadResult:
    """Read any supported file (or a DICOM series directory) -> ``(array, meta)``.

    ``reader`` forces a reader by exact name (see ``READERS.names()``); ``options``
    go to that reader. Every input problem raises InputError naming the file.
    """
    name = reader or detect(path)
    fn = get_reader(name)
    return fn(path, **options)


__all__ = ["READERS", "InputError", "UnsupportedFormatError", "detect", "get_reader", "read"]

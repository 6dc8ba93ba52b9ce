"""Fuzz every reader with mutated real files: the only exception ever allowed is InputError.

Seeds are files no one here wrote (pydicom's and nibabel's bundled test data) plus a PNG
and a WFDB record made here. Mutations: random byte overwrites, truncation, inserted junk,
and structured "absurd header" edits (declared sizes far beyond the bytes present).
A few hundred cases run by default; `pytest -m slow` runs a few thousand.
"""

from __future__ import annotations

import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medmllm.data.readers import read
from medmllm.errors import InputError

pydicom = pytest.importorskip("pydicom")
nibabel = pytest.importorskip("nibabel")

DEFAULT_EXAMPLES = 60   # per seed kind (x5 kinds ~ 300 in the default run)
SLOW_EXAMPLES = 800     # per seed kind (~ 4000 in the slow run)


def _seed_files(root: Path) -> dict[str, list[Path]]:
    from nibabel.testing import data_path
    from pydicom.data import get_testdata_file
    from PIL import Image
    import wfdb

    root.mkdir(parents=True, exist_ok=True)
    dicoms = [Path(get_testdata_file(n)) for n in ("CT_small.dcm", "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm",
                                                   "SC_rgb_rle_2frame.dcm")]
    niftis = [Path(data_path) / "example_nifti2.nii.gz", Path(data_path) / "anatomical.nii"]
    rng = np.random.default_rng(0)
    png = root / "seed.png"
    Image.fromarray(rng.integers(0, 255, (24, 20), dtype=np.uint8)).save(png)
    sig = np.stack([np.sin(np.linspace(0, 20, 500)), np.cos(np.linspace(0, 20, 500))], 1)
    wfdb.wrsamp("rec", fs=250, units=["mV", "mV"], sig_name=["I", "II"], p_signal=sig, fmt=["16", "16"],
                write_dir=str(root))
    return {"dicom": dicoms, "nifti": niftis, "png": [png], "wfdb_dat": [root / "rec.dat"], "wfdb_hea": [root / "rec.hea"]}


def _absurd_header(kind: str, data: bytearray, value: int) -> bytearray:
    """Overwrite a size field with a huge (or zero/negative) value, keeping the rest intact."""
    if kind == "png" and len(data) >= 33:
        ihdr = bytes(data[12:16]) + struct.pack(">II", value & 0x7FFFFFFF, value & 0x7FFFFFFF) + bytes(data[24:29])
        data[16:24] = ihdr[4:12]
        data[29:33] = struct.pack(">I", zlib.crc32(ihdr) & 0xFFFFFFFF)  # valid CRC: only the size is absurd
    elif kind == "nifti" and len(data) >= 56:
        for off in (42, 44, 46):  # dim[1..3] of a NIfTI-1 header (int16)
            data[off:off + 2] = struct.pack("<h", value & 0x7FFF)
    elif kind == "wfdb_hea":
        lines = data.decode("latin-1").splitlines()
        if lines:
            parts = lines[0].split()
            if len(parts) >= 4:
                parts[3] = str(value)  # signal length
            lines[0] = " ".join(parts)
        data = bytearray(("\n".join(lines) + "\n").encode("latin-1"))
    return data


def _dicom_absurd(src: Path, dst: Path, value: int) -> None:
    ds = pydicom.dcmread(src)
    ds.Rows = value & 0xFFFF
    ds.Columns = value & 0xFFFF
    if value % 3 == 0:
        ds.NumberOfFrames = str(value)
    ds.save_as(dst)


mutation = st.tuples(
    st.sampled_from(["flip", "truncate", "insert", "absurd"]),
    st.lists(st.tuples(st.integers(0, 1 << 30), st.integers(0, 255)), min_size=1, max_size=12),
    st.integers(0, (1 << 31) - 1),
)


def _apply(kind: str, src: Path, dst: Path, mut) -> None:
    how, edits, value = mut
    if kind == "dicom" and how == "absurd":
        _dicom_absurd(src, dst, value)
        return
    data = bytearray(src.read_bytes())
    if how == "flip":
        for pos, byte in edits:
            data[pos % len(data)] = byte
    elif how == "truncate":
        data = data[: edits[0][0] % len(data)]
    elif how == "insert":
        pos = edits[0][0] % (len(data) + 1)
        data[pos:pos] = bytes(b for _, b in edits)
    else:
        data = _absurd_header(kind, data, value)
    dst.write_bytes(bytes(data))


def _check_one(kind: str, seeds: list[Path], workdir: Path, pick: int, mut) -> None:
    src = seeds[pick % len(seeds)]
    case = workdir / f"case_{kind}"
    if case.exists():
        shutil.rmtree(case)
    case.mkdir(parents=True)
    if kind.startswith("wfdb"):
        for f in src.parent.glob("rec.*"):
            shutil.copy(f, case / f.name)
        target = case / src.name
        _apply(kind, src, target, mut)
        path = case / "rec.hea"
    else:
        path = case / src.name
        _apply(kind, src, path, mut)
    try:
        arr, meta = read(path)
    except InputError as exc:
        assert str(path.name) in str(exc) or str(case) in str(exc), f"error does not name the file: {exc}"
        return
    # A mutated file may still be readable; then the result must be a real array with metadata.
    assert isinstance(arr, np.ndarray) and isinstance(meta, dict) and arr.size > 0


def _make_check(kind: str, examples: int):
    @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(pick=st.integers(0, 10), mut=mutation)
    def run(seeds, workdir, pick, mut):
        _check_one(kind, seeds[kind], workdir, pick, mut)

    return run


KINDS = ["dicom", "nifti", "png", "wfdb_dat", "wfdb_hea"]


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    return _seed_files(tmp_path_factory.mktemp("seeds"))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind", KINDS)
def test_fuzz_readers_raise_only_input_error(kind, seeds, workdir):
    _make_check(kind, DEFAULT_EXAMPLES)(seeds, workdir)


@pytest.mark.slow
@pytest.mark.timeout(3000)
@pytest.mark.parametrize("kind", KINDS)
def test_fuzz_readers_raise_only_input_error_long(kind, seeds, workdir):
    _make_check(kind, SLOW_EXAMPLES)(seeds, workdir)

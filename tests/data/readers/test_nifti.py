"""NIfTI / Analyze reader against nibabel's own bundled test files.

Expected arrays are computed here without medmllm's orientation code: nibabel's
``as_closest_canonical`` gives RAS+ (axis 0 -> Right, 1 -> Anterior, 2 -> Superior);
medmllm's canonical layout is ("S", "P", "L"), i.e. RAS transposed to (k, j, i) with
the A and R axes flipped.
"""

from __future__ import annotations

import shutil
import struct
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from medmllm.data.readers import detect, read
from medmllm.data.readers.nifti import read_nifti
from medmllm.errors import InputError

nib = pytest.importorskip("nibabel")
from nibabel.testing import data_path  # noqa: E402

DATA = Path(data_path)
BUNDLED = ["anatomical.nii", "example4d.nii.gz", "example_nifti2.nii.gz", "standard.nii.gz",
           "reoriented_anat_moved.nii", "functional.nii"]


def _expected_spl(img, volume: int = 0) -> tuple[np.ndarray, tuple[float, float, float]]:
    """(volume in S,P,L layout, spacing) derived from nibabel's RAS+ canonical image."""
    ras = nib.as_closest_canonical(img)
    assert nib.aff2axcodes(ras.affine) == ("R", "A", "S")
    data = np.asarray(ras.dataobj, dtype=np.float64)
    if data.ndim == 4:
        data = data[..., volume]
    zooms = ras.header.get_zooms()[:3]
    spl = data.transpose(2, 1, 0)[:, ::-1, ::-1]  # (S, A->P, R->L)
    return spl, (float(zooms[2]), float(zooms[1]), float(zooms[0]))


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_files_match_nibabel_canonical(name):
    img = nib.load(DATA / name)
    vol, meta = read_nifti(DATA / name)
    expected, zooms = _expected_spl(img)
    assert vol.dtype == np.float32 and vol.shape == expected.shape
    np.testing.assert_allclose(vol, expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(meta["spacing"], zooms, rtol=1e-5)
    assert nib.aff2axcodes(np.array(meta["affine"])) == ("S", "P", "L")
    assert meta["orientation"] == "SPL"
    assert tuple(meta["original_axcodes"]) == nib.aff2axcodes(img.affine)
    assert meta["n_volumes"] == (img.shape[3] if len(img.shape) == 4 else 1)
    assert meta["datatype"] == img.header.get_data_dtype().name
    assert meta["kind"] == "volume" and meta["format"] == "nifti"


@pytest.mark.parametrize("name", ["anatomical.nii", "example4d.nii.gz", "reoriented_anat_moved.nii"])
def test_affine_maps_output_index_to_the_same_world_point(name):
    img = nib.load(DATA / name)
    original = np.asarray(img.dataobj, dtype=np.float64)
    original = original[..., 0] if original.ndim == 4 else original
    vol, meta = read_nifti(DATA / name)
    inv = np.linalg.inv(img.affine)
    rng = np.random.default_rng(0)
    for d, h, w in zip(*(rng.integers(0, n, 20) for n in vol.shape)):
        world = np.array(meta["affine"]) @ [d, h, w, 1]
        ijk = inv @ world
        idx = tuple(int(v) for v in np.round(ijk[:3]))
        np.testing.assert_allclose(ijk[:3], idx, atol=1e-4)
        assert vol[d, h, w] == pytest.approx(original[idx], rel=1e-6)


def test_description_and_nifti2_class():
    _, meta = read_nifti(DATA / "example_nifti2.nii.gz")
    assert meta["image_class"] == "Nifti2Image"
    # descrip is a NUL-terminated C string; this file holds b"FSL3.3\0 v2.25 NIfTI-1 ..." after the NUL
    raw = nib.load(DATA / "example_nifti2.nii.gz").header["descrip"].item()
    assert raw.startswith(b"FSL3.3\x00")
    assert meta["description"] == "FSL3.3"


def test_4d_volume_index_and_range():
    img = nib.load(DATA / "example4d.nii.gz")
    vol1, meta = read_nifti(DATA / "example4d.nii.gz", volume_index=1)
    expected, _ = _expected_spl(img, volume=1)
    np.testing.assert_allclose(vol1, expected, rtol=1e-6)
    assert meta["n_volumes"] == 2 and meta["volume_index"] == 1
    with pytest.raises(InputError, match="volume_index 2 out of range"):
        read_nifti(DATA / "example4d.nii.gz", volume_index=2)


def _permuted_copies(tmp_path: Path) -> list[Path]:
    """anatomical.nii re-saved with its axes flipped / swapped and the affine adjusted to match."""
    img = nib.load(DATA / "anatomical.nii")
    data = np.asarray(img.dataobj)
    aff = img.affine
    n0, n1 = data.shape[:2]
    flip0 = np.eye(4)
    flip0[0, 0], flip0[0, 3] = -1, n0 - 1  # new index i' = n0-1-i
    swap01 = np.eye(4)[[1, 0, 2, 3]]  # new (i', j') = (j, i)
    variants = {
        "flip0.nii": (data[::-1], aff @ flip0),
        "swap01.nii": (data.transpose(1, 0, 2), aff @ swap01),
        "flip1_swap02.nii.gz": (data[:, ::-1].transpose(2, 1, 0),
                                aff @ np.array([[1, 0, 0, 0], [0, -1, 0, n1 - 1], [0, 0, 1, 0], [0, 0, 0, 1]])
                                @ np.eye(4)[[2, 1, 0, 3]]),
    }
    paths = []
    for fname, (arr, a) in variants.items():
        out = tmp_path / fname
        nib.save(nib.Nifti1Image(np.ascontiguousarray(arr), a), out)
        paths.append(out)
    return paths


def test_permuted_and_flipped_files_read_to_the_same_canonical_array(tmp_path):
    ref, ref_meta = read_nifti(DATA / "anatomical.nii")
    codes = set()
    for path in _permuted_copies(tmp_path):
        vol, meta = read_nifti(path)
        codes.add(tuple(meta["original_axcodes"]))
        np.testing.assert_array_equal(vol, ref)
        np.testing.assert_allclose(meta["affine"], ref_meta["affine"], atol=1e-4)
        np.testing.assert_allclose(meta["spacing"], ref_meta["spacing"])
    assert len(codes) == 3  # the copies really are stored in different orientations
    assert ("L", "A", "S") not in codes


def test_scaling_is_applied(tmp_path):
    data = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    img = nib.Nifti1Image(data, np.diag([-1.0, 1, 1, 1]))  # LAS: index i runs right -> left
    img.header.set_slope_inter(2.0, 10.0)
    nib.save(img, tmp_path / "scaled.nii")
    vol, meta = read_nifti(tmp_path / "scaled.nii")
    # LAS (i, j, k) -> SPL (k, j flipped, i): L is already along i
    expected = (data.astype(np.float64) * 2 + 10).transpose(2, 1, 0)[:, ::-1, :]
    np.testing.assert_array_equal(vol, expected)
    assert meta["datatype"] == "int16"


def test_meter_units_are_converted_to_mm(tmp_path):
    img = nib.Nifti1Image(np.ones((2, 3, 4), np.float32), np.diag([0.002, 0.003, 0.004, 1.0]))
    img.header.set_xyzt_units("meter")
    nib.save(img, tmp_path / "m.nii")
    _, meta = read_nifti(tmp_path / "m.nii")
    # RAS (x: 2 mm, y: 3 mm, z: 4 mm) -> SPL spacing (z, y, x)
    np.testing.assert_allclose(meta["spacing"], [4.0, 3.0, 2.0])


def test_analyze_pair(tmp_path):
    data = np.random.default_rng(1).integers(-100, 100, (5, 6, 7)).astype(np.int16)
    img = nib.AnalyzeImage(data, np.diag([2.0, 3.0, 4.0, 1.0]))
    nib.save(img, tmp_path / "pair.hdr")
    assert (tmp_path / "pair.img").exists()
    expected, zooms = _expected_spl(nib.load(tmp_path / "pair.hdr"))
    for name in ("pair.hdr", "pair.img"):
        assert detect(tmp_path / name) == "nifti"
        vol, meta = read(tmp_path / name)
        np.testing.assert_array_equal(vol, expected)
        np.testing.assert_allclose(meta["spacing"], zooms)


def test_analyze_header_without_image_file(tmp_path):
    shutil.copy(DATA / "analyze.hdr", tmp_path / "analyze.hdr")
    with pytest.raises(InputError, match=r"analyze\.img is missing"):
        read_nifti(tmp_path / "analyze.hdr")


def test_truncated_file_is_refused_with_sizes(tmp_path):
    src = DATA / "anatomical.nii"
    full = src.stat().st_size
    cut = tmp_path / "cut.nii"
    cut.write_bytes(src.read_bytes()[: full - 1000])
    with pytest.raises(InputError, match=f"expected {full} bytes.*found {full - 1000}"):
        read_nifti(cut)


def test_truncated_gzip_is_an_input_error(tmp_path):
    src = DATA / "example4d.nii.gz"
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    with pytest.raises(InputError, match="cut.nii.gz"):
        read_nifti(cut)


def test_absurd_header_dims_fail_fast_without_allocating(tmp_path):
    src = DATA / "anatomical.nii"
    raw = bytearray(src.read_bytes())
    endian = "<" if struct.unpack("<i", raw[:4])[0] == 348 else ">"
    raw[42:48] = struct.pack(endian + "hhh", 30000, 30000, 30000)  # dim[1..3]
    bad = tmp_path / "huge.nii"
    bad.write_bytes(bytes(raw))
    assert nib.load(bad).shape == (30000, 30000, 30000)
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(InputError, match="above the limit"):
            read(bad)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - t0 < 2.0
    assert peak < 20 * 2**20


def test_non_nifti_content_is_an_input_error(tmp_path):
    bad = tmp_path / "junk.nii"
    bad.write_bytes(b"not a nifti header at all" * 20)
    with pytest.raises(InputError, match="junk.nii"):
        read_nifti(bad)


@pytest.mark.parametrize("name", ["anatomical.nii", "example4d.nii.gz", "example_nifti2.nii.gz"])
def test_auto_detection_picks_nifti(name):
    assert detect(DATA / name) == "nifti"
    vol, meta = read(DATA / name)
    assert meta["format"] == "nifti" and vol.ndim == 3

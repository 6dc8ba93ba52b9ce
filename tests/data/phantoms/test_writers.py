"""MedPhantom writers: valid DICOM / NIfTI / PNG, exact round trips, byte-identical output."""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.uid import UID, ExplicitVRLittleEndian

from medmllm.data.phantoms.writers import (
    apply_window,
    canonical_affine,
    write_dicom_image,
    write_dicom_series,
    write_nifti,
    write_png,
)
from medmllm.errors import InputError

DX_UID = "1.2.840.10008.5.1.4.1.1.1.1"
CT_UID = "1.2.840.10008.5.1.4.1.1.2"
MR_UID = "1.2.840.10008.5.1.4.1.1.4"


@pytest.fixture(scope="module")
def xray():
    rng = np.random.default_rng(0)
    return rng.integers(0, 4096, (48, 40)).astype(np.uint16)  # (H, W) 12-bit


@pytest.fixture(scope="module")
def volume():
    rng = np.random.default_rng(1)
    vol = rng.integers(-1024, 1500, (6, 20, 24)).astype(np.int16)  # (D, H, W) HU
    vol[0, 0, 0], vol[-1, -1, -1] = -1024, 3071  # the 12-bit extremes
    return vol, (5.0, 1.5, 1.25)


def _common_tags(ds, modality: str, sop_class: str) -> None:
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert ds.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID == sop_class
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    for uid in (ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID):
        assert UID(uid).is_valid
    assert ds.Modality == modality and ds.PatientID == "P0001"
    assert ds.PhotometricInterpretation == "MONOCHROME2" and ds.SamplesPerPixel == 1
    assert ds.BitsAllocated == 16 and ds.BitsStored in (12, 16) and ds.HighBit == ds.BitsStored - 1
    assert ds.PixelRepresentation == 0
    assert ds.StudyDate == "20000101"  # fixed, not the clock


# ----------------------------------------------------------------------------- single images


def test_dx_round_trip_and_tags(tmp_path, xray):
    path = write_dicom_image(tmp_path / "x.dcm", xray, modality="DX", pixel_spacing_mm=3.0,
                             patient_id="P0001", uid_seed="case-1", window=(2048, 4096), view="PA")
    ds = pydicom.dcmread(path)
    _common_tags(ds, "DX", DX_UID)
    assert np.array_equal(ds.pixel_array, xray)
    assert ds.BitsStored == 12 and [float(v) for v in ds.PixelSpacing] == [3.0, 3.0]
    assert (float(ds.WindowCenter), float(ds.WindowWidth)) == (2048.0, 4096.0)
    assert ds.PresentationIntentType == "FOR PRESENTATION" and ds.ViewPosition == "PA"
    assert list(ds.PatientOrientation) == ["L", "F"]  # PA: image right is the patient's left
    assert os.listdir(tmp_path) == ["x.dcm"]  # atomic write leaves no temp file


def test_ct_round_trip_in_hounsfield_units(tmp_path, volume):
    hu = volume[0][2]
    path = write_dicom_image(tmp_path / "c.dcm", hu, modality="CT", pixel_spacing_mm=(0.7, 0.8),
                             patient_id="P0001", uid_seed="case-2")
    ds = pydicom.dcmread(path)
    _common_tags(ds, "CT", CT_UID)
    assert float(ds.RescaleIntercept) == -1024.0 and float(ds.RescaleSlope) == 1.0
    back = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert np.array_equal(back, hu)
    assert [float(v) for v in ds.PixelSpacing] == [0.7, 0.8]
    assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    assert len(ds.ImagePositionPatient) == 3 and "WindowCenter" not in ds


def test_mr_and_rescale_variants(tmp_path):
    img = np.arange(20 * 30, dtype=np.uint16).reshape(20, 30) * 100  # max 59900 -> 16 bits
    ds = pydicom.dcmread(write_dicom_image(tmp_path / "m.dcm", img, modality="MR", pixel_spacing_mm=1.0,
                                           patient_id="P0001", uid_seed="m"))
    _common_tags(ds, "MR", MR_UID)
    assert ds.BitsStored == 16 and np.array_equal(ds.pixel_array, img)
    hu = np.array([[-2000.0, 0.0], [1000.0, 30000.0]])
    ds = pydicom.dcmread(write_dicom_image(tmp_path / "s.dcm", hu, modality="CT", pixel_spacing_mm=1.0,
                                           patient_id="P0001", uid_seed="s", rescale=(2.0, -4000.0)))
    assert np.array_equal(ds.pixel_array * 2.0 - 4000.0, hu)


@pytest.mark.parametrize(
    "img, kwargs",
    [
        (np.full((4, 4), -2000, np.int16), {"modality": "CT"}),  # below -1024: negative stored
        (np.zeros((4, 4), np.uint16), {"modality": "US"}),
        (np.zeros((4, 4, 3), np.uint16), {"modality": "DX"}),
        (np.zeros((4, 4), bool), {"modality": "DX"}),
        (np.full((4, 4), np.nan), {"modality": "CT"}),
        (np.zeros((4, 4), np.uint16), {"modality": "DX", "rescale": (1.0, -1024.0)}),
        (np.zeros((4, 4), np.uint16), {"modality": "DX", "pixel_spacing_mm": -1.0}),
        (np.zeros((4, 4), np.uint16), {"modality": "DX", "window": (40, 0)}),
    ],
)
def test_dicom_bad_input_raises_input_error(tmp_path, img, kwargs):
    kwargs = {"pixel_spacing_mm": 1.0, "patient_id": "P", "uid_seed": "u", **kwargs}
    with pytest.raises(InputError):
        write_dicom_image(tmp_path / "bad.dcm", img, **kwargs)
    assert not (tmp_path / "bad.dcm").exists()


# ----------------------------------------------------------------------------- series


def test_series_geometry_round_trip_and_consistent_uids(tmp_path, volume):
    vol, spacing = volume
    dz, dy, dx = spacing
    paths = write_dicom_series(tmp_path / "ser", vol, spacing, patient_id="P0001", uid_seed="case-3",
                               window=(40, 400))
    assert [p.name for p in paths] == [f"{d:04d}.dcm" for d in range(vol.shape[0])]
    dss = [pydicom.dcmread(p) for p in paths]
    aff = canonical_affine(vol.shape, spacing)
    z = [float(ds.ImagePositionPatient[2]) for ds in dss]
    assert np.allclose(np.diff(z), dz)  # increasing along z (inferior -> superior) by dz
    for d, ds in enumerate(dss):
        _common_tags(ds, "CT", CT_UID)
        assert ds.InstanceNumber == d + 1 and float(ds.SliceThickness) == dz
        hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        assert np.array_equal(hu, vol[d])
        # voxel (d, h, w): LPS = IPP + w*dx*row_dir + h*dy*col_dir; RAS = (-x, -y, z)
        row_dir, col_dir = np.array(ds.ImageOrientationPatient[:3], float), np.array(ds.ImageOrientationPatient[3:], float)
        for h, w in [(0, 0), (3, 7), (19, 23)]:
            lps = np.array(ds.ImagePositionPatient, float) + w * float(ds.PixelSpacing[1]) * row_dir \
                + h * float(ds.PixelSpacing[0]) * col_dir
            assert np.allclose(lps * [-1, -1, 1], (aff @ [d, h, w, 1])[:3])  # same world as the NIfTI
    for key in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        assert len({ds[key].value for ds in dss}) == 1
    assert len({ds.SOPInstanceUID for ds in dss}) == len(dss)


def test_series_files_are_canonical_pydicom_encodings(tmp_path, volume):
    """Each slice re-encoded by pydicom gives the same bytes (element order, lengths, meta group length)."""
    vol, spacing = volume
    for path in write_dicom_series(tmp_path / "s", vol, spacing, patient_id="P0001", uid_seed="u"):
        ds = pydicom.dcmread(path)
        out = tmp_path / "again.dcm"
        ds.save_as(out, enforce_file_format=True)
        assert out.read_bytes() == path.read_bytes()


def test_series_refuses_a_folder_with_other_files(tmp_path, volume):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "notes.txt").write_text("x")
    with pytest.raises(InputError):
        write_dicom_series(tmp_path / "s", volume[0], volume[1], patient_id="P", uid_seed="u")


# ----------------------------------------------------------------------------- NIfTI


@pytest.mark.parametrize("name", ["v.nii", "v.nii.gz"])
def test_nifti_round_trip_orientation_and_spacing(tmp_path, volume, name):
    vol, spacing = volume
    img = nib.load(write_nifti(tmp_path / name, vol, spacing))
    assert nib.aff2axcodes(img.affine) == ("S", "P", "L")
    assert np.allclose(img.header.get_zooms(), spacing)
    assert np.allclose(img.affine, canonical_affine(vol.shape, spacing))
    assert img.get_data_dtype() == np.int16 and np.array_equal(np.asarray(img.dataobj), vol)
    if name.endswith(".gz"):
        assert (tmp_path / name).read_bytes()[4:8] == b"\x00\x00\x00\x00"  # gzip mtime 0


def test_nifti_bad_input(tmp_path, volume):
    with pytest.raises(InputError):
        write_nifti(tmp_path / "v.img", volume[0], volume[1])
    with pytest.raises(InputError):
        write_nifti(tmp_path / "v.nii", volume[0][0], volume[1])
    with pytest.raises(InputError):
        write_nifti(tmp_path / "v.nii", volume[0], (1.0, 0.0, 1.0))


# ----------------------------------------------------------------------------- PNG & window


@pytest.mark.parametrize("dtype, mode", [(np.uint8, "L"), (np.uint16, "I;16")])
def test_png_round_trip(tmp_path, dtype, mode):
    img = (np.arange(12 * 9).reshape(12, 9) * (1 if dtype == np.uint8 else 600)).astype(dtype)
    with Image.open(write_png(tmp_path / "a.png", img)) as im:
        assert im.mode == mode and np.array_equal(np.array(im), img)
    with pytest.raises(InputError):
        write_png(tmp_path / "b.png", img.astype(np.float32))


def test_apply_window():
    hu = np.array([-1000, -160, 40, 240, 1000])
    # window 40/400 spans -160..240: -160 -> 0, 40 -> 127.5 -> 128 (round half to even), 240 -> 255
    assert apply_window(hu, 40, 400).tolist() == [0, 0, 128, 255, 255]
    assert apply_window(hu, 40, 400).dtype == np.uint8


# ----------------------------------------------------------------------------- determinism


def test_byte_identical_output(tmp_path, xray, volume):
    vol, spacing = volume
    for sub in ("a", "b"):
        d = tmp_path / sub
        write_png(d / "x.png", xray)
        write_dicom_image(d / "x.dcm", xray, modality="DX", pixel_spacing_mm=3.0, patient_id="P0001", uid_seed="k")
        write_nifti(d / "v.nii", vol, spacing)
        write_nifti(d / "v.nii.gz", vol, spacing)
        write_dicom_series(d / "ser", vol, spacing, patient_id="P0001", uid_seed="k")
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 4 + vol.shape[0]
    for rel in files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    other = write_dicom_image(tmp_path / "c.dcm", xray, modality="DX", pixel_spacing_mm=3.0,
                              patient_id="P0001", uid_seed="other")
    assert pydicom.dcmread(other).StudyInstanceUID != pydicom.dcmread(tmp_path / "a" / "x.dcm").StudyInstanceUID


# ----------------------------------------------------------------------------- medmllm readers


def test_medmllm_nifti_reader_returns_the_same_array(tmp_path, volume):
    pytest.importorskip("medmllm.data.readers.nifti")
    from medmllm.data.readers import read

    vol, spacing = volume
    arr, meta = read(write_nifti(tmp_path / "v.nii.gz", vol, spacing))
    assert arr.shape == vol.shape and np.array_equal(arr, vol)
    assert np.allclose(meta["spacing"], spacing)


def test_medmllm_dicom_readers_return_the_same_arrays(tmp_path, volume, xray):
    dicom = pytest.importorskip("medmllm.data.readers.dicom")
    vol, spacing = volume
    write_dicom_series(tmp_path / "ser", vol, spacing, patient_id="P0001", uid_seed="r")
    arr, meta = dicom.read_dicom_series(tmp_path / "ser")
    assert arr.shape == vol.shape and np.array_equal(arr, vol)
    assert np.allclose(meta["spacing"], spacing)
    img, _ = dicom.read_dicom(write_dicom_image(tmp_path / "x.dcm", xray, modality="DX", pixel_spacing_mm=3.0,
                                                patient_id="P0001", uid_seed="r"))
    assert np.array_equal(img, xray)

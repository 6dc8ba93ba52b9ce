"""DICOM readers against pydicom's bundled test files and synthetic series built from them.

Expected values come from pydicom itself (its decoders, LUT functions and waveform
decoding) or from formulas written out here, never from the reader's own output.
"""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")

from pydicom.data import get_testdata_file  # noqa: E402
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, get_decoder  # noqa: E402
from pydicom.sequence import Sequence  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402

from medmllm.data.readers import read  # noqa: E402
from medmllm.data.readers.dicom import read_dicom, read_dicom_series  # noqa: E402
from medmllm.errors import InputError  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _path(name: str) -> str:
    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"pydicom test file {name} is not installed")
    return path


def _pydicom_modality(name: str) -> np.ndarray:
    ds = pydicom.dcmread(_path(name))
    return np.asarray(apply_modality_lut(ds.pixel_array, ds), dtype=np.float32)


# --------------------------------------------------------------------------- grayscale values
def test_ct_modality_values_are_pydicom_hounsfield_units():
    ds = pydicom.dcmread(_path("CT_small.dcm"))
    expected = apply_modality_lut(ds.pixel_array, ds)  # float64 HU
    arr, meta = read_dicom(_path("CT_small.dcm"))
    assert arr.dtype == np.float32 and arr.shape == (ds.Rows, ds.Columns)
    np.testing.assert_array_equal(arr, expected.astype(np.float32))
    assert meta["kind"] == "image" and meta["format"] == "dicom" and meta["modality"] == "CT"
    assert meta["rescale_slope"] == float(ds.RescaleSlope)
    assert meta["rescale_intercept"] == float(ds.RescaleIntercept)
    assert meta["pixel_spacing_mm"] == [float(v) for v in ds.PixelSpacing] == meta["spacing"]
    assert meta["series_uid"] == ds.SeriesInstanceUID and meta["patient_id"] == ds.PatientID
    assert meta["voi_applied"] is None and meta["inverted"] is False
    assert meta["transfer_syntax"] == "Explicit VR Little Endian"
    json.dumps(meta)  # plain values only


def test_file_voi_is_pydicom_window_scaled_by_its_output_range():
    ds = pydicom.dcmread(_path("MR_small.dcm"))
    windowed = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds)
    # PS3.3 C.11.2.1.2: the window's output range is the stored-value range (no rescale here).
    assert "RescaleSlope" not in ds and "ModalityLUTSequence" not in ds
    if ds.PixelRepresentation == 0:
        y_min, y_max = 0, 2**ds.BitsStored - 1
    else:
        y_min, y_max = -(2 ** (ds.BitsStored - 1)), 2 ** (ds.BitsStored - 1) - 1
    expected = (windowed - y_min) / (y_max - y_min)
    arr, meta = read_dicom(_path("MR_small.dcm"), voi="file")
    assert arr.dtype == np.float32
    np.testing.assert_allclose(arr, expected, rtol=0, atol=1e-6)
    assert meta["voi_applied"] == "window"
    assert meta["window_center"] == float(ds.WindowCenter) and meta["window_width"] == float(ds.WindowWidth)


def test_file_voi_without_window_falls_back_to_minmax():
    hu = _pydicom_modality("CT_small.dcm").astype(np.float64)
    arr, meta = read_dicom(_path("CT_small.dcm"), voi="file")
    assert meta["voi_applied"] == "minmax"
    np.testing.assert_allclose(arr, (hu - hu.min()) / (hu.max() - hu.min()), atol=1e-6)


@pytest.mark.parametrize("center, width", [(40.0, 400.0), (-600.0, 1500.0), (0.0, 1.0)])
def test_explicit_window_follows_dicom_linear_formula(center, width):
    x = _pydicom_modality("CT_small.dcm").astype(np.float64)
    # PS3.3 C.11.2.1.2.1, output range [0, 1]
    lower = x <= center - 0.5 - (width - 1) / 2
    upper = x > center - 0.5 + (width - 1) / 2
    with np.errstate(divide="ignore", invalid="ignore"):
        linear = (x - (center - 0.5)) / (width - 1) + 0.5
    expected = np.where(lower, 0.0, np.where(upper, 1.0, linear))
    arr, meta = read_dicom(_path("CT_small.dcm"), voi=(center, width))
    assert meta["voi_applied"] == "explicit"
    np.testing.assert_allclose(arr, expected, atol=1e-6)
    assert (arr.min() == 0 or arr.max() == 1) and arr.min() < arr.max()  # clips, yet not constant


# --------------------------------------------------------------------------- codecs
@pytest.mark.parametrize(
    "name",
    [
        "MR_small_RLE.dcm",
        "MR_small_jp2klossless.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_implicit.dcm",
    ],
)
def test_lossless_encodings_decode_to_the_uncompressed_mr(name):
    ts = pydicom.dcmread(_path(name), stop_before_pixels=True).file_meta.TransferSyntaxUID
    if ts.is_compressed and not get_decoder(ts).is_available:
        pytest.skip(f"no pixel handler for {ts.name}")
    reference = pydicom.dcmread(_path("MR_small.dcm")).pixel_array.astype(np.float32)
    arr, meta = read_dicom(_path(name))
    np.testing.assert_array_equal(arr, reference)
    assert meta["transfer_syntax"] == ts.name


def test_rgb_jpeg_lossless_equals_rgb_rle():
    reference = pydicom.dcmread(_path("SC_rgb_rle.dcm")).pixel_array  # decoded by pydicom's RLE handler
    arr, meta = read_dicom(_path("SC_rgb_jpeg_gdcm.dcm"))
    assert arr.shape == (100, 100, 3) and arr.dtype == np.uint8
    np.testing.assert_array_equal(arr, reference)
    assert meta["color_space"] == "RGB" and meta["voi_applied"] is None


@pytest.mark.parametrize("name", ["JPGExtended.dcm", "JPEG2000.dcm", "693_J2KI.dcm", "image_dfl.dcm"])
def test_other_codecs_match_pydicom_decoding(name):
    arr, _ = read_dicom(_path(name))
    np.testing.assert_array_equal(arr, _pydicom_modality(name))


def test_file_without_preamble_or_file_meta_is_read(tmp_path):
    ds = pydicom.dcmread(_path("CT_small.dcm"))
    ds.preamble = None
    ds.file_meta = FileMetaDataset()
    target = tmp_path / "raw.dcm"
    pydicom.dcmwrite(target, ds, enforce_file_format=False, implicit_vr=True, little_endian=True)
    assert open(target, "rb").read(4) != b"\x00" * 4  # really no preamble
    arr, meta = read_dicom(target)
    np.testing.assert_array_equal(arr, _pydicom_modality("CT_small.dcm"))
    assert meta["transfer_syntax"] == "Implicit VR Little Endian"


# --------------------------------------------------------------------------- photometric / frames
def _monochrome1_copy(tmp_path):
    ds = pydicom.dcmread(_path("MR_small.dcm"))
    ds.PhotometricInterpretation = "MONOCHROME1"
    target = tmp_path / "mono1.dcm"
    ds.save_as(target)
    return target


def test_monochrome1_modality_values_are_flipped(tmp_path):
    target = _monochrome1_copy(tmp_path)
    x = _pydicom_modality("MR_small.dcm")
    arr, meta = read_dicom(target)
    np.testing.assert_array_equal(arr, (x.min() + x.max()) - x)
    assert meta["inverted"] is True and meta["photometric"] == "MONOCHROME1"
    raw, meta = read_dicom(target, invert_monochrome1=False)
    np.testing.assert_array_equal(raw, x)
    assert meta["inverted"] is False


def test_monochrome1_voi_output_is_one_minus(tmp_path):
    target = _monochrome1_copy(tmp_path)
    normal, _ = read_dicom(_path("MR_small.dcm"), voi=(600.0, 1600.0))
    arr, meta = read_dicom(target, voi=(600.0, 1600.0))
    np.testing.assert_allclose(arr, 1.0 - normal, atol=1e-7)
    assert meta["inverted"] is True and arr.min() >= 0 and arr.max() <= 1


def test_multiframe_shape_and_frame_selection():
    ds = pydicom.dcmread(_path("rtdose.dcm"))
    arr, meta = read_dicom(_path("rtdose.dcm"))
    assert arr.shape == (15, 10, 10) and meta["frames"] == 15
    np.testing.assert_array_equal(arr, ds.pixel_array.astype(np.float32))
    one, meta = read_dicom(_path("rtdose.dcm"), frame=7)
    assert one.shape == (10, 10) and meta["frame"] == 7
    np.testing.assert_array_equal(one, arr[7])
    for bad in (15, -1, 2.5):
        with pytest.raises(InputError, match="0 <= frame <= 14|in \\[0, 14\\]") as exc:
            read_dicom(_path("rtdose.dcm"), frame=bad)
        assert "rtdose.dcm" in str(exc.value)


def test_ybr_jpeg_multiframe_is_rgb_and_frame_selects():
    ds = pydicom.dcmread(_path("examples_ybr_color.dcm"))
    reference = ds.pixel_array  # pydicom converts YBR_FULL_422 to RGB
    arr, meta = read_dicom(_path("examples_ybr_color.dcm"))
    assert arr.shape == (30, 240, 320, 3) and arr.dtype == np.uint8
    np.testing.assert_array_equal(arr, reference)
    last, _ = read_dicom(_path("examples_ybr_color.dcm"), frame=29)
    np.testing.assert_array_equal(last, reference[29])
    assert meta["photometric"] == "YBR_FULL_422" and meta["color_space"] == "RGB"


def test_palette_colour_goes_through_its_lut():
    ds = pydicom.dcmread(_path("examples_palette.dcm"))
    arr, meta = read_dicom(_path("examples_palette.dcm"), voi="file")
    assert arr.shape == (ds.Rows, ds.Columns, 3)
    np.testing.assert_array_equal(arr, apply_color_lut(ds.pixel_array, ds))
    assert meta["color_space"] == "RGB"


def test_enhanced_shared_rescale_is_applied(tmp_path):
    ds = pydicom.dcmread(_path("MR_small.dcm"))
    raw = ds.pixel_array.astype(np.float64)
    transform = Dataset()
    transform.RescaleSlope, transform.RescaleIntercept, transform.RescaleType = "2", "-5", "US"
    group = Dataset()
    group.PixelValueTransformationSequence = Sequence([transform])
    ds.SharedFunctionalGroupsSequence = Sequence([group])
    ds.save_as(tmp_path / "enh.dcm")
    arr, _ = read_dicom(tmp_path / "enh.dcm")
    np.testing.assert_array_equal(arr, (2 * raw - 5).astype(np.float32))


# --------------------------------------------------------------------------- waveform
def test_ecg_waveform_is_a_signal():
    ds = pydicom.dcmread(_path("waveform_ecg.dcm"))
    group = ds.WaveformSequence[0]
    arr, meta = read_dicom(_path("waveform_ecg.dcm"))
    assert meta["kind"] == "signal" and arr.dtype == np.float32
    np.testing.assert_allclose(arr, ds.waveform_array(0).T, rtol=1e-6)
    assert arr.shape == (group.NumberOfWaveformChannels, group.NumberOfWaveformSamples)
    assert meta["fs"] == float(group.SamplingFrequency)
    names = [ch.ChannelSourceSequence[0].CodeMeaning for ch in group.ChannelDefinitionSequence]
    assert meta["lead_names"] == names and "Lead II" in names
    assert set(meta["units"]) == {"uV"}
    json.dumps(meta)


# --------------------------------------------------------------------------- errors
def _error_cases(tmp_path):
    empty = tmp_path / "empty.dcm"
    empty.write_bytes(b"")
    text = tmp_path / "notes.dcm"
    text.write_text("this is a plain text note, not a DICOM file\n" * 20)
    huge = tmp_path / "huge.dcm"
    ds = pydicom.dcmread(_path("CT_small.dcm"))
    ds.Rows = ds.Columns = 60000
    ds.save_as(huge)
    short_header = tmp_path / "cut.dcm"
    short_header.write_bytes(open(_path("CT_small.dcm"), "rb").read()[:300])
    return {
        "truncated": (_path("MR_truncated.dcm"), "truncated pixel data: expected 8192 bytes, found 8130"),
        "rtplan": (_path("rtplan.dcm"), "no pixel data (SOP class RT Plan Storage)"),
        "empty": (str(empty), "empty"),
        "text": (str(text), "not a DICOM file"),
        "huge": (str(huge), "above the limit"),
        "cut_header": (str(short_header), ""),
        "bad_jpeg": (_path("JPEG-lossy.dcm"), "cannot decode pixel data"),
    }


@pytest.mark.parametrize("case", ["truncated", "rtplan", "empty", "text", "huge", "cut_header", "bad_jpeg"])
def test_bad_files_raise_input_error_naming_the_file(tmp_path, case):
    path, reason = _error_cases(tmp_path)[case]
    if case == "truncated":  # derive the numbers: 64x64 pixels of 16 bits vs the bytes stored
        ds = pydicom.dcmread(path)
        assert ds.Rows * ds.Columns * ds.BitsAllocated // 8 == 8192 and len(ds.PixelData) == 8130
    with pytest.raises(InputError) as exc:
        read_dicom(path)
    assert path in str(exc.value) and reason in str(exc.value)


def test_corrupt_rle_stream_never_escapes_as_a_panic(tmp_path):
    """pylibjpeg-rle (Rust) panics on this stream; a PanicException is a BaseException."""
    from pydicom.encaps import encapsulate, generate_frames

    ds = pydicom.dcmread(_path("MR_small_RLE.dcm"))
    frame = bytearray(next(generate_frames(ds.PixelData, number_of_frames=1)))
    rng = np.random.default_rng(0)
    for _ in range(20):  # 20 rounds of 3 random byte writes: the 20th state makes the decoder index out of bounds
        for _ in range(3):
            frame[rng.integers(0, len(frame))] = rng.integers(0, 256)
    ds.PixelData = encapsulate([bytes(frame)])
    target = tmp_path / "corrupt_rle.dcm"
    ds.save_as(target)
    try:
        arr, _ = read_dicom(target)
    except InputError as exc:
        assert str(target) in str(exc)
    else:  # a decoder that survives must still give the declared shape
        assert arr.shape == (64, 64)


def test_decoder_base_exception_becomes_input_error(monkeypatch):
    class PanicException(BaseException):  # what pyo3 raises for a Rust panic
        pass

    def panic(*args, **kwargs):
        raise PanicException("index out of bounds")

    monkeypatch.setattr("pydicom.pixels.pixel_array", panic)
    with pytest.raises(InputError, match="PanicException: index out of bounds"):
        read_dicom(_path("MR_small_RLE.dcm"))


@pytest.mark.parametrize("voi", ["auto", (40, 0), (40,), "nan"])
def test_bad_voi_argument(voi):
    with pytest.raises(InputError, match="voi"):
        read_dicom(_path("CT_small.dcm"), voi=voi)


# --------------------------------------------------------------------------- series
D, H, W = 12, 10, 14  # canonical (S, P, L) test volume
DZ, DY, DX = 2.5, 0.8, 0.7  # mm: slice, row, column spacing
X0, Y0, Z0 = -20.0, 35.0, 100.0  # LPS position of voxel (0, 0, 0)


@pytest.fixture(scope="module")
def template():
    return pydicom.dcmread(_path("CT_small.dcm"))


@pytest.fixture(scope="module")
def volume():
    return np.random.default_rng(0).integers(-1000, 2000, size=(D, H, W)).astype(np.float32)  # HU


def _write_slice(template, path, image_hu, *, iop, ipp, spacing, series_uid, number, intercept=-1024.0):
    ds = copy.deepcopy(template)
    rows, cols = image_hu.shape
    ds.Rows, ds.Columns = rows, cols
    ds.RescaleSlope, ds.RescaleIntercept = 1, intercept
    ds.PixelData = np.round(image_hu - intercept).astype("<i2").tobytes()
    ds.ImageOrientationPatient = [float(v) for v in iop]
    ds.ImagePositionPatient = [float(v) for v in ipp]
    ds.PixelSpacing = [float(v) for v in spacing]
    ds.SliceThickness = 9.0  # deliberately wrong: spacing must come from the positions
    ds.SeriesInstanceUID = series_uid
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.InstanceNumber = number
    ds.save_as(path)


def _write_axial(template, folder, vol, series_uid=None, names=None):
    """Slice d of the (S, P, L) volume at z = Z0 + d*DZ; rows go posterior, columns go left."""
    folder.mkdir(exist_ok=True)
    series_uid = series_uid or generate_uid()
    n = vol.shape[0]
    numbers = np.random.default_rng(1).permutation(n) + 1  # scrambled InstanceNumber
    names = names or [f"img_{k:03d}.dcm" for k in np.random.default_rng(2).permutation(n)]
    for d in range(n):
        _write_slice(
            template, folder / names[d], vol[d],
            iop=[1, 0, 0, 0, 1, 0], ipp=[X0, Y0, Z0 + d * DZ], spacing=[DY, DX],
            series_uid=series_uid, number=int(numbers[d]), intercept=-1024.0 if d % 2 else -1000.0,
        )
    return series_uid


def _write_sagittal(template, folder, vol):
    """Slice w of the volume as a sagittal image: columns go posterior, rows go inferior."""
    folder.mkdir(exist_ok=True)
    uid = generate_uid()
    for w in range(vol.shape[2]):
        image = vol[::-1, :, w]  # (rows = S->I, cols = A->P)
        _write_slice(
            template, folder / f"sag_{w:03d}.dcm", image,
            iop=[0, 1, 0, 0, 0, -1], ipp=[X0 + w * DX, Y0, Z0 + (vol.shape[0] - 1) * DZ], spacing=[DZ, DY],
            series_uid=uid, number=vol.shape[2] - w,
        )


def _expected_ras(d, h, w):
    return np.array([-(X0 + w * DX), -(Y0 + h * DY), Z0 + d * DZ])


def test_axial_series_rebuilds_the_volume(tmp_path, template, volume):
    uid = _write_axial(template, tmp_path / "ax", volume)
    arr, meta = read_dicom_series(tmp_path / "ax")
    assert arr.dtype == np.float32 and arr.shape == (D, H, W)
    np.testing.assert_array_equal(arr, volume)
    np.testing.assert_allclose(meta["spacing"], [DZ, DY, DX], rtol=1e-6)
    assert meta["slice_spacing_mm"] == pytest.approx(DZ) and meta["slice_thickness_mm"] == 9.0
    assert meta["orientation"] == "SPL" and meta["n_slices"] == D and meta["series_uid"] == uid
    assert meta["nonuniform_spacing"] is False and meta["kind"] == "volume"
    affine = np.array(meta["affine"])
    for index in [(0, 0, 0), (D - 1, 0, 0), (3, H - 1, 5), (D - 1, H - 1, W - 1)]:
        np.testing.assert_allclose(affine @ [*index, 1], [*_expected_ras(*index), 1], atol=1e-6)
    json.dumps(meta)


def test_shuffled_file_names_give_the_same_volume(tmp_path, template, volume):
    _write_axial(template, tmp_path / "a", volume)
    arr_a, meta_a = read_dicom_series(tmp_path / "a")
    other = tmp_path / "b"
    other.mkdir()
    files = sorted((tmp_path / "a").iterdir())
    for i, f in enumerate(files):  # reversed, differently named copies
        shutil.copy(f, other / f"z{len(files) - i:02d}_{f.stem[::-1]}.dcm")
    arr_b, meta_b = read_dicom_series(other)
    np.testing.assert_array_equal(arr_a, arr_b)
    assert meta_a["affine"] == meta_b["affine"]
    arr_c, _ = read_dicom_series(list(reversed(files)))  # a list of files works too
    np.testing.assert_array_equal(arr_c, volume)


def test_other_series_and_non_dicom_files_are_listed(tmp_path, template, volume):
    folder = tmp_path / "mixed"
    main_uid = _write_axial(template, folder, volume)
    small_uid = _write_axial(template, folder, volume[:3] * 0 + 7, names=["x1.dcm", "x2.dcm", "x3.dcm"])
    (folder / "README.txt").write_text("exported by a PACS\n")
    arr, meta = read_dicom_series(folder)
    np.testing.assert_array_equal(arr, volume)
    assert meta["series_uid"] == main_uid
    assert [(o["series_uid"], o["n_slices"]) for o in meta["other_series"]] == [(small_uid, 3)]
    assert [s["path"] for s in meta["skipped"]] == [str(folder / "README.txt")]
    small, meta = read_dicom_series(folder, series_uid=small_uid)
    assert small.shape == (3, H, W) and np.all(small == 7)
    with pytest.raises(InputError, match="not found"):
        read_dicom_series(folder, series_uid="1.2.3")


def test_sagittal_series_gives_the_same_canonical_volume(tmp_path, template, volume):
    _write_axial(template, tmp_path / "ax", volume)
    _write_sagittal(template, tmp_path / "sag", volume)
    axial, meta_ax = read_dicom_series(tmp_path / "ax")
    sagittal, meta_sag = read_dicom_series(tmp_path / "sag")
    assert sagittal.shape == (D, H, W)
    np.testing.assert_array_equal(sagittal, volume)
    np.testing.assert_array_equal(sagittal, axial)
    np.testing.assert_allclose(meta_sag["affine"], meta_ax["affine"], atol=1e-6)
    np.testing.assert_allclose(meta_sag["spacing"], [DZ, DY, DX], rtol=1e-6)


def test_nonuniform_and_duplicate_positions(tmp_path, template, volume):
    folder = tmp_path / "gap"
    _write_axial(template, folder, volume)
    victim = next(f for f in sorted(folder.iterdir()) if pydicom.dcmread(f).ImagePositionPatient[2] == Z0 + 5 * DZ)
    ds = pydicom.dcmread(victim)
    ds.ImagePositionPatient = [X0, Y0, Z0 + 5 * DZ + 0.4]
    ds.save_as(victim)
    arr, meta = read_dicom_series(folder)
    assert meta["nonuniform_spacing"] is True and meta["slice_spacing_mm"] == pytest.approx(DZ)
    np.testing.assert_array_equal(arr, volume)  # the order is still right
    ds.ImagePositionPatient = [X0, Y0, Z0 + 4 * DZ]  # now collides with slice 4
    ds.save_as(victim)
    with pytest.raises(InputError, match="duplicate slice position"):
        read_dicom_series(folder)


def test_missing_orientation_names_the_file(tmp_path, template, volume):
    folder = tmp_path / "noiop"
    _write_axial(template, folder, volume[:4])
    victim = sorted(folder.iterdir())[2]
    ds = pydicom.dcmread(victim)
    del ds.ImageOrientationPatient
    ds.save_as(victim)
    with pytest.raises(InputError, match="ImageOrientationPatient") as exc:
        read_dicom_series(folder)
    assert str(victim) in str(exc.value)


def test_series_without_images_and_registry_dispatch(tmp_path, template, volume):
    empty = tmp_path / "nothing"
    empty.mkdir()
    (empty / "a.txt").write_text("x")
    with pytest.raises(InputError, match="no DICOM image"):
        read_dicom_series(empty)
    _write_axial(template, tmp_path / "ax", volume)
    arr, meta = read(tmp_path / "ax")  # a folder goes to the series reader
    np.testing.assert_array_equal(arr, volume)
    arr, meta = read(_path("CT_small.dcm"))
    assert meta["format"] == "dicom" and arr.shape == (128, 128)

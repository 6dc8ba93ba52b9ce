"""Record parts -> RGB PIL images: CT windows, VOI / percentile defaults, 16-bit PNG, inline data, volumes."""

import base64
import copy
import io

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from medmllm.data.loading import load_image_part, load_part_images, load_volume_slices
from medmllm.errors import InputError

CT_SMALL = get_testdata_file("CT_small.dcm")

# Synthetic CT pixels (HU) and their 8-bit values under each preset, computed by hand with the
# DICOM LINEAR window y = clip((x - (c - 0.5)) / (w - 1) + 0.5, 0, 1), value = rint(255 * y):
# e.g. lung (c=-600, w=1500) at -1000 HU: -399.5 / 1499 + 0.5 = 0.23349 -> 59.54 -> 60.
HU = np.array([[-1350, -1000, -600, 0], [50, 150, 400, 1000]])
EXPECTED = {
    "lung": [[0, 60, 128, 230], [238, 255, 255, 255]],          # c=-600, w=1500
    "mediastinum": [[0, 0, 0, 91], [128, 201, 255, 255]],       # c=50, w=350
    "bone": [[0, 0, 0, 71], [78, 92, 128, 213]],                # c=400, w=1800
}


def _ct(tmp_path, hu=HU, name="ct.dcm", photometric="MONOCHROME2", voi=None, frames=None):
    """A CT file (CT_small's header) holding ``hu`` as int16 with slope 1, intercept -1024."""
    ds = pydicom.dcmread(CT_SMALL)
    ds = copy.deepcopy(ds)
    stored = (np.asarray(hu) + 1024).astype("<i2")
    ds.Rows, ds.Columns = stored.shape[-2:]
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.PhotometricInterpretation = photometric
    if frames is not None:
        ds.NumberOfFrames = frames
    if voi is not None:
        ds.WindowCenter, ds.WindowWidth = voi
    ds.PixelData = stored.tobytes()
    path = tmp_path / name
    ds.save_as(path)
    return path


def _gray(img):
    arr = np.asarray(img)
    assert img.mode == "RGB" and arr.dtype == np.uint8
    assert np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2])
    return arr[..., 0]


@pytest.mark.parametrize("preset", sorted(EXPECTED))
def test_ct_window_presets_give_hand_computed_values(tmp_path, preset):
    img = load_image_part({"type": "image", "path": str(_ct(tmp_path)), "options": {"window": preset}})
    np.testing.assert_array_equal(_gray(img), np.array(EXPECTED[preset]))


def test_window_as_center_width_pair_equals_the_preset(tmp_path):
    part = {"type": "image", "path": "ct.dcm", "options": {"window": [50, 350]}}
    _ct(tmp_path)
    np.testing.assert_array_equal(_gray(load_image_part(part, base_dir=tmp_path)), EXPECTED["mediastinum"])


def test_multi_window_stacks_lung_mediastinum_bone_as_rgb(tmp_path):
    img = load_image_part({"type": "image", "path": str(_ct(tmp_path)), "options": {"window": "multi"}})
    arr = np.asarray(img)
    for channel, preset in enumerate(["lung", "mediastinum", "bone"]):
        np.testing.assert_array_equal(arr[..., channel], EXPECTED[preset])


def test_multi_window_custom_windows(tmp_path):
    opts = {"window": "multi", "windows": ["bone", [-600, 1500], "mediastinum"]}
    arr = np.asarray(load_image_part({"type": "image", "path": str(_ct(tmp_path)), "options": opts}))
    np.testing.assert_array_equal(arr[..., 0], EXPECTED["bone"])
    np.testing.assert_array_equal(arr[..., 1], EXPECTED["lung"])


def test_monochrome1_is_inverted_after_windowing(tmp_path):
    path = _ct(tmp_path, photometric="MONOCHROME1")
    img = load_image_part({"type": "image", "path": str(path), "options": {"window": "lung"}})
    np.testing.assert_array_equal(_gray(img), 255 - np.array(EXPECTED["lung"]))


def test_default_uses_the_files_voi_window(tmp_path):
    path = _ct(tmp_path, voi=(400, 1800))  # the bone window, declared in the file
    np.testing.assert_array_equal(_gray(load_image_part({"type": "image", "path": str(path)})), EXPECTED["bone"])


def test_default_without_voi_is_the_percentile_range():
    ds = pydicom.dcmread(CT_SMALL)  # declares no WindowCenter / WindowWidth
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    lo, hi = np.percentile(hu, [0.5, 99.5])
    expected = np.rint(np.clip((hu - lo) / (hi - lo), 0, 1) * 255)
    got = _gray(load_image_part({"type": "image", "path": CT_SMALL}))
    assert got.shape == (128, 128)
    assert np.abs(got.astype(int) - expected).max() <= 1  # float32 vs float64 at .5 boundaries
    assert np.mean(got == expected) > 0.99


def test_multi_frame_picks_options_frame(tmp_path):
    frames = np.stack([np.full((2, 3), v) for v in (-1000, 0, 1000)])  # HU per frame
    path = _ct(tmp_path, hu=frames, frames=3)
    first = _gray(load_image_part({"type": "image", "path": str(path), "options": {"window": "bone"}}))
    last = _gray(load_image_part({"type": "image", "path": str(path), "options": {"window": "bone", "frame": 2}}))
    assert (first == 0).all() and (last == 213).all()  # bone window: -1000 -> 0, 1000 -> 213 (see EXPECTED)
    with pytest.raises(InputError, match="frame 3 out of range"):
        load_image_part({"type": "image", "path": str(path), "options": {"frame": 3}})


# --------------------------------------------------------------------------- PNG
def _png16(path, values):
    Image.fromarray(np.asarray(values, dtype=np.uint16)).save(path)  # mode I;16
    return path


def test_16bit_png_default_minmax(tmp_path):
    path = _png16(tmp_path / "x.png", [[1000, 1500], [3000, 3000]])
    # (v - 1000) / 2000 * 255: 0, 63.75 -> 64, 255
    np.testing.assert_array_equal(_gray(load_image_part({"type": "image", "path": str(path)})), [[0, 64], [255, 255]])


def test_16bit_png_full_range_and_declared_bits(tmp_path):
    path = str(_png16(tmp_path / "x.png", [[0, 3000], [4095, 65535]]))
    full = _gray(load_image_part({"type": "image", "path": path, "options": {"scale": "full"}}))
    np.testing.assert_array_equal(full, [[0, 12], [16, 255]])  # 3000/65535*255 = 11.67; 4095 -> 15.93
    with pytest.raises(InputError, match="12-bit"):
        load_image_part({"type": "image", "path": path, "options": {"scale": "full", "bits": 12}})
    small = str(_png16(tmp_path / "y.png", [[0, 3000], [4095, 4095]]))
    twelve = _gray(load_image_part({"type": "image", "path": small, "options": {"scale": "full", "bits": 12}}))
    np.testing.assert_array_equal(twelve, [[0, 187], [255, 255]])  # 3000/4095*255 = 186.81


def test_rgb_png_is_kept_exactly(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "c.png")
    img = load_image_part({"type": "image", "path": "c.png"}, base_dir=tmp_path)
    assert img.mode == "RGB" and img.size == (7, 5)
    np.testing.assert_array_equal(np.asarray(img), rgb)


def test_window_on_a_png_is_refused(tmp_path):
    Image.fromarray(np.zeros((3, 3), np.uint8)).save(tmp_path / "g.png")
    with pytest.raises(InputError, match="window applies to DICOM"):
        load_image_part({"type": "image", "path": str(tmp_path / "g.png"), "options": {"window": "lung"}})


# --------------------------------------------------------------------------- inline data
def test_inline_base64_png_and_data_uri_equal_the_file(tmp_path):
    rgb = np.random.default_rng(1).integers(0, 256, (4, 6, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    b64 = base64.b64encode(buf.getvalue()).decode()
    for data in (b64, "data:image/png;base64," + b64, buf.getvalue()):
        np.testing.assert_array_equal(np.asarray(load_image_part({"type": "image", "data": data})), rgb)


def test_inline_base64_dicom_equals_the_file(tmp_path):
    path = _ct(tmp_path)
    b64 = base64.b64encode(path.read_bytes()).decode()
    img = load_image_part({"type": "image", "data": b64, "options": {"window": "lung"}})
    np.testing.assert_array_equal(_gray(img), EXPECTED["lung"])


def test_inline_pil_and_array():
    rgb = np.random.default_rng(2).integers(0, 256, (3, 5, 3), dtype=np.uint8)
    np.testing.assert_array_equal(np.asarray(load_image_part({"type": "image", "data": Image.fromarray(rgb)})), rgb)
    gray = np.array([[0, 100], [200, 255]], dtype=np.uint8)
    np.testing.assert_array_equal(_gray(load_image_part({"type": "image", "data": gray})), gray)


def test_bad_inline_data_is_an_input_error():
    with pytest.raises(InputError, match="inline data.*base64"):
        load_image_part({"type": "image", "data": "not base64 !!"})
    with pytest.raises(InputError, match="inline data"):
        load_image_part({"type": "image", "data": base64.b64encode(b"plain text, not an image").decode()})


# --------------------------------------------------------------------------- volumes
def _nifti(tmp_path, depth=10):
    """x=6, y=5, z=depth voxels, identity affine; every voxel of axial slice k holds k."""
    data = np.broadcast_to(np.arange(depth, dtype=np.float32), (6, 5, depth)).copy()
    path = tmp_path / "vol.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    return path


def test_nifti_slices_count_order_and_size(tmp_path):
    path = _nifti(tmp_path)
    slices = load_volume_slices({"type": "volume", "path": str(path)}, n=4)
    assert len(slices) == 4
    assert all(s.mode == "RGB" and s.size == (6, 5) for s in slices)  # canonical (S, P, L): H = y, W = x
    # uniform picks floor((i + 0.5) * 10 / 4) = slices 1, 3, 6, 8; their percentile range is 1..8,
    # so (k - 1) / 7 * 255 = 0, 72.86, 182.14, 255
    assert [int(_gray(s)[0, 0]) for s in slices] == [0, 73, 182, 255]
    assert all((_gray(s) == _gray(s)[0, 0]).all() for s in slices)


def test_volume_as_image_part_and_slices_option(tmp_path):
    path = _nifti(tmp_path)
    assert len(load_part_images({"type": "image", "path": str(path)}, n_slices=3)) == 3
    assert len(load_part_images({"type": "volume", "path": str(path), "options": {"slices": 5}})) == 5
    assert len(load_part_images({"type": "image", "path": str(_ct(tmp_path))})) == 1
    with pytest.raises(InputError, match="is a volume"):
        load_image_part({"type": "image", "path": str(path)})


def test_inline_nifti_volume(tmp_path):
    b64 = base64.b64encode(_nifti(tmp_path).read_bytes()).decode()
    slices = load_part_images({"type": "image", "data": b64}, n_slices=2)
    assert len(slices) == 2 and slices[0].size == (6, 5)


def test_volume_window_applies_to_all_slices(tmp_path):
    data = np.zeros((4, 4, 3), np.float32)
    data[..., 1], data[..., 2] = 50.0, 1000.0  # HU per axial slice: 0, 50, 1000
    path = tmp_path / "ct.nii"
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    slices = load_volume_slices({"type": "volume", "path": str(path), "options": {"window": "mediastinum"}}, n=3)
    assert [int(_gray(s)[0, 0]) for s in slices] == [91, 128, 255]  # EXPECTED["mediastinum"] at 0, 50, 1000 HU


# --------------------------------------------------------------------------- errors
def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(InputError) as exc:
        load_image_part({"type": "image", "path": "missing.png"}, base_dir=tmp_path)
    assert exc.value.path == str(tmp_path / "missing.png")


def test_bad_options_are_input_errors(tmp_path):
    path = str(_ct(tmp_path))
    with pytest.raises(InputError, match="options.window"):
        load_image_part({"type": "image", "path": path, "options": {"window": "lungs"}})
    with pytest.raises(InputError, match="unknown key"):
        load_image_part({"type": "image", "path": path, "options": {"windw": "lung"}})
    with pytest.raises(InputError, match="'path' or inline 'data'"):
        load_image_part({"type": "image"})
    with pytest.raises(InputError, match="expected a volume"):
        load_volume_slices({"type": "volume", "path": path})

"""Tests of medmllm.data.preprocess. Expected values are worked by hand or come from
reference libraries (pydicom, PIL, scipy, torch, numpy), never from the code under test."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medmllm.data import preprocess as P
from medmllm.errors import ConfigError, InputError

RNG_SEED = 1234


# ============================================================================ CT windows

def test_window_linear_matches_dicom_formula_by_hand():
    # brain window c=40, w=80. DICOM LINEAR: c' = 39.5, w' = 79;
    # x <= 0 -> 0, x > 79 -> 1, else (x - 39.5) / 79 + 0.5.
    hu = np.array([-1000.0, 0.0, 20.0, 39.5, 40.0, 79.0, 80.0, 3000.0])
    expected = np.array([0.0, 0.0, 0.5 - 19.5 / 79, 0.5, 0.5 + 0.5 / 79, 1.0, 1.0, 1.0])
    out = P.window(hu, 40, 80)
    assert out.dtype == np.float32 and hu[0] == -1000.0        # input untouched
    assert float(P.window(np.float64(79.0), 40, 80)) == 1.0    # 0-d input
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_window_linear_exact_by_hand():
    # LINEAR_EXACT: clip((x - c) / w + 0.5): lung c=-600, w=1500 -> [-1350, 150].
    hu = np.array([-2000.0, -1350.0, -600.0, -225.0, 150.0, 400.0])
    expected = np.array([0.0, 0.0, 0.5, 0.75, 1.0, 1.0])
    np.testing.assert_allclose(P.window(hu, -600, 1500, function="linear_exact"), expected, atol=1e-7)


@pytest.mark.parametrize("function", ["LINEAR", "LINEAR_EXACT"])
def test_window_agrees_with_pydicom(function):
    from pydicom.dataset import Dataset
    from pydicom.pixels.processing import apply_windowing

    rng = np.random.default_rng(RNG_SEED)
    hu = rng.integers(-1100, 1500, size=(16, 16)).astype(np.float64)
    ds = Dataset()
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsStored, ds.PixelRepresentation = 16, 0          # output range 0..65535
    ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = 50, 350, function
    ref = apply_windowing(hu.copy(), ds) / 65535.0
    ours = P.window(hu, 50, 350, function=function.lower())
    np.testing.assert_allclose(ours, ref, atol=1e-6)


STATED_PRESETS = {
    "lung": (-600, 1500), "mediastinum": (50, 350), "bone": (400, 1800), "brain": (40, 80),
    "abdomen": (40, 400), "liver": (60, 160), "subdural": (75, 215), "stroke": (40, 40),
}


@pytest.mark.parametrize("name", sorted(STATED_PRESETS))
def test_presets_have_stated_values(name):
    c, w = STATED_PRESETS[name]
    assert P.CT_WINDOWS.get(name) == (c, w)
    # just outside the window edges -> 0 and 1; the centre -> ~0.5 (DICOM half-unit offset)
    hu = np.array([c - w / 2 - 1, c - 0.5, c + w / 2 + 1])
    np.testing.assert_allclose(P.window_preset(hu, name), [0.0, 0.5, 1.0], atol=1e-6)


def test_unknown_preset_is_config_error_listing_known():
    with pytest.raises(ConfigError) as err:
        P.window_preset(np.zeros((2, 2)), "kidney")
    assert "kidney" in str(err.value) and "lung" in str(err.value) and "mediastinum" in str(err.value)


@pytest.mark.parametrize("shape", [(6, 7), (3, 6, 7)])
def test_multi_window_rgb_channels_are_the_named_windows(shape):
    hu = np.random.default_rng(RNG_SEED).uniform(-1200, 1800, size=shape)
    names = ("lung", "mediastinum", "bone")
    rgb = P.multi_window_rgb(hu)
    assert rgb.shape == shape + (3,) and rgb.dtype == np.float32
    for k, name in enumerate(names):
        np.testing.assert_array_equal(rgb[..., k], P.window_preset(hu, name))
    medgemma = P.multi_window_rgb(hu, P.MEDGEMMA_CT_WINDOWS)
    # wide window -1024..1024: linear_exact would be (hu + 1024) / 2048; LINEAR differs by < 1/2047
    np.testing.assert_allclose(medgemma[..., 0], np.clip((hu + 1024) / 2048, 0, 1), atol=1e-3)
    pairs = P.multi_window_rgb(hu, [(-600, 1500), "mediastinum", (400, 1800)])
    np.testing.assert_array_equal(pairs, rgb)


def test_window_bad_inputs():
    with pytest.raises(ConfigError):
        P.window(np.zeros(3), 40, 0.5)          # LINEAR needs width >= 1
    with pytest.raises(ConfigError):
        P.window(np.zeros(3), 40, 80, function="sigmoidal")
    with pytest.raises(InputError):
        P.window(np.array(["a", "b"]), 40, 80)
    with pytest.raises(InputError):
        P.window(np.array([0.0, np.nan]), 40, 80)
    with pytest.raises(InputError) as err:
        P.multi_window_rgb(np.zeros(5))
    assert err.value.path == "hu" and "got shape (5,)" in err.value.reason
    with pytest.raises(ConfigError):
        P.multi_window_rgb(np.zeros((2, 2)), ("lung", "bone"))


# ============================================================================ intensity

def test_normalize_minmax_and_constant():
    np.testing.assert_allclose(P.normalize_minmax(np.array([[2, 4], [6, 3]])), [[0, 0.5], [1, 0.25]])
    out = P.normalize_minmax(np.full((3, 3), 7.0))
    assert out.dtype == np.float32 and not out.any()


def test_normalize_percentile_by_hand():
    x = np.arange(1001, dtype=np.float64)        # 0.5th pct = 5, 99.5th = 995 (linear interpolation)
    out = P.normalize_percentile(x)
    np.testing.assert_allclose(out, np.clip((x - 5) / 990, 0, 1), atol=1e-6)
    out2 = P.normalize_percentile(x, lo=10, hi=20, clip=False)   # 100 -> 0, 200 -> 1
    assert out2[100] == 0 and out2[200] == pytest.approx(1) and out2[300] == pytest.approx(2)
    with pytest.raises(ConfigError):
        P.normalize_percentile(x, lo=60, hi=40)


def test_to_float01():
    np.testing.assert_allclose(P.to_float01(np.array([[0, 51, 255]], np.uint8)), [[0, 0.2, 1]], atol=1e-7)
    np.testing.assert_allclose(P.to_float01(np.array([[0, 65535]], np.uint16)), [[0, 1]])
    np.testing.assert_allclose(P.to_float01(np.array([[0, 4095]], np.uint16), bits=12), [[0, 1]])
    with pytest.raises(InputError):
        P.to_float01(np.array([[4096]], np.uint16), bits=12)
    with pytest.raises(InputError):
        P.to_float01(np.array([[-1000, 30]], np.int16))
    with pytest.raises(InputError):
        P.to_float01(np.array([[0.0, 2.0]]))
    with pytest.raises(ConfigError):
        P.to_float01(np.array([[1]], np.uint8), bits=12)


def test_ensure_rgb_and_gray():
    g = np.arange(12, dtype=np.uint8).reshape(3, 4)
    rgb = P.ensure_rgb(g)
    assert rgb.shape == (3, 4, 3) and rgb.dtype == np.uint8
    assert all((rgb[..., k] == g).all() for k in range(3))
    rgba = np.dstack([rgb, np.full((3, 4), 9, np.uint8)])
    np.testing.assert_array_equal(P.ensure_rgb(rgba), rgb)
    np.testing.assert_array_equal(P.ensure_gray(rgb), g)       # equal channels -> same gray
    np.testing.assert_array_equal(P.ensure_gray(g[:, :, None]), g)


def test_ensure_gray_matches_pil_luma():
    from PIL import Image

    rgb = np.random.default_rng(RNG_SEED).integers(0, 256, size=(9, 11, 3), dtype=np.uint8)
    ref = np.asarray(Image.fromarray(rgb, "RGB").convert("L")).astype(int)
    ours = P.ensure_gray(rgb)
    assert ours.dtype == np.uint8 and ours.shape == (9, 11)
    assert np.abs(ours.astype(int) - ref).max() <= 1              # PIL uses fixed-point rounding


# ============================================================================ resize / pad / crop

def test_resize_upsample_matches_scipy_zoom():
    from scipy import ndimage

    x = np.random.default_rng(RNG_SEED).random((37, 53)).astype(np.float32)
    out = P.resize(x, (50, 71))
    # scipy's grid_mode=True is the same half-pixel (align_corners=False) convention
    ref = ndimage.zoom(x, (50 / 37, 71 / 53), order=1, grid_mode=True, mode="nearest")
    assert out.shape == (50, 71) and out.dtype == np.float32
    np.testing.assert_allclose(out, ref, atol=1e-5)


def test_resize_downsample_antialias_matches_pil():
    from PIL import Image

    x = np.random.default_rng(RNG_SEED).random((37, 53)).astype(np.float32)
    ref = np.asarray(Image.fromarray(x, mode="F").resize((20, 15), Image.BILINEAR))
    np.testing.assert_allclose(P.resize(x, (15, 20)), ref, atol=1e-5)


def test_resize_against_torch_interpolate_channels():
    import torch
    import torch.nn.functional as F

    x = np.random.default_rng(RNG_SEED).random((20, 30, 3)).astype(np.float32)
    ref = F.interpolate(torch.from_numpy(x).permute(2, 0, 1)[None], size=(13, 41), mode="bilinear",
                        align_corners=False, antialias=False)[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(P.resize(x, (13, 41), antialias=False), ref, atol=1e-6)


def test_resize_nearest_keeps_labels_and_matches_torch_nearest_exact():
    import torch
    import torch.nn.functional as F

    labels = np.random.default_rng(RNG_SEED).integers(0, 5, size=(17, 23)).astype(np.int64)
    for size in [(34, 46), (9, 12), (40, 7)]:
        ref = F.interpolate(torch.from_numpy(labels.astype(np.float64))[None, None], size=size,
                            mode="nearest-exact")[0, 0].numpy()
        out = P.resize(labels, size, mode="nearest")
        assert out.dtype == np.int64
        np.testing.assert_array_equal(out, ref.astype(np.int64))


def test_resize_pad_keeps_aspect_ratio_and_pads():
    img = np.ones((100, 200), np.float32)
    out, box = P.resize_pad(img, 64, pad_value=-1)
    assert out.shape == (64, 64)
    assert box.resized_shape == (32, 64) and box.offset == (16, 0)
    assert box.resized_shape[1] / box.resized_shape[0] == pytest.approx(200 / 100)
    assert box.scale == (pytest.approx(0.32), pytest.approx(0.32))
    assert (out[:16] == -1).all() and (out[48:] == -1).all() and np.allclose(out[16:48], 1)
    odd, obox = P.resize_pad(np.ones((10, 9)), 12, pad_value=-1)  # s = 1.2 -> (12, 11): 1 column left over
    assert obox.resized_shape == (12, 11) and obox.offset == (0, 0)
    assert (odd[:, 11] == -1).all() and (odd[:, :11] != -1).all()
    tall, tbox = P.resize_pad(np.ones((90, 30, 3), np.uint8), (60, 60), position="top_left")
    assert tall.shape == (60, 60, 3) and tbox.resized_shape == (60, 20) and tbox.offset == (0, 0)


def _centroid_xy(img):
    rows, cols = np.nonzero(img > 0.5 * img.max())
    w = img[rows, cols]
    # pixel centres are at index + 0.5 in the edge-based (x, y) convention
    return np.array([np.average(cols + 0.5, weights=w), np.average(rows + 0.5, weights=w)])


def test_resize_pad_maps_a_marked_pixel_block():
    img = np.zeros((40, 80), np.float32)
    img[12:16, 40:44] = 1.0                           # x in [40, 44), y in [12, 16)
    out, box = P.resize_pad(img, (120, 120), mode="nearest")
    # s = min(120/40, 120/80) = 1.5 -> (60, 120) placed at top = 30: block -> x [60, 66), y [48, 54)
    assert box.offset == (30, 0)
    np.testing.assert_array_equal(np.argwhere(out == 1).min(0), [48, 60])
    np.testing.assert_array_equal(np.argwhere(out == 1).max(0), [53, 65])
    np.testing.assert_allclose(box.to_output([42.0, 14.0]), [63.0, 51.0])
    # a non-integer scale with bilinear: the blob's centroid lands where the map says
    img2 = np.zeros((57, 91), np.float32)
    img2[20:26, 60:66] = 1.0
    out2, box2 = P.resize_pad(img2, 224)
    np.testing.assert_allclose(_centroid_xy(out2), box2.to_output(_centroid_xy(img2)), atol=0.5)
    np.testing.assert_allclose(box2.to_input(box2.to_output([[3.0, 4.0], [90.0, 56.0]])), [[3, 4], [90, 56]])
    assert P.Letterbox.from_dict(box2.to_dict()) == box2


def test_pad_value_must_fit_the_dtype():
    labels = np.ones((4, 6), np.uint8)
    with pytest.raises(ConfigError):
        P.crop_or_pad(labels, (8, 8), pad_value=-1)            # would wrap to 255
    with pytest.raises(ConfigError):
        P.resize_pad(labels, 8, pad_value=0.5, mode="nearest")
    assert P.crop_or_pad(labels, (8, 8), pad_value=7)[0, 0] == 7


def test_center_crop_and_crop_or_pad():
    img = np.arange(6 * 8).reshape(6, 8)
    np.testing.assert_array_equal(P.center_crop(img, (2, 4)), img[2:4, 2:6])
    with pytest.raises(InputError):
        P.center_crop(img, 10)
    vol = np.arange(4 * 5 * 6).reshape(4, 5, 6)
    out = P.crop_or_pad(vol, (6, 3, None), pad_value=-1)
    assert out.shape == (6, 3, 6)
    np.testing.assert_array_equal(out[1:5], vol[:, 1:4, :])   # depth padded 1+1, H cropped from 1
    assert (out[0] == -1).all() and (out[5] == -1).all()
    odd = P.crop_or_pad(vol, (7,), pad_value=-1)                 # pad 3: 1 before, 2 after
    np.testing.assert_array_equal(odd[:, 0, 0], [-1, 0, 30, 60, 90, -1, -1])
    odd = P.crop_or_pad(vol, (None, 2))                           # crop 3 of 5: start at 1
    np.testing.assert_array_equal(odd, vol[:, 1:3])
    out = P.crop_or_pad(vol, (2,), mode="end")
    np.testing.assert_array_equal(out, vol[2:])


# ============================================================================ volumes

def test_resample_volume_doubles_depth_on_a_ramp():
    # value = physical z in mm at spacing 2 mm: voxel d sits at z = 2d
    vol = (2.0 * np.arange(5))[:, None, None] * np.ones((5, 4, 3))
    out, sp = P.resample_volume(vol, (2, 1, 1), (1, 1, 1))
    assert out.shape == (10, 4, 3) and out.dtype == np.float32
    assert sp == (1.0, 1.0, 1.0)
    # output voxel i is at z = i mm; the last input voxel is at 8 mm, beyond it the edge repeats
    expected = np.minimum(np.arange(10.0), 8.0)
    np.testing.assert_allclose(out[:, 2, 1], expected, atol=1e-5)


def test_resample_volume_linear_ramp_all_axes():
    spacing, target = (2.0, 0.5, 1.5), (1.0, 1.0, 1.0)
    d, h, w = np.meshgrid(np.arange(6), np.arange(12), np.arange(8), indexing="ij")
    ramp = lambda z, y, x: 3 * z + 2 * y - x                       # noqa: E731 - in mm
    vol = ramp(d * spacing[0], h * spacing[1], w * spacing[2])
    out, sp = P.resample_volume(vol, spacing, target)
    # output shape = round(shape * spacing / target) = (12, 6, 12)
    assert out.shape == (12, 6, 12) and sp == target
    zi, yi, xi = np.meshgrid(np.arange(12.0), np.arange(6.0), np.arange(12.0), indexing="ij")
    inside = (zi <= 10) & (yi <= 5.5) & (xi <= 10.5)               # within the input's extent
    np.testing.assert_allclose(out[inside], ramp(zi, yi, xi)[inside], atol=1e-3)


def test_resample_volume_shrink_order0_and_bad_inputs():
    vol = (np.arange(7)[:, None, None] * np.ones((7, 2, 2))).astype(np.int16)
    out, sp = P.resample_volume(vol, (1, 1, 1), (2, None, None), order=0)
    assert out.shape == (4, 2, 2) and out.dtype == np.int16     # round(3.5) = 4 (half up)
    np.testing.assert_array_equal(out[:, 0, 0], [0, 2, 4, 6])
    assert sp == (2.0, 1.0, 1.0)
    with pytest.raises(InputError) as err:
        P.resample_volume(np.zeros((4, 4)), (1, 1, 1), 1)
    assert err.value.path == "volume"
    with pytest.raises(InputError):
        P.resample_volume(np.zeros((4, 4, 4)), (1, 0, 1), 1)
    with pytest.raises(ConfigError):
        P.resample_volume(np.zeros((4, 4, 4)), (1, 1, 1), 1, order=7)
    with pytest.raises(InputError):                              # absurd output refused
        P.resample_volume(np.zeros((4, 4, 4)), (1, 1, 1), 1e-4)


def test_crop_or_pad_depth_and_sample_slices():
    vol = np.arange(16)[:, None, None] * np.ones((16, 3, 3))
    np.testing.assert_array_equal(P.crop_or_pad_depth(vol, 10)[:, 0, 0], np.arange(3, 13))
    padded = P.crop_or_pad_depth(vol, 20, pad_value=-5)
    np.testing.assert_array_equal(padded[:, 0, 0], [-5, -5] + list(range(16)) + [-5, -5])
    idx, sl = P.sample_slices(vol, 4)                             # middles of 4 chunks of 4
    np.testing.assert_array_equal(idx, [2, 6, 10, 14])
    np.testing.assert_array_equal(sl, vol[[2, 6, 10, 14]])
    idx, _ = P.sample_slices(vol[:10], 4, strategy="center")
    np.testing.assert_array_equal(idx, [3, 4, 5, 6])
    np.testing.assert_array_equal(P.sample_slices(vol, 16)[0], np.arange(16))
    with pytest.raises(InputError):
        P.sample_slices(vol[:3], 4, strategy="center")
    with pytest.raises(ConfigError):
        P.sample_slices(vol, 4, strategy="random")


# ============================================================================ signals

def _sines(fs, seconds=4.0, freqs=(10.0, 3.0)):
    t = np.arange(int(fs * seconds)) / fs
    return np.stack([np.sin(2 * np.pi * f * t) for f in freqs]).astype(np.float32)


def test_resample_signal_keeps_frequency_and_matches_scipy():
    from scipy.signal import resample_poly

    sig = _sines(250)                                             # (2, 1000)
    out, fs = P.resample_signal(sig, 250, 500)
    assert out.shape == (2, 2000) and out.dtype == np.float32 and fs == 500
    for lead, f0 in enumerate((10.0, 3.0)):
        spec = np.abs(np.fft.rfft(out[lead]))
        freqs = np.fft.rfftfreq(out.shape[1], d=1 / 500)
        assert freqs[np.argmax(spec)] == pytest.approx(f0)
    ref = resample_poly(sig.astype(np.float64), 2, 1, axis=1, padtype="line")
    np.testing.assert_allclose(out, ref, atol=1e-6)


def test_resample_signal_rational_ratio():
    from scipy.signal import resample_poly

    sig = _sines(360, seconds=1.0)
    out, fs = P.resample_signal(sig, 360, 500)                    # 500/360 = 25/18
    assert out.shape == (2, math.ceil(360 * 25 / 18)) and fs == pytest.approx(500)
    np.testing.assert_allclose(out, resample_poly(sig.astype(np.float64), 25, 18, axis=1, padtype="line"),
                               atol=1e-6)
    with pytest.raises(InputError):
        P.resample_signal(sig, 0, 500)
    with pytest.raises(InputError):
        P.resample_signal(sig[0], 360, 500)                       # 1D: needs (leads, samples)


def test_normalize_leads_zscore_and_constant_lead():
    rng = np.random.default_rng(RNG_SEED)
    sig = np.stack([rng.normal(3.0, 0.2, 500), rng.normal(-1.0, 5.0, 500), np.full(500, 0.7)])
    out = P.normalize_leads(sig)
    np.testing.assert_allclose(out[:2].mean(axis=1), 0, atol=1e-5)
    np.testing.assert_allclose(out[:2].std(axis=1), 1, atol=1e-5)
    assert np.isfinite(out).all() and (out[2] == 0).all()
    sig[0, 5] = np.nan
    with pytest.raises(InputError):
        P.normalize_leads(sig)
    out = P.normalize_leads(sig, nan_policy="zero")
    obs = np.delete(sig[0], 5)
    assert out[0, 5] == 0
    np.testing.assert_allclose(np.delete(out[0], 5), (obs - obs.mean()) / obs.std(), atol=1e-5)


def test_crop_or_pad_signal():
    sig = np.arange(10, dtype=np.float32)[None].repeat(2, 0)
    np.testing.assert_array_equal(P.crop_or_pad_signal(sig, 4), sig[:, :4])
    out = P.crop_or_pad_signal(sig, 13)
    assert out.shape == (2, 13) and (out[:, 10:] == 0).all()
    np.testing.assert_array_equal(P.crop_or_pad_signal(sig, 4, mode="end"), sig[:, 6:])


def test_select_leads_reorders_and_masks_missing():
    sig = np.arange(3)[:, None] * np.ones((3, 5), np.float32) + 1   # rows 1, 2, 3
    out, present = P.select_leads(sig, ["II", "I", "V1"], ["I", "ii", "aVR", "V1"])
    np.testing.assert_array_equal(out[:, 0], [2, 1, 0, 3])
    np.testing.assert_array_equal(present, [True, True, False, True])
    with pytest.raises(InputError) as err:
        P.select_leads(sig, ["II", "I", "V1"], ["I", "aVR"], missing="raise")
    assert "aVR" in str(err.value)
    with pytest.raises(InputError):
        P.select_leads(sig, ["I", "II"], ["I"])                     # 2 names for 3 rows


# ============================================================================ EHR

FEATURES = ["heart_rate", "lactate", "my_score"]


def _tables():
    rng = np.random.default_rng(RNG_SEED)
    tabs = [rng.normal([80, 1.5, 10], [15, 0.8, 3], size=(t, 3)) for t in (5, 8, 3)]
    tabs[0][1, 0] = np.nan
    tabs[1][:4, 1] = np.nan
    tabs[2][2, 2] = np.nan
    return tabs


def test_fit_ehr_stats_equals_numpy_nan_stats():
    tabs = _tables()
    stats = P.fit_ehr_stats(tabs, FEATURES)
    pooled = np.concatenate(tabs)
    for j, name in enumerate(FEATURES):
        assert stats[name][0] == pytest.approx(np.nanmean(pooled[:, j]))
        assert stats[name][1] == pytest.approx(np.nanstd(pooled[:, j]))
    with pytest.raises(InputError) as err:
        P.fit_ehr_stats([np.full((3, 2), np.nan)], ["a", "b"])
    assert "a" in str(err.value) and "b" in str(err.value)


def test_normalize_ehr_keeps_missing_in_the_mask():
    tabs = _tables()
    stats = P.fit_ehr_stats(tabs, FEATURES)
    table = tabs[1].astype(np.float32)
    table[5, 2] = stats["my_score"][0]                           # an observed value equal to the mean
    values, missing, used = P.normalize_ehr(table, FEATURES, stats)
    np.testing.assert_array_equal(missing, np.isnan(table))
    assert missing[:4, 1].all() and not missing[5, 2]
    assert values[5, 2] == pytest.approx(0, abs=1e-5)            # z = 0 but observed: the mask tells
    assert (values[missing] == 0).all() and np.isfinite(values).all() and values.dtype == np.float32
    for j, name in enumerate(FEATURES):
        m, s = stats[name]
        obs = ~missing[:, j]
        np.testing.assert_allclose(values[obs, j], (table[obs, j] - m) / s, rtol=1e-5, atol=1e-5)
    assert used == stats


def test_normalize_ehr_reference_ranges_and_unknown_features():
    table = np.array([[100.0, np.nan], [60.0, 140.0]])
    values, missing, used = P.normalize_ehr(table, ["heart_rate", "sodium"])
    # heart rate 60-100: mean 80, std 40 / 3.92 -> the range ends sit at z = +-1.96
    np.testing.assert_allclose(values[:, 0], [1.96, -1.96], atol=1e-5)
    assert used["sodium"] == pytest.approx((140.0, 10 / 3.92))
    np.testing.assert_array_equal(missing, [[False, True], [False, False]])
    with pytest.raises(ConfigError) as err:
        P.normalize_ehr(table, ["heart_rate", "mystery_lab"])
    assert "mystery_lab" in str(err.value)
    with pytest.raises(InputError):
        P.normalize_ehr(table, ["heart_rate"])                   # 1 name for 2 columns


# ============================================================================ shapes

@pytest.mark.parametrize("call,field", [
    (lambda: P.resize(np.zeros((2, 3, 4, 5)), 8), "image"),
    (lambda: P.resize(np.zeros((16, 32, 32)), 8), "image"),       # a volume is not an (H, W, C) image
    (lambda: P.resize_pad(np.zeros(5), 8), "image"),
    (lambda: P.ensure_rgb(np.zeros((4, 4, 7))), "image"),
    (lambda: P.normalize_minmax(np.zeros((0, 3))), "image"),
    (lambda: P.crop_or_pad_depth(np.zeros((4, 4)), 2), "volume"),
    (lambda: P.sample_slices(np.zeros(4), 2), "volume"),
    (lambda: P.normalize_leads(np.zeros((2, 3, 4))), "signal"),
    (lambda: P.crop_or_pad_signal(np.zeros(8), 4), "signal"),
    (lambda: P.normalize_ehr(np.zeros(3), ["heart_rate"] * 3), "table"),
    (lambda: P.normalize_ehr(np.array([[np.inf]]), ["heart_rate"]), "table"),
    (lambda: P.Letterbox((1, 1), (1, 1), (1, 1), (1.0, 1.0), (0, 0)).to_output([1, 2, 3]), "points"),
])
def test_bad_shapes_raise_input_error_naming_the_field(call, field):
    with pytest.raises(InputError) as err:
        call()
    assert err.value.path == field and "expected" in err.value.reason and "got" in err.value.reason


# ============================================================================ transforms

def test_compose_volume_pipeline_updates_meta():
    vol = np.random.default_rng(RNG_SEED).uniform(-1000, 1000, size=(4, 6, 6))
    affine = np.diag([2.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = [10.0, -5.0, 3.0]
    meta = {"spacing": (2.0, 1.0, 1.0), "affine": affine.tolist(), "kind": "volume"}
    chain = P.Compose([P.ResampleVolume(1.0), P.CropOrPadDepth(6), P.MultiWindowRGB()])
    out, new_meta = chain((vol, meta))
    assert out.shape == (6, 6, 6, 3) and new_meta["spacing"] == (1.0, 1.0, 1.0)
    assert meta["spacing"] == (2.0, 1.0, 1.0)                      # input meta untouched
    # resampled depth 8 cropped to 6 from index 1: new voxel (i, j, k) is old (i + 1) / 2 in depth
    new_aff = np.asarray(new_meta["affine"])
    for i in range(6):
        old_idx = np.array([(i + 1) / 2, 2, 3, 1])
        np.testing.assert_allclose(new_aff @ [i, 2, 3, 1], affine @ old_idx)
    bare = chain.transforms[2](vol)                               # bare arrays work too
    np.testing.assert_array_equal(bare, P.multi_window_rgb(vol))


def test_transforms_on_pairs_signal_image_ehr():
    sig = _sines(250)
    meta = {"fs": 250.0, "lead_names": ["V1", "I"], "n_samples": 1000}
    out, m = P.Compose([P.SelectLeads(["I", "II", "V1"]), P.ResampleSignal(500), P.NormalizeLeads()])((sig, meta))
    assert out.shape == (3, 2000) and m["fs"] == 500 and m["lead_mask"] == [True, False, True]
    assert m["lead_names"] == ["I", "II", "V1"] and m["n_samples"] == 2000 and (out[1] == 0).all()
    with pytest.raises(InputError) as err:
        P.ResampleSignal(500)(sig)                                # bare array: no fs anywhere
    assert err.value.path == "meta"

    img, im = P.ResizePad(32)((np.ones((20, 40), np.uint8), {"spacing": (0.5, 0.5)}))
    assert img.shape == (32, 32) and im["spacing"] == (pytest.approx(0.625), pytest.approx(0.625))
    assert P.Letterbox.from_dict(im["letterbox"]).offset == (8, 0)

    table = np.array([[90.0, np.nan]])
    vals, em = P.NormalizeEHR()((table, {"features": ["heart_rate", "spo2"]}))
    np.testing.assert_array_equal(em["missing_mask"], [[False, True]])
    assert vals[0, 1] == 0 and set(em["ehr_stats"]) == {"heart_rate", "spo2"}
    with pytest.raises(ConfigError):
        P.WindowPreset("nope")
    with pytest.raises(ConfigError):
        P.Compose([P.NormalizeMinMax(), "not callable"])


@pytest.mark.slow
def test_transforms_run_inside_monai_compose():
    from monai.transforms import Compose as MonaiCompose

    hu = np.random.default_rng(RNG_SEED).uniform(-1000, 1000, size=(40, 30))
    ours = P.Compose([P.MultiWindowRGB(), P.ResizePad(64)])
    monai = MonaiCompose([P.MultiWindowRGB(), P.ResizePad(64)])
    np.testing.assert_array_equal(np.asarray(monai(hu)), ours(hu))
    out, meta = MonaiCompose([P.WindowPreset("lung"), P.ResizePad(64)], map_items=False)((hu, {}))
    assert np.asarray(out).shape == (64, 64) and "letterbox" in meta

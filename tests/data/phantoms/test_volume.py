"""MedPhantom CT volume: determinism, canonical orientation, lesion truth <-> voxels, balance."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import ndimage

from medmllm.data.phantoms.volume import generate_ct_volume, lesion_mask
from medmllm.errors import InputError

SHAPE = (32, 64, 64)


def rng(*key):
    return np.random.default_rng(list(key))


def binomial_band(n: int, p: float, k: float = 4.0) -> tuple[float, float]:
    sd = math.sqrt(n * p * (1 - p))
    return n * p - k * sd, n * p + k * sd


def test_same_seed_same_volume_different_seed_different():
    a, ta = generate_ct_volume(rng(1, 1))
    b, tb = generate_ct_volume(rng(1, 1))
    c, _ = generate_ct_volume(rng(1, 2))
    assert np.array_equal(a, b) and ta == tb
    assert not np.array_equal(a, c)


def test_dtype_shape_and_truth_schema():
    for i in range(8):
        vol, t = generate_ct_volume(rng(2, i))
        assert vol.shape == SHAPE and vol.dtype == np.int16
        assert vol.min() >= -1024 and vol.max() <= 3071
        assert json.loads(json.dumps(t)) == t
        assert t["modality"] == "ct3d" and t["shape"] == list(SHAPE)
        dz, dy, dx = t["spacing_mm"]
        assert dz in (3.0, 4.0, 5.0) and dy == dx and 340 / 64 - 0.01 <= dx <= 420 / 64 + 0.01
        les = t["findings"]["lesion"]
        assert {"present", "organ", "side", "slice_range", "diameter_mm", "center_dhw"} <= set(les)
        assert t["normal"] == (not les["present"])
        if not les["present"]:
            assert les["slice_range"] is None and les["center_dhw"] is None


def test_canonical_orientation_anatomy():
    """Axis 0 inferior->superior (lungs on top), axis 1 anterior->posterior (spine behind),
    axis 2 patient right->left (liver on the low-index side)."""
    vol, _ = generate_ct_volume(rng(3, 0), overrides={"lesion": False})
    d, h, w = vol.shape
    lung = (vol > -950) & (vol < -500)  # aerated lung (outside air is ~-1000)
    assert lung[-1].sum() > 100 and lung[0].sum() == 0  # lungs superiorly, none at the bottom
    bone = np.nonzero(vol[d // 2] > 250)
    assert bone[0].mean() > h / 2  # spine posterior
    for i in range(40):  # liver lesions are on the patient's right, spleen on the left
        _, t = generate_ct_volume(rng(3, i), overrides={"lesion": True})
        les = t["findings"]["lesion"]
        assert les["center_dhw"][2] < w / 2 if les["side"] == "right" else les["center_dhw"][2] > w / 2
        if les["organ"] in ("liver", "spleen"):
            assert les["side"] == {"liver": "right", "spleen": "left"}[les["organ"]]


def test_lesion_voxels_match_truth_and_are_visible():
    for i in range(12):
        vol, t = generate_ct_volume(rng(4, i), overrides={"lesion": True})
        twin, t2 = generate_ct_volume(rng(4, i), overrides={"lesion": False})
        assert t2["spacing_mm"] == t["spacing_mm"] and not t2["findings"]["lesion"]["present"]
        les = t["findings"]["lesion"]
        mask = vol != twin
        slices = np.flatnonzero(mask.any(axis=(1, 2)))
        assert [slices[0], slices[-1]] == les["slice_range"]
        assert mask[tuple(les["center_dhw"])]
        assert np.all((vol.astype(int) - twin)[mask] == les["hu_delta"])
        # extent along z matches the diameter to within one slice on each end
        dz = t["spacing_mm"][0]
        extent = (slices[-1] - slices[0] + 1) * dz
        assert les["diameter_mm"] - 2 * dz <= extent <= les["diameter_mm"] + dz
        shell = ndimage.binary_dilation(mask) & ~mask  # 1-voxel rim of the organ around it
        rim = vol[shell].astype(float)
        sigma = 1.4826 * np.median(np.abs(rim - np.median(rim)))
        assert abs(vol[mask].mean() - rim.mean()) > 2 * sigma, (i, les, sigma)


def test_truth_gives_back_the_lesion_voxels():
    """lesion_mask from the truth alone (centre, rounded diameter, spacing) finds the voxels the lesion changed,
    up to the rim voxels the diameter's rounding to 0.01 mm can flip."""
    changed = flipped = 0
    for i in range(40):
        vol, t = generate_ct_volume(rng(5, i), overrides={"lesion": True})
        twin, _ = generate_ct_volume(rng(5, i), overrides={"lesion": False})
        les = t["findings"]["lesion"]
        mask = lesion_mask(t["shape"], t["spacing_mm"], les["center_dhw"], les["diameter_mm"] / 2)
        assert mask.shape == vol.shape and mask[tuple(les["center_dhw"])]
        changed += int((vol != twin).sum())
        flipped += int((mask != (vol != twin)).sum())
    assert changed > 0 and flipped <= 0.01 * changed, (flipped, changed)


def test_lesions_balanced():
    n = 200
    present = right = 0
    organs: dict[str, int] = {}
    for i in range(n):
        _, t = generate_ct_volume(rng(5, i))
        les = t["findings"]["lesion"]
        present += les["present"]
        right += les["side"] == "right"
        if les["present"]:
            organs[les["organ"]] = organs.get(les["organ"], 0) + 1
    lo, hi = binomial_band(n, 0.5)
    assert lo <= present <= hi
    lo, hi = binomial_band(present, 0.5)
    assert lo <= right <= hi
    assert set(organs) == {"liver", "spleen", "kidney", "lung"}


def test_small_shape_and_bad_shape():
    vol, t = generate_ct_volume(rng(6, 0), shape=(12, 40, 48), overrides={"lesion": True})
    assert vol.shape == (12, 40, 48) and t["shape"] == [12, 40, 48]
    first, last = t["findings"]["lesion"]["slice_range"]
    assert 0 <= first <= last < 12
    for bad in [(32, 64), (2, 64, 64), "32x64x64", (32.0, 64, 64)]:
        with pytest.raises(InputError):
            generate_ct_volume(rng(0), shape=bad)

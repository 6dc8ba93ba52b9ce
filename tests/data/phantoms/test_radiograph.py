"""MedPhantom 2D generators: determinism, truth <-> pixels, visibility, windowing, balance."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import ndimage

from medmllm.data.phantoms.radiograph import CT_WINDOWS, generate_ct_slice, generate_xray
from medmllm.errors import InputError

S = 128


def rng(*key):
    return np.random.default_rng(list(key))


def binomial_band(n: int, p: float, k: float = 4.0) -> tuple[float, float]:
    """Count range n*p ± k*sqrt(n p (1-p)); k=4 keeps a false failure below 1e-4."""
    sd = math.sqrt(n * p * (1 - p))
    return n * p - k * sd, n * p + k * sd


def disk_and_ring(shape, center, radius, ring=(1.0, 4.0)):
    """Masks of the disk (dist <= radius) and the annulus radius+ring[0] .. radius+ring[1]."""
    rr, cc = np.indices(shape)
    dist = np.hypot(rr - center[0], cc - center[1])
    return dist <= radius, (dist >= radius + ring[0]) & (dist <= radius + ring[1])


def xray_noise_std(img: np.ndarray) -> float:
    """Noise std from the two top corners (6x8 px each), which lie outside the body (flat air)."""
    patches = [img[:8, :6].astype(float), img[:8, -6:].astype(float)]
    return float(np.sqrt(np.mean([((p - p.mean()) ** 2).mean() for p in patches])))


def window(hu: np.ndarray, center: float, width: float) -> np.ndarray:
    """Display gray levels 0..255 (8-bit quantised) of a linear window."""
    lo = center - width / 2
    return np.clip(np.rint((hu.astype(float) - lo) / width * 255), 0, 255)


# ----------------------------------------------------------------------------- determinism & schema


@pytest.mark.parametrize("gen", [generate_xray, generate_ct_slice])
def test_same_seed_same_output_different_seed_different(gen):
    a, ta = gen(rng(7, 3))
    b, tb = gen(rng(7, 3))
    c, _ = gen(rng(7, 4))
    assert np.array_equal(a, b) and ta == tb
    assert not np.array_equal(a, c)


def test_xray_dtype_range_and_truth_schema():
    for i in range(20):
        img, t = generate_xray(rng(1, i))
        assert img.shape == (S, S) and img.dtype == np.uint16 and img.max() <= 4095
        assert json.loads(json.dumps(t)) == t  # plain JSON types only
        assert set(t) == {"modality", "organ", "view", "pixel_spacing_mm", "findings", "normal"}
        assert (t["modality"], t["organ"], t["view"], t["pixel_spacing_mm"]) == ("xray", "chest", "PA", 3.0)
        f = t["findings"]
        assert set(f["nodule"]) == {"present", "side", "zone", "diameter_px", "diameter_mm", "contrast", "center_rc"}
        assert set(f["effusion"]) == {"present", "side"} and set(f["cardiomegaly"]) == {"present", "ctr"}
        assert t["normal"] == (not any(x["present"] for x in f.values()))
        nod = f["nodule"]
        if nod["present"]:
            assert nod["side"] in ("left", "right") and nod["zone"] in ("upper", "lower")
            assert 3.0 <= nod["diameter_px"] <= 12.0
            assert nod["diameter_mm"] == pytest.approx(nod["diameter_px"] * 3.0, abs=0.02)
        else:
            assert all(nod[k] is None for k in nod if k != "present")
        ctr = f["cardiomegaly"]["ctr"]
        assert ctr > 0.5 if f["cardiomegaly"]["present"] else ctr <= 0.45


def test_ct_dtype_range_and_truth_schema():
    for i in range(20):
        hu, t = generate_ct_slice(rng(2, i))
        assert hu.shape == (S, S) and hu.dtype == np.int16
        assert hu.min() >= -1024 and hu.max() <= 3071
        assert json.loads(json.dumps(t)) == t
        assert set(t) == {"modality", "organ", "pixel_spacing_mm", "window", "findings", "normal"}
        assert t["modality"] == "ct" and t["window"] in CT_WINDOWS
        assert {"chest": "lung", "abdomen": "abdomen", "head": "brain"}[t["organ"]] == t["window"]
        les = t["findings"]["lesion"]
        assert set(les) == {"present", "side", "diameter_mm", "hu_delta", "center_rc"}
        assert t["normal"] == (not les["present"])
        assert np.median(hu[:6, :6]) < -950  # air outside the body


def test_bad_inputs_raise_input_error():
    with pytest.raises(InputError):
        generate_xray(np.random.RandomState(0))
    with pytest.raises(InputError):
        generate_xray(rng(0), size=16)
    with pytest.raises(InputError):
        generate_xray(rng(0), overrides={"pneumothorax": True})
    with pytest.raises(InputError):
        generate_ct_slice(rng(0), overrides={"lesion": "yes"})


# ----------------------------------------------------------------------------- X-ray truth <-> pixels


def test_nodule_is_visible_and_only_changes_its_disk():
    for i in range(40):
        img, t = generate_xray(rng(3, i), overrides={"nodule": True})
        twin, t2 = generate_xray(rng(3, i), overrides={"nodule": False})
        nod = t["findings"]["nodule"]
        assert t2["findings"]["cardiomegaly"] == t["findings"]["cardiomegaly"]
        radius = nod["diameter_px"] / 2
        disk, ring = disk_and_ring(img.shape, nod["center_rc"], radius)
        sigma = xray_noise_std(img)
        contrast = img[disk].mean() - img[ring].mean()
        assert contrast > 2 * sigma, (i, nod, contrast, sigma)  # bright blob above the noise
        changed = img != twin
        assert changed.any()
        near, _ = disk_and_ring(img.shape, nod["center_rc"], radius + 0.01)
        assert not (changed & ~near).any()  # nothing outside the nodule changed
        # radiological convention: the patient's right lung is on the image's left
        col = nod["center_rc"][1]
        assert col < S / 2 if nod["side"] == "right" else col > S / 2
        row = nod["center_rc"][0]
        assert row < S / 2 if nod["zone"] == "upper" else row > S / 3


def test_effusion_changes_only_the_lower_lung_on_its_side():
    for i in range(20):
        img, t = generate_xray(rng(4, i), overrides={"effusion": True})
        twin, _ = generate_xray(rng(4, i), overrides={"effusion": False})
        side = t["findings"]["effusion"]["side"]
        rows, cols = np.nonzero(img != twin)
        assert rows.size > 50
        assert (cols < S / 2).all() if side == "right" else (cols >= S / 2).all()
        assert rows.min() > S / 3
        delta = img.astype(float) - twin
        assert np.median(delta[rows, cols]) > 10 * xray_noise_std(img)  # fluid is much denser than air


def _lungs(img: np.ndarray) -> np.ndarray:
    """Label image of the two lungs (1 = image left, 2 = image right) found by thresholds."""
    s = img.shape[0]
    air = np.median(img[:8, :6])
    soft = np.median(img[-6:, [int(0.3 * s), int(0.7 * s)]])  # abdomen, off the spine
    lung = np.percentile(img[int(0.45 * s), int(0.2 * s): int(0.8 * s)], 25)
    mask = (img > (air + lung) / 2) & (img < (lung + soft) / 2)
    mask = ndimage.binary_opening(mask, np.ones((3, 3)))  # drop the 1-px body-edge ring
    lab, n = ndimage.label(mask)
    sizes = ndimage.sum(mask, lab, range(1, n + 1))
    keep = np.argsort(sizes)[-2:] + 1
    cents = [ndimage.center_of_mass(lab == k)[1] for k in keep]
    out = np.zeros_like(lab)
    for rank, k in enumerate(keep[np.argsort(cents)]):
        out[lab == k] = rank + 1
    return out


def _thoracic_width(lungs: np.ndarray) -> int:
    best = 0
    for row in lungs:
        left, right = np.flatnonzero(row == 1), np.flatnonzero(row == 2)
        if left.size and right.size:
            best = max(best, right.max() - left.min() + 1)
    return best


def test_cardiothoracic_ratio_matches_the_pixels():
    """Heart widths come from the twin difference (big heart minus small heart), the thoracic
    width from the segmented lungs; each of the 4 edges is within ~1 px, hence the tolerance."""
    for i in range(12):
        keep = {"nodule": False, "effusion": False}
        big, tb = generate_xray(rng(5, i), overrides={**keep, "cardiomegaly": True})
        small, ts = generate_xray(rng(5, i), overrides={**keep, "cardiomegaly": False})
        lungs = _lungs(small)
        assert (np.nonzero(lungs == 1)[1].mean() < S / 2) and (np.nonzero(lungs == 2)[1].mean() > S / 2)
        thorax = _thoracic_width(lungs)
        diff = big != small
        extents = [(c.max() - c.min() + 1, r) for r in range(S) if (c := np.flatnonzero(diff[r])).size]
        w_big = max(e for e, _ in extents)
        widest = [r for e, r in extents if e == w_big]  # a flat run of rows around the heart centre
        cols = np.flatnonzero(diff[widest[len(widest) // 2]])
        w_small = int(np.diff(cols).max()) - 1  # the unchanged gap = the small heart
        for width, truth in ((w_big, tb), (w_small, ts)):
            ctr = truth["findings"]["cardiomegaly"]["ctr"]
            tol = (2 + 2 * ctr) / thorax + 0.005
            assert abs(width / thorax - ctr) <= tol, (i, width, thorax, ctr)
        assert w_big / thorax > 0.48 > w_small / thorax


def test_xray_findings_balanced():
    n = 400
    counts = {"nodule": 0, "effusion": 0, "cardiomegaly": 0}
    right = {"nodule": 0, "effusion": 0}
    upper = normal = 0
    for i in range(n):
        _, t = generate_xray(rng(6, i))
        f = t["findings"]
        for k in counts:
            counts[k] += f[k]["present"]
        for k in right:
            right[k] += f[k]["side"] == "right"
        upper += f["nodule"]["zone"] == "upper"
        normal += t["normal"]
    lo, hi = binomial_band(n, 0.5)
    assert all(lo <= c <= hi for c in counts.values()), counts
    for k in right:
        lo, hi = binomial_band(counts[k], 0.5)
        assert lo <= right[k] <= hi, (k, right[k], counts[k])
    lo, hi = binomial_band(counts["nodule"], 0.5)
    assert lo <= upper <= hi
    lo, hi = binomial_band(n, 0.125)
    assert lo <= normal <= hi


# ----------------------------------------------------------------------------- CT truth <-> pixels


def test_ct_lesion_matches_truth_and_needs_the_right_window():
    organs = set()
    for i in range(45):
        hu, t = generate_ct_slice(rng(8, i), overrides={"lesion": True})
        twin, t2 = generate_ct_slice(rng(8, i), overrides={"lesion": False})
        assert t2["organ"] == t["organ"] and not t2["findings"]["lesion"]["present"]
        organs.add(t["organ"])
        les = t["findings"]["lesion"]
        radius = les["diameter_mm"] / t["pixel_spacing_mm"] / 2
        changed = hu != twin
        inner, _ = disk_and_ring(hu.shape, les["center_rc"], radius - 0.01)
        outer, _ = disk_and_ring(hu.shape, les["center_rc"], radius + 0.01)
        assert not (changed & ~outer).any() and changed[inner].all()
        assert np.all((hu.astype(int) - twin)[inner] == les["hu_delta"])
        col = les["center_rc"][1]
        assert col < S / 2 if les["side"] == "right" else col > S / 2
        disk, ring = disk_and_ring(hu.shape, les["center_rc"], radius, ring=(1.0, 3.0))
        sigma = 1.4826 * np.median(np.abs(hu[ring] - np.median(hu[ring])))  # robust organ noise
        assert abs(hu[disk].mean() - hu[ring].mean()) > 2 * sigma, (i, les, sigma)
        right = window(hu, *CT_WINDOWS[t["window"]])
        shown = abs(right[disk].mean() - right[ring].mean())
        wrong = window(hu, *CT_WINDOWS["mediastinum" if t["organ"] == "chest" else "bone"])
        hidden = abs(wrong[disk].mean() - wrong[ring].mean())
        assert shown >= 10, (i, t["organ"], shown)  # clearly visible in the organ's window
        assert hidden <= 6 and hidden <= shown / 4, (i, t["organ"], shown, hidden)
    assert organs == {"chest", "abdomen", "head"}


def test_ct_balanced():
    n = 400
    present = right = 0
    organs = {"chest": 0, "abdomen": 0, "head": 0}
    for i in range(n):
        _, t = generate_ct_slice(rng(9, i))
        les = t["findings"]["lesion"]
        present += les["present"]
        right += les["side"] == "right"
        organs[t["organ"]] += 1
    lo, hi = binomial_band(n, 0.5)
    assert lo <= present <= hi
    lo, hi = binomial_band(present, 0.5)
    assert lo <= right <= hi
    lo, hi = binomial_band(n, 1 / 3)
    assert all(lo <= c <= hi for c in organs.values()), organs


def test_other_sizes_scale():
    img, t = generate_xray(rng(10, 0), size=256, overrides={"nodule": True})
    assert img.shape == (256, 256) and t["pixel_spacing_mm"] == 1.5
    assert 6.0 <= t["findings"]["nodule"]["diameter_px"] <= 24.0
    hu, t = generate_ct_slice(rng(10, 1), size=64)
    assert hu.shape == (64, 64)

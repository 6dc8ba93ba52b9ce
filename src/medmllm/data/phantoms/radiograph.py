"""MedPhantom 2D radiology: a chest radiograph and an axial CT slice, with exact truth.

Both generators are pure functions of a ``numpy.random.Generator`` (no global RNG, no
clock): the same seed gives the same pixels and the same truth dict. Every random
number is drawn in a fixed order whatever ``overrides`` says, so a counterfactual twin
(``overrides={"nodule": False}`` …) differs from the original only inside the region
of the overridden finding.

Conventions
-----------
* Image axes ``(row, col)``; the image is viewed as if facing the patient, so the
  patient's RIGHT is on the image's LEFT (small column indices). ``side`` in the truth
  is always the patient's side.
* Radiograph: 12-bit ``uint16`` (0..4095), bright = dense.
* CT: ``int16`` Hounsfield units clipped to [-1024, 3071] (air -1000, fat -100, soft
  tissue 40, lung -850, bone > 300). ``CT_WINDOWS`` holds the display presets.

Every finding is drawn with contrast above the noise at its size (see the
module-level ranges), so it is truly visible in the pixels.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import numpy as np

from medmllm.errors import InputError

SIDES = ("right", "left")  # patient's side; "right" is on the image's left
ZONES = ("upper", "lower")
XRAY_FINDINGS = ("nodule", "effusion", "cardiomegaly")
XRAY_FIELD_MM = 384.0  # detector width: pixel spacing = 384 / size (3.0 mm at 128 px)
XRAY_MAX = 4095  # 12-bit
HU_MIN, HU_MAX = -1024, 3071  # 12-bit CT range (stored = HU + 1024)

# Display presets (center, width) in HU.
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (40.0, 400.0),
    "abdomen": (40.0, 400.0),
    "brain": (40.0, 80.0),
    "bone": (400.0, 1800.0),
}
CT_ORGANS = ("chest", "abdomen", "head")
CT_WINDOW_FOR_ORGAN = {"chest": "lung", "abdomen": "abdomen", "head": "brain"}

# Nodule diameters at 128 px (scaled with size, never below 3 px) and visibility floor.
_TEXTURE_GRID = 12  # coarse grid of the smooth lung-parenchyma texture
NODULE_DIAMETER_PX = (3.0, 12.0)
NODULE_MIN_PEAK_CNR = 6.0  # peak nodule amplitude >= 6 noise std above the rib amplitude
CTR_PRESENT = (0.52, 0.64)
CTR_ABSENT = (0.36, 0.45)


# ----------------------------------------------------------------------------- checks


def check_rng(rng: Any) -> np.random.Generator:
    """Return ``rng`` if it is a numpy Generator, else raise InputError."""
    if not isinstance(rng, np.random.Generator):
        raise InputError("rng", f"expected numpy.random.Generator, got {type(rng).__name__}")
    return rng


def check_size(value: Any, name: str, minimum: int, maximum: int = 4096) -> int:
    """An integer image dimension in [minimum, maximum], else InputError."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InputError(name, f"expected an integer, got {type(value).__name__}")
    if not minimum <= int(value) <= maximum:
        raise InputError(name, f"expected {minimum}..{maximum}, got {value}")
    return int(value)


def check_overrides(overrides: Mapping[str, Any] | None, allowed: tuple[str, ...]) -> dict[str, bool]:
    """Validate ``{finding: bool}`` overrides; unknown names or non-bool values raise InputError."""
    if overrides is None:
        return {}
    if not isinstance(overrides, Mapping):
        raise InputError("overrides", f"expected a dict of finding -> bool, got {type(overrides).__name__}")
    out = {}
    for key, value in overrides.items():
        if key not in allowed:
            raise InputError("overrides", f"unknown finding {key!r}; expected one of {list(allowed)}")
        if not isinstance(value, (bool, np.bool_)):
            raise InputError(f"overrides.{key}", f"expected true/false, got {value!r}")
        out[key] = bool(value)
    return out


# ----------------------------------------------------------------------------- grids & shapes


@functools.lru_cache(maxsize=16)
def norm_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Normalised pixel-centre coordinates: ``v`` (size, 1) rows, ``u`` (1, size) cols, in (0, 1)."""
    c = (np.arange(size, dtype=np.float32) + 0.5) / size
    v, u = c[:, None].copy(), c[None, :].copy()
    v.flags.writeable = False
    u.flags.writeable = False
    return v, u


@functools.lru_cache(maxsize=16)
def index_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel indices as float32: rows (size, 1), cols (1, size)."""
    i = np.arange(size, dtype=np.float32)
    r, c = i[:, None].copy(), i[None, :].copy()
    r.flags.writeable = False
    c.flags.writeable = False
    return r, c


def ellipse(v: np.ndarray, u: np.ndarray, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    """Boolean mask of the ellipse centred (cy, cx) with semi-axes (ry, rx); broadcasts v, u."""
    return ((v - cy) / ry) ** 2 + ((u - cx) / rx) ** 2 <= 1.0


def soft_edge(depth_px: np.ndarray, edge_px: float = 1.5) -> np.ndarray:
    """Anti-aliased inside-ness in [0, 1] from a signed depth in pixels (>0 inside)."""
    return np.clip(depth_px / edge_px + 0.5, 0.0, 1.0)


def pick_center(
    eligible: np.ndarray,
    radius: float,
    margin: float,
    u: float,
    sampling: tuple[float, ...] | None = None,
    min_radius: float = 1.0,
) -> tuple[tuple[int, ...], float]:
    """Choose a lesion centre deep inside ``eligible`` (2D or 3D bool array).

    Candidates are the elements whose Euclidean distance to the outside (array border
    included, in ``sampling`` units) is at least ``radius + margin``; the one at
    fraction ``u`` in [0, 1) of the row-major candidate list is returned. If none is
    deep enough, the deepest element is used and the radius shrinks to fit.
    Returns ``(center_index, radius)``.
    """
    from scipy import ndimage

    nz = np.nonzero(eligible)
    if nz[0].size == 0:
        raise RuntimeError("phantom bug: the organ chosen for a lesion has no pixels")
    lo = [int(a.min()) for a in nz]
    hi = [int(a.max()) + 1 for a in nz]
    crop = np.pad(eligible[tuple(slice(a, b) for a, b in zip(lo, hi))], 1)
    dist = ndimage.distance_transform_edt(crop, sampling=sampling)[(slice(1, -1),) * crop.ndim]
    cand = np.flatnonzero(dist >= radius + margin)
    if cand.size == 0:
        k = int(np.argmax(dist))
        radius = max(float(dist.flat[k]) - margin, min_radius)
        cand = np.array([k])
    k = int(cand[min(int(u * cand.size), cand.size - 1)])
    local = np.unravel_index(k, dist.shape)
    return tuple(int(a + o) for a, o in zip(local, lo)), float(radius)


def _r(x: float, nd: int = 3) -> float:
    return round(float(x), nd)


# ----------------------------------------------------------------------------- chest X-ray


def _xray_anatomy(rng: np.random.Generator) -> dict:
    """Per-case anatomy and exposure (normalised coordinates, 0..1 across the image)."""
    a: dict[str, Any] = {}
    a["xc"] = 0.5 + rng.uniform(-0.02, 0.02)  # thorax midline
    wth = rng.uniform(0.60, 0.72)  # thoracic width / image width
    a["bw"] = min(wth / 2 + rng.uniform(0.06, 0.11), 0.49)  # body half-width
    a["ya"] = rng.uniform(0.08, 0.15)  # lung apices
    yb = rng.uniform(0.76, 0.84)  # lateral costophrenic angles
    dh = rng.uniform(0.05, 0.09)  # diaphragm dome height
    right_up = rng.uniform(0.0, 0.03)  # right hemidiaphragm sits higher
    a["cy"] = a["ya"] + rng.uniform(0.30, 0.38)  # row where the lung apex ellipse ends
    lungs = {}
    for side, sign in (("right", -1.0), ("left", 1.0)):
        xo = a["xc"] + sign * (wth / 2 + rng.uniform(-0.01, 0.01))  # outer (lateral) edge
        xm = a["xc"] + sign * rng.uniform(0.0, 0.02)  # medial edge (hidden by mediastinum)
        lungs[side] = {"xo": xo, "xm": xm, "cx": (xo + xm) / 2, "rx": abs(xo - xm) / 2,
                       "yb": yb - (right_up if side == "right" else 0.0), "dh": dh}
    a["lungs"] = lungs
    a["thorax"] = lungs["left"]["xo"] - lungs["right"]["xo"]  # internal thoracic width
    a["mw"] = rng.uniform(0.05, 0.07)  # mediastinum half-width
    a["mcx"] = a["xc"] + rng.uniform(-0.01, 0.01)
    a["dome_top"] = dome_top = min(lung["yb"] - lung["dh"] for lung in lungs.values())
    a["hcy"] = dome_top - rng.uniform(0.02, 0.05)  # widest row just above the diaphragm
    a["hry"] = rng.uniform(0.11, 0.15)
    hrx_max = CTR_PRESENT[1] * a["thorax"] / 2
    hcx = a["xc"] + rng.uniform(0.015, 0.045)  # heart shifted to the patient's left
    hcx = min(hcx, lungs["left"]["xo"] - 0.05 - hrx_max)
    a["hcx"] = max(hcx, lungs["right"]["xo"] + 0.05 + hrx_max)
    a["hrx_max"] = hrx_max
    a["heart_d"] = rng.uniform(0.05, 0.12)
    a["spine_w"] = rng.uniform(0.025, 0.035)
    a["spine_d"] = rng.uniform(0.15, 0.25)
    a["spine_p"] = rng.uniform(0.05, 0.07)
    a["rib"] = {"spacing": rng.uniform(0.06, 0.08), "phase": rng.random(),
                "a1": rng.uniform(0.3, 0.6), "a2": rng.uniform(1.2, 2.0), "amp": rng.uniform(0.07, 0.12)}
    a["clav"] = {"y": a["ya"] + rng.uniform(0.0, 0.04), "slope": rng.uniform(0.05, 0.2), "amp": rng.uniform(0.08, 0.14)}
    a["texture"] = rng.standard_normal((_TEXTURE_GRID, _TEXTURE_GRID)) * rng.uniform(0.01, 0.03)
    a["air"] = rng.uniform(0.55, 0.65)  # lung darkening (density units; soft tissue = 1)
    a["i0"] = rng.uniform(200.0, 320.0)  # counts of unattenuated air
    a["gain"] = rng.uniform(2000.0, 2400.0)  # counts per density unit
    a["grad"] = (rng.uniform(-0.04, 0.04), rng.uniform(-0.04, 0.04))
    a["sigma"] = rng.uniform(15.0, 45.0)  # noise std in counts
    return a


@functools.lru_cache(maxsize=16)
def _upsample_matrix(size: int, k: int) -> np.ndarray:
    """(size, k) linear-interpolation matrix from a k-point coarse grid to ``size`` pixels."""
    pos = np.clip((np.arange(size) + 0.5) / size * k - 0.5, 0, k - 1)
    lo = np.minimum(np.floor(pos).astype(int), k - 2)
    w = (pos - lo).astype(np.float32)
    m = np.zeros((size, k), np.float32)
    m[np.arange(size), lo] = 1.0 - w
    m[np.arange(size), lo + 1] = w
    m.flags.writeable = False
    return m


def _xray_findings(rng: np.random.Generator, size: int) -> dict:
    """Draw every finding parameter (always, in a fixed order)."""
    lo, hi = NODULE_DIAMETER_PX
    d128 = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
    nodule = {"present": bool(rng.random() < 0.5), "side": SIDES[int(rng.integers(2))],
              "zone": ZONES[int(rng.integers(2))], "diameter_px": max(d128 * size / 128.0, lo),
              "contrast": rng.uniform(0.15, 0.45), "u": rng.random(), "jitter": rng.uniform(-0.4, 0.4, 2)}
    effusion = {"present": bool(rng.random() < 0.5), "side": SIDES[int(rng.integers(2))],
                "height": rng.uniform(0.18, 0.35), "meniscus": rng.uniform(0.04, 0.10),
                "fluid": rng.uniform(0.85, 1.0)}
    cardio = {"present": bool(rng.random() < 0.5), "ctr_yes": rng.uniform(*CTR_PRESENT),
              "ctr_no": rng.uniform(*CTR_ABSENT)}
    return {"nodule": nodule, "effusion": effusion, "cardiomegaly": cardio}


def _lung_depth(v: np.ndarray, u: np.ndarray, lung: dict, ya: float, cy: float, s: int) -> np.ndarray:
    """Signed depth (px) inside a lung: apex ellipse above ``cy``, diaphragm dome below."""
    q = (u - lung["cx"]) / lung["rx"]  # (1, W)
    up = np.minimum(v - cy, 0.0) / (cy - ya)  # (H, 1)
    d_side = (1.0 - np.sqrt(q * q + up * up)) * (lung["rx"] * s)
    y_dia = lung["yb"] - lung["dh"] * (1.0 - q * q)  # diaphragm row per column
    return np.minimum(d_side, (y_dia - v) * s)


def _ellipse_depth(v, u, cy, cx, ry, rx, s) -> np.ndarray:
    """Approximate signed depth (px) inside an ellipse, exact along its centre row."""
    return (1.0 - np.sqrt(((v - cy) / ry) ** 2 + ((u - cx) / rx) ** 2)) * (rx * s)


def _ribs(v, u, a: dict, s: int) -> np.ndarray:
    """Rib and clavicle density (H, W): curved periodic bands over the thorax."""
    rib, xc = a["rib"], a["xc"]
    dx = u - xc
    t = (v + rib["a1"] * np.abs(dx) - rib["a2"] * dx * dx) / rib["spacing"] - rib["phase"]
    bands = np.clip((np.cos(2 * np.pi * t) - 0.3) / 0.7, 0.0, 1.0)
    y_end = max(lung["yb"] for lung in a["lungs"].values())
    rows = soft_edge(np.minimum(v - (a["ya"] - 0.04), y_end - v) * s, 3.0)
    cols = soft_edge((a["thorax"] / 2 + 0.03 - np.abs(dx)) * s, 3.0)
    out = rib["amp"] * bands * rows * cols
    clav = a["clav"]
    cy = clav["y"] + clav["slope"] * np.abs(dx)
    out += clav["amp"] * soft_edge((0.012 - np.abs(v - cy)) * s, 1.5) * soft_edge((0.3 - np.abs(dx)) * s, 2.0) \
        * soft_edge((np.abs(dx) - 0.04) * s, 2.0)
    return out


def _effusion_mask(v, u, a: dict, eff: dict, lung_mask: np.ndarray, s: int) -> np.ndarray:
    """Fluid fraction (H, W) in the lower part of the effusion-side lung (meniscus rises laterally)."""
    lung = a["lungs"][eff["side"]]
    level = lung["yb"] - eff["height"] * (lung["yb"] - a["ya"])
    lateral = np.clip((u - lung["xm"]) / (lung["xo"] - lung["xm"]), 0.0, 1.0)
    y_f = level - eff["meniscus"] * lateral * lateral
    return soft_edge((v - y_f) * s) * lung_mask


def _place_nodule(a: dict, f: dict, lung_masks: dict, medi: np.ndarray, s: int) -> tuple[list, float]:
    """Centre (row, col) and radius (px) of a nodule inside its lung and zone, clear of the
    heart and of the effusion.

    The exclusions use the largest possible heart and the drawn effusion geometry whether or
    not those findings are present, so the nodule position does not depend on them (twins).
    """
    nod, eff = f["nodule"], f["effusion"]
    v, u = norm_grid(s)
    lung = a["lungs"][nod["side"]]
    heart_max = _ellipse_depth(v, u, a["hcy"], a["hcx"], a["hry"], a["hrx_max"], s) > -1.0
    mid = a["ya"] + 0.5 * (lung["yb"] - lung["dh"] - a["ya"])
    zone = (v < mid) if nod["zone"] == "upper" else (v >= mid)
    eligible = (lung_masks[nod["side"]] > 0.99) & ~heart_max & (medi < 0.01) & zone
    if eff["side"] == nod["side"]:  # keep out of where an effusion is (or would be) drawn
        eligible &= _effusion_mask(v, u, a, eff, lung_masks[nod["side"]], s) < 0.01
    radius = nod["diameter_px"] / 2
    (r, c), radius = pick_center(eligible, radius, 3.0, nod["u"], min_radius=1.5)
    center = [round(r + float(nod["jitter"][0]), 2), round(c + float(nod["jitter"][1]), 2)]
    return center, radius


def _xray_density(a: dict, f: dict, s: int) -> tuple[np.ndarray, dict]:
    """Density map (H, W) float32 (soft tissue = 1) and the drawn nodule geometry."""
    v, u = norm_grid(s)
    xc = a["xc"]
    bw_row = a["bw"] * (1.0 - 0.3 * np.clip((0.1 - v) / 0.1, 0.0, 1.0))
    body = soft_edge((bw_row - np.abs(u - xc)) * s)
    lung = {k: soft_edge(_lung_depth(v, u, g, a["ya"], a["cy"], s)) for k, g in a["lungs"].items()}
    aer = lung["right"] + lung["left"]  # aerated fraction
    eff = f["effusion"]
    if eff["present"]:
        aer = aer - eff["fluid"] * _effusion_mask(v, u, a, eff, lung[eff["side"]], s)
    card = f["cardiomegaly"]
    ctr = _r(card["ctr_yes"] if card["present"] else card["ctr_no"])
    card["ctr"] = ctr
    heart = soft_edge(_ellipse_depth(v, u, a["hcy"], a["hcx"], a["hry"], ctr * a["thorax"] / 2, s))
    medi = soft_edge((a["mw"] - np.abs(u - a["mcx"])) * s)  # (1, W): the whole midline column
    cover = np.maximum(medi, heart)
    above_dia = soft_edge((a["dome_top"] + 0.02 - v) * s, 3.0)  # heart shadow ends at the diaphragm
    m = _upsample_matrix(s, _TEXTURE_GRID)
    texture = m @ a["texture"].astype(np.float32) @ m.T  # (H, W) smooth parenchymal pattern
    spine = soft_edge((a["spine_w"] - np.abs(u - xc)) * s) * (0.85 + 0.15 * np.cos(2 * np.pi * v / a["spine_p"]))
    gx, gy = a["grad"]
    dens = body * (1.0 + gx * (u - 0.5) + gy * (v - 0.5) + a["spine_d"] * spine)
    dens += _ribs(v, u, a, s) - (a["air"] - texture) * aer * (1.0 - cover) + a["heart_d"] * heart * above_dia
    geo: dict[str, Any] = {}
    nod = f["nodule"]
    if nod["present"]:
        center, radius = _place_nodule(a, f, lung, medi, s)
        rr, cc = index_grid(s)
        rho2 = ((rr - center[0]) ** 2 + (cc - center[1]) ** 2) / (radius * radius)
        # Peak (counts) at least 6 noise std above a rib crossing, so even a 3-px nodule shows.
        floor = NODULE_MIN_PEAK_CNR * a["sigma"] + a["rib"]["amp"] * a["gain"]
        amp = max(nod["contrast"] * a["air"] * a["gain"], floor)
        dens += (amp / a["gain"]) * np.sqrt(np.clip(1.0 - rho2, 0.0, None))
        geo = {"center_rc": center, "diameter_px": 2 * radius, "contrast": amp / (a["air"] * a["gain"])}
    return dens.astype(np.float32, copy=False), geo


def _xray_truth(f: dict, geo: dict, spacing: float) -> dict:
    nod, eff, card = f["nodule"], f["effusion"], f["cardiomegaly"]
    if nod["present"]:
        d = geo["diameter_px"]
        nodule = {"present": True, "side": nod["side"], "zone": nod["zone"], "diameter_px": _r(d, 2),
                  "diameter_mm": _r(d * spacing, 2), "contrast": _r(geo["contrast"]),
                  "center_rc": list(geo["center_rc"])}
    else:
        nodule = {"present": False, "side": None, "zone": None, "diameter_px": None,
                  "diameter_mm": None, "contrast": None, "center_rc": None}
    findings = {"nodule": nodule,
                "effusion": {"present": eff["present"], "side": eff["side"] if eff["present"] else None},
                "cardiomegaly": {"present": card["present"], "ctr": card["ctr"]}}
    return {"modality": "xray", "organ": "chest", "view": "PA", "pixel_spacing_mm": _r(spacing, 4),
            "findings": findings, "normal": not any(x["present"] for x in findings.values())}


def generate_xray(
    rng: np.random.Generator, size: int = 128, overrides: Mapping[str, bool] | None = None
) -> tuple[np.ndarray, dict]:
    """A PA chest radiograph ``(size, size)`` uint16 (12-bit, bright = dense) and its truth.

    Anatomy varies per case (body and thorax width, lung apices and diaphragm domes,
    heart position, mediastinum, rib pattern, exposure, noise std 15..45 counts). Findings,
    each present with p=0.5 independently: ``nodule`` (3..12 px at 128 px; peak at least
    the rib amplitude + 6 noise std; kept clear of the heart and of the effusion region),
    ``effusion`` (basal fluid with a lateral meniscus), ``cardiomegaly``
    (cardiothoracic ratio in [0.52, 0.64] when present, [0.36, 0.45] when absent).
    ``overrides`` (e.g. ``{"nodule": False}``) forces findings on/off without changing
    any other pixel. Truth layout: see the MedPhantom contract; ``contrast`` is the
    nodule's peak density as a fraction of the lung-to-soft-tissue difference.
    """
    check_rng(rng)
    s = check_size(size, "size", 64)
    force = check_overrides(overrides, XRAY_FINDINGS)
    a = _xray_anatomy(rng)
    noise = rng.standard_normal((s, s), dtype=np.float32)  # (H, W)
    f = _xray_findings(rng, s)
    for name, present in force.items():
        f[name]["present"] = present
    dens, geo = _xray_density(a, f, s)
    img = a["i0"] + a["gain"] * dens + a["sigma"] * noise
    img = np.clip(np.rint(img), 0, XRAY_MAX).astype(np.uint16)
    return img, _xray_truth(f, geo, XRAY_FIELD_MM / s)


# ----------------------------------------------------------------------------- CT slice

# Labels of the CT slice label map.
(_AIR, _FAT, _SOFT, _LUNG_R, _LUNG_L, _HEART, _VESSEL, _BONE, _AORTA, _CAVITY, _LIVER,
 _SPLEEN, _STOMACH_AIR, _STOMACH, _BOWEL, _SCALP, _GREY, _WHITE, _CSF) = range(19)

# Per organ: noise std range (HU), |lesion delta| range (HU), lesion sign (+1 or None = random).
_CT_LESION = {
    "chest": {"sigma": (10.0, 22.0), "delta": (100.0, 220.0), "sign": 1},  # ground-glass nodule
    "abdomen": {"sigma": (3.0, 6.0), "delta": (20.0, 35.0), "sign": None},  # liver / spleen lesion
    "head": {"sigma": (1.5, 3.0), "delta": (10.0, 20.0), "sign": None},  # infarct / bleed-like
}
CT_LESION_DIAMETER_PX = (4.0, 14.0)  # at 128 px, scaled with size


def _ct_body(rng, v, u, lab, big: bool) -> dict:
    """Paint the body ellipse (fat rim, soft-tissue inside); return its geometry."""
    b = {"cy": 0.5 + rng.uniform(-0.03, 0.03), "cx": 0.5 + rng.uniform(-0.02, 0.02),
         "ry": rng.uniform(0.27, 0.35) if big else rng.uniform(0.40, 0.45),
         "rx": rng.uniform(0.38, 0.46) if big else rng.uniform(0.33, 0.38),
         "fat": rng.uniform(0.015, 0.045)}
    lab[ellipse(v, u, b["cy"], b["cx"], b["ry"], b["rx"])] = _FAT
    lab[ellipse(v, u, b["cy"], b["cx"], b["ry"] - b["fat"], b["rx"] - b["fat"])] = _SOFT
    return b


def _ct_chest(rng, s: int) -> dict:
    v, u = norm_grid(s)
    lab = np.zeros((s, s), np.int8)
    b = _ct_body(rng, v, u, lab, True)
    hu = {_FAT: rng.uniform(-110, -80), _SOFT: rng.uniform(35, 50), _HEART: rng.uniform(35, 45),
          _AORTA: rng.uniform(38, 45), _BONE: rng.uniform(350, 600), _VESSEL: rng.uniform(-350, -200)}
    hu[_LUNG_R] = hu[_LUNG_L] = rng.uniform(-870, -820)
    for label, sign in ((_LUNG_R, -1.0), (_LUNG_L, 1.0)):
        cx = b["cx"] + sign * rng.uniform(0.45, 0.5) * b["rx"]
        lab[ellipse(v, u, b["cy"] + 0.03, cx, rng.uniform(0.66, 0.74) * b["ry"], rng.uniform(0.34, 0.4) * b["rx"])] = label
    lab[ellipse(v, u, b["cy"] - 0.22 * b["ry"], b["cx"] + rng.uniform(0.08, 0.14) * b["rx"],
                rng.uniform(0.38, 0.46) * b["ry"], rng.uniform(0.25, 0.3) * b["rx"])] = _HEART
    lab[ellipse(v, u, b["cy"] + 0.45 * b["ry"], b["cx"] + 0.1 * b["rx"], 0.09 * b["ry"], 0.07 * b["rx"])] = _AORTA
    lab[ellipse(v, u, b["cy"] + 0.72 * b["ry"], b["cx"], 0.13 * b["ry"], 0.09 * b["rx"])] = _BONE
    pts = rng.random((30, 2))  # candidate vessel positions (kept only inside the lungs)
    rows = np.clip(((b["cy"] - b["ry"]) + pts[:, 0] * 2 * b["ry"]) * s, 0, s - 1).astype(int)
    cols = np.clip(((b["cx"] - b["rx"]) + pts[:, 1] * 2 * b["rx"]) * s, 0, s - 1).astype(int)
    keep = (lab[rows, cols] == _LUNG_R) | (lab[rows, cols] == _LUNG_L)
    lab[rows[keep], cols[keep]] = _VESSEL
    eligible = {"right": lab == _LUNG_R, "left": lab == _LUNG_L}
    return {"labels": lab, "hu": hu, "fov": rng.uniform(340.0, 420.0), "eligible": eligible}


def _ct_abdomen(rng, s: int) -> dict:
    v, u = norm_grid(s)
    lab = np.zeros((s, s), np.int8)
    b = _ct_body(rng, v, u, lab, True)
    hu = {_FAT: rng.uniform(-110, -80), _SOFT: rng.uniform(35, 50), _CAVITY: rng.uniform(-100, -70),
          _LIVER: rng.uniform(55, 65), _SPLEEN: rng.uniform(45, 52), _STOMACH_AIR: -1000.0,
          _STOMACH: rng.uniform(5, 20), _BOWEL: rng.uniform(20, 40), _AORTA: rng.uniform(38, 45),
          _BONE: rng.uniform(350, 600)}
    wall = rng.uniform(0.02, 0.035)
    cavity = ellipse(v, u, b["cy"], b["cx"], b["ry"] - b["fat"] - wall, b["rx"] - b["fat"] - wall)
    lab[cavity] = _CAVITY
    liver = ellipse(v, u, b["cy"] - 0.05 * b["ry"], b["cx"] - rng.uniform(0.3, 0.4) * b["rx"],
                    rng.uniform(0.58, 0.68) * b["ry"], rng.uniform(0.45, 0.52) * b["rx"])
    lab[liver & cavity] = _LIVER
    spleen = ellipse(v, u, b["cy"] + 0.35 * b["ry"], b["cx"] + rng.uniform(0.52, 0.58) * b["rx"],
                     rng.uniform(0.36, 0.42) * b["ry"], rng.uniform(0.24, 0.28) * b["rx"])
    lab[spleen & cavity] = _SPLEEN
    st_cy, st_cx = b["cy"] - 0.35 * b["ry"], b["cx"] + rng.uniform(0.3, 0.4) * b["rx"]
    stomach = ellipse(v, u, st_cy, st_cx, 0.3 * b["ry"], 0.22 * b["rx"]) & (lab == _CAVITY)
    lab[stomach] = _STOMACH
    lab[stomach & (v < st_cy - rng.uniform(0.0, 0.15) * b["ry"])] = _STOMACH_AIR
    for _ in range(6):  # bowel loops in the remaining fat
        by, bx, br = rng.random(3)
        loop = ellipse(v, u, b["cy"] + (by - 0.3) * b["ry"], b["cx"] + (bx - 0.5) * b["rx"],
                       (0.08 + 0.06 * br) * b["ry"], (0.06 + 0.05 * br) * b["rx"])
        lab[loop & (lab == _CAVITY)] = _BOWEL
    lab[ellipse(v, u, b["cy"] + 0.45 * b["ry"], b["cx"] + 0.08 * b["rx"], 0.09 * b["ry"], 0.07 * b["rx"])] = _AORTA
    lab[ellipse(v, u, b["cy"] + 0.72 * b["ry"], b["cx"], 0.14 * b["ry"], 0.09 * b["rx"])] = _BONE
    eligible = {"right": lab == _LIVER, "left": lab == _SPLEEN}
    return {"labels": lab, "hu": hu, "fov": rng.uniform(340.0, 420.0), "eligible": eligible}


def _ct_head(rng, s: int) -> dict:
    v, u = norm_grid(s)
    lab = np.zeros((s, s), np.int8)
    fov = rng.uniform(220.0, 260.0)
    cy, cx = 0.5 + rng.uniform(-0.02, 0.02), 0.5 + rng.uniform(-0.02, 0.02)
    ry, rx = rng.uniform(0.40, 0.45), rng.uniform(0.33, 0.38)
    scalp, skull = rng.uniform(3.0, 6.0) / fov, rng.uniform(5.0, 8.0) / fov
    hu = {_SCALP: rng.uniform(20, 40), _BONE: rng.uniform(800, 1300), _GREY: rng.uniform(34, 40),
          _CSF: rng.uniform(2, 10)}
    hu[_WHITE] = hu[_GREY] - rng.uniform(5, 8)
    lab[ellipse(v, u, cy, cx, ry, rx)] = _SCALP
    lab[ellipse(v, u, cy, cx, ry - scalp, rx - scalp)] = _BONE
    lab[ellipse(v, u, cy, cx, ry - scalp - skull, rx - scalp - skull)] = _GREY
    wm = rng.uniform(0.74, 0.82)
    lab[ellipse(v, u, cy, cx, wm * (ry - scalp - skull), wm * (rx - scalp - skull))] = _WHITE
    vent = rng.uniform(0.10, 0.14) * ry
    for sign in (-1.0, 1.0):
        lab[ellipse(v, u, cy - 0.02, cx + sign * 0.045, vent, 0.025)] = _CSF
    lab[(np.abs(u - cx) < 0.5 / s) & (lab == _GREY)] = _BONE  # falx (1 px)
    lateral = np.abs(u - cx) > 0.06  # keep lesions clear of the midline
    white = (lab == _WHITE) & lateral
    eligible = {"right": white & (u < cx), "left": white & (u > cx)}
    return {"labels": lab, "hu": hu, "fov": fov, "eligible": eligible}


_CT_BUILDERS = {"chest": _ct_chest, "abdomen": _ct_abdomen, "head": _ct_head}


def _ct_lesion_params(rng, organ: str, s: int) -> dict:
    spec = _CT_LESION[organ]
    lo, hi = CT_LESION_DIAMETER_PX
    les = {"present": bool(rng.random() < 0.5), "side": SIDES[int(rng.integers(2))],
           "diameter_px": max(rng.uniform(lo, hi) * s / 128.0, lo), "mag": rng.uniform(*spec["delta"]),
           "sign_draw": bool(rng.random() < 0.5), "u": rng.random()}
    sign = spec["sign"] if spec["sign"] is not None else (1 if les["sign_draw"] else -1)
    les["delta"] = int(round(sign * les["mag"]))
    return les


def generate_ct_slice(
    rng: np.random.Generator, size: int = 128, overrides: Mapping[str, bool] | None = None
) -> tuple[np.ndarray, dict]:
    """An axial CT slice ``(size, size)`` int16 in HU and its truth.

    ``organ`` is uniform over chest / abdomen / head. The lesion (p=0.5) is a disk of
    constant ``hu_delta`` inside the organ on ``side`` (chest: lung, +100..220 HU
    ground-glass; abdomen: liver (right) or spleen (left), ±20..35 HU; head: white
    matter, ±10..20 HU), at least 3.3 noise std, so it is visible in the organ's
    window (truth ``window``) and nearly invisible in a wide one. Rows run anterior ->
    posterior, columns patient right -> left. ``overrides={"lesion": bool}`` forces it.
    """
    check_rng(rng)
    s = check_size(size, "size", 64)
    force = check_overrides(overrides, ("lesion",))
    organ = CT_ORGANS[int(rng.integers(3))]
    sc = _CT_BUILDERS[organ](rng, s)
    sigma = rng.uniform(*_CT_LESION[organ]["sigma"])
    noise = rng.standard_normal((s, s), dtype=np.float32)  # (H, W)
    les = _ct_lesion_params(rng, organ, s)
    les["present"] = force.get("lesion", les["present"])
    lut = np.full(32, -1000.0, np.float32)
    for label, value in sc["hu"].items():
        lut[label] = value
    hu = np.rint(lut[sc["labels"]] + sigma * noise)  # (H, W) float32, integral
    spacing = sc["fov"] / s
    lesion = {"present": False, "side": None, "diameter_mm": None, "hu_delta": None, "center_rc": None}
    if les["present"]:
        (r0, c0), radius = pick_center(sc["eligible"][les["side"]], les["diameter_px"] / 2, 3.0, les["u"])
        rr, cc = index_grid(s)
        hu[(rr - r0) ** 2 + (cc - c0) ** 2 <= radius * radius] += les["delta"]
        lesion = {"present": True, "side": les["side"], "diameter_mm": _r(2 * radius * spacing, 2),
                  "hu_delta": float(les["delta"]), "center_rc": [r0, c0]}
    hu = np.clip(hu, HU_MIN, HU_MAX).astype(np.int16)
    truth = {"modality": "ct", "organ": organ, "pixel_spacing_mm": _r(spacing, 4),
             "window": CT_WINDOW_FOR_ORGAN[organ], "findings": {"lesion": lesion}, "normal": not lesion["present"]}
    return hu, truth

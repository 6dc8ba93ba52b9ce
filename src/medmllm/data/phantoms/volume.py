"""MedPhantom 3D: a thoraco-abdominal CT volume in Hounsfield units, with exact truth.

The array is ``(D, H, W)`` int16 in medmllm's canonical orientation: axis 0 runs
inferior -> superior, axis 1 anterior -> posterior, axis 2 patient right -> left
(nibabel axcodes ``("S", "P", "L")``), so ``writers.write_nifti`` /
``writers.write_dicom_series`` store it and medmllm's readers give it back unchanged.

The volume covers the lung bases, heart, diaphragm domes, liver, spleen and kidneys.
Anatomy is laid out in normalised coordinates (z as a fraction of the covered
length, y / x as a fraction of the field of view) with per-case jitter; the lesion is a
sphere in millimetres. All random numbers are drawn in a fixed order, so
``overrides={"lesion": bool}`` changes only the lesion voxels.
"""

from __future__ import annotations

import functools
from typing import Mapping

import numpy as np

from medmllm.data.phantoms.radiograph import (
    HU_MAX,
    HU_MIN,
    SIDES,
    check_overrides,
    check_rng,
    check_size,
    pick_center,
)
from medmllm.errors import InputError

# Labels of the volume label map.
(_AIR, _FAT, _WALL, _MEDIAST, _ABDOMEN, _LUNG_R, _LUNG_L, _HEART, _LIVER, _SPLEEN,
 _KIDNEY_R, _KIDNEY_L, _AORTA, _BONE) = range(14)

# side -> organ name -> label of the organ on that side
_LESION_ORGANS = {
    "right": {"liver": _LIVER, "kidney": _KIDNEY_R, "lung": _LUNG_R},
    "left": {"spleen": _SPLEEN, "kidney": _KIDNEY_L, "lung": _LUNG_L},
}
SLICE_SPACINGS_MM = (3.0, 4.0, 5.0)
FOV_MM = (340.0, 420.0)
LESION_MAX_DIAMETER_MM = 45.0
# |HU delta| of the lesion and the noise std: a lesion is >= 3.5 noise std from its organ.
LUNG_LESION_DELTA = (150.0, 400.0)
SOLID_ORGAN_LESION_DELTA = (25.0, 50.0)
NOISE_STD_HU = (3.5, 7.0)


@functools.lru_cache(maxsize=8)
def _grid3(shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Normalised voxel centres: z (D,1,1) inferior->superior, y (1,H,1), x (1,1,W), in (0, 1)."""
    out = []
    for axis, n in enumerate(shape):
        c = (np.arange(n, dtype=np.float32) + 0.5) / n
        view = [1, 1, 1]
        view[axis] = n
        c = c.reshape(view)
        c.flags.writeable = False
        out.append(c)
    return tuple(out)


def _check_shape(shape) -> tuple[int, int, int]:
    if not isinstance(shape, (tuple, list)) or len(shape) != 3:
        raise InputError("shape", f"expected (D, H, W), got {shape!r}")
    d = check_size(shape[0], "shape[0]", 8, 1024)
    return d, check_size(shape[1], "shape[1]", 32, 1024), check_size(shape[2], "shape[2]", 32, 1024)


def _ell2(y, x, cy, cx, ry, rx):
    """In-plane normalised squared radius (1, H, W)."""
    return ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2


def _anatomy(rng: np.random.Generator, shape: tuple[int, int, int]) -> tuple[np.ndarray, dict, dict]:
    """Paint the label map (D, H, W) int8; return it, the HU per label and the geometry."""
    z, y, x = _grid3(shape)
    b = {"cy": 0.5 + rng.uniform(-0.03, 0.03), "cx": 0.5 + rng.uniform(-0.02, 0.02),
         "ry": rng.uniform(0.27, 0.34), "rx": rng.uniform(0.37, 0.45), "fat": rng.uniform(0.015, 0.04),
         "wall": rng.uniform(0.02, 0.03)}
    hu = {_FAT: rng.uniform(-110, -80), _WALL: rng.uniform(35, 50), _MEDIAST: rng.uniform(-90, -40),
          _ABDOMEN: rng.uniform(-60, -20), _LUNG_R: rng.uniform(-870, -820), _HEART: rng.uniform(35, 45),
          _LIVER: rng.uniform(55, 65), _SPLEEN: rng.uniform(45, 52), _KIDNEY_R: rng.uniform(28, 35),
          _AORTA: rng.uniform(38, 45), _BONE: rng.uniform(300, 500)}
    hu[_LUNG_L], hu[_KIDNEY_L] = hu[_LUNG_R], hu[_KIDNEY_R]
    zd = rng.uniform(0.45, 0.6)  # diaphragm level (fraction of the covered length)
    zh = rng.uniform(0.08, 0.15)  # dome height
    zd_side = {"right": zd + rng.uniform(0.0, 0.05), "left": zd}
    lab = np.zeros(shape, np.int8)
    lab[np.broadcast_to(_ell2(y, x, b["cy"], b["cx"], b["ry"], b["rx"]) <= 1.0, shape)] = _FAT
    inner = (b["ry"] - b["fat"], b["rx"] - b["fat"])
    lab[np.broadcast_to(_ell2(y, x, b["cy"], b["cx"], *inner) <= 1.0, shape)] = _WALL
    cav2d = _ell2(y, x, b["cy"], b["cx"], inner[0] - b["wall"], inner[1] - b["wall"]) <= 1.0  # (1, H, W)
    lungs2d, dome = {}, np.zeros_like(cav2d, dtype=np.float32)
    for side, sign in (("right", -1.0), ("left", 1.0)):
        lcy, lcx = b["cy"] + 0.03, b["cx"] + sign * rng.uniform(0.45, 0.5) * b["rx"]
        lry, lrx = rng.uniform(0.66, 0.74) * b["ry"], rng.uniform(0.34, 0.4) * b["rx"]
        r2 = _ell2(y, x, lcy, lcx, lry, lrx)
        lungs2d[side] = r2 <= 1.0
        half = (x < b["cx"]) if side == "right" else (x >= b["cx"])
        dome = np.where(half, zd_side[side] + zh * np.clip(1.0 - r2, 0.0, 1.0), dome)
    above = z > dome  # (D, H, W): thorax side of the diaphragm
    lab[cav2d & above] = _MEDIAST
    lab[cav2d & ~above] = _ABDOMEN
    lab[lungs2d["right"] & above] = _LUNG_R
    lab[lungs2d["left"] & above] = _LUNG_L
    heart = _ell2(y, x, b["cy"] - 0.25 * b["ry"], b["cx"] + rng.uniform(0.08, 0.14) * b["rx"],
                  rng.uniform(0.38, 0.46) * b["ry"], rng.uniform(0.27, 0.32) * b["rx"])
    hz = rng.uniform(0.15, 0.22)
    lab[(heart + ((z - zd - 0.6 * hz) / hz) ** 2 <= 1.0) & above] = _HEART
    organs = [
        (_LIVER, (zd_side["right"] - rng.uniform(0.12, 0.2), rng.uniform(0.22, 0.3)),
         (b["cy"] - 0.05 * b["ry"], b["cx"] - rng.uniform(0.3, 0.4) * b["rx"]),
         (rng.uniform(0.58, 0.68) * b["ry"], rng.uniform(0.45, 0.52) * b["rx"])),
        (_SPLEEN, (zd - rng.uniform(0.08, 0.14), rng.uniform(0.13, 0.17)),
         (b["cy"] + 0.38 * b["ry"], b["cx"] + rng.uniform(0.52, 0.58) * b["rx"]),
         (rng.uniform(0.36, 0.42) * b["ry"], rng.uniform(0.24, 0.28) * b["rx"])),
    ]
    kz = zd - rng.uniform(0.3, 0.38)
    for label, sign in ((_KIDNEY_R, -1.0), (_KIDNEY_L, 1.0)):
        organs.append((label, (kz + rng.uniform(-0.03, 0.03), rng.uniform(0.13, 0.17)),
                       (b["cy"] + 0.45 * b["ry"], b["cx"] + sign * rng.uniform(0.38, 0.45) * b["rx"]),
                       (rng.uniform(0.18, 0.22) * b["ry"], rng.uniform(0.15, 0.19) * b["rx"])))
    for label, (cz, az), (cy, cx), (ry, rx) in organs:
        lab[(_ell2(y, x, cy, cx, ry, rx) + ((z - cz) / az) ** 2 <= 1.0) & ~above & cav2d] = label
    lab[np.broadcast_to(_ell2(y, x, b["cy"] + 0.42 * b["ry"], b["cx"] + 0.1 * b["rx"], 0.09 * b["ry"], 0.07 * b["rx"]) <= 1.0, shape)] = _AORTA
    lab[np.broadcast_to(_ell2(y, x, b["cy"] + 0.72 * b["ry"], b["cx"], 0.13 * b["ry"], 0.09 * b["rx"]) <= 1.0, shape)] = _BONE
    return lab, hu, b


def _lesion_params(rng: np.random.Generator, spacing: tuple[float, float, float]) -> dict:
    """Draw every lesion parameter (always, in a fixed order)."""
    side = SIDES[int(rng.integers(2))]
    organ = list(_LESION_ORGANS[side])[int(rng.integers(3))]
    dz, _, dx = spacing
    d_min = min(max(3.0 * dx, 2.0 * dz), LESION_MAX_DIAMETER_MM)
    les = {"present": bool(rng.random() < 0.5), "side": side, "organ": organ,
           "diameter_mm": float(np.exp(rng.uniform(np.log(d_min), np.log(LESION_MAX_DIAMETER_MM)))),
           "lung_mag": rng.uniform(*LUNG_LESION_DELTA), "solid_mag": rng.uniform(*SOLID_ORGAN_LESION_DELTA),
           "sign_draw": bool(rng.random() < 0.5), "u": rng.random()}
    if organ == "lung":
        les["delta"] = int(round(les["lung_mag"]))  # a solid-ish nodule in aerated lung
    else:
        les["delta"] = int(round(les["solid_mag"] * (1 if les["sign_draw"] else -1)))
    return les


def lesion_mask(shape, spacing, center, radius: float) -> np.ndarray:
    """Voxels of a lesion sphere: bool ``(D, H, W)``, True where the voxel centre lies within ``radius``
    mm of ``center`` (voxel indices ``(d, h, w)``), with ``spacing`` (mm per voxel along each axis).
    The generator draws lesions with it; a truth entry gives them back as
    ``lesion_mask(truth["shape"], truth["spacing_mm"], lesion["center_dhw"], lesion["diameter_mm"] / 2)``."""
    z, y, x = (np.arange(n, dtype=np.float32) for n in shape)
    dist2 = (((z - center[0]) * spacing[0]) ** 2)[:, None, None] + (((y - center[1]) * spacing[1]) ** 2)[None, :, None] \
        + (((x - center[2]) * spacing[2]) ** 2)[None, None, :]
    return dist2 <= radius * radius


def _draw_lesion(hu: np.ndarray, lab: np.ndarray, les: dict, spacing) -> dict:
    """Add the lesion sphere to ``hu`` in place; return its truth entry."""
    label = _LESION_ORGANS[les["side"]][les["organ"]]
    margin = max(spacing[1], spacing[2])  # keep one in-plane voxel of organ around it
    center, radius = pick_center(lab == label, les["diameter_mm"] / 2, margin, les["u"],
                                 sampling=spacing, min_radius=min(spacing))
    mask = lesion_mask(hu.shape, spacing, center, radius)  # (D, H, W)
    hu[mask] += les["delta"]
    slices = np.flatnonzero(mask.any(axis=(1, 2)))
    return {"present": True, "organ": les["organ"], "side": les["side"],
            "slice_range": [int(slices[0]), int(slices[-1])], "diameter_mm": round(2 * radius, 2),
            "center_dhw": [int(c) for c in center], "hu_delta": float(les["delta"])}


def generate_ct_volume(
    rng: np.random.Generator,
    shape: tuple[int, int, int] = (32, 64, 64),
    overrides: Mapping[str, bool] | None = None,
) -> tuple[np.ndarray, dict]:
    """A CT volume ``(D, H, W)`` int16 in HU (canonical S, P, L orientation) and its truth.

    Spacing per case: slice spacing ``dz`` from (3, 4, 5) mm, in-plane ``dy = dx`` =
    field of view (340..420 mm) / max(H, W). The lesion (p=0.5) is a sphere of constant
    ``hu_delta`` in one organ: patient right {liver, kidney, lung}, left {spleen,
    kidney, lung}, side uniform; diameter 3 in-plane voxels (or 2 slices) .. 45 mm
    (shrunk to fit the organ); solid organs ±25..50 HU, lung +150..400 HU; noise std
    3.5..7 HU. ``slice_range`` lists the first and last axis-0 index holding lesion
    voxels (inclusive); ``center_dhw`` is its centre voxel. Truth adds ``hu_delta``.
    """
    check_rng(rng)
    shape = _check_shape(shape)
    force = check_overrides(overrides, ("lesion",))
    dz = float(SLICE_SPACINGS_MM[int(rng.integers(len(SLICE_SPACINGS_MM)))])
    dxy = round(rng.uniform(*FOV_MM) / max(shape[1], shape[2]), 4)
    spacing = (dz, dxy, dxy)
    lab, hu_map, _ = _anatomy(rng, shape)
    sigma = rng.uniform(*NOISE_STD_HU)
    noise = rng.standard_normal(shape, dtype=np.float32)  # (D, H, W)
    les = _lesion_params(rng, spacing)
    les["present"] = force.get("lesion", les["present"])
    lut = np.full(32, -1000.0, np.float32)
    for label, value in hu_map.items():
        lut[label] = value
    hu = np.rint(lut[lab] + sigma * noise)  # (D, H, W) float32, integral
    lesion = {"present": False, "organ": None, "side": None, "slice_range": None,
              "diameter_mm": None, "center_dhw": None, "hu_delta": None}
    if les["present"]:
        lesion = _draw_lesion(hu, lab, les, spacing)
    hu = np.clip(hu, HU_MIN, HU_MAX).astype(np.int16)
    truth = {"modality": "ct3d", "spacing_mm": [dz, dxy, dxy], "shape": list(shape),
             "findings": {"lesion": lesion}, "normal": not lesion["present"]}
    return hu, truth

"""One canonical orientation for every 3D volume, whatever file it came from.

Volumes leave the readers as ``(D, H, W)`` arrays in the axial radiological layout:
axis 0 runs inferior -> superior, axis 1 anterior -> posterior (image rows, top to
bottom), axis 2 patient right -> left (image columns). In nibabel's axis codes
that is ``("S", "P", "L")``. A NIfTI file and a DICOM series of the same scan
therefore give the same array. ``affine`` maps ``(d, h, w, 1)`` to RAS mm.
"""

from __future__ import annotations

import numpy as np

CANONICAL_AXCODES = ("S", "P", "L")


def to_canonical(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """Reorient a 3D ``array`` whose index->RAS map is ``affine`` to CANONICAL_AXCODES.

    Returns ``(array, affine, spacing)``; spacing is mm per output axis. Only axis
    flips and permutations are applied (no resampling), so values are unchanged.
    """
    from nibabel import orientations as ornt_mod

    affine = np.asarray(affine, dtype=np.float64)
    start = ornt_mod.io_orientation(affine)
    end = ornt_mod.axcodes2ornt(CANONICAL_AXCODES)
    transform = ornt_mod.ornt_transform(start, end)
    out = ornt_mod.apply_orientation(array, transform)
    new_affine = affine @ ornt_mod.inv_ornt_aff(transform, array.shape[:3])
    spacing = tuple(float(s) for s in np.sqrt((new_affine[:3, :3] ** 2).sum(axis=0)))
    return np.ascontiguousarray(out), new_affine, spacing

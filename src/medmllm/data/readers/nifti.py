"""NIfTI-1 / NIfTI-2 (``.nii``, ``.nii.gz``) and Analyze / NIfTI pairs (``.hdr`` + ``.img``).

``read_nifti(path, *, volume_index=0) -> (volume, meta)``

* ``volume``: ``(D, H, W)`` float32 in medmllm's canonical orientation (nibabel axis
  codes ``("S", "P", "L")``, see :mod:`medmllm.data.readers.orientation`), with the
  file's scaling (``scl_slope`` / ``scl_inter``) applied. A 4D file gives the volume at
  ``volume_index`` (``meta["n_volumes"]`` says how many there are).
* ``meta``: ``format="nifti"``, ``path``, ``kind="volume"``, ``spacing`` (mm per output
  axis), ``affine`` (4x4 list, ``(d, h, w, 1)`` -> RAS mm), ``orientation="SPL"``,
  ``original_axcodes`` (the file's own axis codes), ``datatype`` (stored numpy dtype
  name), ``shape`` (the file's declared shape), ``n_volumes``, ``volume_index``,
  ``description`` (the header's ``descrip``), ``image_class`` (nibabel class name).

Before any voxel is read the declared shape is checked against
``base.MAX_VOLUME_VOXELS`` and, for uncompressed data files, the byte count the header
implies (``offset + n_voxels * itemsize``) against the real file size, so a truncated
file or an absurd header fails fast with :class:`InputError` instead of allocating.
The affine is nibabel's best affine (sform, else qform, else the header zooms), in mm
(``xyzt_units`` of meter/micron are converted).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from medmllm.errors import InputError
from medmllm.data.readers import base, orientation

_UNIT_TO_MM = {"meter": 1000.0, "mm": 1.0, "micron": 1e-3, "unknown": 1.0}


def read_nifti(path: str | os.PathLike, *, volume_index: int = 0) -> base.ReadResult:
    """Read a NIfTI / Analyze file -> ``((D, H, W) float32, meta)``; see the module docstring."""
    import nibabel as nib

    p = base.check_file(path)
    img = base.guard(p, lambda: nib.load(str(p)), "cannot parse NIfTI/Analyze header")
    shape = _declared_shape(p, img)
    n_vox = base.check_elements(p, shape, base.MAX_VOLUME_VOXELS, "voxels")
    _check_data_size(p, img, n_vox)
    n_volumes = shape[3] if len(shape) > 3 else 1
    if not 0 <= volume_index < n_volumes:
        raise InputError(p, f"volume_index {volume_index} out of range: the file holds {n_volumes} volume(s)")

    data = base.guard(p, lambda: _load_volume(img, volume_index), "cannot read voxel data")
    affine = _affine_mm(p, img)  # (4, 4) array index (i, j, k, 1) -> RAS mm
    volume, canon_affine, spacing = base.guard(
        p, lambda: orientation.to_canonical(data, affine), "cannot reorient volume"
    )  # volume: (D, H, W) float32
    return volume, _meta(p, img, shape, n_volumes, volume_index, affine, canon_affine, spacing)


def _declared_shape(p: Path, img: Any) -> tuple[int, ...]:
    """The file's declared shape as 3 or 4 ints (2D files get a third axis of 1)."""
    shape = tuple(int(d) for d in img.header.get_data_shape())
    if len(shape) == 0:
        raise InputError(p, "header declares no dimensions")
    if any(d <= 0 for d in shape):
        raise InputError(p, f"declared shape {shape} has a non-positive dimension")
    if len(shape) < 3:
        shape = shape + (1,) * (3 - len(shape))
    if len(shape) > 4:
        if any(d != 1 for d in shape[4:]):
            raise InputError(p, f"declared shape {shape} has more than 4 non-trivial dimensions; expected 3D or 4D")
        shape = shape[:4]
    return shape


def _check_data_size(p: Path, img: Any, n_vox: int) -> None:
    """Compare the bytes the header implies with the data file's size (uncompressed files only)."""
    data_file = img.file_map["image"].filename
    if data_file is None:
        return
    data_path = Path(data_file)
    if not data_path.exists():
        raise InputError(p, f"data file {data_path.name} is missing (expected next to the header)")
    if data_path.name.lower().endswith((".gz", ".bz2", ".zst")):
        return  # compressed: a short stream is caught while decoding
    dtype = np.dtype(img.header.get_data_dtype())
    offset = int(getattr(img.dataobj, "offset", 0) or 0)
    expected = offset + n_vox * dtype.itemsize
    actual = data_path.stat().st_size
    if actual < expected:
        raise InputError(
            p,
            f"truncated data: expected {expected} bytes in {data_path.name} "
            f"({offset} header/offset + {n_vox} voxels x {dtype.itemsize} bytes), found {actual}",
        )


def _load_volume(img: Any, volume_index: int) -> np.ndarray:
    """Scaled float32 voxels of one 3D volume in file axis order: (I, J, K)."""
    ndim = len(img.shape)
    if ndim >= 4:
        # reads only that volume from uncompressed files; trailing axes beyond 4 are all 1
        img = img.slicer[(slice(None),) * 3 + (volume_index,) + (0,) * (ndim - 4)]
    data = img.get_fdata(dtype=np.float32)  # (I, J, K), or (I,) / (I, J) for 1D/2D files
    return data.reshape(data.shape + (1,) * (3 - data.ndim))


def _affine_mm(p: Path, img: Any) -> np.ndarray:
    affine = np.asarray(img.affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise InputError(p, "header affine (sform/qform/pixdim) is not a finite 4x4 matrix")
    get_units = getattr(img.header, "get_xyzt_units", None)
    unit = get_units()[0] if get_units is not None else "mm"
    scale = _UNIT_TO_MM.get(unit, 1.0)
    if scale != 1.0:
        affine = np.diag([scale, scale, scale, 1.0]) @ affine
    if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InputError(p, "header affine is singular (a zero voxel size or degenerate direction)")
    return affine


def _meta(p: Path, img: Any, shape, n_volumes, volume_index, affine, canon_affine, spacing) -> dict:
    from nibabel.orientations import aff2axcodes

    header = img.header
    return base.base_meta(
        p,
        "nifti",
        "volume",
        spacing=[float(s) for s in spacing],
        affine=[[float(v) for v in row] for row in canon_affine],
        orientation="".join(orientation.CANONICAL_AXCODES),
        original_axcodes=list(aff2axcodes(affine)),
        datatype=np.dtype(header.get_data_dtype()).name,
        shape=list(shape),
        n_volumes=int(n_volumes),
        volume_index=int(volume_index),
        description=_description(header),
        image_class=type(img).__name__,
    )


def _description(header: Any) -> str:
    try:
        raw = np.asarray(header["descrip"]).tobytes()
    except (KeyError, ValueError):
        return ""
    return raw.split(b"\x00", 1)[0].decode("utf-8", "replace").strip()

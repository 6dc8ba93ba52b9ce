"""2D raster images (PNG, JPEG, TIFF, BMP, GIF) through Pillow.

``read_image(path, *, page=0) -> (array, meta)``

Pixel modes map to arrays as follows (alpha is dropped, never composited):

=====================  ==============================  =========
Pillow mode            array                           dtype
=====================  ==============================  =========
``1``, ``L``, ``LA``   ``(H, W)`` (``1`` -> 0 / 255)    uint8
``I;16*``              ``(H, W)``                      uint16
``I``                  ``(H, W)``                      int32
``F``                  ``(H, W)``                      float32
``RGB``, ``RGBA``,     ``(H, W, 3)``                   uint8
``P``, ``CMYK``, ...
=====================  ==============================  =========

``page`` selects a frame of a multi-page TIFF (or animated GIF). ``meta``:
``format="image"``, ``path``, ``kind="image"``, ``mode`` (the file's own mode),
``size`` ``[width, height]``, ``n_pages``, ``page``, ``image_format`` (Pillow's name),
``dpi`` ``[x, y]`` if the file states one, and ``spacing`` ``[row_mm, col_mm]`` from a
TIFF's XResolution/YResolution when its ResolutionUnit is inch or cm, else ``None``.

Safety: the declared ``width x height`` is read from the header and refused above
``base.MAX_IMAGE_PIXELS`` before any pixel is decoded (Pillow's decompression-bomb
check is set to the same limit -- note that ``PIL.Image.MAX_IMAGE_PIXELS`` is
process-wide -- and its warning is an error here). Truncated files
raise :class:`InputError` (Pillow's "image file is truncated"; truncated loading is
never enabled).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from medmllm.errors import InputError
from medmllm.data.readers import base

_GRAY8 = {"1", "L", "LA", "La"}
_UINT16 = {"I;16", "I;16L", "I;16B", "I;16N"}
_RES_UNIT_MM = {2: 25.4, 3: 10.0}  # TIFF ResolutionUnit: 2 = inch, 3 = centimetre


def read_image(path: str | os.PathLike, *, page: int = 0) -> base.ReadResult:
    """Read one 2D image -> ``((H, W) or (H, W, 3) array, meta)``; see the module docstring."""
    from PIL import Image

    p = base.check_file(path)
    Image.MAX_IMAGE_PIXELS = base.MAX_IMAGE_PIXELS  # Pillow's bomb check uses our ceiling
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        img = _open(p)
        try:
            n_pages = int(getattr(img, "n_frames", 1) or 1)
            _seek(p, img, page, n_pages)
            width, height = img.size
            base.check_elements(p, (height, width), base.MAX_IMAGE_PIXELS, "pixels")
            mode = img.mode
            meta = _meta(p, img, mode, n_pages, page)
            array = base.guard(p, lambda: _to_array(p, img), "cannot decode image")
        finally:
            img.close()
    return array, meta


def _open(p: Path) -> Any:
    """``Image.open`` (parses the header only); every failure -> InputError."""
    return base.guard(p, lambda: _open_refusing_bombs(p), "cannot open image")


def _open_refusing_bombs(p: Path) -> Any:
    from PIL import Image

    try:
        return Image.open(p)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InputError(p, f"refused without decoding: {exc}") from exc


def _seek(p: Path, img: Any, page: int, n_pages: int) -> None:
    if not 0 <= page < n_pages:
        raise InputError(p, f"page {page} out of range: the file holds {n_pages} page(s)")
    if page:
        base.guard(p, lambda: img.seek(page), f"cannot seek to page {page}")


def _to_array(p: Path, img: Any) -> np.ndarray:
    """Decode and convert per the mode table: (H, W) or (H, W, 3)."""
    from PIL import Image

    try:
        img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InputError(p, f"refused without decoding: {exc}") from exc
    mode = img.mode
    if mode in _GRAY8:
        return np.asarray(img.convert("L"), dtype=np.uint8)  # (H, W)
    if mode in _UINT16:
        return np.asarray(img).astype(np.uint16)  # (H, W), native byte order
    if mode == "I":
        return np.asarray(img).astype(np.int32)
    if mode == "F":
        return np.asarray(img).astype(np.float32)
    if mode == "RGB":
        return np.asarray(img, dtype=np.uint8)  # (H, W, 3)
    return np.asarray(img.convert("RGB"), dtype=np.uint8)  # RGBA/RGBX/P/PA/CMYK/YCbCr/...: (H, W, 3)


def _meta(p: Path, img: Any, mode: str, n_pages: int, page: int) -> dict:
    width, height = img.size
    meta = base.base_meta(
        p,
        "image",
        "image",
        mode=mode,
        size=[int(width), int(height)],
        n_pages=n_pages,
        page=page,
        image_format=img.format,
        spacing=_tiff_spacing(img),
    )
    dpi = img.info.get("dpi")
    tags = getattr(img, "tag_v2", None)
    if tags is not None and (282 not in tags or 283 not in tags):
        dpi = None  # Pillow reports a default of 1 dpi for TIFFs that state no resolution
    if dpi is not None:
        try:
            meta["dpi"] = [float(d) for d in dpi]
        except (TypeError, ValueError):
            pass
    return meta


def _tiff_spacing(img: Any) -> list[float] | None:
    """``[row_mm, col_mm]`` per pixel from TIFF resolution tags in inch or cm, else None."""
    tags = getattr(img, "tag_v2", None)
    if tags is None:
        return None
    try:
        mm_per_unit = _RES_UNIT_MM.get(int(tags.get(296, 2)))  # TIFF default unit is inch
        x_res, y_res = float(tags.get(282, 0)), float(tags.get(283, 0))
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    if mm_per_unit is None or not (x_res > 0 and y_res > 0) or not np.isfinite(x_res + y_res):
        return None
    return [mm_per_unit / y_res, mm_per_unit / x_res]

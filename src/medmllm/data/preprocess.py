"""Preprocessing: reader outputs ``(array, meta)`` -> model-ready arrays. Small callables.

Conventions (the reader contract, see :mod:`medmllm.data.readers.base`):

* images  ``(H, W)`` or ``(H, W, C)`` channel-last, ``C <= 4``;
* volumes ``(D, H, W)`` (slice axis first), ``meta["spacing"]`` = mm per axis;
* signals ``(leads, samples)``, ``meta["fs"]`` = samples per second;
* EHR tables ``(T, F)`` float, NaN = missing, ``meta["features"]`` = column names.

Every function is plain numpy in -> numpy out and validates what it is given:
a bad *array or metadata* raises :class:`~medmllm.errors.InputError` whose path is
the field (``"image"``, ``"volume"``, ``"spacing"`` ...) and whose reason says
expected vs got; a bad *option* (unknown window or mode name, negative size)
raises :class:`~medmllm.errors.ConfigError`.

The classes at the end (``Window``, ``ResizePad``, ``ResampleVolume`` ...) wrap the
functions with their options and chain with :class:`Compose`. Each accepts a bare
array (returns an array) or an ``(array, meta)`` pair (returns a new pair whose meta
is updated: ``spacing``, ``affine``, ``fs``, ``letterbox`` ...). They also work in
``monai.transforms.Compose`` for bare arrays; for ``(array, meta)`` pairs pass
``map_items=False`` there, since MONAI otherwise maps over tuple items.

Heavy libraries (torch, scipy) are imported inside the functions that use them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from medmllm.errors import ConfigError, InputError
from medmllm.registry import Registry

# Refuse to allocate outputs above this (same ceiling as the readers' volumes: 4 GiB float32).
MAX_OUTPUT_ELEMENTS = 1 << 30
MAX_IMAGE_CHANNELS = 4


# ============================================================================ validation

def _array(x: Any, field: str, ndims: Sequence[int] | None = None, what: str = "") -> np.ndarray:
    """``np.asarray(x)`` checked to be a non-empty real numeric array with an allowed ndim."""
    try:
        arr = np.asarray(x)
    except Exception as exc:  # noqa: BLE001 - ragged lists etc.
        raise InputError(field, f"expected a numeric array, got {type(x).__name__} ({exc})") from None
    if arr.dtype.kind not in "biuf":
        raise InputError(field, f"expected a real numeric or bool array, got dtype {arr.dtype}")
    if ndims is not None and arr.ndim not in ndims:
        want = " or ".join(f"{n}D" for n in ndims)
        raise InputError(field, f"expected a {want} array{' ' + what if what else ''}, got shape {arr.shape}")
    if arr.size == 0:
        raise InputError(field, f"expected a non-empty array, got shape {arr.shape}")
    return arr


def _image(x: Any, field: str = "image") -> np.ndarray:
    """An image ``(H, W)`` or ``(H, W, C)`` with ``1 <= C <= 4``."""
    arr = _array(x, field, (2, 3), "(H, W) or (H, W, C)")
    if arr.ndim == 3 and arr.shape[2] > MAX_IMAGE_CHANNELS:
        raise InputError(field, f"expected (H, W, C) with C <= {MAX_IMAGE_CHANNELS} channels (channel-last), "
                                f"got shape {arr.shape}; a (D, H, W) volume needs the volume functions")
    return arr


def _finite(arr: np.ndarray, field: str) -> np.ndarray:
    if arr.dtype.kind == "f":
        bad = int(np.count_nonzero(~np.isfinite(arr)))
        if bad:
            raise InputError(field, f"expected finite values, got {bad} NaN/inf of {arr.size}")
    return arr


def _positive_int(v: Any, name: str) -> int:
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) or int(v) < 1:
        raise ConfigError(f"{name} must be a positive integer, got {v!r}")
    return int(v)


def _size2(size: Any, name: str = "size") -> tuple[int, int]:
    """``int`` -> square; ``(h, w)`` -> itself. Positive ints only."""
    if isinstance(size, (int, np.integer)) and not isinstance(size, (bool, np.bool_)):
        s = _positive_int(size, name)
        return s, s
    if isinstance(size, (tuple, list)) and len(size) == 2:
        return _positive_int(size[0], name), _positive_int(size[1], name)
    raise ConfigError(f"{name} must be an int or an (height, width) pair, got {size!r}")


def _choice(value: Any, allowed: Sequence[str], name: str) -> str:
    if value not in allowed:
        raise ConfigError(f"unknown {name} {value!r}; known: {', '.join(allowed)}")
    return value


def _real(v: Any, name: str, positive: bool = False, error: type = ConfigError) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        f = math.nan
    if isinstance(v, (bool, np.bool_)) or not math.isfinite(f) or (positive and f <= 0):
        kind = "a positive finite number" if positive else "a finite number"
        if error is InputError:
            raise InputError(name, f"expected {kind}, got {v!r}")
        raise ConfigError(f"{name} must be {kind}, got {v!r}")
    return f


def _pad_value(value: Any, dtype: np.dtype) -> Any:
    """``value`` if an array of ``dtype`` can hold it exactly, else ConfigError (no silent wrap-around)."""
    v = _real(value, "pad_value")
    if dtype.kind == "f":
        return v
    lo, hi = (0, 1) if dtype == np.bool_ else (np.iinfo(dtype).min, np.iinfo(dtype).max)
    if v != int(v) or not lo <= v <= hi:
        raise ConfigError(f"pad_value {value!r} does not fit the array's dtype {dtype} (range {lo}..{hi})")
    return int(v)


def _check_elements(shape: Sequence[int], field: str, what: str) -> None:
    n = math.prod(int(s) for s in shape)
    if n > MAX_OUTPUT_ELEMENTS:
        raise InputError(field, f"{what} would create shape {tuple(shape)} = {n} elements, "
                                f"above the limit of {MAX_OUTPUT_ELEMENTS}")


# ============================================================================ 1. CT windows

# name -> (center, width) in Hounsfield units. Values are the usual ones, e.g. Radiopaedia
# "Windowing (CT)" (https://radiopaedia.org/articles/windowing-ct); sites and vendors vary.
CT_WINDOWS: Registry[tuple[float, float]] = Registry("CT window")
CT_WINDOWS.register("lung", (-600.0, 1500.0))        # Radiopaedia lungs W:1500 L:-600
CT_WINDOWS.register("mediastinum", (50.0, 350.0))    # Radiopaedia mediastinum W:350 L:50
CT_WINDOWS.register("bone", (400.0, 1800.0))         # Radiopaedia bone W:1800 L:400
CT_WINDOWS.register("brain", (40.0, 80.0))           # Radiopaedia brain W:80 L:40
CT_WINDOWS.register("abdomen", (40.0, 400.0))        # abdominal soft tissue W:400 L:40 (Radiopaedia: L:50)
CT_WINDOWS.register("liver", (60.0, 160.0))          # liver W:160 L:60 (Radiopaedia W:150 L:30; varies)
CT_WINDOWS.register("subdural", (75.0, 215.0))       # mid-points of Radiopaedia W:130-300 L:50-100
CT_WINDOWS.register("stroke", (40.0, 40.0))          # Radiopaedia stroke W:40 L:40 (or W:8 L:32)
CT_WINDOWS.register("soft_tissue", (40.0, 350.0))    # -135..215 HU
CT_WINDOWS.register("wide", (0.0, 2048.0))           # -1024..1024 HU

# Default RGB mapping of multi_window_rgb: R = lung, G = mediastinum, B = bone.
DEFAULT_RGB_WINDOWS = ("lung", "mediastinum", "bone")
# The windows third-party reproductions of Google's MedGemma 1.5 CT pipeline use
# (R = wide -1024..1024, G = soft tissue -135..215, B = brain 0..80); check against
# the model card before relying on it.
MEDGEMMA_CT_WINDOWS = ("wide", "soft_tissue", "brain")

_WINDOW_FUNCTIONS = ("linear", "linear_exact")


def window(hu: Any, center: float, width: float, function: str = "linear") -> np.ndarray:
    """Map Hounsfield units to ``[0, 1]`` float32 with a window (center, width), any shape.

    ``function="linear"`` is the DICOM default VOI LUT function (PS3.3 C.11.2.1.2.1)
    with ``y_min=0, y_max=1``::

        x <= c - 0.5 - (w-1)/2  -> 0
        x >  c - 0.5 + (w-1)/2  -> 1
        else                    -> ((x - (c - 0.5)) / (w - 1) + 0.5)

    (``width >= 1``); ``"linear_exact"`` is C.11.2.1.3.2: ``clip((x - c)/w + 0.5, 0, 1)``
    (``width > 0``).
    """
    x = _array(hu, "hu")
    _finite(x, "hu")
    c = _real(center, "window center")
    w = _real(width, "window width")
    _choice(function, _WINDOW_FUNCTIONS, "window function")
    if function == "linear":
        if w < 1:
            raise ConfigError(f"window width must be >= 1 for the DICOM 'linear' function, got {width!r}")
        c, w = c - 0.5, w - 1.0
    elif w <= 0:
        raise ConfigError(f"window width must be > 0, got {width!r}")
    x = x.astype(np.float32, copy=False)  # float32 keeps HU to < 1e-3 and halves the memory of float64
    if w == 0:  # width 1 under 'linear': a threshold at c - 0.5
        return (x > c).astype(np.float32)
    out = np.asarray((x - np.float32(c)) / np.float32(w) + np.float32(0.5), dtype=np.float32)
    return np.clip(out, 0.0, 1.0, out=out)


def window_preset(hu: Any, name: str, function: str = "linear") -> np.ndarray:
    """:func:`window` with a named preset from :data:`CT_WINDOWS` (unknown name -> ConfigError)."""
    center, width = CT_WINDOWS.get(name)
    return window(hu, center, width, function)


def _window_spec(spec: Any) -> tuple[float, float]:
    if isinstance(spec, str):
        return CT_WINDOWS.get(spec)
    if isinstance(spec, (tuple, list)) and len(spec) == 2:
        return _real(spec[0], "window center"), _real(spec[1], "window width")
    raise ConfigError(f"a window is a preset name or a (center, width) pair, got {spec!r}")


def multi_window_rgb(hu: Any, names: Sequence[Any] = DEFAULT_RGB_WINDOWS, function: str = "linear") -> np.ndarray:
    """Three windows of the same HU array stacked as RGB channels (channel-last, float32 in [0, 1]).

    ``hu`` is a slice ``(H, W)`` -> ``(H, W, 3)`` or a volume ``(D, H, W)`` -> ``(D, H, W, 3)``.
    ``names`` holds three preset names or ``(center, width)`` pairs; channel ``k`` equals
    ``window(hu, *names[k])``. See :data:`MEDGEMMA_CT_WINDOWS` for the MedGemma mapping.
    """
    x = _array(hu, "hu", (2, 3), "(H, W) or (D, H, W)")
    if isinstance(names, str) or len(names) != 3:
        raise ConfigError(f"multi_window_rgb needs exactly 3 windows (R, G, B), got {names!r}")
    specs = [_window_spec(n) for n in names]
    return np.stack([window(x, c, w, function) for c, w in specs], axis=-1)


# ============================================================================ 2. intensity

def normalize_minmax(x: Any) -> np.ndarray:
    """Rescale to ``[0, 1]`` float32 by the array's own min and max; a constant array -> zeros."""
    arr = _finite(_array(x, "image"), "image").astype(np.float64, copy=False)
    lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        return np.zeros(arr.shape, np.float32)
    return ((arr - lo) / (hi - lo)).astype(np.float32)


def normalize_percentile(x: Any, lo: float = 0.5, hi: float = 99.5, clip: bool = True) -> np.ndarray:
    """Rescale so the ``lo``-th percentile -> 0 and the ``hi``-th -> 1 (float32), clipped by default.

    Robust to a few extreme pixels (burned-in text, metal). When both percentiles are
    equal the result is zeros.
    """
    lo_f, hi_f = _real(lo, "lo"), _real(hi, "hi")
    if not 0.0 <= lo_f < hi_f <= 100.0:
        raise ConfigError(f"percentiles must satisfy 0 <= lo < hi <= 100, got lo={lo!r}, hi={hi!r}")
    arr = _finite(_array(x, "image"), "image").astype(np.float64, copy=False)
    p_lo, p_hi = np.percentile(arr, [lo_f, hi_f])
    if p_hi <= p_lo:
        return np.zeros(arr.shape, np.float32)
    out = (arr - p_lo) / (p_hi - p_lo)
    if clip:
        out = np.clip(out, 0.0, 1.0)
    return out.astype(np.float32)


def to_float01(img: Any, bits: int | None = None) -> np.ndarray:
    """Integer image -> float32 in ``[0, 1]``: uint8 / 255, uint16 / 65535 (or ``/(2**bits - 1)``).

    ``bits`` declares the stored bit depth (e.g. 12 for a 12-bit radiograph in uint16);
    a value above ``2**bits - 1`` is an InputError. ``bool`` -> 0/1. A float array is
    returned as float32 if it already lies in ``[0, 1]``, else InputError.
    """
    arr = _array(img, "image")
    if arr.dtype == np.bool_:
        return arr.astype(np.float32)
    if arr.dtype.kind == "f":
        _finite(arr, "image")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < 0.0 or hi > 1.0:
            raise InputError("image", f"expected a float image in [0, 1], got values in [{lo:g}, {hi:g}]; "
                                      "use normalize_minmax, normalize_percentile or window first")
        return arr.astype(np.float32)
    if arr.dtype not in (np.uint8, np.uint16):
        raise InputError("image", f"expected dtype uint8, uint16, bool or float in [0, 1], got {arr.dtype}; "
                                  "use normalize_minmax or window for signed/wide integers")
    native = 8 * arr.dtype.itemsize
    if bits is None:
        bits = native
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 1 <= bits <= native:
        raise ConfigError(f"bits must be an int in 1..{native} for {arr.dtype}, got {bits!r}")
    top = (1 << int(bits)) - 1
    vmax = int(arr.max())
    if vmax > top:
        raise InputError("image", f"expected values <= {top} for a {bits}-bit image, got max {vmax}")
    return (arr.astype(np.float32) / np.float32(top)).astype(np.float32)


# ITU-R BT.601 luma weights, the same as PIL's convert("L").
_LUMA = np.array([0.299, 0.587, 0.114])


def ensure_rgb(img: Any) -> np.ndarray:
    """``(H, W)`` / ``(H, W, 1)`` -> ``(H, W, 3)`` by repeating; RGBA drops alpha; RGB unchanged.

    The dtype is kept. Two channels (gray + alpha) keep the gray one.
    """
    arr = _image(img)
    if arr.ndim == 2:
        return np.repeat(arr[:, :, None], 3, axis=2)
    c = arr.shape[2]
    if c in (1, 2):
        return np.repeat(arr[:, :, :1], 3, axis=2)
    return np.ascontiguousarray(arr[:, :, :3])


def ensure_gray(img: Any) -> np.ndarray:
    """``(H, W, 3|4)`` -> ``(H, W)`` by BT.601 luma (0.299 R + 0.587 G + 0.114 B); gray is unchanged.

    Alpha is dropped. The dtype is kept (integer outputs are rounded and clipped).
    """
    arr = _image(img)
    if arr.ndim == 2:
        return arr
    c = arr.shape[2]
    if c in (1, 2):
        return np.ascontiguousarray(arr[:, :, 0])
    gray = arr[:, :, :3].astype(np.float64) @ _LUMA  # (H, W)
    if arr.dtype.kind in "biu":
        info = np.iinfo(arr.dtype) if arr.dtype != np.bool_ else None
        gray = np.rint(gray)
        if info is not None:
            gray = np.clip(gray, info.min, info.max)
    return gray.astype(arr.dtype)


# ============================================================================ 3. resize / pad / crop

_RESIZE_MODES = ("bilinear", "bicubic", "nearest", "area")


def _nearest_index(n_in: int, n_out: int) -> np.ndarray:
    """Half-pixel nearest neighbour: ``floor((o + 0.5) * n_in / n_out)``, exact integer arithmetic."""
    o = np.arange(n_out, dtype=np.int64)
    return np.minimum(((2 * o + 1) * n_in) // (2 * n_out), n_in - 1)


def resize(img: Any, size: Any, mode: str = "bilinear", antialias: bool = True) -> np.ndarray:
    """Resize an image ``(H, W[, C])`` to ``size`` (int -> square, or ``(h, w)``) ignoring aspect ratio.

    Pixel-area alignment (``align_corners=False``: pixel centres at ``i + 0.5``).
    ``bilinear`` / ``bicubic`` / ``area`` use ``torch.nn.functional.interpolate`` and return
    float32; ``antialias`` (bilinear/bicubic, on by default) low-pass filters when
    shrinking the way PIL does, which is what pretrained encoders' processors do.
    ``nearest`` keeps the dtype (label maps) and picks source index
    ``floor((i + 0.5) * H / h)`` (torch's ``nearest-exact``).
    """
    arr = _image(img)
    h, w = _size2(size)
    _choice(mode, _RESIZE_MODES, "resize mode")
    _check_elements((h, w) + arr.shape[2:], "image", "resize")
    H, W = arr.shape[:2]
    if mode == "nearest":
        return np.ascontiguousarray(arr[_nearest_index(H, h)][:, _nearest_index(W, w)])
    import torch
    import torch.nn.functional as F

    _finite(arr, "image")
    chw = arr[:, :, None] if arr.ndim == 2 else arr  # (H, W, C)
    t = torch.from_numpy(np.ascontiguousarray(chw, dtype=np.float32)).permute(2, 0, 1)[None]  # (1, C, H, W)
    kwargs: dict[str, Any] = {}
    if mode in ("bilinear", "bicubic"):
        kwargs = {"align_corners": False, "antialias": bool(antialias)}
    out = F.interpolate(t, size=(h, w), mode=mode, **kwargs)[0].permute(1, 2, 0).numpy()  # (h, w, C)
    out = np.ascontiguousarray(out, dtype=np.float32)
    return out[:, :, 0] if arr.ndim == 2 else out


@dataclass(frozen=True)
class Letterbox:
    """How :func:`resize_pad` placed the image; maps finding coordinates both ways.

    Coordinates are continuous ``(x, y)`` pixel coordinates, x = column, y = row, with
    pixel edges on integers: pixel ``(row r, col c)`` covers ``[c, c+1) x [r, r+1)`` and
    its centre is ``(c + 0.5, r + 0.5)`` (bounding boxes in pixels use this convention).
    A point maps as ``x' = x * scale[1] + offset[1]``, ``y' = y * scale[0] + offset[0]``.
    """

    in_shape: tuple[int, int]       # (H, W) of the input
    out_shape: tuple[int, int]      # (h, w) of the output canvas
    resized_shape: tuple[int, int]  # (h', w') of the image inside the canvas
    scale: tuple[float, float]      # (sy, sx) = resized / input, per axis
    offset: tuple[int, int]         # (top, left) padding before the image

    def to_output(self, xy: Any) -> np.ndarray:
        """Input ``(..., 2)`` (x, y) points -> output canvas coordinates (float64)."""
        p = _points(xy)
        return np.stack([p[..., 0] * self.scale[1] + self.offset[1],
                         p[..., 1] * self.scale[0] + self.offset[0]], axis=-1)

    def to_input(self, xy: Any) -> np.ndarray:
        """Output canvas ``(..., 2)`` (x, y) points -> input image coordinates (float64)."""
        p = _points(xy)
        return np.stack([(p[..., 0] - self.offset[1]) / self.scale[1],
                         (p[..., 1] - self.offset[0]) / self.scale[0]], axis=-1)

    def to_dict(self) -> dict:
        return {k: list(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Letterbox":
        try:
            return cls(**{k: tuple(d[k]) for k in ("in_shape", "out_shape", "resized_shape", "scale", "offset")})
        except (KeyError, TypeError) as exc:
            raise InputError("letterbox", f"expected the keys of Letterbox.to_dict(), got {dict(d)!r}") from exc


def _points(xy: Any) -> np.ndarray:
    p = _array(xy, "points").astype(np.float64)
    if p.shape[-1] != 2:
        raise InputError("points", f"expected (..., 2) (x, y) coordinates, got shape {p.shape}")
    return p


_POSITIONS = ("center", "top_left")


def resize_pad(img: Any, size: Any, pad_value: float = 0, mode: str = "bilinear",
               antialias: bool = True, position: str = "center") -> tuple[np.ndarray, Letterbox]:
    """Letterbox: resize keeping the aspect ratio so the image fits ``size``, then pad.

    Returns ``(out, letterbox)``: ``out`` is ``(h, w[, C])`` (float32, or the input dtype
    for ``mode="nearest"``); the image sits centred (``position="center"``) or in the
    top-left corner with ``pad_value`` around it (an odd leftover pixel goes bottom/right). ``letterbox`` holds the per-axis scale
    and the (top, left) offset and maps coordinates (:meth:`Letterbox.to_output`).
    """
    arr = _image(img)
    h, w = _size2(size)
    _choice(position, _POSITIONS, "position")
    H, W = arr.shape[:2]
    s = min(h / H, w / W)
    nh = min(h, max(1, int(math.floor(H * s + 0.5))))
    nw = min(w, max(1, int(math.floor(W * s + 0.5))))
    resized = resize(arr, (nh, nw), mode=mode, antialias=antialias)
    top, left = ((h - nh) // 2, (w - nw) // 2) if position == "center" else (0, 0)
    out = np.full((h, w) + resized.shape[2:], _pad_value(pad_value, resized.dtype), dtype=resized.dtype)
    out[top:top + nh, left:left + nw] = resized
    box = Letterbox(in_shape=(H, W), out_shape=(h, w), resized_shape=(nh, nw),
                    scale=(nh / H, nw / W), offset=(top, left))
    return out, box


_CROP_MODES = ("center", "start", "end")


def _shift(n: int, target: int, mode: str) -> int:
    """Old index of new index 0 when cropping (>= 0) or padding (<= 0) ``n`` -> ``target``."""
    diff = n - target  # > 0: crop that many, < 0: pad that many
    if mode == "start":
        return 0
    if mode == "end":
        return diff
    return diff // 2 if diff >= 0 else -((-diff) // 2)


def _crop_pad_axis(arr: np.ndarray, axis: int, target: int, mode: str, pad_value: float) -> tuple[np.ndarray, int]:
    """Crop or pad one axis to ``target``. Returns ``(array, shift)``: new index i = old index i + shift."""
    n = arr.shape[axis]
    shift = _shift(n, target, mode)
    if n == target:
        return arr, 0
    if n > target:
        idx = [slice(None)] * arr.ndim
        idx[axis] = slice(shift, shift + target)
        return arr[tuple(idx)], shift
    widths = [(0, 0)] * arr.ndim
    widths[axis] = (-shift, target - n + shift)
    return np.pad(arr, widths, mode="constant", constant_values=_pad_value(pad_value, arr.dtype)), shift


def _crop_or_pad(arr: np.ndarray, shape: Sequence[Any], mode: str, pad_value: float) -> tuple[np.ndarray, list[int]]:
    shifts = []
    for axis, t in enumerate(shape):
        if t is None:
            shifts.append(0)
            continue
        arr, sh = _crop_pad_axis(arr, axis, _positive_int(t, "shape entry"), mode, pad_value)
        shifts.append(sh)
    return np.ascontiguousarray(arr), shifts


def crop_or_pad(arr: Any, shape: Sequence[Any], pad_value: float = 0, mode: str = "center") -> np.ndarray:
    """Crop or pad the leading ``len(shape)`` axes of ``arr`` to ``shape`` (``None`` keeps an axis).

    ``mode``: ``"center"`` (crop/pad equally on both sides, extra one at the end),
    ``"start"`` (keep the start, pad at the end) or ``"end"``. Padding uses ``pad_value``.
    Works for volumes ``(D, H, W)``, images ``(H, W[, C])`` and anything else.
    """
    x = _array(arr, "array")
    if isinstance(shape, (str, bytes)) or not isinstance(shape, Sequence) or not 1 <= len(shape) <= x.ndim:
        raise ConfigError(f"shape must be a sequence of 1..{x.ndim} sizes (or None), got {shape!r}")
    _choice(mode, _CROP_MODES, "crop/pad mode")
    return _crop_or_pad(x, shape, mode, pad_value)[0]


def center_crop(img: Any, size: Any) -> np.ndarray:
    """The central ``size`` (int or ``(h, w)``) window of an image ``(H, W[, C])``; must fit inside."""
    arr = _image(img)
    h, w = _size2(size)
    if h > arr.shape[0] or w > arr.shape[1]:
        raise InputError("image", f"expected at least {h}x{w} pixels for center_crop, got shape {arr.shape}; "
                                  "use resize_pad or crop_or_pad to grow an image")
    return _crop_or_pad(arr, (h, w), "center", 0)[0]


# ============================================================================ 4. volumes

def _volume(vol: Any, ndims: Sequence[int] = (3,)) -> np.ndarray:
    what = "(D, H, W)" if tuple(ndims) == (3,) else "(D, H, W) or (D, H, W, C)"
    return _array(vol, "volume", ndims, what)


def _spacing3(spacing: Any, field: str, error: type) -> tuple[float, ...]:
    if not isinstance(spacing, (Sequence, np.ndarray)) or isinstance(spacing, str) or len(spacing) != 3:
        if error is InputError:
            raise InputError(field, f"expected 3 spacings in mm (one per (D, H, W) axis), got {spacing!r}")
        raise ConfigError(f"{field} must hold 3 spacings in mm, got {spacing!r}")
    return tuple(_real(s, field, positive=True, error=error) for s in spacing)


def resample_volume(vol: Any, spacing: Sequence[float], target_spacing: Any,
                    order: int = 1) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Resample a volume ``(D, H, W)`` from ``spacing`` to ``target_spacing`` (mm per axis).

    ``target_spacing`` is one number (isotropic) or 3 (``None`` keeps that axis).
    Output shape = ``round(shape * spacing / target)`` per axis (at least 1). The grid is
    origin-preserving, as in ITK/MONAI affine resampling: output voxel ``i`` samples
    the input at ``i * target / spacing`` (voxel 0 stays where it was) and positions past
    the last input voxel repeat the edge. Spline ``order`` 0..5 via
    ``scipy.ndimage.affine_transform``; ``order=0`` keeps the dtype (label maps),
    others return float32. Returns ``(volume, new_spacing)`` with ``new_spacing`` equal
    to the target; the affine becomes ``affine @ diag(target / spacing, 1)``
    (see :class:`ResampleVolume`). No anti-aliasing filter is applied when shrinking.
    """
    x = _volume(vol)
    src = _spacing3(spacing, "spacing", InputError)
    if isinstance(target_spacing, (Sequence, np.ndarray)) and not isinstance(target_spacing, str):
        if len(target_spacing) != 3:
            raise ConfigError(f"target_spacing must be one number or 3, got {target_spacing!r}")
        tgt = tuple(s if t is None else _real(t, "target_spacing", positive=True)
                    for s, t in zip(src, target_spacing))
    else:
        t = _real(target_spacing, "target_spacing", positive=True)
        tgt = (t, t, t)
    if isinstance(order, bool) or not isinstance(order, (int, np.integer)) or not 0 <= order <= 5:
        raise ConfigError(f"order must be an int spline order 0..5, got {order!r}")
    step = np.array(tgt) / np.array(src)  # input voxels per output voxel, per axis
    out_shape = tuple(max(1, int(math.floor(n / st + 0.5))) for n, st in zip(x.shape, step))
    _check_elements(out_shape, "volume", f"resampling spacing {src} -> {tgt}")
    if order == 0:
        data = x
    else:
        data = _finite(x, "volume").astype(np.float32, copy=False)
    if out_shape == x.shape and np.allclose(step, 1.0, rtol=0, atol=1e-12):
        return data.copy(), tgt
    from scipy import ndimage

    out = ndimage.affine_transform(data, step, offset=0.0, output_shape=out_shape, order=int(order),
                                   mode="nearest", prefilter=order > 1)
    return out, tgt


def crop_or_pad_depth(vol: Any, depth: int, mode: str = "center", pad_value: float = 0) -> np.ndarray:
    """Crop or pad the slice axis of ``(D, H, W[, C])`` to ``depth`` (see :func:`crop_or_pad`)."""
    x = _volume(vol, (3, 4))
    _choice(mode, _CROP_MODES, "crop/pad mode")
    return _crop_or_pad(x, (_positive_int(depth, "depth"),), mode, pad_value)[0]


_SLICE_STRATEGIES = ("uniform", "center")


def slice_indices(depth: int, n: int, strategy: str = "uniform") -> np.ndarray:
    """The ``n`` slice indices :func:`sample_slices` picks from ``depth`` slices (int64).

    ``uniform``: the middle slice of each of ``n`` equal chunks, ``floor((i + 0.5) * D / n)``
    (``n == D`` -> every slice; ``n > D`` repeats slices). ``center``: ``n`` consecutive
    slices around the middle (``n <= D``).
    """
    d = _positive_int(depth, "depth")
    k = _positive_int(n, "n")
    _choice(strategy, _SLICE_STRATEGIES, "slice strategy")
    if strategy == "uniform":
        return _nearest_index(d, k)
    if k > d:
        raise InputError("volume", f"expected at least {k} slices for strategy='center', got {d}; "
                                   "use strategy='uniform' or crop_or_pad_depth")
    start = (d - k) // 2
    return np.arange(start, start + k, dtype=np.int64)


def sample_slices(vol: Any, n: int, strategy: str = "uniform") -> tuple[np.ndarray, np.ndarray]:
    """Pick ``n`` slices of ``(D, H, W[, C])``; returns ``(indices (n,), slices (n, H, W[, C]))``."""
    x = _volume(vol, (3, 4))
    idx = slice_indices(x.shape[0], n, strategy)
    return idx, np.ascontiguousarray(x[idx])


# ============================================================================ 5. signals

def _signal(sig: Any) -> np.ndarray:
    return _array(sig, "signal", (2,), "(leads, samples); add an axis for one lead: sig[None]")


def resample_signal(sig: Any, fs: float, target_fs: float, max_denominator: int = 1000,
                    padtype: str = "line") -> tuple[np.ndarray, float]:
    """Resample ``(leads, samples)`` from ``fs`` to ``target_fs`` Hz with a polyphase filter.

    The ratio ``target_fs / fs`` becomes ``up / down`` via
    ``Fraction(...).limit_denominator(max_denominator)`` and
    ``scipy.signal.resample_poly(sig, up, down, axis=1, padtype=padtype)`` runs (its
    default Kaiser FIR anti-aliasing filter; ``padtype="line"`` avoids edge transients
    from a baseline offset). Output length ``ceil(samples * up / down)``, float32.
    Returns ``(signal, new_fs)`` with ``new_fs = fs * up / down`` (the rate actually reached).
    """
    x = _finite(_signal(sig), "signal")
    f_in = _real(fs, "fs", positive=True, error=InputError)
    f_out = _real(target_fs, "target_fs", positive=True)
    max_den = _positive_int(max_denominator, "max_denominator")
    ratio = Fraction(f_out / f_in).limit_denominator(max_den)
    if ratio == 0:
        raise ConfigError(f"target_fs {target_fs!r} is too small for fs {fs!r} with max_denominator {max_den}")
    up, down = ratio.numerator, ratio.denominator
    new_fs = f_in * up / down
    if up == down:
        return x.astype(np.float32), new_fs
    _check_elements((x.shape[0], -(-x.shape[1] * up // down)), "signal", f"resampling {fs} -> {target_fs} Hz")
    from scipy import signal as sps

    out = sps.resample_poly(x.astype(np.float64), up, down, axis=1, padtype=padtype)
    return out.astype(np.float32), new_fs


_NAN_POLICIES = ("raise", "zero")


def normalize_leads(sig: Any, eps: float = 1e-6, nan_policy: str = "raise") -> np.ndarray:
    """Per-lead z-score of ``(leads, samples)``: each lead -> mean 0, std 1 (population std), float32.

    A lead whose std is below ``eps`` (flat or disconnected) becomes all zeros, never NaN.
    ``nan_policy="raise"`` refuses NaN samples; ``"zero"`` computes the statistics over
    the observed samples and puts 0 (the lead mean) where samples were NaN.
    """
    x = _signal(sig).astype(np.float64)
    _choice(nan_policy, _NAN_POLICIES, "nan_policy")
    e = _real(eps, "eps", positive=True)
    if np.isinf(x).any():
        raise InputError("signal", "expected finite samples, got inf")
    nan = np.isnan(x)
    if nan.any() and nan_policy == "raise":
        raise InputError("signal", f"expected no NaN samples, got {int(nan.sum())}; pass nan_policy='zero' to ignore them")
    observed = ~nan
    count = observed.sum(axis=1, keepdims=True)  # (leads, 1)
    filled = np.where(observed, x, 0.0)
    mean = filled.sum(axis=1, keepdims=True) / np.maximum(count, 1)
    var = (np.where(observed, x - mean, 0.0) ** 2).sum(axis=1, keepdims=True) / np.maximum(count, 1)
    std = np.sqrt(var)
    flat = std < e  # (leads, 1)
    out = np.where(flat | ~observed, 0.0, (filled - mean) / np.where(flat, 1.0, std))
    return out.astype(np.float32)


def crop_or_pad_signal(sig: Any, n_samples: int, mode: str = "start", pad_value: float = 0.0) -> np.ndarray:
    """Crop or pad the sample axis of ``(leads, samples)`` to ``n_samples``.

    ``mode="start"`` (default) keeps the first samples and pads at the end; ``"center"``
    and ``"end"`` as in :func:`crop_or_pad`. The dtype is kept.
    """
    x = _signal(sig)
    _choice(mode, _CROP_MODES, "crop/pad mode")
    out, _ = _crop_pad_axis(x, 1, _positive_int(n_samples, "n_samples"), mode, pad_value)
    return np.ascontiguousarray(out)


STANDARD_12_LEADS = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")
_MISSING_POLICIES = ("zero", "raise")


def _lead_key(name: Any) -> str:
    return str(name).strip().casefold()


def select_leads(sig: Any, lead_names: Sequence[str], wanted: Sequence[str] = STANDARD_12_LEADS,
                 missing: str = "zero") -> tuple[np.ndarray, np.ndarray]:
    """Reorder ``(leads, samples)`` to the ``wanted`` lead order; names match ignoring case and spaces.

    Returns ``(signal (len(wanted), samples), present (len(wanted),) bool)``. A wanted lead
    absent from ``lead_names`` becomes a row of zeros with ``present[k] = False``
    (``missing="zero"``), or raises InputError listing what is missing (``"raise"``).
    """
    x = _signal(sig)
    _choice(missing, _MISSING_POLICIES, "missing policy")
    if isinstance(lead_names, str) or len(lead_names) != x.shape[0]:
        raise InputError("lead_names", f"expected {x.shape[0]} names (one per signal row), got {lead_names!r}")
    if isinstance(wanted, str) or len(wanted) == 0:
        raise ConfigError(f"wanted must be a non-empty sequence of lead names, got {wanted!r}")
    keys = [_lead_key(n) for n in lead_names]
    if len(set(keys)) != len(keys):
        raise InputError("lead_names", f"expected unique lead names, got {list(lead_names)!r}")
    wanted_keys = [_lead_key(n) for n in wanted]
    if len(set(wanted_keys)) != len(wanted_keys):
        raise ConfigError(f"wanted lead names repeat: {list(wanted)!r}")
    pos = {k: i for i, k in enumerate(keys)}
    absent = [w for w, k in zip(wanted, wanted_keys) if k not in pos]
    if absent and missing == "raise":
        raise InputError("lead_names", f"expected leads {absent} (missing), got {list(lead_names)}")
    out = np.zeros((len(wanted), x.shape[1]), dtype=x.dtype)
    present = np.array([k in pos for k in wanted_keys], dtype=bool)
    for row, k in enumerate(wanted_keys):
        if k in pos:
            out[row] = x[pos[k]]
    return out, present


# ============================================================================ 6. EHR

# Typical adult reference intervals (low, high, unit), US conventional units as in MIMIC-IV.
# Labs differ; these only set a scale. A reference interval is the central 95 % of a
# healthy population, so the default statistics are mean = mid-point and
# std = (high - low) / (2 * 1.96).
EHR_REFERENCE_RANGES: dict[str, tuple[float, float, str]] = {
    "heart_rate": (60.0, 100.0, "beats/min"),
    "resp_rate": (12.0, 20.0, "breaths/min"),
    "sbp": (90.0, 120.0, "mmHg"),
    "dbp": (60.0, 80.0, "mmHg"),
    "map": (70.0, 100.0, "mmHg"),
    "temp_c": (36.5, 37.5, "degC"),
    "spo2": (95.0, 100.0, "%"),
    "wbc": (4.0, 11.0, "10^9/L"),
    "lactate": (0.5, 2.0, "mmol/L"),
    "creatinine": (0.6, 1.2, "mg/dL"),
    "bun": (7.0, 20.0, "mg/dL"),
    "sodium": (135.0, 145.0, "mmol/L"),
    "potassium": (3.5, 5.0, "mmol/L"),
    "chloride": (98.0, 106.0, "mmol/L"),
    "bicarbonate": (22.0, 28.0, "mmol/L"),
    "glucose": (70.0, 140.0, "mg/dL"),
    "hemoglobin": (12.0, 17.5, "g/dL"),
    "hematocrit": (36.0, 50.0, "%"),
    "platelets": (150.0, 400.0, "10^9/L"),
    "bilirubin": (0.1, 1.2, "mg/dL"),
    "albumin": (3.5, 5.0, "g/dL"),
    "ph": (7.35, 7.45, ""),
    "pao2": (75.0, 100.0, "mmHg"),
    "paco2": (35.0, 45.0, "mmHg"),
    "inr": (0.8, 1.2, ""),
}
_Z95 = 1.96


def reference_stats(feature: str) -> tuple[float, float]:
    """``(mean, std)`` implied by :data:`EHR_REFERENCE_RANGES` (ConfigError for an unknown name)."""
    if feature not in EHR_REFERENCE_RANGES:
        raise ConfigError(f"no reference range for EHR feature {feature!r}; known: {', '.join(sorted(EHR_REFERENCE_RANGES))}")
    lo, hi, _ = EHR_REFERENCE_RANGES[feature]
    return (lo + hi) / 2.0, (hi - lo) / (2.0 * _Z95)


def _features(features: Any, n: int, field: str = "features") -> list[str]:
    if isinstance(features, str) or not isinstance(features, (Sequence, np.ndarray)) or len(features) != n:
        raise InputError(field, f"expected {n} feature names (one per column), got {features!r}")
    names = [str(f) for f in features]
    if len(set(names)) != n:
        raise InputError(field, f"expected unique feature names, got {names!r}")
    return names


def _ehr_table(table: Any, field: str = "table") -> np.ndarray:
    x = _array(table, field, (2,), "(T, F): time steps x features").astype(np.float64)
    if np.isinf(x).any():
        raise InputError(field, "expected finite values or NaN (missing), got inf")
    return x


def fit_ehr_stats(tables: Any, features: Sequence[str]) -> dict[str, tuple[float, float]]:
    """Per-feature ``(mean, std)`` over the observed (non-NaN) values of training tables.

    ``tables`` is one ``(T, F)`` table, a sequence of them (different ``T`` allowed) or an
    ``(N, T, F)`` array; all rows are pooled. ``mean = np.nanmean``, ``std = np.nanstd``
    (population, ddof=0); a feature observed once or constant gets ``std = 1``. A feature
    never observed is an InputError naming it.
    """
    if isinstance(tables, np.ndarray) and tables.ndim == 3:
        tables = list(tables)
    if isinstance(tables, np.ndarray) or (isinstance(tables, Sequence) and tables and np.ndim(tables[0]) == 1):
        tables = [tables]
    if not isinstance(tables, Sequence) or len(tables) == 0:
        raise InputError("tables", f"expected a (T, F) table or a non-empty sequence of them, got {type(tables).__name__}")
    arrs = [_ehr_table(t, f"tables[{i}]") for i, t in enumerate(tables)]
    n_feat = arrs[0].shape[1]
    for i, a in enumerate(arrs):
        if a.shape[1] != n_feat:
            raise InputError(f"tables[{i}]", f"expected {n_feat} feature columns, got shape {a.shape}")
    names = _features(features, n_feat)
    pooled = np.concatenate(arrs, axis=0)  # (sum T, F)
    counts = (~np.isnan(pooled)).sum(axis=0)
    never = [n for n, c in zip(names, counts) if c == 0]
    if never:
        raise InputError("tables", f"expected every feature observed at least once, got none for {never}")
    mean = np.nanmean(pooled, axis=0)
    std = np.nanstd(pooled, axis=0)
    return {n: (float(m), float(s) if s > 0 else 1.0) for n, m, s in zip(names, mean, std)}


def _stats_entry(name: str, value: Any) -> tuple[float, float]:
    if isinstance(value, Mapping):
        value = (value.get("mean"), value.get("std"))
    if not isinstance(value, (Sequence, np.ndarray)) or isinstance(value, str) or len(value) != 2:
        raise ConfigError(f"stats[{name!r}] must be (mean, std), got {value!r}")
    return _real(value[0], f"stats[{name!r}] mean"), _real(value[1], f"stats[{name!r}] std", positive=True)


def normalize_ehr(table: Any, features: Sequence[str], stats: Mapping[str, Any] | None = None,
                  ) -> tuple[np.ndarray, np.ndarray, dict[str, tuple[float, float]]]:
    """Z-score each column of an EHR table ``(T, F)``; returns ``(values, missing_mask, stats)``.

    * ``stats`` maps feature -> ``(mean, std)`` (e.g. :func:`fit_ehr_stats` on the train
      split); features it lacks use :data:`EHR_REFERENCE_RANGES` (:func:`reference_stats`);
      features in neither raise ConfigError naming them. The returned ``stats`` are the
      ones used, for every feature, so they can be saved and reused.
    * ``values`` ``(T, F)`` float32 = ``(x - mean) / std``; ``missing_mask`` ``(T, F)`` bool,
      True where the input was NaN.
    * **The mask is the truth.** Missing cells hold 0 in ``values`` only so the array
      is finite; 0 is also the z-score of an observed value equal to the mean, so
      ``values`` must never be used without ``missing_mask``.
    """
    x = _ehr_table(table)
    names = _features(features, x.shape[1])
    stats = {} if stats is None else stats
    if not isinstance(stats, Mapping):
        raise ConfigError(f"stats must map feature -> (mean, std), got {type(stats).__name__}")
    unknown = [n for n in names if n not in stats and n not in EHR_REFERENCE_RANGES]
    if unknown:
        raise ConfigError(f"no statistics for EHR features {unknown}: pass stats (fit_ehr_stats on the train split) "
                          f"or use reference names: {', '.join(sorted(EHR_REFERENCE_RANGES))}")
    used = {n: _stats_entry(n, stats[n]) if n in stats else reference_stats(n) for n in names}
    mean = np.array([used[n][0] for n in names])  # (F,)
    std = np.array([used[n][1] for n in names])   # (F,)
    missing = np.isnan(x)                          # (T, F)
    values = np.where(missing, 0.0, (x - mean) / std).astype(np.float32)
    return values, missing, used


# ============================================================================ composable transforms

def _is_pair(data: Any) -> bool:
    return isinstance(data, tuple) and len(data) == 2 and isinstance(data[1], Mapping)


class Transform:
    """Base of the callable transforms: ``t(array) -> array`` or ``t((array, meta)) -> (array, meta)``.

    Subclasses implement ``apply(array, meta) -> (array, meta_updates)``; ``meta`` is None
    for a bare array. The input meta is never modified: a new dict is returned.
    """

    def apply(self, arr: Any, meta: Mapping[str, Any] | None) -> tuple[Any, dict]:
        raise NotImplementedError

    def __call__(self, data: Any) -> Any:
        if _is_pair(data):
            arr, meta = data
            out, updates = self.apply(arr, meta)
            return out, {**meta, **updates}
        return self.apply(data, None)[0]

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


def _meta_value(meta: Mapping[str, Any] | None, key: str, given: Any, owner: str) -> Any:
    if given is not None:
        return given
    if meta is None or meta.get(key) is None:
        raise InputError("meta", f"expected meta[{key!r}] for {owner} (pass (array, meta) or set it explicitly), "
                                 f"got {'no meta' if meta is None else sorted(meta)}")
    return meta[key]


class Compose:
    """Apply callables in order: ``Compose([a, b])(x) == b(a(x))``."""

    def __init__(self, transforms: Iterable[Callable[[Any], Any]]):
        self.transforms = list(transforms)
        for t in self.transforms:
            if not callable(t):
                raise ConfigError(f"Compose takes callables, got {t!r}")

    def __call__(self, data: Any) -> Any:
        for t in self.transforms:
            data = t(data)
        return data

    def __len__(self) -> int:
        return len(self.transforms)

    def __repr__(self) -> str:
        return f"Compose({self.transforms!r})"


class Window(Transform):
    """:func:`window` with a fixed (center, width)."""

    def __init__(self, center: float, width: float, function: str = "linear"):
        window(np.zeros(1), center, width, function)  # validate now, not at the first sample
        self.center, self.width, self.function = center, width, function

    def apply(self, arr, meta):
        return window(arr, self.center, self.width, self.function), {}


class WindowPreset(Transform):
    """:func:`window_preset` with a fixed preset name (checked at construction)."""

    def __init__(self, name: str, function: str = "linear"):
        CT_WINDOWS.get(name)
        self.name, self.function = name, function

    def apply(self, arr, meta):
        return window_preset(arr, self.name, self.function), {}


class MultiWindowRGB(Transform):
    """:func:`multi_window_rgb` with fixed windows."""

    def __init__(self, names: Sequence[Any] = DEFAULT_RGB_WINDOWS, function: str = "linear"):
        multi_window_rgb(np.zeros((1, 1)), names, function)
        self.names, self.function = tuple(names), function

    def apply(self, arr, meta):
        return multi_window_rgb(arr, self.names, self.function), {}


class NormalizeMinMax(Transform):
    """:func:`normalize_minmax`."""

    def apply(self, arr, meta):
        return normalize_minmax(arr), {}


class NormalizePercentile(Transform):
    """:func:`normalize_percentile` with fixed percentiles."""

    def __init__(self, lo: float = 0.5, hi: float = 99.5, clip: bool = True):
        normalize_percentile(np.zeros(1), lo, hi, clip)
        self.lo, self.hi, self.clip = lo, hi, clip

    def apply(self, arr, meta):
        return normalize_percentile(arr, self.lo, self.hi, self.clip), {}


class ToFloat01(Transform):
    """:func:`to_float01`; ``bits=None`` reads ``meta["bits_stored"]`` when present."""

    def __init__(self, bits: int | None = None):
        self.bits = bits

    def apply(self, arr, meta):
        bits = self.bits if self.bits is not None else (meta or {}).get("bits_stored")
        return to_float01(arr, bits), {}


class EnsureRGB(Transform):
    """:func:`ensure_rgb`."""

    def apply(self, arr, meta):
        return ensure_rgb(arr), {}


class EnsureGray(Transform):
    """:func:`ensure_gray`."""

    def apply(self, arr, meta):
        return ensure_gray(arr), {}


def _scaled_spacing(meta: Mapping[str, Any] | None, scale: Sequence[float]) -> dict:
    """meta['spacing'] (mm per pixel, 2 axes) divided by the per-axis scale, when present."""
    sp = (meta or {}).get("spacing")
    if sp is not None and len(sp) == len(scale):
        return {"spacing": tuple(float(s) / float(k) for s, k in zip(sp, scale))}
    return {}


class Resize(Transform):
    """:func:`resize` to a fixed size; updates meta['spacing'] of a 2D image."""

    def __init__(self, size: Any, mode: str = "bilinear", antialias: bool = True):
        self.size, self.mode, self.antialias = _size2(size), _choice(mode, _RESIZE_MODES, "resize mode"), antialias

    def apply(self, arr, meta):
        out = resize(arr, self.size, self.mode, self.antialias)
        scale = (out.shape[0] / np.shape(arr)[0], out.shape[1] / np.shape(arr)[1])
        return out, _scaled_spacing(meta, scale)


class ResizePad(Transform):
    """:func:`resize_pad`; with ``(array, meta)`` the :class:`Letterbox` goes to ``meta["letterbox"]``
    (as :meth:`Letterbox.to_dict`) and ``meta["spacing"]`` is updated. A bare array loses it."""

    def __init__(self, size: Any, pad_value: float = 0, mode: str = "bilinear", antialias: bool = True,
                 position: str = "center"):
        self.size, self.pad_value = _size2(size), pad_value
        self.mode = _choice(mode, _RESIZE_MODES, "resize mode")
        self.antialias, self.position = antialias, _choice(position, _POSITIONS, "position")

    def apply(self, arr, meta):
        out, box = resize_pad(arr, self.size, self.pad_value, self.mode, self.antialias, self.position)
        return out, {"letterbox": box.to_dict(), **_scaled_spacing(meta, box.scale)}


def _shift_affine(meta: Mapping[str, Any] | None, shifts: Sequence[int]) -> dict:
    """New affine after crop/pad: new index i maps to old index i + shift."""
    aff = (meta or {}).get("affine")
    if aff is None:
        return {}
    a = np.asarray(aff, dtype=np.float64)
    t = np.eye(4)
    t[: len(shifts), 3] = shifts
    return {"affine": (a @ t).tolist()}


class CenterCrop(Transform):
    """:func:`center_crop` to a fixed size."""

    def __init__(self, size: Any):
        self.size = _size2(size)

    def apply(self, arr, meta):
        return center_crop(arr, self.size), {}


class CropOrPad(Transform):
    """:func:`crop_or_pad` to a fixed shape; updates meta['affine'] (voxel shift) when present."""

    def __init__(self, shape: Sequence[Any], pad_value: float = 0, mode: str = "center"):
        self.shape, self.pad_value = tuple(shape), pad_value
        self.mode = _choice(mode, _CROP_MODES, "crop/pad mode")

    def apply(self, arr, meta):
        out = crop_or_pad(arr, self.shape, self.pad_value, self.mode)
        shifts = [0 if t is None else _shift(n, int(t), self.mode) for n, t in zip(np.shape(arr), self.shape)]
        return out, _shift_affine(meta, shifts)


class CropOrPadDepth(Transform):
    """:func:`crop_or_pad_depth` to a fixed depth; updates meta['affine'] when present."""

    def __init__(self, depth: int, mode: str = "center", pad_value: float = 0):
        self.depth, self.pad_value = _positive_int(depth, "depth"), pad_value
        self.mode = _choice(mode, _CROP_MODES, "crop/pad mode")

    def apply(self, arr, meta):
        out = crop_or_pad_depth(arr, self.depth, self.mode, self.pad_value)
        return out, _shift_affine(meta, [_shift(np.shape(arr)[0], self.depth, self.mode)])


class SampleSlices(Transform):
    """:func:`sample_slices`; the array becomes the slices, indices go to ``meta["slice_indices"]``.

    The slices need not be evenly spaced, so ``meta["affine"]`` is removed (set to None).
    """

    def __init__(self, n: int, strategy: str = "uniform"):
        self.n, self.strategy = _positive_int(n, "n"), _choice(strategy, _SLICE_STRATEGIES, "slice strategy")

    def apply(self, arr, meta):
        idx, slices = sample_slices(arr, self.n, self.strategy)
        updates: dict[str, Any] = {"slice_indices": idx.tolist()}
        if meta is not None and "affine" in meta:
            updates["affine"] = None
        return slices, updates


class ResampleVolume(Transform):
    """:func:`resample_volume`; source spacing from ``spacing`` or ``meta["spacing"]``.

    Updates ``meta["spacing"]`` and ``meta["affine"]`` (columns scaled by target / source).
    """

    def __init__(self, target_spacing: Any, order: int = 1, spacing: Sequence[float] | None = None):
        self.target_spacing, self.order, self.spacing = target_spacing, order, spacing

    def apply(self, arr, meta):
        src = _meta_value(meta, "spacing", self.spacing, "ResampleVolume")
        out, new = resample_volume(arr, src, self.target_spacing, self.order)
        updates: dict[str, Any] = {"spacing": new}
        if meta is not None and meta.get("affine") is not None:
            zoom = np.diag(list(np.array(new) / np.array(_spacing3(src, "spacing", InputError))) + [1.0])
            updates["affine"] = (np.asarray(meta["affine"], dtype=np.float64) @ zoom).tolist()
        return out, updates


def _n_samples(meta: Mapping[str, Any] | None, out: np.ndarray) -> dict:
    """Keep a reader's ``meta["n_samples"]`` true after the sample axis changed."""
    return {"n_samples": int(out.shape[1])} if meta is not None and "n_samples" in meta else {}


class ResampleSignal(Transform):
    """:func:`resample_signal`; source rate from ``fs`` or ``meta["fs"]``; updates ``meta["fs"]``."""

    def __init__(self, target_fs: float, fs: float | None = None, max_denominator: int = 1000,
                 padtype: str = "line"):
        self.target_fs = _real(target_fs, "target_fs", positive=True)
        self.fs, self.max_denominator, self.padtype = fs, max_denominator, padtype

    def apply(self, arr, meta):
        fs = _meta_value(meta, "fs", self.fs, "ResampleSignal")
        out, new_fs = resample_signal(arr, fs, self.target_fs, self.max_denominator, self.padtype)
        return out, {"fs": new_fs, **_n_samples(meta, out)}


class NormalizeLeads(Transform):
    """:func:`normalize_leads`."""

    def __init__(self, eps: float = 1e-6, nan_policy: str = "raise"):
        self.eps, self.nan_policy = eps, _choice(nan_policy, _NAN_POLICIES, "nan_policy")

    def apply(self, arr, meta):
        return normalize_leads(arr, self.eps, self.nan_policy), {}


class CropOrPadSignal(Transform):
    """:func:`crop_or_pad_signal` to a fixed number of samples."""

    def __init__(self, n_samples: int, mode: str = "start", pad_value: float = 0.0):
        self.n_samples, self.pad_value = _positive_int(n_samples, "n_samples"), pad_value
        self.mode = _choice(mode, _CROP_MODES, "crop/pad mode")

    def apply(self, arr, meta):
        out = crop_or_pad_signal(arr, self.n_samples, self.mode, self.pad_value)
        return out, _n_samples(meta, out)


class SelectLeads(Transform):
    """:func:`select_leads`; lead names from ``lead_names`` or ``meta[names_key]``.

    Sets ``meta[names_key]`` to ``wanted`` and ``meta["lead_mask"]`` to the presence list.
    """

    def __init__(self, wanted: Sequence[str] = STANDARD_12_LEADS, missing: str = "zero",
                 lead_names: Sequence[str] | None = None, names_key: str = "lead_names"):
        self.wanted, self.missing = tuple(wanted), _choice(missing, _MISSING_POLICIES, "missing policy")
        self.lead_names, self.names_key = lead_names, names_key

    def apply(self, arr, meta):
        names = _meta_value(meta, self.names_key, self.lead_names, "SelectLeads")
        out, present = select_leads(arr, names, self.wanted, self.missing)
        return out, {self.names_key: list(self.wanted), "lead_mask": present.tolist()}


class NormalizeEHR(Transform):
    """:func:`normalize_ehr`; names from ``features`` or ``meta["features"]``.

    The array becomes the z-scored values; with ``(array, meta)`` the missing mask goes to
    ``meta["missing_mask"]`` (bool array, True = missing) and the statistics used to
    ``meta["ehr_stats"]``. A bare array loses the mask, so pass ``(array, meta)``.
    """

    def __init__(self, stats: Mapping[str, Any] | None = None, features: Sequence[str] | None = None):
        self.stats, self.features = stats, features

    def apply(self, arr, meta):
        names = _meta_value(meta, "features", self.features, "NormalizeEHR")
        values, missing, used = normalize_ehr(arr, names, self.stats)
        return values, {"missing_mask": missing, "ehr_stats": used}


__all__ = [
    "CT_WINDOWS", "DEFAULT_RGB_WINDOWS", "MEDGEMMA_CT_WINDOWS", "EHR_REFERENCE_RANGES", "STANDARD_12_LEADS",
    "window", "window_preset", "multi_window_rgb",
    "normalize_minmax", "normalize_percentile", "to_float01", "ensure_rgb", "ensure_gray",
    "resize", "resize_pad", "Letterbox", "center_crop", "crop_or_pad",
    "resample_volume", "crop_or_pad_depth", "slice_indices", "sample_slices",
    "resample_signal", "normalize_leads", "crop_or_pad_signal", "select_leads",
    "reference_stats", "fit_ehr_stats", "normalize_ehr",
    "Transform", "Compose", "Window", "WindowPreset", "MultiWindowRGB", "NormalizeMinMax",
    "NormalizePercentile", "ToFloat01", "EnsureRGB", "EnsureGray", "Resize", "ResizePad", "CenterCrop",
    "CropOrPad", "CropOrPadDepth", "SampleSlices", "ResampleVolume", "ResampleSignal", "NormalizeLeads",
    "CropOrPadSignal", "SelectLeads", "NormalizeEHR",
]

"""Record parts -> model-ready pictures: RGB ``PIL.Image`` objects for image-text models.

This is the data layer in front of every pretrained MLLM: it reads a part of a record
(``{"type": "image" | "volume", "path" | "data", "options"}``, see
:mod:`medmllm.data.records`) through :func:`medmllm.data.readers.read` and turns it
into 8-bit RGB pictures. It knows nothing of models; resizing and normalisation for a
given vision tower are left to that model's own image processor.

Intensity mapping (every float result in ``[0, 1]`` becomes uint8 by
``rint(x * 255)``, gray is repeated to three channels):

* **DICOM grayscale** (CT, MR, CR/DX ...; MONOCHROME1 is flipped by the reader):

  - ``options["window"]`` a preset name of :data:`~medmllm.data.preprocess.CT_WINDOWS`
    (``"lung"``, ``"mediastinum"``, ``"bone"`` ...) or a ``[center, width]`` pair: the
    DICOM LINEAR window (PS3.3 C.11.2.1.2.1) on modality values (HU for CT);
  - ``"multi"``: three windows as R, G, B (:func:`~medmllm.data.preprocess.multi_window_rgb`),
    by default lung / mediastinum / bone; ``options["windows"]`` picks other three;
  - default (``None`` / ``"auto"``): the file's own VOI LUT or window when it has one,
    else the 0.5-99.5 percentile range of the modality values -> [0, 1].
* **DICOM colour** (RGB, YBR, PALETTE): uint8 kept; uint16 divided by ``2**BitsStored - 1``.
* **multi-frame DICOM / multi-page TIFF**: frame ``options["frame"]`` (default 0).
* **PNG/JPEG/TIFF**: 8-bit gray or RGB kept as is; 16-bit (and 32-bit) gray by
  ``options["scale"]``: ``"minmax"`` (default: stored min..max -> 0..255; such files
  rarely fill 16 bits), ``"full"`` (value / 65535, or ``/ (2**options["bits"] - 1)``)
  or ``"percentile"`` (0.5..99.5 percentiles -> 0..255, clipped).
* **volumes** (NIfTI, a DICOM series folder, or a multi-frame grayscale DICOM given as
  a ``volume`` part): 2D-only models get ``k`` evenly sampled axial slices as ``k``
  images (:func:`load_volume_slices`), a documented fallback that drops 3D context.
  ``options["window"]`` as for DICOM (default: percentile range of the sampled slices,
  one range for all of them so their contrast is comparable).

Inline data: ``part["data"]`` may hold base64 text (a ``data:...;base64,`` URI prefix
is allowed) or raw bytes of any readable file (PNG, JPEG, DICOM, NIfTI, .nii.gz), a
``PIL.Image`` or a numpy array (image ``(H, W[, 3])``, volume ``(D, H, W)``).

Every problem raises :class:`~medmllm.errors.InputError` naming the file (or
``"<kind> part inline data"``) and the reason; a bad option value names the option.
"""

from __future__ import annotations

import base64
import binascii
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from medmllm.errors import ConfigError, InputError

DEFAULT_VOLUME_SLICES = 8
SCALES = ("minmax", "full", "percentile")
OPTION_KEYS = ("window", "windows", "frame", "scale", "bits", "slices", "strategy", "volume_index")
_AUTO_WINDOWS = (None, "auto")


# ============================================================================ helpers

def _options(part: Mapping[str, Any], label: str) -> dict:
    opts = part.get("options") or {}
    if not isinstance(opts, Mapping):
        raise InputError(label, f"options: expected an object, got {type(opts).__name__}")
    unknown = sorted(set(opts) - set(OPTION_KEYS))
    if unknown:
        raise InputError(label, f"options: unknown key(s) {unknown}; known: {list(OPTION_KEYS)}")
    return dict(opts)


def _label(part: Mapping[str, Any], base_dir: str | os.PathLike) -> str:
    kind = part.get("type", "image") if isinstance(part, Mapping) else "image"
    if isinstance(part, Mapping) and isinstance(part.get("path"), str) and part["path"]:
        from medmllm.data.records import resolve_path

        return str(resolve_path(part, base_dir))
    return f"{kind} part inline data"


def to_pil(x: np.ndarray):
    """``(H, W)`` / ``(H, W, 3)`` uint8, or float in ``[0, 1]``, -> RGB ``PIL.Image``.

    Floats become ``rint(x * 255)`` as uint8; gray is repeated to three channels.
    """
    from PIL import Image

    from medmllm.data.preprocess import ensure_rgb

    arr = np.asarray(x)
    if arr.dtype != np.uint8:
        arr = np.rint(np.clip(arr.astype(np.float32), 0.0, 1.0) * np.float32(255.0)).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(ensure_rgb(arr)), mode="RGB")


def _window_arg(win: Any, label: str) -> tuple[float, float]:
    """A preset name or a ``[center, width]`` pair -> ``(center, width)``; InputError otherwise."""
    from medmllm.data.preprocess import CT_WINDOWS

    if isinstance(win, str):
        try:
            return CT_WINDOWS.get(win)
        except ConfigError as exc:
            raise InputError(label, f"options.window: {exc}; or 'multi' / 'auto'") from None
    if isinstance(win, (list, tuple)) and len(win) == 2:
        try:
            center, width = float(win[0]), float(win[1])
        except (TypeError, ValueError):
            center = width = float("nan")
        if np.isfinite(center) and np.isfinite(width) and width >= 1:
            return center, width
    raise InputError(label, f"options.window: expected a preset name, [center, width] with width >= 1, "
                            f"'multi' or 'auto', got {win!r}")


def _rgb_windows(opts: dict, label: str) -> tuple:
    from medmllm.data.preprocess import DEFAULT_RGB_WINDOWS

    names = opts.get("windows", DEFAULT_RGB_WINDOWS)
    if isinstance(names, str) or not isinstance(names, (list, tuple)) or len(names) != 3:
        raise InputError(label, f"options.windows: expected 3 windows (R, G, B), got {names!r}")
    return tuple(tuple(n) if isinstance(n, list) else n for n in names)


def _multi_window(hu: np.ndarray, opts: dict, label: str) -> np.ndarray:
    """``(..., H, W)`` modality values -> ``(..., H, W, 3)`` float in [0, 1]."""
    from medmllm.data.preprocess import multi_window_rgb

    try:
        return multi_window_rgb(hu, _rgb_windows(opts, label))
    except ConfigError as exc:
        raise InputError(label, f"options.windows: {exc}") from None


def _int_option(opts: dict, key: str, default: int, label: str, minimum: int = 0) -> int:
    v = opts.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or int(v) < minimum:
        raise InputError(label, f"options.{key}: expected an integer >= {minimum}, got {v!r}")
    return int(v)


def _relabel(exc: InputError, label: str, tmp: str | None) -> InputError:
    """Re-point an error about a temporary file at the part it came from."""
    if tmp is None:
        return exc
    return InputError(label, exc.reason)


# ============================================================================ inline data

_GZIP = b"\x1f\x8b"


def _decode_inline(data: Any, label: str) -> bytes:
    """Inline ``data`` (base64 text, optional data URI, or bytes) -> raw bytes."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        raw = bytes(data)
    elif isinstance(data, str):
        text = data.strip()
        if text.startswith("data:"):
            head, sep, text = text.partition(",")
            if not sep or ";base64" not in head:
                raise InputError(label, "expected a base64 data URI ('data:<mime>;base64,<payload>')")
        try:
            raw = base64.b64decode("".join(text.split()), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise InputError(label, f"inline data is not valid base64 ({exc})") from None
    else:
        raise InputError(label, f"inline data: expected base64 text, bytes, a PIL image or a numpy array, "
                                f"got {type(data).__name__}")
    if not raw:
        raise InputError(label, "inline data is empty")
    return raw


def _suffix_for(raw: bytes) -> str:
    """A file name suffix that lets :func:`~medmllm.data.readers.detect` recognise ``raw``.

    Images and DICOM with its preamble are recognised by content; gzip can only be a
    NIfTI; a 348/540 header size is NIfTI; anything else is tried as preamble-less DICOM.
    """
    from medmllm.data.readers import _is_nifti_header

    if raw[:2] == _GZIP:
        return ".nii.gz"
    if _is_nifti_header(raw[:4]) and not (len(raw) >= 132 and raw[128:132] == b"DICM"):
        return ".nii"
    return ".dcm"


class _Source:
    """Context manager: a readable file path for a part (its own path, or a temp file for inline data)."""

    def __init__(self, part: Mapping[str, Any], base_dir: str | os.PathLike, label: str):
        self.part, self.base_dir, self.label = part, base_dir, label
        self.tmpdir: tempfile.TemporaryDirectory | None = None

    def __enter__(self) -> tuple[Path, str | None]:
        from medmllm.data.records import resolve_path

        path = self.part.get("path")
        if isinstance(path, str) and path:
            p = resolve_path(self.part, self.base_dir)
            if not p.exists():
                raise InputError(p, f"{self.part.get('type', 'image')} part: file does not exist")
            return p, None
        if self.part.get("data") is None:
            raise InputError(self.label, "expected a non-empty 'path' or inline 'data'")
        raw = _decode_inline(self.part["data"], self.label)
        self.tmpdir = tempfile.TemporaryDirectory(prefix="medmllm-inline-")
        tmp = Path(self.tmpdir.name) / f"inline{_suffix_for(raw)}"
        tmp.write_bytes(raw)
        return tmp, str(tmp)

    def __exit__(self, *exc_info) -> None:
        if self.tmpdir is not None:
            self.tmpdir.cleanup()


def _is_array_data(part: Mapping[str, Any]) -> bool:
    if part.get("path"):
        return False
    data = part.get("data")
    if isinstance(data, np.ndarray):
        return True
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow is a dependency
        return False
    return isinstance(data, Image.Image)


def _array_from_data(data: Any) -> np.ndarray:
    """A PIL image or numpy array held inline -> numpy array (PIL modes as the image reader maps them)."""
    if isinstance(data, np.ndarray):
        return data
    img = data
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        return np.asarray(img).astype(np.uint16)
    if img.mode in ("I", "F", "L"):
        return np.asarray(img)
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


# ============================================================================ 2D images

def _scale_gray(arr: np.ndarray, opts: dict, label: str) -> np.ndarray:
    """A non-uint8 gray image -> float in [0, 1] by ``options["scale"]`` (see the module docstring)."""
    from medmllm.data.preprocess import normalize_minmax, normalize_percentile, to_float01

    scale = opts.get("scale", "minmax")
    if scale not in SCALES:
        raise InputError(label, f"options.scale: expected one of {SCALES}, got {scale!r}")
    if scale == "full":
        if arr.dtype.kind == "f" or arr.dtype not in (np.uint8, np.uint16):
            raise InputError(label, f"options.scale='full' needs a uint16 image, got dtype {arr.dtype}")
        bits = opts.get("bits")
        try:
            return to_float01(arr, bits=bits)
        except ConfigError as exc:
            raise InputError(label, f"options.bits: {exc}") from None
        except InputError as exc:
            raise InputError(label, exc.reason) from None
    if scale == "percentile":
        return normalize_percentile(arr)
    return normalize_minmax(arr)


def _raster_to_pil(arr: np.ndarray, opts: dict, label: str):
    """Reader output of a 2D raster ``(H, W)`` / ``(H, W, 3)`` -> RGB PIL image."""
    if arr.ndim == 3 and arr.shape[2] in (3, 4):
        if arr.dtype == np.uint8:
            return to_pil(arr[:, :, :3])
        from medmllm.data.preprocess import normalize_minmax

        return to_pil(normalize_minmax(arr[:, :, :3]))
    if arr.ndim != 2:
        raise InputError(label, f"expected a 2D image (H, W) or (H, W, 3), got shape {arr.shape}")
    if arr.dtype == np.uint8:
        return to_pil(arr)
    if arr.dtype == np.bool_:
        return to_pil(arr.astype(np.float32))
    if not np.all(np.isfinite(arr)):
        raise InputError(label, "image holds NaN or infinite values")
    return to_pil(_scale_gray(arr, opts, label))


def _check_no_window(opts: dict, label: str, what: str) -> None:
    if opts.get("window") not in _AUTO_WINDOWS or "windows" in opts:
        raise InputError(label, f"options.window applies to DICOM and volumes, not to {what}")


def _dicom_to_pil(path: Path, opts: dict, label: str):
    """One DICOM file -> RGB PIL image (see the module docstring for the intensity mapping)."""
    from medmllm.data.preprocess import normalize_percentile
    from medmllm.data.readers import read

    frame = _int_option(opts, "frame", 0, label)
    win = opts.get("window")
    if win == "multi":
        hu, meta = read(path, reader="dicom", frame=frame, invert_monochrome1=False)
        _check_dicom_image(meta, hu, label)
        if meta.get("color_space") == "RGB":
            return _dicom_color(hu, meta)
        rgb = _multi_window(hu, opts, label)
        return to_pil(1.0 - rgb if meta.get("photometric") == "MONOCHROME1" else rgb)
    if win in _AUTO_WINDOWS:
        arr, meta = read(path, reader="dicom", frame=frame, voi="file")
        _check_dicom_image(meta, arr, label)
        if meta.get("voi_applied") == "minmax":  # no VOI in the file: robust percentile range instead
            arr, meta = read(path, reader="dicom", frame=frame)
            arr = normalize_percentile(arr)
    else:
        arr, meta = read(path, reader="dicom", frame=frame, voi=_window_arg(win, label))
        _check_dicom_image(meta, arr, label)
    if meta.get("color_space") == "RGB":
        return _dicom_color(arr, meta)
    return to_pil(arr)


def _check_dicom_image(meta: dict, arr: np.ndarray, label: str) -> None:
    if meta.get("kind") != "image":
        raise InputError(label, f"expected a DICOM image, got a {meta.get('kind')} object (no pixel data)")
    color = meta.get("color_space") == "RGB"
    if arr.ndim != (3 if color else 2):
        raise InputError(label, f"expected one frame, got shape {arr.shape}")


def _dicom_color(arr: np.ndarray, meta: dict):
    from medmllm.data.preprocess import to_float01

    if arr.dtype == np.uint8:
        return to_pil(arr)
    bits = meta.get("bits_stored") or 8 * arr.dtype.itemsize
    return to_pil(to_float01(arr.astype(np.uint16), bits=min(int(bits), 16)))


def _read_raster(path: Path, opts: dict, label: str):
    from medmllm.data.readers import read

    page = _int_option(opts, "frame", 0, label)
    arr, _ = read(path, reader="image", page=page)
    return _raster_to_pil(arr, opts, label)


def load_image_part(part: Mapping[str, Any], base_dir: str | os.PathLike = "."):
    """One ``image`` part -> RGB ``PIL.Image`` (8-bit), intensity mapped as in the module docstring.

    ``part["path"]`` is relative to ``base_dir`` (the JSONL file's folder) unless absolute;
    inline ``part["data"]`` is accepted instead. A volume (NIfTI, DICOM series folder)
    raises InputError: use :func:`load_volume_slices` or :func:`load_part_images`.
    """
    from medmllm.data.readers import detect

    if not isinstance(part, Mapping):
        raise InputError("image part", f"expected an object with 'path' or 'data', got {type(part).__name__}")
    label = _label(part, base_dir)
    opts = _options(part, label)
    if _is_array_data(part):
        arr = _array_from_data(part["data"])
        _check_no_window(opts, label, "inline arrays")
        return _raster_to_pil(arr, opts, label)
    with _Source(part, base_dir, label) as (path, tmp):
        try:
            reader = detect(path)
            if reader == "dicom":
                return _dicom_to_pil(path, opts, label)
            if reader == "image":
                _check_no_window(opts, label, "PNG/JPEG/TIFF images")
                return _read_raster(path, opts, label)
            if reader in ("nifti", "dicom_series"):
                raise InputError(label, "is a volume (D, H, W), not a 2D image; use load_volume_slices "
                                        "or load_part_images")
            raise InputError(label, f"expected an image (DICOM, PNG, JPEG, TIFF), got a {reader!r} file")
        except InputError as exc:
            raise _relabel(exc, label, tmp) from None


# ============================================================================ volumes

def _read_volume(path: Path, opts: dict, label: str) -> np.ndarray:
    """Modality values ``(D, H, W)`` float32 of a NIfTI file, DICOM series or multi-frame DICOM."""
    from medmllm.data.readers import detect, read

    reader = detect(path)
    if reader == "nifti":
        vol, _ = read(path, reader="nifti", volume_index=_int_option(opts, "volume_index", 0, label))
        return vol
    if reader == "dicom_series":
        vol, _ = read(path, reader="dicom_series")
        return vol
    if reader == "dicom":
        vol, meta = read(path, reader="dicom")
        if meta.get("kind") == "image" and meta.get("color_space") != "RGB" and vol.ndim == 3:
            return vol  # (F, H, W) frames of one multi-frame grayscale file
        raise InputError(label, f"expected a volume; this DICOM holds one {meta.get('kind')} of shape {vol.shape}")
    raise InputError(label, f"expected a volume (NIfTI, DICOM series folder or multi-frame DICOM), "
                            f"got a {reader!r} file")


def _slices_to_unit(slices: np.ndarray, opts: dict, label: str) -> np.ndarray:
    """Sampled modality values ``(k, H, W)`` -> ``(k, H, W)`` or ``(k, H, W, 3)`` float in [0, 1]."""
    from medmllm.data.preprocess import normalize_percentile, window

    win = opts.get("window")
    if win == "multi":
        return _multi_window(slices, opts, label)
    if win in _AUTO_WINDOWS:
        if not np.all(np.isfinite(slices)):
            raise InputError(label, "volume holds NaN or infinite values")
        return normalize_percentile(slices)
    center, width = _window_arg(win, label)
    try:
        return window(slices, center, width)
    except ConfigError as exc:
        raise InputError(label, f"options.window: {exc}") from None


def load_volume_slices(part: Mapping[str, Any], n: int | None = None, base_dir: str | os.PathLike = ".",
                       strategy: str | None = None) -> list:
    """A volume part -> ``n`` RGB PIL images of axial slices (the 2D-model fallback).

    ``n`` defaults to ``options["slices"]``, else :data:`DEFAULT_VOLUME_SLICES`; slices
    are picked by :func:`~medmllm.data.preprocess.slice_indices` (``strategy``
    ``"uniform"``: the middle slice of each of ``n`` equal chunks; ``"center"``: ``n``
    consecutive middle slices), in array order (canonical axis 0, inferior -> superior).
    Each slice is displayed radiologically (anterior up, patient's right on the left),
    which is medmllm's canonical ``("S", "P", "L")`` layout. Intensities: see the module
    docstring (one window / percentile range for all slices).
    """
    from medmllm.data.preprocess import sample_slices

    if not isinstance(part, Mapping):
        raise InputError("volume part", f"expected an object with 'path' or 'data', got {type(part).__name__}")
    label = _label(part, base_dir)
    opts = _options(part, label)
    k = _int_option({"slices": n if n is not None else opts.get("slices", DEFAULT_VOLUME_SLICES)},
                    "slices", DEFAULT_VOLUME_SLICES, label, minimum=1)
    how = strategy or opts.get("strategy", "uniform")
    if how not in ("uniform", "center"):
        raise InputError(label, f"options.strategy: expected 'uniform' or 'center', got {how!r}")
    if _is_array_data(part):
        vol = np.asarray(part["data"])
        if vol.ndim != 3:
            raise InputError(label, f"expected an inline volume (D, H, W), got shape {vol.shape}")
        vol = vol.astype(np.float32)
    else:
        with _Source(part, base_dir, label) as (path, tmp):
            try:
                vol = _read_volume(path, opts, label)
            except InputError as exc:
                raise _relabel(exc, label, tmp) from None
    _, slices = sample_slices(vol, k, how)  # (k, H, W)
    return [to_pil(s) for s in _slices_to_unit(slices, opts, label)]


def is_volume_part(part: Mapping[str, Any], base_dir: str | os.PathLike = ".") -> bool:
    """True for a ``volume`` part, or an ``image`` part whose path is a NIfTI file or a folder."""
    if part.get("type") == "volume":
        return True
    path = part.get("path")
    if not isinstance(path, str) or not path:
        data = part.get("data")
        if isinstance(data, np.ndarray):
            return data.ndim == 3 and data.shape[2] not in (3, 4)
        if _is_array_data(part) or data is None:
            return False
        return _suffix_for(_decode_inline(data, _label(part, base_dir))) in (".nii", ".nii.gz")
    from medmllm.data.readers import detect
    from medmllm.data.records import resolve_path

    p = resolve_path(part, base_dir)
    if p.is_dir():
        return True
    if not p.exists():
        raise InputError(p, f"{part.get('type', 'image')} part: file does not exist")
    return detect(p) == "nifti"


def load_part_images(part: Mapping[str, Any], base_dir: str | os.PathLike = ".",
                     n_slices: int | None = None) -> list:
    """Any image or volume part -> list of RGB PIL images: one for a 2D image, slices for a volume.

    A volume gives ``options["slices"]`` slices when the part sets it, else ``n_slices``
    (default :data:`DEFAULT_VOLUME_SLICES`).
    """
    if not isinstance(part, Mapping):
        raise InputError("part", f"expected an object with 'path' or 'data', got {type(part).__name__}")
    if part.get("type") not in ("image", "volume"):
        raise InputError(_label(part, base_dir), f"expected an 'image' or 'volume' part, got {part.get('type')!r}")
    if is_volume_part(part, base_dir):
        opts = part.get("options") if isinstance(part.get("options"), Mapping) else {}
        n = opts["slices"] if "slices" in opts else n_slices
        return load_volume_slices(part, n=n, base_dir=base_dir)
    return [load_image_part(part, base_dir)]


__all__ = ["DEFAULT_VOLUME_SLICES", "OPTION_KEYS", "SCALES", "is_volume_part", "load_image_part",
           "load_part_images", "load_volume_slices", "to_pil"]

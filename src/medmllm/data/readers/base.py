"""What every reader shares: the contract, input checks and allocation limits.

Reader contract
---------------
``reader(path, **options) -> (array, meta)`` where ``array`` is a numpy array and
``meta`` a plain dict. Axis conventions (channel-last, slice-first):

* ``kind="image"``  -> ``(H, W)`` or ``(H, W, C)``; DICOM multi-frame ``(F, H, W[, C])``.
* ``kind="volume"`` -> ``(D, H, W)``: axis 0 is the slice axis.
* ``kind="signal"`` -> ``(leads, samples)`` float32.
* ``kind="ehr"``    -> ``(T, F)`` float32 table of measurements, NaN = missing.

``meta`` always holds ``format`` (reader name), ``path``, ``kind``, and where known
``spacing`` (mm per array axis, same order as the array's spatial axes). Volumes also
hold ``affine``: a 4x4 list mapping array index ``(d, h, w, 1)`` to RAS world mm.
Every failure caused by the file raises :class:`~medmllm.errors.InputError`
naming the path and the reason, never a library's own exception.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Tuple

import numpy as np

from medmllm.errors import InputError

ReadResult = Tuple[np.ndarray, dict]
Reader = Callable[..., ReadResult]

# Allocation ceilings: a header that declares more than this is refused before any decoding.
MAX_IMAGE_PIXELS = 1 << 28        # 268M pixels in one 2D image/frame stack
MAX_VOLUME_VOXELS = 1 << 30       # 1G voxels (4 GiB as float32)
MAX_SIGNAL_SAMPLES = 1 << 28      # leads * samples
MAX_TEXT_BYTES = 64 << 20         # CSV / JSON inputs


def check_file(path: str | os.PathLike, max_bytes: int | None = None) -> Path:
    """Return ``Path(path)`` if it is a readable, non-empty regular file, else raise InputError."""
    p = Path(path)
    if not p.exists():
        raise InputError(p, "file does not exist")
    if p.is_dir():
        raise InputError(p, "expected a file, got a directory")
    size = p.stat().st_size
    if size == 0:
        raise InputError(p, "file is empty (0 bytes)")
    if max_bytes is not None and size > max_bytes:
        raise InputError(p, f"file is {size} bytes, larger than the limit of {max_bytes} bytes")
    return p


def check_elements(path: str | os.PathLike, shape: tuple[int, ...], limit: int, what: str = "elements") -> int:
    """Refuse absurd declared sizes before allocating: every dim >= 1 and the product <= limit."""
    dims = [int(d) for d in shape]
    if any(d <= 0 for d in dims):
        raise InputError(path, f"declared shape {tuple(dims)} has a non-positive dimension")
    n = 1
    for d in dims:
        n *= d
    if n > limit:
        raise InputError(path, f"declared shape {tuple(dims)} holds {n} {what}, above the limit of {limit}")
    return n


def guard(path: str | os.PathLike, fn: Callable[[], Any], what: str) -> Any:
    """Run ``fn``; turn any non-InputError exception into an InputError naming ``path``.

    Readers wrap third-party calls with this so callers only ever see InputError.
    MemoryError is converted as well (a file must never be able to exhaust memory), and so
    are BaseExceptions raised by native decoders (e.g. a Rust codec's PanicException);
    only KeyboardInterrupt, SystemExit and GeneratorExit pass through.
    """
    try:
        return fn()
    except InputError:
        raise
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as exc:  # noqa: BLE001 - we re-raise typed
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(path, f"{what}: {type(exc).__name__}: {msg[:300]}") from exc


def base_meta(path: str | os.PathLike, fmt: str, kind: str, **extra: Any) -> dict:
    meta = {"format": fmt, "path": str(path), "kind": kind}
    meta.update(extra)
    return meta

"""Previews for the web page: a file -> a PNG rendering (or, for EHR, a JSON summary).

``POST /v1/preview?kind=image|volume|signal|ehr&window=auto|<CT preset>&slice=N&filename=NAME``
with the raw file as the body. The file goes through the same checks as a chat request
(:func:`medmllm.serve.inputs.check_file`) and medmllm's readers:

* ``image`` (PNG/JPEG/DICOM): ``window=auto`` windows CT with ``mediastinum`` (as the models see it,
  :class:`~medmllm.data.dataset.PartLoader`) and stretches other images between their 0.5th and
  99.5th percentiles; a preset name windows the Hounsfield units. A multi-frame DICOM is a stack:
  ``slice`` picks the frame.
* ``volume`` (NIfTI, DICOM series ZIP): the axial slice ``slice`` (default: the middle) of the canonical (S, P, L)
  volume, windowed as above (``auto``: percentiles of the slice).
* ``signal`` (WFDB ZIP, signal CSV, DICOM ECG): the first 10 s of every lead, drawn as traces.
* ``ehr``: JSON ``{"kind": "ehr", "features": {name: latest value}, "units": {...}, "notes": n}``.

PNG answers carry ``X-Medmllm-Kind``, ``X-Medmllm-Slices`` (slices or frames, 1 for a 2D image) and
``X-Medmllm-Slice`` headers. Images are shrunk to at most :data:`MAX_SIDE` pixels a side.
"""

from __future__ import annotations

import io
import logging
import tempfile
from pathlib import Path

import numpy as np

from medmllm.serve.errors import ServeError, invalid
from medmllm.serve.inputs import InputLimits, check_file, write_media

log = logging.getLogger("medmllm.serve")

MAX_SIDE = 512
KINDS = ("image", "volume", "signal", "ehr")


def preview(data: bytes, kind: str, window: str = "auto", slice_index: int | None = None,
            filename: str | None = None, limits: InputLimits = InputLimits()) -> tuple[bytes | dict, dict]:
    """(PNG bytes or the EHR JSON dict, response headers); ServeError 422/413 for a bad file or setting."""
    if kind not in KINDS:
        raise invalid(f"kind: expected one of {KINDS}, got {kind[:20]!r}", "invalid_kind", "kind")
    if slice_index is not None and slice_index < 0:
        raise invalid(f"slice: expected an index >= 0, got {slice_index}", "invalid_slice", "slice")
    mf = check_file(kind, data, filename, None if window == "auto" else window, "file", limits)
    with tempfile.TemporaryDirectory(prefix="medmllm-preview-") as d:
        path = write_media(mf, Path(d), "file", "file", limits)
        arr, meta = _read(path, kind)
    if kind == "ehr":
        return _ehr_summary(arr, meta), {}
    if kind == "signal":
        return _png(_draw_signal(arr, float(meta.get("fs") or 250.0))), {"X-Medmllm-Kind": "signal",
                                                                          "X-Medmllm-Slices": "1"}
    stack = arr if kind == "volume" or _is_stack(arr) else arr[None]           # [S, H, W(, C)]
    n = int(stack.shape[0])
    i = n // 2 if slice_index is None else slice_index
    if i >= n:
        raise invalid(f"slice: expected an index below {n} (the number of slices), got {i}", "invalid_slice", "slice")
    img = _intensity(stack[i], meta, window, volume=(kind == "volume"))
    return _png(img), {"X-Medmllm-Kind": kind, "X-Medmllm-Slices": str(n), "X-Medmllm-Slice": str(i)}


def _read(path: Path, kind: str):
    from medmllm.data.readers import read
    from medmllm.errors import MedmllmError

    try:
        arr, meta = read(path)
    except MedmllmError as exc:
        log.info("preview: unreadable %s: %s", kind, exc)
        raise invalid(f"file: the {kind} file could not be read (a corrupt or unsupported file)",
                      "unreadable_file", "file") from None
    if meta.get("kind") != kind and not (kind == "image" and meta.get("kind") == "volume"):
        raise invalid(f"file: expected a {kind} file, the reader found a {meta.get('kind')}", "wrong_kind", "file")
    return arr, meta


def _is_stack(arr: np.ndarray) -> bool:
    return arr.ndim == 4 or (arr.ndim == 3 and arr.shape[-1] not in (3, 4))


def _intensity(img: np.ndarray, meta: dict, window: str, volume: bool) -> np.ndarray:
    """One 2D slice -> float32 in [0, 1] (see module doc)."""
    from medmllm.data import preprocess as P

    img = np.nan_to_num(np.asarray(img, dtype=np.float32)) if img.dtype.kind == "f" else img
    if window != "auto":
        return P.window_preset(img.astype(np.float32), window)
    if meta.get("modality") == "CT" and not volume:
        return P.window_preset(img.astype(np.float32), "mediastinum")
    if img.dtype == np.uint8:
        return P.to_float01(img)
    return P.normalize_percentile(img.astype(np.float32), 0.5, 99.5)


def _png(img01: np.ndarray) -> bytes:
    """float [0, 1] (H, W[, 3]) -> PNG bytes, longest side <= MAX_SIDE."""
    from PIL import Image

    a = np.clip(np.rint(np.asarray(img01, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)
    im = Image.fromarray(a[..., :3] if a.ndim == 3 else a)
    im.thumbnail((MAX_SIDE, MAX_SIDE))
    buf = io.BytesIO()
    im.save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def _draw_signal(sig: np.ndarray, fs: float, seconds: float = 10.0, width: int = 1000, row: int = 48) -> np.ndarray:
    """(leads, samples) -> a white image with one black trace per lead (at most 12 leads, ``seconds``)."""
    from PIL import Image, ImageDraw

    leads = sig[:12, : max(2, int(round(seconds * fs)))]
    im = Image.new("L", (width, row * leads.shape[0]), 255)
    draw = ImageDraw.Draw(im)
    for k, x in enumerate(leads):
        x = np.nan_to_num(x.astype(np.float64))
        span = float(np.percentile(x, 99.5) - np.percentile(x, 0.5)) or 1.0
        y = row * k + row / 2 - (x - np.median(x)) / span * (row * 0.8)
        t = np.linspace(0, width - 1, num=x.size)
        draw.line(list(zip(t.tolist(), np.clip(y, row * k, row * (k + 1) - 1).tolist())), fill=0, width=1)
        draw.line([(0, row * (k + 1) - 1), (width, row * (k + 1) - 1)], fill=210)
    return np.asarray(im, dtype=np.float32) / 255.0


def _ehr_summary(table: np.ndarray, meta: dict) -> dict:
    feats = list(meta.get("features") or [])
    latest = {}
    for j, name in enumerate(feats):
        col = table[:, j]
        seen = col[~np.isnan(col)]
        latest[name] = float(seen[-1]) if seen.size else None
    units = dict(zip(feats, meta.get("units") or [None] * len(feats)))
    return {"kind": "ehr", "features": latest, "units": units, "notes": len(meta.get("notes") or [])}


def parse_slice(value: str | None) -> int | None:
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise invalid(f"slice: expected an integer, got {value[:20]!r}", "invalid_slice", "slice") from None


__all__ = ["KINDS", "MAX_SIDE", "ServeError", "parse_slice", "preview"]

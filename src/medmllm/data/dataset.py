"""Records -> model-ready tensors: the bridge between the data layer and the composed model.

:class:`PartLoader` turns one modality part of a record into the tensor its encoder takes:

* ``image``  -> ``[C, S, S]`` float32 in [0, 1] (CT in a window preset or three windows as RGB,
  other images percentile-normalised), letterboxed to ``S``;
* ``volume`` -> ``[1, D, H, W]`` float32 in [0, 1] (windowed HU), resized to ``volume_shape``; with
  ``volume_window="multi"`` ``[3, D, H, W]``, one channel per window of ``volume_windows`` (a lung
  nodule and a liver lesion are never both visible in one window);
* ``signal`` -> ``[leads, T]`` float32, resampled to ``signal_fs``, standard leads, z-scored per lead;
* ``ehr``    -> ``[F, 2]`` float32: column 0 the z-scored latest value of each feature in
  ``ehr_features``, column 1 the missing flag (1 = missing; the value there is 0 and means nothing).
  Free-text notes go to the LLM as text: they are returned next to the tensor.

:class:`RecordDataset` yields ``{"record", "modalities": [(kind, tensor), ...]}`` — what
:class:`medmllm.data.collate.MultimodalCollator` takes — or ``None`` for an item whose file
is bad (the error is kept in ``dataset.errors``); :func:`skip_bad_items` drops those.
Knows nothing of models.
"""

from __future__ import annotations

import copy
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from medmllm.data import preprocess as P
from medmllm.data.records import MODALITY_PARTS, read_records, resolve_path
from medmllm.errors import ConfigError, InputError

log = logging.getLogger(__name__)

DEFAULT_EHR_FEATURES = ("heart_rate", "resp_rate", "sbp", "dbp", "temp_c", "spo2",
                        "wbc", "lactate", "creatinine", "sodium", "potassium", "hemoglobin")


@dataclass(frozen=True)
class ModalityShapes:
    """Fixed tensor shapes per modality (what the encoders were built for)."""

    image_size: int = 128
    image_channels: int = 1
    volume_shape: tuple[int, int, int] = (32, 64, 64)
    volume_window: str = "abdomen"
    volume_windows: tuple[str, str, str] = ("lung", "liver", "abdomen")   # channels when volume_window="multi"
    signal_fs: float = 250.0
    signal_samples: int = 2500
    signal_leads: tuple[str, ...] = P.STANDARD_12_LEADS
    ehr_features: tuple[str, ...] = DEFAULT_EHR_FEATURES

    @property
    def volume_channels(self) -> int:
        """Channels of a volume tensor: 3 for ``volume_window="multi"``, else 1."""
        return 3 if self.volume_window == "multi" else 1

    def __post_init__(self) -> None:
        if self.image_channels not in (1, 3):
            raise ConfigError(f"image_channels: expected 1 or 3, got {self.image_channels!r}")
        if len(tuple(self.volume_windows)) != 3:
            raise ConfigError(f"volume_windows: expected 3 window presets, got {self.volume_windows!r}")
        unknown = [f for f in self.ehr_features if f not in P.EHR_REFERENCE_RANGES]
        if unknown:
            raise ConfigError(f"ehr_features: no reference range for {unknown}; known: {sorted(P.EHR_REFERENCE_RANGES)}")


class PartLoader:
    """``loader(part, base_dir) -> (tensor, text_or_None)`` for one modality part (see module doc).

    ``cache_items`` > 0 keeps that many loaded tensors in memory (records of one case share files).
    """

    def __init__(self, shapes: ModalityShapes = ModalityShapes(), cache_items: int = 0):
        self.shapes = shapes
        self.cache_items = cache_items
        self._cache: OrderedDict[tuple, tuple[torch.Tensor, str | None]] = OrderedDict()

    def __call__(self, part: dict, base_dir: str | os.PathLike = ".") -> tuple[torch.Tensor, str | None]:
        kind = part.get("type")
        if kind not in MODALITY_PARTS:
            raise InputError("part.type", f"expected one of {MODALITY_PARTS}, got {kind!r}")
        key = None
        if "path" in part and self.cache_items:
            key = (kind, str(resolve_path(part, base_dir)), repr(sorted((part.get("options") or {}).items())))
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        out = getattr(self, f"_{kind}")(part, base_dir)
        if key is not None:
            self._cache[key] = out
            if len(self._cache) > self.cache_items:
                self._cache.popitem(last=False)
        return out

    # -- one function per modality ---------------------------------------------------------

    def _read(self, part: dict, base_dir) -> tuple[np.ndarray, dict]:
        from medmllm.data.readers import read

        if "path" not in part:
            raise InputError(f"{part['type']} part", "inline data is supported for ehr parts only; give a 'path'")
        opts = part.get("options") or {}
        return read(resolve_path(part, base_dir), reader=opts.get("reader"))

    def _image(self, part: dict, base_dir) -> tuple[torch.Tensor, None]:
        arr, meta = self._read(part, base_dir)
        opts = part.get("options") or {}
        if arr.ndim == 3 and arr.shape[-1] not in (3, 4) or arr.ndim == 4:  # multi-frame: one frame
            arr = arr[int(opts.get("frame", arr.shape[0] // 2))]
        img = self._intensity(arr, meta, opts.get("window"))          # (H, W) or (H, W, 3) in [0, 1]
        img = P.ensure_gray(img) if self.shapes.image_channels == 1 else P.ensure_rgb(img)
        size = self.shapes.image_size
        img, _ = P.resize_pad(img, (size, size))
        img = np.asarray(img, dtype=np.float32)
        chw = img[None] if img.ndim == 2 else img.transpose(2, 0, 1)  # [C, S, S]
        return torch.from_numpy(np.ascontiguousarray(chw)), None

    @staticmethod
    def _intensity(arr: np.ndarray, meta: dict, window: str | None) -> np.ndarray:
        """CT (HU) -> a window preset ('multi' = three windows as RGB); other images -> [0, 1]."""
        if meta.get("modality") == "CT" or window:
            if window == "multi":
                return P.multi_window_rgb(arr)
            return P.window_preset(arr, window or "mediastinum")
        if arr.dtype == np.uint8 or arr.ndim == 3:
            return P.to_float01(arr) if arr.dtype.kind in "ui" else P.normalize_minmax(arr)
        return P.normalize_percentile(arr.astype(np.float32), 0.5, 99.5)

    def _volume(self, part: dict, base_dir) -> tuple[torch.Tensor, None]:
        vol, _ = self._read(part, base_dir)                           # (D, H, W) HU, canonical orientation
        window = (part.get("options") or {}).get("window") or self.shapes.volume_window
        if window == "multi":                                          # [3, D, H, W]
            x = torch.from_numpy(np.ascontiguousarray(
                np.moveaxis(P.multi_window_rgb(vol, self.shapes.volume_windows), -1, 0), dtype=np.float32))
        else:                                                          # [1, D, H, W]
            x = torch.from_numpy(np.ascontiguousarray(P.window_preset(vol, window), dtype=np.float32))[None]
        if tuple(x.shape[1:]) != tuple(self.shapes.volume_shape):
            x = torch.nn.functional.interpolate(x[None], size=self.shapes.volume_shape, mode="trilinear",
                                                align_corners=False)[0]
        return x.contiguous(), None                                   # [C, D, H, W]

    def _signal(self, part: dict, base_dir) -> tuple[torch.Tensor, None]:
        sig, meta = self._read(part, base_dir)                        # (leads, samples), meta fs + lead names
        s = self.shapes
        if abs(float(meta["fs"]) - s.signal_fs) > 1e-6:
            sig, _ = P.resample_signal(sig, float(meta["fs"]), s.signal_fs)
        sig, _present = P.select_leads(sig, meta.get("lead_names") or [], s.signal_leads, missing="zero")
        sig = P.crop_or_pad_signal(sig, s.signal_samples)
        sig = P.normalize_leads(sig, nan_policy="zero")
        return torch.from_numpy(np.ascontiguousarray(sig, dtype=np.float32)), None   # [leads, T]

    def _ehr(self, part: dict, base_dir) -> tuple[torch.Tensor, str | None]:
        if "path" in part:
            table, meta = self._read(part, base_dir)
        else:
            from medmllm.data.readers.ehr import parse_ehr_json

            table, meta = parse_ehr_json(part["data"], "ehr part data")
        names = list(meta.get("features") or [])
        feats = self.shapes.ehr_features
        latest = np.full(len(feats), np.nan, dtype=np.float32)
        for j, f in enumerate(feats):
            if f in names:
                col = table[:, names.index(f)]
                seen = col[~np.isnan(col)]
                if seen.size:
                    latest[j] = seen[-1]                               # the latest measured value
        values, missing, _ = P.normalize_ehr(latest[None], list(feats))  # z-scores by reference ranges
        x = np.stack([values[0], missing[0].astype(np.float32)], axis=1)  # [F, 2]
        notes = [n for n in meta.get("notes") or [] if isinstance(n, str) and n.strip()]
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), (
            "Clinical note: " + " ".join(n.strip() for n in notes) if notes else None)


class RecordDataset(torch.utils.data.Dataset):
    """Instruction records (a JSONL path or a list) -> collator examples, files loaded on access.

    ``base_dir``: folder that relative part paths start from (default: the JSONL's folder).
    A record whose file cannot be read yields ``None`` and its error is appended to ``errors``.
    """

    def __init__(self, records: str | os.PathLike | Sequence[dict], loader: PartLoader | None = None,
                 base_dir: str | os.PathLike | None = None):
        if isinstance(records, (str, os.PathLike)):
            path = Path(records)
            self.records, self.load_report = read_records(path, on_error="skip")
            self.base_dir = Path(base_dir) if base_dir is not None else path.parent
        else:
            self.records, self.load_report = list(records), None
            self.base_dir = Path(base_dir) if base_dir is not None else Path(".")
        self.loader = loader or PartLoader()
        self.errors: list[str] = []

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict | None:
        rec = copy.deepcopy(self.records[i])
        modalities: list[tuple[str, torch.Tensor]] = []
        try:
            for msg in rec["messages"]:
                if not isinstance(msg.get("content"), list):
                    continue
                new_content = []
                for part in msg["content"]:
                    new_content.append(part)
                    if part["type"] in MODALITY_PARTS:
                        tensor, text = self.loader(part, self.base_dir)
                        modalities.append((part["type"], tensor))
                        if text:  # e.g. EHR notes: the LLM reads them as text right after the part
                            new_content.append({"type": "text", "text": text})
                msg["content"] = new_content
        except InputError as exc:
            self.errors.append(f"{rec['id']}: {exc}")
            log.warning("skipping record %s: %s", rec["id"], exc)
            return None
        return {"record": rec, "modalities": modalities}


def skip_bad_items(collate: Callable[[list[dict]], dict]) -> Callable[[list[dict | None]], dict]:
    """Wrap a collator so ``None`` items (unreadable files) are dropped; ``batch["skipped"]`` counts them."""

    def run(items: list[dict | None]) -> dict:
        good = [it for it in items if it is not None]
        batch = collate(good)
        batch["skipped"] = len(items) - len(good)
        return batch

    return run

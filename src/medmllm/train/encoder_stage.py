"""The ``encoder`` stage: adapt the modality encoders with supervised heads on structured labels.

Run before alignment / instruction tuning. Training a small model only through the LLM's answer
loss left its encoders at chance; a supervised loss on the encoders' own features does not. So::

    train-split cases of a MedPhantom build (counterfactual twins included)
      -> case_part / case_labels / case_regions (medmllm.data.phantoms.labels)
      -> PartLoader tensors, loaded once and kept in memory
      -> batches mixing kinds: inputs {kind: [N_k, ...]}, labels {kind: [N_k, T_k]} (NaN = n/a),
         boxes {kind: [N_k, R_k, 6]} (where each focal finding lies; NaN = n/a)
      -> model.encoders[kind] -> features [N_k, T, D], mask [N_k, T]  (+ stem maps, via hooks)
      -> EncoderHeads: [masked mean ; masked max] [N_k, 2D] -> one linear head per task, and per
         dense task one linear head per stem level on every cell of that level's map -> [N_k, U_l]
      -> loss = sum over kinds present of (mean of the task losses (cross-entropy | Huber)
                + dense_weight * mean of the dense losses (positive-weighted binary cross-entropy)
                + voxel_weight * voxel loss (a volume encoder's voxel logits vs the lesion's voxels))

Why dense tasks: a 3-px nodule on a 128-px radiograph is learnt from ~600 images only after a long,
erratic plateau when the only label is "nodule: yes/no" (still at chance after 700 steps of 32 in a
measurement). Saying which cells of the encoder's feature maps hold it (the truth knows where:
nodules, CT lesions, 3D lesions) at every resolution level of its convolutional stem below the
input's (deep supervision: 64, 32 and 16 px maps for a 128 px image) brought the same encoder past
it in 100-200 steps, also with CT slices mixed into its batches. Encoders without a convolutional
``stem`` (``image_encoder.stem`` for slice-wise volume encoders) get the per-case tasks only.

Only the encoders (of ``cfg.kinds``) and the heads are optimised, on :class:`TrainLoop`
(checkpoints, exact resume, progress bar, metrics.jsonl); the LLM and projectors are never run
and never touched. Afterwards the heads are scored on the validation cases, saved to
``run_dir/heads.safetensors`` for inspection and dropped; the trained encoders stay in the model.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Literal, Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from medmllm.data.dataset import ModalityShapes, PartLoader
from medmllm.errors import ConfigError, InputError
from medmllm.model.encoders.base import masked_max, masked_mean
from medmllm.train.sft import ModelConfig

log = logging.getLogger(__name__)


# ============================================================================= config
VOXEL_LESION_WEIGHT = 0.1    # default weight of the lesion voxels' mean in voxel_loss (background: 1)


@dataclasses.dataclass
class EncoderStageConfig:
    """Settings of :func:`train_encoders` (embed as ``encoder:`` in a recipe, or load on its own).

    ``data``: a MedPhantom build folder (holding ``cases.jsonl``). ``kinds``: encoder kinds to
    train (empty: every kind the model has and the build holds). ``lr`` applies to encoders and
    heads (AdamW, ``warmup_steps`` linear warm-up then cosine to 0). ``kind_weights``: share of the
    samples per kind (kinds not listed: 1; None: every case equally likely). ``dense_weight``:
    weight of the dense (where-is-it) tasks, 0 = off; ``dense_pos_weight_cap`` bounds the weight of
    the (rare) positive cells, which is otherwise negatives / positives. ``extra_data``: more MedPhantom
    builds (e.g. a volume-only one, ``medmllm phantoms --modalities ct3d``) whose cases of every split are
    added to the training cases; validation stays on ``data``'s ``eval_split``.

    Voxel loss (``voxel_weight`` > 0, for a volume encoder that returns ``aux["voxel_logits"]``, e.g.
    ``CNNVolumeEncoder(decoder=True)``): class-balanced binary cross-entropy (the lesion voxels' mean
    weighted ``voxel_lesion_weight``) + soft Dice (over the batch) between those logits and the lesion's
    voxels from the case's truth (:func:`lesion_voxels`, averaged onto the logits' grid); volumes without
    a lesion have an empty mask (see :func:`voxel_loss`).

    Contrast curriculum for 3D lesions (``lesion_boost`` > 1): each training volume's lesion is drawn
    with ``factor`` times its HU difference from its organ, ``factor`` = ``lesion_boost`` for the first
    ``lesion_boost_hold`` of the steps, then falling linearly to 1 at ``lesion_boost_until`` and 1 after
    (see :func:`boost_factor`); the lesion's voxels come from the case's truth. Validation volumes are
    never changed. Measured (README, "Where it still falls short"): a 3D U-Net probe learnt solid-organ
    lesions with it (96% held-out) and not without (54%); ``small``'s volume encoder learnt them neither way.

    Speed on CPU (2 cores, builders.small, measured): ``mixed_precision: bf16`` autocasts the
    encoders of ``bf16_kinds`` (None: all) — image 3-8x faster, volume 1.5x, signal ~1.1x, ehr
    slower (so it is left out by default); ``channels_last`` keeps 4-D (5-D: channels_last_3d) conv weights in that memory
    format while training (image/volume convolutions 1.4-5x faster; restored afterwards).
    """

    data: str
    extra_data: list[str] = dataclasses.field(default_factory=list)
    run_dir: str = "runs/encoder"
    steps: int = 300
    batch_size: int = 32
    lr: float = 4e-3
    weight_decay: float = 0.01
    warmup_steps: int = 10
    grad_clip: Optional[float] = None
    seed: int = 0
    mixed_precision: Literal["no", "bf16"] = "bf16"
    bf16_kinds: Optional[list[str]] = dataclasses.field(default_factory=lambda: ["image", "volume", "signal"])
    channels_last: bool = True
    dense_weight: float = 2.0
    dense_pos_weight_cap: float = 30.0
    voxel_weight: float = 1.0
    voxel_lesion_weight: float = VOXEL_LESION_WEIGHT
    lesion_boost: float = 1.0
    lesion_boost_hold: float = 0.4
    lesion_boost_until: float = 0.8
    ckpt_every: int = 0
    keep_last: int = 2
    log_every: int = 10
    kinds: list[str] = dataclasses.field(default_factory=list)
    kind_weights: Optional[dict[str, float]] = None
    eval_split: str = "validation"
    eval_batch_size: int = 64
    resume: bool = True
    save_heads: bool = True
    tensorboard: bool = False

    def __post_init__(self) -> None:
        for name, low in (("steps", 1), ("batch_size", 1), ("eval_batch_size", 1), ("warmup_steps", 0)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise ConfigError(f"encoder.{name}: expected an int >= {low}, got {v!r}")
        for name, low, strict in (("lr", 0.0, True), ("dense_weight", 0.0, False), ("dense_pos_weight_cap", 1.0, False),
                                  ("voxel_weight", 0.0, False), ("voxel_lesion_weight", 0.0, True)):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v < low or (strict and v == low):
                raise ConfigError(f"encoder.{name}: expected a number {'>' if strict else '>='} {low:g}, got {v!r}")
        boost = (self.lesion_boost, self.lesion_boost_hold, self.lesion_boost_until)
        if any(not isinstance(v, (int, float)) or isinstance(v, bool) for v in boost) or self.lesion_boost < 1 \
                or not 0 <= self.lesion_boost_hold <= self.lesion_boost_until <= 1:
            raise ConfigError("encoder.lesion_boost >= 1 and 0 <= lesion_boost_hold <= lesion_boost_until <= 1 "
                              f"expected, got {boost}")


# ============================================================================= feature maps
@dataclasses.dataclass(frozen=True)
class MapLayout:
    """One feature map as the dense tasks see it.

    ``source`` "stem": the output of the stem child ``module`` (dotted name inside the stem);
    "tokens": the encoder's output tokens — an image encoder's first ``rows * cols`` tokens are its
    grid cells (row-major), a slice-wise volume encoder's ``per_slice`` tokens of each slice are
    max-pooled into one. ``depth`` slices (1 for an image) of ``rows x cols`` cells of ``channels``
    features; cell ``(i, j)`` covers the input fractions ``[i / rows, (i + 1) / rows)`` x
    ``[j / cols, (j + 1) / cols)``, slice ``d`` covers ``[d / depth, (d + 1) / depth)``. Units are
    flattened depth-major, then row-major.
    """

    module: str
    channels: int
    rows: int
    cols: int
    depth: int = 1
    source: str = "stem"
    per_slice: int = 0

    @property
    def units(self) -> int:
        return self.depth * self.rows * self.cols

    def targets(self, boxes: torch.Tensor) -> torch.Tensor:
        """``boxes [N, 6]`` ``(z0, r0, c0, z1, r1, c1)`` fractions -> ``[N, units]`` float: 1 on the
        cells a box overlaps, 0 elsewhere (an empty box ``z1 <= z0`` overlaps none), NaN rows for NaN boxes."""
        def axis(n: int, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:   # [N, n]
            k = torch.arange(n, dtype=boxes.dtype, device=boxes.device)
            return (hi[:, None] > k / n) & (lo[:, None] < (k + 1) / n) & (hi > lo)[:, None]

        z = axis(self.depth, boxes[:, 0], boxes[:, 3])
        r = axis(self.rows, boxes[:, 1], boxes[:, 4])
        c = axis(self.cols, boxes[:, 2], boxes[:, 5])
        out = (z[:, :, None, None] & r[:, None, :, None] & c[:, None, None, :]).flatten(1).float()
        return out.masked_fill(torch.isnan(boxes[:, :1]), math.nan)              # [N, units]

    def flatten(self, fmap: torch.Tensor, batch: int) -> torch.Tensor:
        """Stem map ``[batch * depth, channels, rows, cols]`` (3D stems: ``[batch, channels, depth, rows,
        cols]``) or encoder tokens ``[batch, N, channels]``
        -> ``[batch, units, channels]``."""
        if self.source == "tokens":
            if self.per_slice:                                               # [B, D*k, e] -> max per slice
                return fmap[:, : self.depth * self.per_slice].reshape(
                    batch, self.depth, self.per_slice, self.channels).amax(2)
            return fmap[:, : self.units]                                     # grid cells, row-major
        if fmap.ndim == 5:                                                   # 3D map [B, C, d, r, c]
            return fmap.permute(0, 2, 3, 4, 1).reshape(batch, self.units, self.channels)
        x = fmap.reshape(batch, self.depth, self.channels, self.rows, self.cols)
        return x.permute(0, 1, 3, 4, 2).reshape(batch, self.units, self.channels)


def region_box(region: tuple[float, ...] | None) -> torch.Tensor:
    """A ``labels.case_regions`` region -> ``[6]`` box ``(z0, r0, c0, z1, r1, c1)``: 2-D boxes span
    the whole depth, ``()`` (no finding) becomes an empty box, ``None`` (n/a) NaNs."""
    if region is None:
        return torch.full((6,), math.nan)
    if not region:
        return torch.zeros(6)
    if len(region) == 4:
        r0, c0, r1, c1 = region
        return torch.tensor([0.0, r0, c0, 1.0, r1, c1])
    return torch.tensor([float(v) for v in region])


def feature_stem(encoder: nn.Module, kind: str) -> nn.Module | None:
    """The convolutional stem the dense tasks read: an image encoder's ``stem``, a slice-wise volume
    encoder's ``image_encoder.stem``, a 3D CNN volume encoder's ``stem``; None when there is none."""
    inner = encoder if kind == "image" else getattr(encoder, "image_encoder", encoder) if kind == "volume" else None
    stem = getattr(inner, "stem", None)
    return stem if isinstance(stem, nn.Module) else None


def token_layout(encoder: nn.Module, kind: str, shapes: ModalityShapes) -> MapLayout | None:
    """The output tokens as a map: a grid-cell image encoder (``grid`` attribute, ``grid**2`` (+1)
    tokens) or a slice-wise volume encoder (``k`` tokens per slice + 1); None for other encoders."""
    dim = int(getattr(encoder, "out_dim", 0))
    try:
        if kind == "image":
            g = getattr(encoder, "grid", None)
            n = encoder.num_tokens((shapes.image_channels, shapes.image_size, shapes.image_size))
            if isinstance(g, int) and g > 0 and dim and n in (g * g, g * g + 1):
                return MapLayout("", dim, g, g, source="tokens")
        grid3 = getattr(encoder, "grid", None)
        if kind == "volume" and isinstance(grid3, tuple) and len(grid3) == 3 and dim:   # 3D cells, depth-major
            n = encoder.num_tokens((shapes.volume_channels, *shapes.volume_shape))
            if n in (math.prod(grid3), math.prod(grid3) + 1):
                return MapLayout("", dim, grid3[1], grid3[2], grid3[0], source="tokens")
        if kind == "volume":
            k, depth = getattr(encoder, "k", None), int(shapes.volume_shape[0])
            if isinstance(k, int) and k > 0 and dim and encoder.num_tokens((1, *shapes.volume_shape)) == depth * k + 1:
                return MapLayout("", dim, 1, 1, depth, source="tokens", per_slice=k)
    except (InputError, ConfigError, TypeError, AttributeError):
        return None
    return None


@torch.no_grad()
def map_layouts(encoder: nn.Module, kind: str, shapes: ModalityShapes) -> list[MapLayout]:
    """The maps the dense tasks supervise, finest first: one per resolution level of the encoder's
    stem below the input's (the last child of the stem at each level; a stem without children: its
    output; found with one dummy pass in eval mode), then the output tokens (:func:`token_layout`) —
    so a finding is both detected early and carried into the tokens the LLM will read."""
    tokens = token_layout(encoder, kind, shapes)
    return _stem_layouts(encoder, kind, shapes) + ([tokens] if tokens is not None else [])


def _stem_layouts(encoder: nn.Module, kind: str, shapes: ModalityShapes) -> list[MapLayout]:
    stem = feature_stem(encoder, kind)
    if stem is None:
        return []
    inner = encoder if kind == "image" else getattr(encoder, "image_encoder", encoder)
    is_3d = kind == "volume" and inner is encoder                  # a 3D stem maps [1, C, D, H, W]
    depth, rows, cols = ((1, shapes.image_size, shapes.image_size) if kind == "image"
                         else tuple(int(n) for n in shapes.volume_shape))
    channels = int(getattr(inner, "in_channels", shapes.image_channels if kind == "image" else 1))
    full = (depth, rows, cols) if is_3d else (rows, cols)
    children = list(stem.named_children()) or [("", stem)]
    seen: dict[str, tuple] = {}
    hooks = [m.register_forward_hook(lambda mod, a, out, name=name: seen.__setitem__(name, tuple(out.shape)))
             for name, m in children]
    param = next(stem.parameters(), None)
    was = stem.training
    try:
        stem.eval()
        dummy = (1, channels, depth, rows, cols) if is_3d else (1, channels, rows, cols)
        stem(torch.zeros(dummy, device=param.device if param is not None else None))
    except (RuntimeError, InputError):
        return []
    finally:
        stem.train(was)
        for h in hooks:
            h.remove()
    last: dict[tuple[int, ...], MapLayout] = {}
    for name, _ in children:                               # in order: the last child of a level wins
        shape = seen.get(name)
        if shape is None or len(shape) != len(full) + 2 or tuple(shape[2:]) == full:
            continue
        d = int(shape[2]) if is_3d else depth
        last[tuple(shape[2:])] = MapLayout(name, int(shape[1]), int(shape[-2]), int(shape[-1]), d)
    return sorted(last.values(), key=lambda lay: -lay.units)


# ============================================================================= heads
def pool_features(features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[masked mean ; masked max]`` of ``features [B, N, D]`` over real tokens ``mask [B, N]`` -> ``[B, 2D]``.

    Rows without a real token give zeros.
    """
    return torch.cat([masked_mean(features, mask), masked_max(features, mask)], dim=-1)   # [B, 2D]


class EncoderHeads(nn.Module):
    """Per kind, one linear head per task on :func:`pool_features` of the kind's encoder output,
    and per dense task one linear head per map level (``layouts[kind]``) applied to every cell.

    ``dims``: ``{kind: D}`` (encoder ``out_dim``); ``tasks``: ``{kind: {task: n_classes}}``
    (0 = regression: one output); ``dense``: ``{kind: (task, ...)}``, kept for kinds with layouts.
    ``forward(kind, features [B, N, D], mask [B, N], cells)`` with ``cells``: one ``[B, U_l, C_l]``
    per level (or None) returns ``{task: [B, n_classes]}`` (``[B, 1]`` for regression) plus
    ``{dense task: [[B, U_l] per level]}`` logits.
    """

    def __init__(self, dims: dict[str, int], tasks: dict[str, dict[str, int]],
                 dense: dict[str, Sequence[str]] | None = None, layouts: dict[str, list[MapLayout]] | None = None):
        super().__init__()
        missing = sorted(set(dims) - set(tasks))
        if missing:
            raise ConfigError(f"EncoderHeads: no tasks for kinds {missing}; tasks cover {sorted(tasks)}")
        self.tasks = {k: dict(tasks[k]) for k in dims}
        self.layouts = {k: list(v) for k, v in (layouts or {}).items() if k in dims and v and (dense or {}).get(k)}
        self.dense = {k: tuple(dense[k]) for k in self.layouts}                  # type: ignore[index]
        self.heads = nn.ModuleDict({
            kind: nn.ModuleDict({t: nn.Linear(2 * int(d), n if n > 0 else 1) for t, n in self.tasks[kind].items()})
            for kind, d in dims.items()})
        self.dense_heads = nn.ModuleDict({
            kind: nn.ModuleDict({t: nn.ModuleList(nn.Linear(lay.channels, 1) for lay in self.layouts[kind])
                                 for t in names})
            for kind, names in self.dense.items()})

    def forward(self, kind: str, features: torch.Tensor, mask: torch.Tensor,
                cells: Sequence[torch.Tensor] | None = None) -> dict:
        pooled = pool_features(features, mask)                             # [B, 2D]
        out: dict = {t: head(pooled) for t, head in self.heads[kind].items()}   # {task: [B, n]}
        if cells is not None and kind in self.dense_heads:
            for t, per_level in self.dense_heads[kind].items():
                out[t] = [head(c)[..., 0] for head, c in zip(per_level, cells)]  # [[B, U_l] per level]
        return out


def encode(encoder: nn.Module, kind: str, x: torch.Tensor):
    """Run one encoder the way :class:`MedMLLM` does: ehr ``[B, F, 2]`` -> values + missing flags."""
    if kind == "ehr" and x.ndim == 3 and x.shape[-1] == 2:
        return encoder(x[..., 0], missing=x[..., 1] > 0.5)
    return encoder(x)


VOXEL_KEY = "voxel_logits"   # an encoder's aux output the voxel loss reads


class _StageModule(nn.Module):
    """What the loop trains: the model's encoders (shared, not copied) + the heads. Outputs: the heads'
    ``{kind: {task: logits}}``, plus ``VOXEL_KEY`` for an encoder that gives voxel logits.

    The encoders of ``bf16_kinds`` run under bf16 autocast; the heads always run in float32. For the
    kinds with dense heads, forward hooks on the stem levels keep their maps for the heads; call
    :meth:`close` to remove the hooks.
    """

    def __init__(self, encoders: dict[str, nn.Module], heads: EncoderHeads, bf16_kinds: Sequence[str] = ()):
        super().__init__()
        self.encoders = nn.ModuleDict(encoders)
        self.heads = heads
        self.bf16_kinds = set(bf16_kinds)
        self._maps: dict[tuple[str, int], torch.Tensor] = {}
        self._hooks = []
        for kind, layouts in heads.layouts.items():
            stem = feature_stem(self.encoders[kind], kind)
            for i, lay in enumerate(layouts):
                if lay.source != "stem":
                    continue
                module = stem.get_submodule(lay.module) if lay.module else stem
                self._hooks.append(module.register_forward_hook(self._keeper((kind, i))))

    def _keeper(self, key: tuple[str, int]):
        def keep(module, args, output):
            self._maps[key] = output
        return keep

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks, self._maps = [], {}

    def forward(self, inputs: dict[str, torch.Tensor]) -> dict[str, dict]:
        out = {}
        for kind, x in inputs.items():
            self._maps.clear()
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=kind in self.bf16_kinds):
                enc = encode(self.encoders[kind], kind, x)                 # features [N_k, T, D]
            cells = None
            if kind in self.heads.layouts:                                 # maps -> [N_k, U_l, C_l]
                cells = [lay.flatten((enc.features if lay.source == "tokens" else self._maps.pop((kind, i))).float(),
                                     x.shape[0]) for i, lay in enumerate(self.heads.layouts[kind])]
            with torch.autocast(x.device.type, enabled=False):
                out[kind] = self.heads(kind, enc.features.float(), enc.mask, cells)
            if VOXEL_KEY in enc.aux:
                out[kind][VOXEL_KEY] = enc.aux[VOXEL_KEY]                   # [N_k, 1, d, h, w]
        return out


# ============================================================================= data
@dataclasses.dataclass
class StageItem:
    """One case ready for training: its kind, input tensor, label row ``[T_k]`` (NaN = n/a),
    one finding box per dense task ``[R_k, 6]`` (see :func:`region_box`; ``[0, 6]`` when none) and,
    for a volume with a lesion, ``boost``: what one more lesion HU delta adds to ``tensor`` (see
    :func:`lesion_boost_map`; None otherwise)."""

    case_id: str
    kind: str
    tensor: torch.Tensor
    labels: torch.Tensor
    boxes: torch.Tensor = dataclasses.field(default_factory=lambda: torch.zeros(0, 6))
    boost: Optional[torch.Tensor] = None
    voxels: Optional[torch.Tensor] = None


def lesion_voxels(case: dict, tensor_shape: Sequence[int]) -> torch.Tensor | None:
    """For a MedPhantom CT volume: ``[1, D, H, W]`` float in [0, 1], the part of each voxel of the loaded
    tensor (``tensor_shape`` ``[C, D, H, W]``) inside the lesion sphere of the case's truth
    (:func:`medmllm.data.phantoms.volume.lesion_mask`, resampled trilinearly when the grids differ); all
    zeros when the truth says there is no lesion; None for cases without a lesion truth (not ct3d)."""
    from medmllm.data.phantoms.volume import lesion_mask

    truth = case.get("truth") or {}
    lesion = (truth.get("findings") or {}).get("lesion")
    if case.get("modality") != "ct3d" or not isinstance(lesion, dict):
        return None
    grid = tuple(int(n) for n in tensor_shape[1:])
    if not lesion.get("present"):
        return torch.zeros((1, *grid))
    try:
        mask = lesion_mask(truth["shape"], truth["spacing_mm"], lesion["center_dhw"], float(lesion["diameter_mm"]) / 2)
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"{case.get('case_id', '<case>')}.truth",
                         f"expected the lesion's center_dhw, diameter_mm, shape and spacing_mm: {exc!r}") from None
    m = torch.from_numpy(mask.astype("float32"))[None, None]                          # [1, 1, D0, H0, W0]
    if tuple(m.shape[2:]) != grid:
        m = F.interpolate(m, size=grid, mode="trilinear", align_corners=False)
    return m[0]                                                                       # [1, D, H, W]


def lesion_boost_map(case: dict, part: dict, tensor_shape: Sequence[int], shapes: ModalityShapes) -> torch.Tensor | None:
    """For a MedPhantom CT volume with a lesion: ``[C, D, H, W]`` float, the change of the loaded tensor
    (``tensor_shape``, windowed as :class:`PartLoader` windows it) when the lesion's HU difference from
    its organ is added once more: ``hu_delta * mask * window slope`` per channel, the mask (the lesion
    sphere, :func:`lesion_voxels`) on the tensor's grid. Exact for voxels inside every window; a caller
    clamps to [0, 1]. None for other cases."""
    import numpy as np

    from medmllm.data.preprocess import CT_WINDOWS, window_preset

    truth = case.get("truth") or {}
    lesion = (truth.get("findings") or {}).get("lesion") or {}
    if case.get("modality") != "ct3d" or not lesion.get("present"):
        return None
    try:
        delta = float(lesion["hu_delta"])
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"{case.get('case_id', '<case>')}.truth", f"expected the lesion's hu_delta: {exc!r}") from None
    voxels = lesion_voxels(case, tensor_shape)                                         # [1, D, H, W]
    window = (part.get("options") or {}).get("window") or shapes.volume_window
    names = list(shapes.volume_windows) if window == "multi" else [window]
    # the window's slope (output per HU) where it is linear: 1 / (width - 1) for the DICOM 'linear' function
    slopes = torch.tensor([float(np.diff(window_preset(np.array([c, c + 1.0]), n))[0])
                           for n in names for c in [CT_WINDOWS.get(n)[0]]], dtype=torch.float32)
    return (delta * slopes)[:, None, None, None] * voxels                              # [C, D, H, W]


def boost_factor(step: int, total: int, boost: float, hold: float, until: float) -> float:
    """The contrast curriculum's factor at ``step`` (0-based) of ``total``: ``boost`` while
    ``step < hold * total``, then linear down to 1 at ``until * total``, then 1."""
    if boost <= 1:
        return 1.0
    start, end = hold * total, until * total
    if step < start:
        return float(boost)
    if step >= end or end <= start:
        return 1.0
    return float(boost) - (float(boost) - 1.0) * (step - start) / (end - start)


def read_cases(build_dir: str | Path) -> list[dict]:
    """Every case of a MedPhantom build (``cases.jsonl``); InputError when it is missing."""
    path = Path(build_dir) / "cases.jsonl"
    if not path.is_file():
        raise InputError(path, "expected the cases.jsonl of a MedPhantom build (medmllm phantoms --out DIR)")
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def load_items(build_dir: str | Path, cases: Sequence[dict], kinds: Sequence[str], loader: PartLoader,
               dense_kinds: Sequence[str] = (), boost: bool = False, voxels: bool = False) -> list[StageItem]:
    """Load each case of ``kinds`` once (its record part through ``loader``) with its labels,
    finding boxes for ``dense_kinds``, with ``boost`` each lesion volume's :func:`lesion_boost_map`
    and with ``voxels`` each CT volume's :func:`lesion_voxels` (kept as uint8 at 1/255 steps).
    A case whose file cannot be read is skipped (warning)."""
    from medmllm.data.phantoms.labels import LABEL_TASKS, REGION_TASKS, case_kind, case_labels, case_part, \
        case_regions

    items = []
    for case in cases:
        if case_kind(case) not in kinds:
            continue
        kind, labels = case_labels(case)
        part = case_part(case)
        try:
            tensor, _ = loader(part, build_dir)
        except InputError as exc:
            log.warning("encoder stage: skipping %s: %s", case.get("case_id"), exc)
            continue
        row = torch.tensor([math.nan if labels[t] is None else float(labels[t]) for t in LABEL_TASKS[kind]])
        item = StageItem(case["case_id"], kind, tensor, row)
        if kind in dense_kinds and REGION_TASKS.get(kind):
            regions = case_regions(case)[1]
            item.boxes = torch.stack([region_box(regions[t]) for t in REGION_TASKS[kind]])   # [R, 6]
        if boost and kind == "volume":
            item.boost = lesion_boost_map(case, part, tuple(tensor.shape), loader.shapes)
        if voxels and kind == "volume":
            v = lesion_voxels(case, tuple(tensor.shape))
            item.voxels = None if v is None else (v * 255).round().to(torch.uint8)   # 4x smaller than float
        items.append(item)
    return items


def collate(items: Sequence[StageItem]) -> dict:
    """Items -> ``{"index": [B], "inputs": {kind: [N_k, ...]}, "labels": {kind: [N_k, T_k]},
    "boxes": {kind: [N_k, R_k, 6]}, "boost": {kind: [N_k, ...]}, "voxels": {kind: [N_k, 1, D, H, W]}}``
    (kinds in first-seen order; boxes only for kinds that have them; boost only for kinds where an item
    has one, zeros for the others; voxels (float in [0, 1]) only for kinds where an item has them, NaN
    for the others; ``index`` is the item's position in the batch)."""
    by_kind: dict[str, list[StageItem]] = {}
    for it in items:
        by_kind.setdefault(it.kind, []).append(it)
    return {"index": torch.arange(len(items)),
            "inputs": {k: torch.stack([it.tensor for it in group]) for k, group in by_kind.items()},
            "labels": {k: torch.stack([it.labels for it in group]) for k, group in by_kind.items()},
            "boxes": {k: torch.stack([it.boxes for it in group]) for k, group in by_kind.items()
                      if group[0].boxes.numel()},
            "boost": {k: torch.stack([it.boost if it.boost is not None else torch.zeros_like(it.tensor) for it in group])
                      for k, group in by_kind.items() if any(it.boost is not None for it in group)},
            "voxels": {k: torch.stack([it.voxels.float() / 255 if it.voxels is not None
                                       else torch.full((1, *it.tensor.shape[1:]), math.nan) for it in group])
                       for k, group in by_kind.items() if any(it.voxels is not None for it in group)}}


class _ListDataset(torch.utils.data.Dataset):
    def __init__(self, items: list):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


# ============================================================================= loss
def task_losses(outputs: dict[str, dict], labels: dict[str, torch.Tensor],
                tasks: dict[str, dict[str, int]]) -> dict[str, dict[str, torch.Tensor]]:
    """``{kind: {task: loss}}`` over the items whose label is not NaN (tasks with none are left out).

    Classification: cross-entropy of the class index; regression: Huber (delta 1) on the scaled value.
    """
    out: dict[str, dict[str, torch.Tensor]] = {}
    for kind, logits in outputs.items():
        y = labels[kind]                                                     # [N_k, T_k]
        for j, (task, n) in enumerate(tasks[kind].items()):
            valid = ~torch.isnan(y[:, j])                                    # [N_k]
            if not bool(valid.any()):
                continue
            pred, target = logits[task][valid].float(), y[valid, j]
            loss = (F.cross_entropy(pred, target.long()) if n > 0
                    else F.huber_loss(pred[:, 0], target.to(pred.dtype), delta=1.0))
            out.setdefault(kind, {})[task] = loss
    return out


def dense_losses(outputs: dict[str, dict], boxes: dict[str, torch.Tensor], heads: EncoderHeads,
                 pos_weight: dict[str, dict[str, list[float]]] | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """``{kind: {dense task: mean over levels of binary cross-entropy}}`` over the items whose box is
    not NaN; positive cells of level ``l`` weighted by ``pos_weight[kind][task][l]`` (default 1)."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for kind, names in heads.dense.items():
        if kind not in outputs or kind not in boxes:
            continue
        for j, task in enumerate(names):
            b = boxes[kind][:, j]                                            # [N_k, 6]
            valid = ~torch.isnan(b[:, 0])
            if not bool(valid.any()):
                continue
            weights = ((pos_weight or {}).get(kind) or {}).get(task) or [1.0] * len(heads.layouts[kind])
            levels = [F.binary_cross_entropy_with_logits(
                logits[valid].float(), lay.targets(b[valid]), pos_weight=torch.tensor(w, device=b.device))
                for lay, logits, w in zip(heads.layouts[kind], outputs[kind][task], weights)]
            out.setdefault(kind, {})[task] = torch.stack(levels).mean()
    return out


def dense_pos_weights(items: Sequence[StageItem], heads: EncoderHeads, cap: float = 30.0,
                      ) -> dict[str, dict[str, list[float]]]:
    """Per kind, dense task and level: negatives / positives over the labelled cells of ``items``,
    clipped to ``[1, cap]`` (a nodule fills ~1 of 500 cells of a 16 x 16 map on half the radiographs)."""
    out: dict[str, dict[str, list[float]]] = {}
    for kind, names in heads.dense.items():
        rows = [it.boxes for it in items if it.kind == kind and it.boxes.numel()]
        if not rows:
            continue
        boxes = torch.stack(rows)                                            # [N, R, 6]
        for j, task in enumerate(names):
            b = boxes[:, j][~torch.isnan(boxes[:, j, 0])]                     # [N', 6]
            weights = []
            for lay in heads.layouts[kind]:
                pos = sum(float(lay.targets(chunk).sum()) for chunk in b.split(64))
                neg = float(len(b) * lay.units) - pos
                weights.append(round(min(cap, max(1.0, neg / pos)) if pos else 1.0, 3))
            out.setdefault(kind, {})[task] = weights
    return out


def voxel_loss(logits: torch.Tensor, voxels: torch.Tensor,
               lesion_weight: float = VOXEL_LESION_WEIGHT) -> torch.Tensor | None:
    """Class-balanced binary cross-entropy + soft Dice between ``logits [N, 1, d, h, w]`` and the lesion
    part of each voxel ``voxels [N, 1, D, H, W]`` (NaN rows: n/a, left out), averaged onto the logits' grid.

    The cross-entropy is ``lesion_weight`` times the mean over lesion voxels plus the mean over the other
    voxels, each voxel weighted by its (soft) target ``t`` and ``1 - t``:
    ``-w sum(t log p) / sum(t) - sum((1-t) log(1-p)) / sum(1-t)`` (a batch without a lesion voxel has the
    second term only). Why: with the plain mean a lesion voxel weighs ~1/1000 of the batch; once the
    background was confidently negative (logits -20 and below) the Dice's gradient vanished there too, and
    a probe's decoder never learnt kidney lesions, not even on its training volumes. With the two means at
    equal weight it learnt them (voxel AUC 0.83 -> 0.97) but every lesion-free volume had a voxel above
    p = 0.95; at ``lesion_weight`` 0.1 the AUC was 1.0 and 0.5 the right threshold (README, "Where it
    still falls short"). Dice is taken over the whole batch (volumes without a lesion add only to its
    false positives), with 1 added to numerator and denominator. None when no row is labelled."""
    valid = ~torch.isnan(voxels.flatten(1)[:, 0])                            # [N]
    if not bool(valid.any()):
        return None
    x = logits[valid].float()
    target = F.adaptive_avg_pool3d(voxels[valid].to(x), x.shape[2:])         # [N', 1, d, h, w]
    pos = -(target * F.logsigmoid(x)).sum() / target.sum().clamp_min(1e-6)                # 0 without lesion voxels
    neg = -((1 - target) * F.logsigmoid(-x)).sum() / (1 - target).sum().clamp_min(1e-6)
    p = torch.sigmoid(x)
    dice = 1 - (2 * (p * target).sum() + 1) / (p.sum() + target.sum() + 1)
    return lesion_weight * pos + neg + dice


def boosted(inputs: dict[str, torch.Tensor], boost: dict[str, torch.Tensor], factor: float) -> dict:
    """``inputs`` with ``(factor - 1) * boost[kind]`` added and clamped to [0, 1] for the kinds in ``boost``
    (the lesion drawn at ``factor`` times its contrast); unchanged when ``factor`` is 1."""
    if factor == 1.0 or not boost:
        return inputs
    return {k: (x + (factor - 1.0) * boost[k].to(x)).clamp(0.0, 1.0) if k in boost else x for k, x in inputs.items()}


def make_stage_loss(dense_weight: float, pos_weight: dict | None = None, factor=lambda: 1.0,
                    voxel_weight: float = 0.0, voxel_lesion_weight: float = VOXEL_LESION_WEIGHT):
    """The loop's loss: per kind present, mean task loss + ``dense_weight`` * mean dense loss
    + ``voxel_weight`` * :func:`voxel_loss` (kinds whose encoder gives voxel logits; its ``lesion_weight``
    is ``voxel_lesion_weight``); summed over kinds.
    Per-kind values are returned as ``loss_<kind>`` for every kind of the heads (the loop wants the same
    keys each step): 0 on a batch without that kind. ``factor()``: the contrast
    curriculum's factor for this step (see :func:`boosted`)."""

    def stage_loss(module: _StageModule, batch: dict) -> dict:
        outputs = module(boosted(batch["inputs"], batch.get("boost") or {}, factor()))
        per_task = task_losses(outputs, batch["labels"], module.heads.tasks)
        per_dense = dense_losses(outputs, batch.get("boxes") or {}, module.heads, pos_weight) if dense_weight else {}
        per_kind = {}
        for kind in outputs:
            parts = []
            if per_task.get(kind):
                parts.append(torch.stack(list(per_task[kind].values())).mean())
            if per_dense.get(kind):
                parts.append(dense_weight * torch.stack(list(per_dense[kind].values())).mean())
            if voxel_weight and VOXEL_KEY in outputs[kind] and kind in (batch.get("voxels") or {}):
                vl = voxel_loss(outputs[kind][VOXEL_KEY], batch["voxels"][kind], voxel_lesion_weight)
                if vl is not None:
                    parts.append(voxel_weight * vl)
            if parts:
                per_kind[kind] = torch.stack(parts).sum()
        if not per_kind:
            raise InputError("encoder batch", "expected at least one labelled item, got none")
        total = torch.stack(list(per_kind.values())).sum()
        zero = total.detach() * 0
        return {"loss": total, **{f"loss_{k}": per_kind[k].detach() if k in per_kind else zero
                                  for k in module.heads.tasks}}

    return stage_loss


# ============================================================================= evaluation
class _Scores:
    """Running sums of a metric per (kind, task)."""

    def __init__(self):
        self.sums: dict[tuple[str, str], float] = {}
        self.counts: dict[tuple[str, str], int] = {}
        self.by_class: dict[tuple[str, str, int], list[int]] = {}   # (kind, task, class) -> [hits, n]

    def add_class(self, kind: str, task: str, label: int, hits: int, n: int) -> None:
        if n:
            acc = self.by_class.setdefault((kind, task, label), [0, 0])
            acc[0], acc[1] = acc[0] + hits, acc[1] + n

    def class_recall(self, class_names: dict) -> dict:
        """``{kind: {task: {class name: recall}}}`` over the labelled items of each class (names from
        ``class_names[kind][task]``, else the class index)."""
        out: dict = {}
        for (kind, task, label), (hits, n) in sorted(self.by_class.items()):
            names = (class_names.get(kind) or {}).get(task) or ()
            name = names[label] if label < len(names) else str(label)
            out.setdefault(kind, {}).setdefault(task, {})[name] = round(hits / n, 4)
        return out

    def add(self, kind: str, task: str, total: float, n: int) -> None:
        if n:
            self.sums[(kind, task)] = self.sums.get((kind, task), 0.0) + total
            self.counts[(kind, task)] = self.counts.get((kind, task), 0) + n

    def result(self) -> tuple[dict, dict]:
        metrics: dict[str, dict[str, float]] = {}
        ns: dict[str, dict[str, int]] = {}
        for (kind, task), n in self.counts.items():
            metrics.setdefault(kind, {})[task] = round(self.sums[(kind, task)] / n, 4)
            ns.setdefault(kind, {})[task] = n
        return metrics, ns


def _score_batch(scores: _Scores, heads: EncoderHeads, outputs: dict, batch: dict) -> None:
    from medmllm.data.phantoms.labels import REGRESSION_SCALES

    for kind, logits in outputs.items():
        y = batch["labels"][kind]
        for j, (task, n) in enumerate(heads.tasks[kind].items()):
            valid = ~torch.isnan(y[:, j])
            pred = logits[task].float().cpu()[valid]
            if n > 0:
                gold = y[valid, j].long()
                hit = pred.argmax(-1) == gold
                total = hit.sum().item()
                for c in gold.unique().tolist():
                    scores.add_class(kind, task, int(c), int(hit[gold == c].sum()), int((gold == c).sum()))
            else:
                scale = REGRESSION_SCALES.get((kind, task), (0.0, 1.0))[1]
                total = ((pred[:, 0] - y[valid, j]).abs() * scale).sum().item()
            scores.add(kind, task, total, int(valid.sum()))
        for j, task in enumerate(heads.dense.get(kind, ())):
            target = heads.layouts[kind][-1].targets(batch["boxes"][kind][:, j]).nan_to_num(0.0)  # last map
            has = target.amax(-1) > 0                                          # items holding the finding
            best = logits[task][-1].float().cpu().argmax(-1)                   # [N_k]
            found = target.gather(1, best[:, None])[:, 0] > 0
            scores.add(kind, task, float((found & has).sum()), int(has.sum()))


@torch.no_grad()
def evaluate_heads(module: _StageModule, items: Sequence[StageItem], batch_size: int = 64,
                   device: torch.device | str = "cpu") -> tuple[dict, dict, dict]:
    """Score the heads on ``items`` -> ``({kind: {task: metric}}, {kind: {task: n}},
    {kind: {task: {class name: recall}}})``.

    Metric: accuracy (fraction) for classification, mean absolute error in the value's units
    (e.g. bpm) for regression, and for a dense task the fraction of items holding the finding whose
    highest-scoring cell of the last map (the output tokens, where the encoder has a token layout)
    overlaps it; tasks with no labelled item are left out. The recall of each class of a
    classification task shows what an accuracy hides (a head that always answers "no" on a task
    that is 70% "no").
    Runs in eval mode (BatchNorm running statistics), restored afterwards.
    """
    was = module.training
    module.eval()
    scores = _Scores()
    try:
        for start in range(0, len(items), batch_size):
            batch = collate(items[start:start + batch_size])
            outputs = module({k: v.to(device) for k, v in batch["inputs"].items()})
            _score_batch(scores, module.heads, outputs, batch)
    finally:
        module.train(was)
    from medmllm.data.phantoms.labels import LABEL_CLASSES

    return (*scores.result(), scores.class_recall(LABEL_CLASSES))


# ============================================================================= the stage
def _stage_kinds(model, cases: list[dict], wanted: Sequence[str]) -> list[str]:
    from medmllm.data.phantoms.labels import LABEL_TASKS, case_kind

    present = {case_kind(c) for c in cases}
    if wanted:
        bad = sorted(set(wanted) - set(model.encoders))
        if bad:
            raise ConfigError(f"encoder.kinds: {bad} not among the model's encoders {sorted(model.encoders)}")
        unlabelled = sorted(set(wanted) - set(LABEL_TASKS))
        if unlabelled:
            raise ConfigError(f"encoder.kinds: no label tasks for {unlabelled}; known {sorted(LABEL_TASKS)}")
        kinds = [k for k in model.encoders if k in set(wanted)]
    else:
        kinds = [k for k in model.encoders if k in LABEL_TASKS and k in present]
    if not kinds:
        raise ConfigError(f"encoder stage: nothing to train: model encoders {sorted(model.encoders)}, "
                          f"kinds in the build {sorted(present)}, asked for {list(wanted) or 'all'}")
    return kinds


def _training_set(items: list[StageItem], kinds: list[str], weights: dict | None, seed: int):
    """Training items as a dataset: uniform over items, or a MixtureDataset with per-kind weights."""
    from medmllm.train.engine import MixtureDataset

    if weights is None:
        return _ListDataset(items)
    unknown = sorted(set(weights) - set(kinds))
    if unknown:
        raise ConfigError(f"encoder.kind_weights: {unknown} are not trained kinds {kinds}")
    parts = [[it for it in items if it.kind == k] for k in kinds]
    present = [k for k, p in zip(kinds, parts) if p]
    return MixtureDataset([_ListDataset(p) for p in parts if p], [float(weights.get(k, 1.0)) for k in present],
                          seed=seed, num_samples=len(items))


def _schedule(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _save_heads(run_dir: Path, heads: EncoderHeads, result: dict) -> None:
    from medmllm.data.phantoms.labels import LABEL_CLASSES
    from medmllm.io import write_json
    from medmllm.train.checkpoint import save_weights

    save_weights({k: v.detach().cpu() for k, v in heads.state_dict().items()}, run_dir / "heads.safetensors")
    classes = {k: {t: LABEL_CLASSES.get(k, {}).get(t) for t in tasks} for k, tasks in heads.tasks.items()}
    write_json(run_dir / "heads.json", {
        "tasks": heads.tasks, "classes": classes, "dense": heads.dense,
        "layouts": {k: [dataclasses.asdict(lay) for lay in v] for k, v in heads.layouts.items()},
        "input": "tasks: [masked mean ; masked max] of the encoder tokens; dense: each cell of a stem map"})
    write_json(run_dir / "encoder_stage.json", result)


def train_encoders(model, build_dir: str | Path, cfg: EncoderStageConfig, *,
                   shapes: ModalityShapes | None = None, progress: bool = True) -> dict:
    """Train ``model.encoders`` with supervised heads on a MedPhantom build (see module doc).

    ``model``: a :class:`MedMLLM` (anything with ``.encoders``: ``{kind: module}``). Its encoders
    of the trained kinds are updated in place (their ``requires_grad`` flags, train/eval mode,
    device and memory format are restored afterwards, the stage's hooks removed); nothing else in
    the model changes. With ``cfg.resume`` a run directory holding checkpoints is continued.
    ``shapes`` must be the ones the later stages load with (None: what the encoders fix, see
    :func:`medmllm.model.inspect.modality_shapes_for`, as the SFT stages and evaluation use). Returns ``{"val": {kind: {task:
    accuracy | MAE | hit rate}}, "val_n": {kind: {task: count}}, "val_class_recall": {kind: {task: {class:
    recall}}}, "kinds", "train_cases", "steps",
    "final_loss", "train_seconds", "load_seconds", "samples_per_s", "run_dir"}``.
    """
    from medmllm.data.phantoms.labels import LABEL_TASKS, REGION_TASKS
    from medmllm.train.engine import seed_everything

    t0 = time.perf_counter()
    if shapes is None:
        from medmllm.model.inspect import modality_shapes_for

        shapes = modality_shapes_for(model)
    cases = read_cases(build_dir)
    extra = [(d, read_cases(d)) for d in cfg.extra_data]     # a missing extra build fails before loading
    kinds = _stage_kinds(model, cases, cfg.kinds)
    layouts = {k: lays for k in kinds if cfg.dense_weight and k in REGION_TASKS
               for lays in [map_layouts(model.encoders[k], k, shapes)] if lays}
    loader = PartLoader(shapes, cache_items=0)   # each case is read once and kept as a tensor
    options = dict(dense_kinds=list(layouts), boost=cfg.lesion_boost > 1, voxels=cfg.voxel_weight > 0)
    train = load_items(build_dir, [c for c in cases if c.get("split") == "train"], kinds, loader, **options)
    for extra_dir, extra_cases in extra:
        train += load_items(extra_dir, extra_cases, kinds, loader, **options)
    val = load_items(build_dir, [c for c in cases if c.get("split") == cfg.eval_split], kinds, loader, list(layouts))
    if not train:
        raise InputError(Path(build_dir) / "cases.jsonl", f"expected train-split cases of kinds {kinds}, found none")
    load_seconds = time.perf_counter() - t0
    log.info("encoder stage: %d train / %d %s cases of %s loaded in %.1f s (dense tasks for %s)", len(train),
             len(val), cfg.eval_split, kinds, load_seconds, sorted(layouts))

    seed_everything(cfg.seed)
    heads = EncoderHeads({k: int(model.encoders[k].out_dim) for k in kinds}, {k: LABEL_TASKS[k] for k in kinds},
                         dense={k: REGION_TASKS[k] for k in layouts}, layouts=layouts)
    bf16 = [k for k in kinds if cfg.bf16_kinds is None or k in cfg.bf16_kinds] if cfg.mixed_precision == "bf16" else []
    module = _StageModule({k: model.encoders[k] for k in kinds}, heads, bf16)
    flags = {n: p.requires_grad for n, p in module.encoders.named_parameters()}
    modes = {k: model.encoders[k].training for k in kinds}
    devices = {k: next(model.encoders[k].parameters()).device for k in kinds}
    module.requires_grad_(True)
    if cfg.channels_last:
        for param in module.parameters():              # conv weights only; same Parameter objects
            if param.ndim in (4, 5):
                param.data = param.data.contiguous(
                    memory_format=torch.channels_last if param.ndim == 4 else torch.channels_last_3d)
    try:
        result = _run(module, train, val, kinds, cfg, progress)
    finally:
        module.close()
        for n, p in module.encoders.named_parameters():
            p.requires_grad_(flags[n])
        for k in kinds:
            model.encoders[k].train(modes[k]).to(devices[k], memory_format=torch.contiguous_format)
    result["load_seconds"] = round(load_seconds, 2)
    if cfg.save_heads:
        _save_heads(Path(cfg.run_dir), heads, result)
    return result


def _run(module: _StageModule, train: list[StageItem], val: list[StageItem], kinds: list[str],
         cfg: EncoderStageConfig, progress: bool) -> dict:
    """Train on ``train`` with :class:`TrainLoop`, then score on ``val``."""
    from medmllm.train.engine import RandomBatchSampler, TrainLoop, make_accelerator, make_loader_factory

    acc = make_accelerator("no")  # autocast per kind inside _StageModule instead
    dataset = _training_set(train, kinds, cfg.kind_weights, cfg.seed)
    sampler = RandomBatchSampler(len(dataset), min(cfg.batch_size, len(dataset)), seed=cfg.seed,
                                 num_replicas=acc.num_processes, rank=acc.process_index)
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=cfg.lr,
                                  weight_decay=cfg.weight_decay)
    scheduler = _schedule(optimizer, cfg.warmup_steps, cfg.steps)
    pos_weight = dense_pos_weights(train, module.heads, cfg.dense_pos_weight_cap)
    factor = lambda: boost_factor(loop.step, cfg.steps, cfg.lesion_boost, cfg.lesion_boost_hold,  # noqa: E731
                                  cfg.lesion_boost_until)          # read when the loss runs: the loop's step
    loop = TrainLoop(module, optimizer, scheduler, make_loader_factory(dataset, sampler, collate),
                     make_stage_loss(cfg.dense_weight, pos_weight, factor, cfg.voxel_weight, cfg.voxel_lesion_weight), run_dir=cfg.run_dir, max_steps=cfg.steps,
                     log_every=cfg.log_every, ckpt_every=cfg.ckpt_every, keep_last=cfg.keep_last, mixed_precision="no",
                     grad_clip=cfg.grad_clip, seed=cfg.seed, tensorboard=cfg.tensorboard, accelerator=acc, config=cfg,
                     progress=progress)
    if cfg.resume:
        loop.resume("latest")
    start_step = loop.step
    t0 = time.perf_counter()
    out = loop.run()
    train_seconds = time.perf_counter() - t0
    metrics, counts, recall = evaluate_heads(acc.unwrap_model(loop.model), val, cfg.eval_batch_size, device=acc.device)
    return {"val": metrics, "val_n": counts, "val_class_recall": recall, "kinds": kinds, "train_cases": len(train),
            "steps": out["step"], "final_loss": out["loss"], "train_seconds": round(train_seconds, 2),
            "samples_per_s": round((out["step"] - start_step) * sampler.global_batch_size / max(train_seconds, 1e-9), 2),
            "dense_pos_weight": pos_weight, "run_dir": str(cfg.run_dir)}


# ============================================================================= the recipe
@dataclasses.dataclass
class EncoderRecipe(EncoderStageConfig):
    """``medmllm train recipes/encoder.yaml``: :class:`EncoderStageConfig` plus ``stage: encoder`` and the
    ``model`` to adapt (``{path: a saved medmllm model}`` or ``{builder: small}``, as the SFT recipes)."""

    stage: str = "encoder"
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.stage != "encoder":
            raise ConfigError(f"stage: expected 'encoder' for this recipe, got {self.stage!r}")


def save_encoder_run(model, tokenizer, run_dir: str | Path, metrics: dict) -> Path:
    """Save the model and tokenizer to ``run_dir/model`` and ``metrics`` to ``run_dir/encoder_metrics.json``;
    returns the model folder (the recipe and the quickstart lay a run out the same way)."""
    from medmllm.io import write_json

    out = Path(run_dir) / "model"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    write_json(Path(run_dir) / "encoder_metrics.json", metrics)
    return out


def run_from_config(recipe, overrides: Sequence[str] = (), progress: bool = True) -> dict:
    """Setup -> train -> save: the encoder stage from a recipe YAML (or mapping) with ``key=value`` overrides.

    The model (``model.path`` or ``model.builder``) is loaded, its encoders are trained by
    :func:`train_encoders` on the MedPhantom build at ``data``, and the whole model (the LLM and
    projectors unchanged) is saved with its tokenizer to ``run_dir/model``, ready for
    ``recipes/alignment.yaml model.path=RUN_DIR/model``. The head scores go to
    ``run_dir/encoder_metrics.json``. Config errors (unknown key, missing build) stop it before any training.
    """
    from medmllm.config import load_config
    from medmllm.train.sft import load_model

    cfg = load_config(recipe, overrides, schema=EncoderRecipe)
    model, tokenizer = load_model(cfg.model)
    metrics = train_encoders(model, cfg.data, cfg, progress=progress)     # a missing build fails first thing
    out = save_encoder_run(model, tokenizer, cfg.run_dir, metrics)
    return {"stage": "encoder", "model": str(out), "steps": metrics["steps"], "final_loss": metrics["final_loss"],
            "samples_per_s": metrics["samples_per_s"], "val": metrics["val"],
            "val_class_recall": metrics["val_class_recall"]}


__all__ = ["EncoderHeads", "EncoderRecipe", "EncoderStageConfig", "MapLayout", "StageItem", "boost_factor", "boosted",
           "collate", "dense_losses", "dense_pos_weights", "encode", "evaluate_heads", "feature_stem",
           "lesion_boost_map", "lesion_voxels", "load_items", "make_stage_loss",
           "map_layouts", "pool_features", "read_cases", "region_box", "run_from_config", "save_encoder_run",
           "task_losses", "token_layout", "train_encoders", "voxel_loss"]

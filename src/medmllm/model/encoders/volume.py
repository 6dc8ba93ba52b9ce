"""3D volume encoders: a 3D patch ViT, or any 2D image encoder applied slice by slice.

Input ``[B, C, D, H, W]`` (D = slices), output tokens ``[B, N, out_dim]``.

- :class:`VolumePatchViT`: ``N = (D // pd) * (H // ph) * (W // pw)`` (one token per 3D patch).
- :class:`SliceEncoder3D`: ``N = D * k + 1`` (``k`` tokens per slice, weighted by the slice's
  question-guided score, then one score-weighted global token).
- :class:`CNNVolumeEncoder`: ``N = gd * g * g + 1`` (a full-resolution 3D CNN max-pooled to a
  grid of cells, plus the max over the whole volume): small lesions survive, few tokens.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from medmllm.errors import ConfigError, InputError
from medmllm.model.encoders.base import (EncoderOutput, ModalityEncoder, check_input, full_mask,
                                         masked_mean, trailing, transformer_encoder)


def _triple(v) -> tuple[int, int, int]:
    return (int(v),) * 3 if isinstance(v, int) else tuple(int(s) for s in v)  # type: ignore[return-value]


class VolumePatchViT(ModalityEncoder):
    """3D patch embedding (Conv3d, stride = patch) + learned positions + pre-norm transformer.

    ``grid`` is the patch grid (tokens per axis) the positional embedding is learned on; an input
    with another grid gets it trilinearly interpolated. ``max_tokens`` bounds ``N`` (attention is
    quadratic): a larger input raises InputError instead of exhausting memory — resample first.
    Edges that do not fill a whole patch are dropped (Conv3d floor).
    """

    modality = "volume"

    def __init__(self, in_channels: int = 1, patch: int | Sequence[int] = (4, 8, 8), dim: int = 256,
                 depth: int = 4, heads: int = 4, max_tokens: int = 4096,
                 grid: int | Sequence[int] = (8, 16, 16), dropout: float = 0.0):
        super().__init__(dim)
        self.in_channels, self.patch, self.max_tokens = in_channels, _triple(patch), int(max_tokens)
        self.grid = _triple(grid)
        if min(self.patch) < 1 or min(self.grid) < 1:
            raise ConfigError(f"patch and grid must be positive, got patch={self.patch}, grid={self.grid}")
        self.embed = nn.Conv3d(in_channels, dim, kernel_size=self.patch, stride=self.patch)
        self.pos = nn.Parameter(torch.randn(1, dim, *self.grid) * 0.02)
        self.encoder = transformer_encoder(dim, depth, heads, dropout)

    def _patch_grid(self, dhw: Sequence[int]) -> tuple[int, int, int]:
        if any(s < p for s, p in zip(dhw, self.patch)):
            raise InputError("volume", f"expected D, H, W >= patch {self.patch}, got {tuple(dhw)}")
        return tuple(s // p for s, p in zip(dhw, self.patch))  # type: ignore[return-value]

    def num_tokens(self, input_shape: Sequence[int]) -> int:
        return math.prod(self._patch_grid(trailing(input_shape, 3, "volume")))

    def _positions(self, grid: tuple[int, int, int]) -> torch.Tensor:
        if grid == self.grid:
            return self.pos                                              # [1, dim, d, h, w]
        return F.interpolate(self.pos, size=grid, mode="trilinear", align_corners=False)

    def forward(self, volume: torch.Tensor, **kw) -> EncoderOutput:
        x = check_input(volume, 5, "volume", "[B, C, D, H, W]")
        if x.shape[1] != self.in_channels:
            raise InputError("volume", f"expected {self.in_channels} channels, got shape {tuple(x.shape)}")
        grid = self._patch_grid(x.shape[2:])
        if math.prod(grid) > self.max_tokens:
            raise InputError("volume", f"{tuple(x.shape[2:])} gives {math.prod(grid)} patches, "
                             f"more than max_tokens={self.max_tokens}; resample the volume")
        t = self.embed(x) + self._positions(grid)                       # [B, dim, d, h, w]
        tokens = t.flatten(2).transpose(1, 2)                            # [B, N, dim]
        features = self.encoder(tokens)                                  # [B, N, dim]
        return EncoderOutput(features, full_mask(x.shape[0], features.shape[1], x.device))


_NORMS = {"batch": lambda c: nn.BatchNorm3d(c), "instance": lambda c: nn.InstanceNorm3d(c, affine=True)}


def _conv3d_norm_relu(c_in: int, c_out: int, stride: int, norm: str = "batch") -> list[nn.Module]:
    return [nn.Conv3d(c_in, c_out, 3, stride=stride, padding=1, bias=False), _NORMS[norm](c_out),
            nn.ReLU(inplace=True)]


class CNNVolumeEncoder(ModalityEncoder):
    """Full-resolution 3D CNN stem + adaptive max pooling to ``grid = (gd, g, g)`` cells.

    The stem is a Sequential of levels: level 0 one conv-norm-relu at full resolution (``width``
    channels), each later level a stride-2 conv-norm-relu then a stride-1 one, doubling the width
    (capped at ``8 * width``); ``norm`` is "batch" (BatchNorm) or "instance" (InstanceNorm, affine). The final map is max-pooled to ``gd x g x g`` cells (max keeps a
    lesion of a few voxels that averaging would dilute), each cell is projected to ``out_dim`` and
    gets a learned position embedding; ``global_token`` appends the max over the whole map.
    Input ``[B, C, D, H, W]``; ``N = gd * g * g + global_token`` whatever the input size.

    ``decoder`` (needs ``depth >= 2``): a U-Net decoder climbs from the last level back to level 1
    (half resolution): at each level it upsamples (trilinear) and merges that level's stem map, then
    runs a conv-norm-relu at that level's width. ``merge="concat"`` concatenates the two (U-Net);
    ``merge="add"`` first maps the coarser map to the level's width with a 1x1x1 conv and adds them (a
    feature pyramid's lateral sum): the 3x3x3 conv then reads the level's width instead of three times
    it: 0.87x the time per volume of concat in the encoder stage (2 CPU cores, bf16). ``small`` uses "add"
    with 18 volumes per encoder step (README, "3D lesion presence"). A 1x1x1 conv then
    gives one voxel logit per half-resolution voxel, ``aux["voxel_logits"] [B, 1, D/2, H/2, W/2]`` (what
    a voxel-level loss trains: the encoder stage's lesion mask). The decoder's map and logit are
    max-pooled to the same cells and joined to the stem's before the projection, so each token carries
    "the most lesion-like voxel here".
    Why: a faint (25-50 HU) solid-organ lesion was learnt from a dense voxel loss on a decoder, and
    not from cell boxes or a presence label on the coarse map (README, "Where it still falls short").
    """

    modality = "volume"

    def __init__(self, in_channels: int = 1, width: int = 8, depth: int = 3, out_dim: int = 256,
                 grid: int | Sequence[int] = (4, 2, 2), global_token: bool = True, decoder: bool = False,
                 norm: str = "batch", merge: str = "concat"):
        super().__init__(out_dim)
        self.grid = _triple(grid)
        if in_channels < 1 or width < 1 or depth < 1 or min(self.grid) < 1:
            raise ConfigError(f"CNNVolumeEncoder needs positive sizes, got in_channels={in_channels}, "
                              f"width={width}, depth={depth}, grid={self.grid}")
        if norm not in _NORMS:
            raise ConfigError(f"CNNVolumeEncoder: norm must be one of {sorted(_NORMS)}, got {norm!r}")
        if merge not in ("concat", "add"):
            raise ConfigError(f"CNNVolumeEncoder: merge must be 'concat' or 'add', got {merge!r}")
        if decoder and depth < 2:
            raise ConfigError(f"CNNVolumeEncoder: decoder needs depth >= 2 (a level to climb back to), got depth={depth}")
        self.in_channels, self.global_token, self.decoder, self.merge = in_channels, global_token, bool(decoder), merge
        widths = [width] + [width * 2 ** min(i, 3) for i in range(1, depth)]
        levels: list[nn.Module] = [nn.Sequential(*_conv3d_norm_relu(in_channels, width, 1, norm))]
        for c_in, c_out in zip(widths, widths[1:]):
            levels.append(nn.Sequential(*_conv3d_norm_relu(c_in, c_out, 2, norm), *_conv3d_norm_relu(c_out, c_out, 1, norm)))
        self.stem = nn.Sequential(*levels)
        token_channels = widths[-1]
        if self.decoder:   # up[j] climbs from level j + 2 to level j + 1 (its skip); applied deepest first
            c_in = [widths[j + 1] + (widths[j + 2] if merge == "concat" else 0) for j in range(depth - 2)]
            self.up = nn.ModuleList(nn.Sequential(*_conv3d_norm_relu(c_in[j], widths[j + 1], 1, norm))
                                    for j in range(depth - 2))
            if merge == "add":   # lateral[j]: level j + 2's width -> level j + 1's, at the coarser level
                self.lateral = nn.ModuleList(nn.Conv3d(widths[j + 2], widths[j + 1], 1) for j in range(depth - 2))
            self.voxel_head = nn.Conv3d(widths[1], 1, 1)
            # start at a lesion prior of ~1% of voxels (not 50%): from 0 the loss first spends its steps
            # pushing every voxel down (a measured plateau), the focal-loss detectors' prior init
            nn.init.constant_(self.voxel_head.bias, -math.log(99.0))
            token_channels += widths[1] + 1
        self.proj = nn.Linear(token_channels, out_dim)
        self.pos = nn.Parameter(torch.randn(self.num_tokens((1, 1, 1)), out_dim) * 0.02)

    def num_tokens(self, input_shape: Sequence[int]) -> int:
        trailing(input_shape, 3, "volume")
        return math.prod(self.grid) + int(self.global_token)

    def _decode(self, skips: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Stem maps of levels 1..L-1 -> (decoder map at level 1 ``[B, C1, D', H', W']``,
        voxel logits ``[B, 1, D', H', W']``)."""
        u = skips[-1]
        for j in reversed(range(len(self.up))):
            skip = skips[j]                                              # level j + 1
            if self.merge == "add":
                u = self.lateral[j](u)                                   # to level j + 1's width, coarse
            u = F.interpolate(u, size=skip.shape[2:], mode="trilinear", align_corners=False)
            u = self.up[j](u + skip if self.merge == "add" else torch.cat([u, skip], dim=1))   # [B, C_{j+1}, ...]
        return u, self.voxel_head(u)

    def forward(self, volume: torch.Tensor, **kw) -> EncoderOutput:
        x = check_input(volume, 5, "volume", "[B, C, D, H, W]")
        if x.shape[1] != self.in_channels:
            raise InputError("volume", f"expected {self.in_channels} channels, got shape {tuple(x.shape)}")
        maps = []
        for level in self.stem:
            x = level(x)
            maps.append(x)
        fmap = maps[-1]                                                  # [B, C', D', H', W']
        pooled, aux = [fmap], {}                                         # the maps the tokens max-pool
        if self.decoder:
            dec, logits = self._decode(maps[1:])                         # [B, C1, D/2, H/2, W/2], [B, 1, ...]
            aux["voxel_logits"] = logits
            pooled.append(torch.cat([dec, logits], dim=1))               # [B, C1 + 1, D/2, H/2, W/2]
        cells = torch.cat([F.adaptive_max_pool3d(m, self.grid) for m in pooled], dim=1)   # [B, C, gd, g, g]
        whole = torch.cat([m.amax(dim=(2, 3, 4)) for m in pooled], dim=1)                 # [B, C]
        tokens = cells.flatten(2).transpose(1, 2)                        # [B, gd*g*g, C]
        if self.global_token:
            tokens = torch.cat([tokens, whole.unsqueeze(1)], dim=1)      # [B, N, C]
        features = self.proj(tokens) + self.pos                          # [B, N, out_dim]
        return EncoderOutput(features, full_mask(volume.shape[0], features.shape[1], volume.device), aux=aux)


def _pool_tokens(x: torch.Tensor, mask: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked mean of ``x [M, n, e]`` over ``k`` contiguous chunks -> ``[M, k, e]``, chunk mask ``[M, k]``."""
    w = mask.to(x.dtype).unsqueeze(1)                                    # [M, 1, n]
    num = F.adaptive_avg_pool1d(x.transpose(1, 2) * w, k)               # [M, e, k]
    den = F.adaptive_avg_pool1d(w, k)                                    # [M, 1, k]
    pooled = (num / den.clamp_min(1e-12)).transpose(1, 2)                # [M, k, e]
    return pooled, den[:, 0] > 0


class SliceEncoder3D(ModalityEncoder):
    """Encode each slice with a 2D image encoder, score slices against a question, weight them.

    For ``[B, C, D, H, W]``: the ``B*D`` slices go through ``image_encoder`` as one batch; each
    slice's tokens are mean-pooled (masked) into ``k`` tokens and into one summary vector ``s_d``.
    Slice scores (question-guided inter-slice scoring, after Med-2E3)::

        q      = query + W question          # learned query (+ question term if given), [B, e]
        scores = softmax_d(q . LN(s_d) / sqrt(e))                                      # [B, D]

    Outputs: the ``k`` tokens of slice ``d`` multiplied by ``D_real * scores_d`` (so uniform scores
    leave them unchanged), then one global token ``sum_d scores_d s_d``. ``N = D * k + 1``.
    ``question [B, query_dim]`` needs ``query_dim``; ``slice_mask [B, D]`` marks real slices of
    padded volumes (padded ones get score 0 and mask False). A 1-channel volume is repeated to 3
    channels when the image encoder wants 3. ``aux["slice_scores"]`` holds the scores ``[B, D]``.
    """

    modality = "volume"

    def __init__(self, image_encoder: nn.Module, k: int = 4, query_dim: int | None = None):
        super().__init__(image_encoder.out_dim)
        if k < 1:
            raise ConfigError(f"k (tokens per slice) must be >= 1, got {k}")
        self.image_encoder, self.k, self.query_dim = image_encoder, int(k), query_dim
        e = self.out_dim
        self.query = nn.Parameter(torch.zeros(e))                        # learned query: uniform at init
        self.key_norm = nn.LayerNorm(e)
        self.question_proj = nn.Linear(query_dim, e, bias=False) if query_dim else None

    def num_tokens(self, input_shape: Sequence[int]) -> int:
        depth = trailing(input_shape, 3, "volume")[0]
        return depth * self.k + 1

    def _slices(self, x: torch.Tensor) -> torch.Tensor:
        b, c, d, h, w = x.shape
        slices = x.transpose(1, 2).reshape(b * d, c, h, w)              # [B*D, C, H, W]
        want = getattr(self.image_encoder, "in_channels", c)
        if c == 1 and want == 3:
            slices = slices.expand(-1, 3, -1, -1)                        # [B*D, 3, H, W]
        return slices

    def _scores(self, summary: torch.Tensor, question: torch.Tensor | None,
                slice_mask: torch.Tensor) -> torch.Tensor:
        b, _, e = summary.shape
        q = self.query.expand(b, e)                                      # [B, e]
        if question is not None:
            if self.question_proj is None:
                raise ConfigError("a question embedding was given but SliceEncoder3D has no query_dim")
            question = check_input(question, 2, "question", f"[B, {self.query_dim}]")
            if tuple(question.shape) != (b, self.query_dim):
                raise InputError("question", f"expected shape ({b}, {self.query_dim}), got {tuple(question.shape)}")
            q = q + self.question_proj(question.to(summary.dtype))       # [B, e]
        keys = self.key_norm(summary)                                     # [B, D, e]
        logits = torch.einsum("be,bde->bd", q, keys) / math.sqrt(e)      # [B, D]
        logits = logits.masked_fill(~slice_mask, float("-inf"))
        return logits.softmax(dim=-1)                                     # [B, D]

    def forward(self, volume: torch.Tensor, question: torch.Tensor | None = None,
                slice_mask: torch.Tensor | None = None, **kw) -> EncoderOutput:
        x = check_input(volume, 5, "volume", "[B, C, D, H, W]")
        b, _, d = x.shape[:3]
        if slice_mask is None:
            slice_mask = full_mask(b, d, x.device)
        elif tuple(slice_mask.shape) != (b, d) or not bool(slice_mask.any(dim=1).all()):
            raise InputError("slice_mask", f"expected bool ({b}, {d}) with a real slice per row, "
                             f"got shape {tuple(slice_mask.shape)}")
        slice_mask = slice_mask.bool()
        out = self.image_encoder(self._slices(x))                        # features [B*D, n, e]
        summary = masked_mean(out.features, out.mask).view(b, d, -1)     # [B, D, e]
        tokens, tok_mask = _pool_tokens(out.features, out.mask, self.k)  # [B*D, k, e], [B*D, k]
        tokens, tok_mask = tokens.view(b, d, self.k, -1), tok_mask.view(b, d, self.k)

        scores = self._scores(summary, question, slice_mask)             # [B, D]
        n_real = slice_mask.sum(dim=1, keepdim=True).to(scores.dtype)    # [B, 1]
        weights = (scores * n_real)[:, :, None, None]                    # [B, D, 1, 1]
        weighted = (tokens * weights).reshape(b, d * self.k, -1)         # [B, D*k, e]
        global_tok = torch.einsum("bd,bde->be", scores, summary)[:, None]  # [B, 1, e]
        features = torch.cat([weighted, global_tok], dim=1)              # [B, D*k + 1, e]

        mask = (tok_mask & slice_mask[:, :, None]).reshape(b, d * self.k)  # [B, D*k]
        mask = torch.cat([mask, full_mask(b, 1, x.device)], dim=1)        # [B, D*k + 1]
        return EncoderOutput(features, mask, aux={"slice_scores": scores})

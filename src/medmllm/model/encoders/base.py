"""The encoder contract shared by every modality.

An encoder is an ``nn.Module`` with

- ``modality``: one of ``"image"``, ``"volume"``, ``"signal"``, ``"ehr"``;
- ``out_dim``: the feature width (int) of the tokens it yields;
- ``forward(x, **kw) -> EncoderOutput`` where ``EncoderOutput.features`` is a float tensor
  ``[B, N, out_dim]`` and ``EncoderOutput.mask`` a bool tensor ``[B, N]`` (True = real token,
  False = padding). ``EncoderOutput.aux`` may carry extra named tensors (e.g. slice scores);
  nothing downstream depends on it;
- ``num_tokens(input_shape) -> int``: how many tokens ``N`` an input of that shape yields,
  computed from the shape alone (no forward pass). The collator uses it to expand one
  modality placeholder into ``N`` positions, so it must equal ``features.shape[1]``.
  ``input_shape`` may include or omit the batch dimension: only the trailing dimensions
  are read (e.g. ``(3, H, W)`` and ``(B, 3, H, W)`` both work for images).

Inputs per modality (all float):

- image  ``[B, C, H, W]`` (pixel values, already normalised);
- volume ``[B, C, D, H, W]`` (D = slices along the acquisition axis);
- signal ``[B, leads, T]`` (+ optional ``lengths [B]`` for padded recordings);
- ehr    ``[B, F]`` values + ``missing [B, F]`` bool.

Wrong input shapes raise :class:`medmllm.errors.InputError` naming what was expected and what came.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from medmllm.errors import ConfigError, InputError

MODALITIES = ("image", "volume", "signal", "ehr")


@dataclass
class EncoderOutput:
    """Tokens of one modality: ``features [B, N, D]`` float, ``mask [B, N]`` bool (True = real)."""

    features: torch.Tensor
    mask: torch.Tensor
    aux: dict[str, torch.Tensor] = field(default_factory=dict)


class ModalityEncoder(nn.Module):
    """Base class: sets ``modality`` and ``out_dim``; subclasses define ``forward`` and ``num_tokens``."""

    modality: str = ""

    def __init__(self, out_dim: int):
        super().__init__()
        self.out_dim = int(out_dim)

    def num_tokens(self, input_shape: Sequence[int]) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: torch.Tensor, **kw) -> EncoderOutput:  # pragma: no cover - abstract
        raise NotImplementedError


# ----------------------------------------------------------------------------- helpers

def check_input(x: object, ndim: int, what: str, layout: str) -> torch.Tensor:
    """Return ``x`` if it is a floating tensor with ``ndim`` dims, else raise InputError."""
    if not isinstance(x, torch.Tensor):
        raise InputError(what, f"expected a tensor {layout}, got {type(x).__name__}")
    if x.ndim != ndim:
        raise InputError(what, f"expected {layout} ({ndim} dims), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise InputError(what, f"expected a floating tensor {layout}, got dtype {x.dtype}")
    return x


def trailing(input_shape: Sequence[int], n: int, what: str) -> tuple[int, ...]:
    """The last ``n`` entries of ``input_shape`` as ints (InputError when it is shorter)."""
    shape = tuple(int(s) for s in input_shape)
    if len(shape) < n:
        raise InputError(what, f"expected an input shape with at least {n} dims, got {shape}")
    return shape[-n:]


def full_mask(batch: int, n: int, device: torch.device) -> torch.Tensor:
    """An all-True mask ``[batch, n]``."""
    return torch.ones(batch, n, dtype=torch.bool, device=device)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x [B, N, D]`` over real tokens ``mask [B, N]`` -> ``[B, D]`` (0 for rows with none)."""
    w = mask.to(x.dtype).unsqueeze(-1)                     # [B, N, 1]
    return (x * w).sum(1) / w.sum(1).clamp_min(1.0)        # [B, D]


def masked_max(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Max of ``x [B, N, D]`` over real tokens ``mask [B, N]`` -> ``[B, D]`` (0 for rows with none)."""
    m = mask.to(torch.bool).unsqueeze(-1)                  # [B, N, 1]
    peak = x.masked_fill(~m, float("-inf")).amax(1)        # [B, D]
    return torch.where(m.any(1), peak, torch.zeros_like(peak))


def check_heads(dim: int, heads: int) -> None:
    """ConfigError unless ``heads`` is a positive divisor of ``dim``."""
    if heads < 1 or dim % heads:
        raise ConfigError(f"attention heads must divide the width: dim={dim}, heads={heads}")


def transformer_encoder(dim: int, depth: int, heads: int, dropout: float = 0.0,
                        mlp_ratio: float = 4.0) -> nn.TransformerEncoder:
    """A pre-norm (``norm_first``), batch-first ``nn.TransformerEncoder`` with a final LayerNorm."""
    check_heads(dim, heads)
    layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=int(dim * mlp_ratio), dropout=dropout,
                                       activation="gelu", batch_first=True, norm_first=True)
    return nn.TransformerEncoder(layer, depth, norm=nn.LayerNorm(dim), enable_nested_tensor=False)

"""Projectors: encoder tokens -> LLM embedding space.

Every projector maps ``(features [B, N, in_dim], mask [B, N] | None)`` to
``(tokens [B, M, out_dim], mask [B, M])`` (True = real token; ``None`` means all real). Features at
masked positions never influence the output, and output tokens whose mask is False are zero.
``num_tokens(n)`` gives ``M`` for ``N = n`` input tokens (the collator needs it).

=============  ==========================  =================================================
name           class                       M
=============  ==========================  =================================================
``linear``     :class:`LinearProjector`    ``N``
``mlp``        :class:`MLPProjector`       ``N`` (2-layer GELU MLP, LLaVA-1.5)
``resampler``  :class:`ResamplerProjector` ``num_queries`` (learned queries cross-attend)
``pool``       :class:`PoolProjector`      ``ceil(N / factor)`` (masked average, then MLP)
=============  ==========================  =================================================
"""

from __future__ import annotations

import math

import torch
from torch import nn

from medmllm.errors import ConfigError, InputError
from medmllm.registry import Registry

PROJECTORS: Registry = Registry("projector")


def _prepare(features: torch.Tensor, mask: torch.Tensor | None, in_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Check shapes, default the mask to all True, zero the features at masked positions."""
    if not isinstance(features, torch.Tensor) or features.ndim != 3 or features.shape[-1] != in_dim:
        got = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise InputError("features", f"expected [B, N, {in_dim}], got {got}")
    if mask is None:
        mask = torch.ones(features.shape[:2], dtype=torch.bool, device=features.device)
    elif tuple(mask.shape) != tuple(features.shape[:2]):
        raise InputError("mask", f"expected shape {tuple(features.shape[:2])}, got {tuple(mask.shape)}")
    mask = mask.bool()
    return features.masked_fill(~mask[:, :, None], 0.0), mask                   # [B, N, in], [B, N]


def _zero_masked(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return tokens.masked_fill(~mask[:, :, None], 0.0)


def _mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))


@PROJECTORS.register("linear")
class LinearProjector(nn.Module):
    """One linear layer per token (LLaVA-1.0). ``M = N``."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        self.proj = nn.Linear(in_dim, out_dim)

    def num_tokens(self, n: int) -> int:
        return n

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None):
        x, mask = _prepare(features, mask, self.in_dim)                 # [B, N, in], [B, N]
        return _zero_masked(self.proj(x), mask), mask                   # [B, N, out], [B, N]


@PROJECTORS.register("mlp")
class MLPProjector(nn.Module):
    """Linear -> GELU -> Linear per token (LLaVA-1.5); ``hidden`` defaults to ``out_dim``. ``M = N``."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int | None = None):
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        self.mlp = _mlp(in_dim, hidden or out_dim, out_dim)

    def num_tokens(self, n: int) -> int:
        return n

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None):
        x, mask = _prepare(features, mask, self.in_dim)                 # [B, N, in], [B, N]
        return _zero_masked(self.mlp(x), mask), mask                    # [B, N, out], [B, N]


class _CrossAttentionBlock(nn.Module):
    """Pre-norm: ``q += attn(LN(q), kv, kv)``; ``q += MLP(LN(q))``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm_q = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = _mlp(dim, int(dim * mlp_ratio), dim)

    def forward(self, q: torch.Tensor, kv: torch.Tensor, key_padding_mask: torch.Tensor) -> torch.Tensor:
        attended, _ = self.attn(self.norm_q(q), kv, kv, key_padding_mask=key_padding_mask,
                                need_weights=False)                     # [B, Q, D]
        q = q + attended
        return q + self.mlp(self.norm_mlp(q))                           # [B, Q, D]


@PROJECTORS.register("resampler")
class ResamplerProjector(nn.Module):
    """``num_queries`` learned queries cross-attend to the (masked) features (Perceiver / Q-Former).

    ``M = num_queries`` whatever ``N``. A row with no real input token yields zeros and mask False.
    """

    def __init__(self, in_dim: int, out_dim: int, num_queries: int = 32, heads: int = 8, depth: int = 1,
                 mlp_ratio: float = 4.0):
        super().__init__()
        if heads < 1 or out_dim % heads:
            raise ConfigError(f"heads must divide out_dim: out_dim={out_dim}, heads={heads}")
        if num_queries < 1 or depth < 1:
            raise ConfigError(f"num_queries and depth must be >= 1, got {num_queries}, {depth}")
        self.in_dim, self.out_dim, self.num_queries = in_dim, out_dim, num_queries
        self.kv_proj = nn.Linear(in_dim, out_dim)
        self.kv_norm = nn.LayerNorm(out_dim)
        self.queries = nn.Parameter(torch.randn(num_queries, out_dim) * 0.02)
        self.blocks = nn.ModuleList(_CrossAttentionBlock(out_dim, heads, mlp_ratio) for _ in range(depth))
        self.out_norm = nn.LayerNorm(out_dim)

    def num_tokens(self, n: int) -> int:
        return self.num_queries

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None):
        x, mask = _prepare(features, mask, self.in_dim)                 # [B, N, in], [B, N]
        b = x.shape[0]
        has_real = mask.any(dim=1)                                      # [B]
        attend = mask.clone()
        attend[~has_real, 0] = True                                     # avoid all -inf rows (NaN)
        kv = self.kv_norm(self.kv_proj(x))                              # [B, N, out]
        q = self.queries.expand(b, -1, -1)                              # [B, Q, out]
        for block in self.blocks:
            q = block(q, kv, key_padding_mask=~attend)                  # [B, Q, out]
        out_mask = has_real[:, None].expand(b, self.num_queries)        # [B, Q]
        return _zero_masked(self.out_norm(q), out_mask), out_mask       # [B, Q, out], [B, Q]


@PROJECTORS.register("pool")
class PoolProjector(nn.Module):
    """Masked average of each run of ``factor`` consecutive tokens, then a 2-layer GELU MLP.

    ``M = ceil(N / factor)`` (the last window may be shorter); a window with no real token has mask
    False. Pooling is along the token sequence (row-major for image grids).
    """

    def __init__(self, in_dim: int, out_dim: int, factor: int = 2, hidden: int | None = None):
        super().__init__()
        if factor < 1:
            raise ConfigError(f"pool factor must be >= 1, got {factor}")
        self.in_dim, self.out_dim, self.factor = in_dim, out_dim, factor
        self.mlp = _mlp(in_dim, hidden or out_dim, out_dim)

    def num_tokens(self, n: int) -> int:
        return math.ceil(n / self.factor)

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None):
        x, mask = _prepare(features, mask, self.in_dim)                 # [B, N, in], [B, N]
        b, n, d = x.shape
        m = self.num_tokens(n)
        pad = m * self.factor - n
        x = nn.functional.pad(x, (0, 0, 0, pad))                        # [B, M*f, in]
        w = nn.functional.pad(mask, (0, pad)).to(x.dtype)               # [B, M*f]
        w = w.view(b, m, self.factor, 1)                                # [B, M, f, 1]
        count = w.sum(dim=2)                                            # [B, M, 1]
        pooled = (x.view(b, m, self.factor, d) * w).sum(dim=2) / count.clamp_min(1.0)  # [B, M, in]
        out_mask = count[:, :, 0] > 0                                   # [B, M]
        return _zero_masked(self.mlp(pooled), out_mask), out_mask       # [B, M, out], [B, M]


def build_projector(name: str, in_dim: int, out_dim: int, **kw) -> nn.Module:
    """Build the projector registered as ``name`` mapping ``in_dim`` -> ``out_dim`` features."""
    return PROJECTORS.get(name)(in_dim, out_dim, **kw)

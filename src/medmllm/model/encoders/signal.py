"""1D physiological signal encoder (ECG): strided conv stem over leads + transformer.

Input ``[B, leads, T]`` (samples; optional ``lengths [B]`` for right-padded recordings), output
tokens ``[B, T', dim]``. Each stem stage with stride ``s`` maps ``L`` samples to ``ceil(L / s)``,
so ``T' = ceil(...ceil(T / s1) / s2 ...)``; with the default ``patch=(5, 5, 2)`` one token covers
50 samples (0.1 s at 500 Hz: 10 s -> 100 tokens). ``summary_tokens`` appends two more: the masked
mean and max over the recording's tokens (what a rhythm classifier pools), ``T' + 2`` in all.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from medmllm.errors import ConfigError, InputError
from medmllm.model.encoders.base import (EncoderOutput, ModalityEncoder, check_input, masked_max, masked_mean,
                                         trailing, transformer_encoder)


def sinusoidal_positions(n: int, dim: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """The fixed sine/cosine position table ``[n, dim]`` of "Attention is all you need"."""
    pos = torch.arange(n, device=device, dtype=torch.float32)[:, None]           # [n, 1]
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32)
                     * (-math.log(10000.0) / dim))                                  # [dim/2]
    table = torch.zeros(n, dim, device=device)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq)[:, : dim // 2]
    return table.to(dtype)


def _ceil_div(a: torch.Tensor | int, s: int):
    return (a + s - 1) // s


def _length_mask(lengths: torch.Tensor, n: int) -> torch.Tensor:
    """``[B, n]`` bool: True where position < length."""
    return torch.arange(n, device=lengths.device)[None, :] < lengths[:, None]


class ECGEncoder(ModalityEncoder):
    """Strided Conv1d stem over all leads, sinusoidal positions, pre-norm transformer.

    Stage ``i`` is ``Conv1d(kernel 2*s_i + 1, stride s_i, padding s_i) + GELU`` (``ceil(L / s_i)``
    outputs, overlapping windows). With ``lengths``, samples and stem features past each recording's
    end are zeroed at every stage and masked in attention, so a padded recording gives exactly the
    tokens of the unpadded one (up to float rounding); padded tokens are zero with mask False.
    """

    modality = "signal"

    def __init__(self, n_leads: int = 12, dim: int = 256, depth: int = 4, heads: int = 4,
                 patch: int | Sequence[int] = (5, 5, 2), dropout: float = 0.0, summary_tokens: bool = False):
        super().__init__(dim)
        self.summary_tokens = bool(summary_tokens)
        self.n_leads = int(n_leads)
        self.strides = (int(patch),) if isinstance(patch, int) else tuple(int(s) for s in patch)
        if not self.strides or min(self.strides) < 1:
            raise ConfigError(f"patch strides must be positive ints, got {patch!r}")
        stages, c_in = [], self.n_leads
        for s in self.strides:
            stages.append(nn.Sequential(nn.Conv1d(c_in, dim, 2 * s + 1, stride=s, padding=s), nn.GELU()))
            c_in = dim
        self.stem = nn.ModuleList(stages)
        self.encoder = transformer_encoder(dim, depth, heads, dropout)

    def num_tokens(self, input_shape: Sequence[int]) -> int:
        n = trailing(input_shape, 1, "signal")[0]
        if n < 1:
            raise InputError("signal", f"expected at least 1 sample, got shape {tuple(input_shape)}")
        for s in self.strides:
            n = _ceil_div(n, s)
        return n + 2 * self.summary_tokens

    def _check_lengths(self, lengths: torch.Tensor | None, b: int, t: int, device) -> torch.Tensor:
        if lengths is None:
            return torch.full((b,), t, dtype=torch.long, device=device)
        lengths = torch.as_tensor(lengths, device=device).long()
        if tuple(lengths.shape) != (b,) or bool((lengths < 1).any()) or bool((lengths > t).any()):
            raise InputError("lengths", f"expected {b} lengths in [1, {t}], got {lengths.tolist()}")
        return lengths

    def forward(self, signal: torch.Tensor, lengths: torch.Tensor | None = None, **kw) -> EncoderOutput:
        x = check_input(signal, 3, "signal", "[B, leads, T]")
        b, leads, t = x.shape
        if leads != self.n_leads:
            raise InputError("signal", f"expected {self.n_leads} leads, got shape {tuple(x.shape)}")
        lengths = self._check_lengths(lengths, b, t, x.device)             # [B] samples
        h = x * _length_mask(lengths, t)[:, None, :].to(x.dtype)           # [B, leads, T]
        for stage, s in zip(self.stem, self.strides):
            h = stage(h)                                                     # [B, dim, ceil(L/s)]
            lengths = _ceil_div(lengths, s)
            h = h * _length_mask(lengths, h.shape[-1])[:, None, :].to(h.dtype)
        mask = _length_mask(lengths, h.shape[-1])                            # [B, T']
        tokens = h.transpose(1, 2)                                           # [B, T', dim]
        tokens = tokens + sinusoidal_positions(tokens.shape[1], self.out_dim, x.device, tokens.dtype)
        features = self.encoder(tokens, src_key_padding_mask=~mask)          # [B, T', dim]
        features = features.masked_fill(~mask[:, :, None], 0.0)
        if self.summary_tokens:                                              # + [mean], [max] -> [B, T'+2, dim]
            summary = torch.stack([masked_mean(features, mask), masked_max(features, mask)], dim=1)  # [B, 2, dim]
            features = torch.cat([features, summary], dim=1)
            mask = torch.cat([mask, mask.new_ones(b, 2)], dim=1)
        return EncoderOutput(features, mask)

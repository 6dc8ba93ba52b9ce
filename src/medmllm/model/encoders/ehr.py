"""Tabular EHR encoder: one token per feature (FT-Transformer style feature tokenizer).

Input ``values [B, F]`` float and ``missing [B, F]`` bool (True = not measured), output tokens
``[B, F, dim]``: ``N = F``. A missing value is never read as zero: its token is a learned
per-feature "missing" embedding, whatever (even NaN) sits at that position in ``values``.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from medmllm.errors import ConfigError, InputError
from medmllm.model.encoders.base import (EncoderOutput, ModalityEncoder, check_input, full_mask,
                                         trailing, transformer_encoder)


class EHRFeatureTokenizer(ModalityEncoder):
    """``token_f = value_f * W_f + b_f`` for measured features, ``M_f`` for missing ones.

    ``W, b, M`` are ``[F, dim]`` parameters (per-feature weight, bias — which doubles as the
    feature's identity — and missing embedding). ``depth > 0`` adds a small pre-norm transformer
    over the ``F`` tokens. ``missing=None`` treats NaN values as missing; a given ``missing`` mask
    must cover every non-finite value (InputError otherwise). Inputs should be standardised.
    """

    modality = "ehr"

    def __init__(self, n_features: int, dim: int = 64, depth: int = 0, heads: int = 4, dropout: float = 0.0):
        super().__init__(dim)
        if n_features < 1:
            raise ConfigError(f"n_features must be >= 1, got {n_features}")
        self.n_features = int(n_features)
        bound = 1.0 / math.sqrt(dim)
        self.weight = nn.Parameter(torch.empty(n_features, dim).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(n_features, dim).uniform_(-bound, bound))
        self.missing_embedding = nn.Parameter(torch.empty(n_features, dim).uniform_(-bound, bound))
        self.encoder = transformer_encoder(dim, depth, heads, dropout) if depth > 0 else None

    def num_tokens(self, input_shape: Sequence[int]) -> int:
        f = trailing(input_shape, 1, "ehr")[0]
        if f != self.n_features:
            raise InputError("ehr", f"expected {self.n_features} features, got shape {tuple(input_shape)}")
        return f

    def _check(self, values: torch.Tensor, missing: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        values = check_input(values, 2, "ehr", f"[B, {self.n_features}]")
        if values.shape[1] != self.n_features:
            raise InputError("ehr", f"expected {self.n_features} features, got shape {tuple(values.shape)}")
        if missing is None:
            missing = torch.isnan(values)
        elif tuple(missing.shape) != tuple(values.shape):
            raise InputError("missing", f"expected shape {tuple(values.shape)}, got {tuple(missing.shape)}")
        missing = missing.bool()
        if not bool(torch.isfinite(values)[~missing].all()):
            raise InputError("ehr", "a value marked as measured is NaN or infinite; mark it missing")
        return values, missing

    def tokenize(self, values: torch.Tensor, missing: torch.Tensor | None = None) -> torch.Tensor:
        """The per-feature tokens ``[B, F, dim]`` before any transformer."""
        values, missing = self._check(values, missing)
        clean = values.masked_fill(missing, 0.0).to(self.weight.dtype)      # [B, F] (garbage removed)
        measured = clean[:, :, None] * self.weight + self.bias              # [B, F, dim]
        return torch.where(missing[:, :, None], self.missing_embedding, measured)  # [B, F, dim]

    def forward(self, values: torch.Tensor, missing: torch.Tensor | None = None, **kw) -> EncoderOutput:
        tokens = self.tokenize(values, missing)                             # [B, F, dim]
        if self.encoder is not None:
            tokens = self.encoder(tokens)                                    # [B, F, dim]
        return EncoderOutput(tokens, full_mask(tokens.shape[0], tokens.shape[1], tokens.device))

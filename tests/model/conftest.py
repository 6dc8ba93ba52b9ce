"""Shared helpers of the model tests."""

from __future__ import annotations

import pytest
import torch


class MaskFirstToken(torch.nn.Module):
    """Wraps a projector: the same tokens, with the first token of every item masked out."""

    def __init__(self, projector):
        super().__init__()
        self.projector = projector

    def num_tokens(self, n):
        return self.projector.num_tokens(n)

    def forward(self, features, mask):
        tokens, out_mask = self.projector(features, mask)
        out_mask = out_mask.clone()
        out_mask[:, 0] = False
        return tokens, out_mask


@pytest.fixture
def mask_first_token():
    """``mask_first_token(model, kind)``: ``kind``'s projector then masks each item's first token."""
    def apply(model, kind):
        model.projectors[kind] = MaskFirstToken(model.projectors[kind])
    return apply

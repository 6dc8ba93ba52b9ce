"""bench/packing.py's token accounting (behaviour, never speed): padded, packed and real tokens per batch."""

from __future__ import annotations

import torch


def test_token_counts_follow_the_row_plan(bench_script):
    bench = bench_script("packing")
    masks = [torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]),    # 2 + 3 | 5 -> 2 rows of 5
             torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1]])]                          # full: 2 rows of 4
    counts = bench.token_counts([{"attention_mask": m} for m in masks])
    assert counts == {"padded_per_batch": (15 + 8) / 2, "packed_per_batch": (10 + 8) / 2, "real_per_batch": (10 + 8) / 2}

"""Sequence packing for training: a padded batch's samples laid end to end in fewer rows.

A shuffled instruction batch of the quickstart holds ~40 tokens per sample on average, padded to
~91 (its longest sample): over half of the LLM's work is padding. :func:`pack_batch` moves the
non-padding tokens of the ``B`` samples into ``R <= B`` rows of the batch's own length ``L``
(first-fit decreasing, whole samples only, order kept inside each sample). Each sample keeps its
position ids (counted from 0), so the Hugging Face attention-mask builders see a new sequence where
a position id does not follow its predecessor and give each row a block-diagonal causal mask
(``transformers.masking_utils.find_packed_sequence_indices``; pass ``attention_mask=None``). The
label of each sample's first token is set to -100: in a packed row it would otherwise be the
target of the previous sample's last token. The token-mean loss over a packed batch is therefore
the padded batch's loss (same tokens, same targets, same attention), in fewer rows.
"""

from __future__ import annotations

from typing import Sequence

import torch

from medmllm.data.collate import IGNORE_INDEX
from medmllm.errors import InputError


def plan_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Sample indices per row: first-fit decreasing by length into rows of ``capacity`` tokens.

    Ties keep the original order, so the plan depends only on ``lengths``. A sample longer than
    ``capacity`` raises InputError (rows never split a sample)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: (-int(lengths[j]), j)):
        n = int(lengths[i])
        if n > capacity:
            raise InputError("lengths", f"sample {i} has {n} tokens, more than the row capacity {capacity}")
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(capacity - n)
    return rows


def pack_batch(embeds: torch.Tensor, keep: torch.Tensor, position_ids: torch.Tensor,
               labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Padded ``embeds [B, L, H]``, ``keep [B, L]`` (True on real tokens), ``position_ids [B, L]``
    and ``labels [B, L]`` -> packed ``embeds [R, L, H]``, ``position_ids [R, L]``, ``labels [R, L]``.

    A row's unused tail gets zero embeddings, positions ``0, 1, ...`` (a sequence of its own, after
    every real token, so causal attention keeps it from them) and labels -100. Gradients flow back
    to ``embeds`` through the gather."""
    if embeds.dim() != 3 or keep.shape != embeds.shape[:2] or position_ids.shape != keep.shape \
            or labels.shape != keep.shape:
        raise InputError("pack_batch", f"expected embeds [B, L, H] and keep/position_ids/labels [B, L], got "
                                       f"{tuple(embeds.shape)}, {tuple(keep.shape)}, {tuple(position_ids.shape)}, "
                                       f"{tuple(labels.shape)}")
    b, length, hidden = embeds.shape
    keep = keep.bool()
    lengths = keep.sum(dim=1).tolist()                                   # [B]
    rows = plan_rows(lengths, length)
    tokens = [keep[i].nonzero().squeeze(1) + i * length for i in range(b)]   # flat indices per sample
    pad = b * length                                                     # index of the zero row below
    index = torch.full((len(rows), length), pad, dtype=torch.long, device=embeds.device)   # [R, L]
    pos = torch.arange(length, device=embeds.device).repeat(len(rows), 1)                  # [R, L]
    lab = torch.full((len(rows), length), IGNORE_INDEX, dtype=labels.dtype, device=labels.device)
    flat_pos, flat_lab = position_ids.reshape(-1), labels.reshape(-1)
    for r, members in enumerate(rows):
        at = 0
        for i in members:
            n = int(lengths[i])
            index[r, at:at + n] = tokens[i]
            pos[r, at:at + n] = flat_pos[tokens[i]]
            lab[r, at:at + n] = flat_lab[tokens[i]]
            lab[r, at] = IGNORE_INDEX                                     # no target across samples
            at += n
        pos[r, at:] = torch.arange(length - at, device=embeds.device)    # the tail: its own sequence
    flat = torch.cat([embeds.reshape(b * length, hidden), embeds.new_zeros(1, hidden)])    # [B*L + 1, H]
    return flat[index], pos, lab                                         # [R, L, H], [R, L], [R, L]

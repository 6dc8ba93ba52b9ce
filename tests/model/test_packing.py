"""Sequence packing: the row plan, the packed tensors, and the packed loss and gradients against the
padded batch's (the reference: the same model run on the padded batch)."""

from __future__ import annotations

import pytest
import torch

from medmllm.data.collate import MultimodalCollator
from medmllm.data.records import make_record, media
from medmllm.errors import ConfigError, InputError
from medmllm.model.builders import example_input, tiny
from medmllm.model.packing import IGNORE_INDEX, pack_batch, plan_rows

META = {"dataset": "toy", "split": "train"}


def test_plan_rows_is_first_fit_decreasing_and_never_overfills():
    # sorted: 7 (i=1), 5 (i=3), 4 (i=0), 3 (i=2), 2 (i=4), 1 (i=5); capacity 8
    # 7 -> row 0 (room 1); 5 -> row 1 (room 3); 4 -> row 2 (room 4); 3 -> row 1 (room 0);
    # 2 -> row 2 (room 2); 1 -> row 0 (room 0)
    assert plan_rows([4, 7, 3, 5, 2, 1], 8) == [[1, 5], [3, 2], [0, 4]]
    assert plan_rows([3, 3, 3], 3) == [[0], [1], [2]]
    assert plan_rows([], 4) == []
    with pytest.raises(InputError, match="sample 1 has 9 tokens, more than the row capacity 8"):
        plan_rows([2, 9], 8)


def test_pack_batch_moves_whole_samples_and_cuts_targets_across_them():
    keep = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)   # lengths 2, 3, 5
    embeds = torch.arange(15, dtype=torch.float).reshape(3, 5, 1) + 1                            # token t -> t + 1
    positions = (keep.long().cumsum(-1) - 1).clamp_min(0)
    labels = torch.arange(15).reshape(3, 5) + 100
    e, p, lab = pack_batch(embeds, keep, positions, labels)
    # rows: [sample 2] and [sample 1, sample 0] (first-fit decreasing into rows of 5)
    assert e.shape == (2, 5, 1)
    assert e[..., 0].tolist() == [[11, 12, 13, 14, 15], [6, 7, 8, 1, 2]]
    assert p.tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 0, 1]]
    assert lab.tolist() == [[IGNORE_INDEX, 111, 112, 113, 114], [IGNORE_INDEX, 106, 107, IGNORE_INDEX, 101]]
    # a row with room left: zero embeddings, positions from 0, no targets
    keep2 = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    e2, p2, lab2 = pack_batch(torch.ones(2, 4, 3), keep2, (keep2.long().cumsum(-1) - 1).clamp_min(0),
                              torch.zeros(2, 4, dtype=torch.long))
    assert p2.tolist() == [[0, 1, 2, 3], [0, 1, 2, 0]]
    assert e2[1, 3].abs().sum() == 0 and lab2[1, 3] == IGNORE_INDEX
    with pytest.raises(InputError, match="pack_batch"):
        pack_batch(torch.ones(2, 4), keep2, keep2.long(), keep2.long())


def _batch(model, tok, kinds_per_sample):
    g = torch.Generator().manual_seed(0)
    answers = ["Yes.", "No, it is normal and there is nothing else to see here.", "A lesion in the left kidney."]
    exs = [{"record": make_record(f"r{i}", [media(k, f"{k}.bin") for k in kinds] + ["Is there a finding?" * (1 + i % 3)],
                                  answers[i % 3], META),
            "modalities": [(k, example_input(k, g)) for k in kinds]} for i, kinds in enumerate(kinds_per_sample)]
    return MultimodalCollator(tok, 1024, model.num_tokens)(exs)


@pytest.mark.parametrize("family", ["llama", "gemma"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_and_gradients_equal_the_padded_batch(family, attn):
    torch.manual_seed(0)
    model, tok = tiny(family, modalities=("image", "signal"))
    model.llm.set_attn_implementation(attn)
    model.train()
    batch = _batch(model, tok, [["image"], ["signal"], ["image", "signal"], ["image"], ["signal"], ["image"]])
    padded = model(**batch)
    padded.loss.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    packed = model(**batch, pack=True)
    packed.loss.backward()
    assert packed.logits.shape[0] < batch["input_ids"].shape[0]          # fewer rows than samples
    torch.testing.assert_close(packed.loss, padded.loss, rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        if n in ref:
            torch.testing.assert_close(p.grad, ref[n], rtol=1e-4, atol=1e-6, msg=n)
    # token by token: each sample's logits in its packed row are its padded logits; the same rows with
    # one position count per row (the samples then attend to each other) give other logits
    embeds, attention, positions = model.embed_inputs(**batch)
    e, p, _ = pack_batch(embeds, attention.bool(), positions, batch["labels"])
    lengths = attention.sum(1).tolist()
    with torch.no_grad():
        right = model.llm(inputs_embeds=e, position_ids=p, use_cache=False).logits          # [R, L, V]
        flat = torch.arange(p.shape[1]).expand_as(p)
        leaky = model.llm(inputs_embeds=e, position_ids=flat, use_cache=False).logits
    moved = 0.0
    for r, members in enumerate(plan_rows(lengths, attention.shape[1])):
        at = 0
        for i in members:
            n = int(lengths[i])
            want = padded.logits[i, attention[i].bool()].detach()                          # [n, V]
            torch.testing.assert_close(right[r, at:at + n], want, rtol=1e-4, atol=1e-5)
            if at:                                                                          # not first in its row
                moved = max(moved, float((leaky[r, at:at + n] - want).abs().max()))
            at += n
    assert moved > 1e-3


def test_pack_needs_labels_and_masked_placeholders_fall_back_to_padding(mask_first_token):
    model, tok = tiny("llama", modalities=("image",))
    batch = _batch(model, tok, [["image"], ["image", "image"]])
    with pytest.raises(ConfigError, match="needs labels"):
        model(**{k: v for k, v in batch.items() if k != "labels"}, pack=True)
    mask_first_token(model, "image")
    with torch.no_grad():
        padded, packed = model(**batch), model(**batch, pack=True)
    assert packed.logits.shape == padded.logits.shape                    # run padded, not packed
    torch.testing.assert_close(packed.loss, padded.loss)

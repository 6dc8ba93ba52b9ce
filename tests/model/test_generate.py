"""generate(): batched left-padded greedy == one at a time, == Hugging Face's generate on the same
embeddings, eos / max_new_tokens / stop strings, seeded sampling.

The tiny models' LLM matrices are redrawn with a larger spread so that greedy answers differ
between prompts (a freshly initialised tiny LLM tends to repeat one token whatever the input).
"""

from __future__ import annotations

import functools

import pytest
import torch

from medmllm.data.collate import MultimodalCollator
from medmllm.data.records import make_record, media
from medmllm.errors import ConfigError, InputError
from medmllm.model.builders import example_input, tiny
from medmllm.model.generate import generate, generate_ids

META = {"dataset": "toy", "split": "train"}
FAMILIES = ("llama", "qwen2", "gemma")
PROMPTS = [(["image"], "What is shown?"),
           (["image", "ehr"], "Is the heart enlarged in this chest x-ray? Answer with one word."),
           (["signal"], "Describe the ECG.")]


@functools.lru_cache(maxsize=None)
def _model(family):
    model, tok = tiny(family)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.llm.named_parameters():
            if p.ndim == 2 and "embed" not in name:
                p.normal_(0.0, 0.2, generator=g)
    return model, tok


def _examples(prompts=PROMPTS, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"record": make_record(f"r{i}", [media(k, "x") for k in kinds] + [q], None, META),
             "modalities": [(k, example_input(k, g)) for k in kinds]} for i, (kinds, q) in enumerate(prompts)]


def _collator(model, tok, **kw):
    return MultimodalCollator(tok, 512, model.num_tokens, train=False, **kw)


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_left_padded_greedy_equals_one_at_a_time(family):
    model, tok = _model(family)
    col = _collator(model, tok)
    exs = _examples()
    batch = col(exs)
    lengths = batch["attention_mask"].sum(1)
    assert len(set(lengths.tolist())) == 3 and (batch["attention_mask"][:, 0] == 0).sum() == 2  # left padded
    batched = generate(model, batch, tok, max_new_tokens=8)
    alone = [generate(model, col([ex]), tok, max_new_tokens=8)[0] for ex in exs]
    assert batched == alone
    assert len(set(batched)) == 3 and all(batched)                # distinct, non-empty answers
    assert model.generate(batch, tok, max_new_tokens=8) == batched
    assert generate(model, batch, tok, max_new_tokens=8, seed=123) == batched  # greedy ignores the seed


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_equals_hugging_face_generate_on_the_same_embeddings(family):
    model, tok = _model(family)
    batch = _collator(model, tok)(_examples())
    ours = generate_ids(model, batch, tok, max_new_tokens=6)
    embeds, attention, _ = model.embed_inputs(**batch)
    with torch.no_grad():
        ref = model.llm.generate(inputs_embeds=embeds, attention_mask=attention, max_new_tokens=6, do_sample=False,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    ref_rows = [[t for t in row.tolist() if t != tok.pad_token_id] for row in ref]
    ref_rows = [row[: row.index(tok.eos_token_id)] if tok.eos_token_id in row else row for row in ref_rows]
    assert ours == ref_rows


def test_eos_and_max_new_tokens_end_rows():
    model, tok = _model("llama")
    batch = _collator(model, tok)(_examples())
    rows = generate_ids(model, batch, tok, max_new_tokens=6)
    assert [len(r) for r in rows] == [6, 6, 6]
    stop_id = rows[0][2]                                    # pretend this token is the end of turn
    cut = rows[0].index(stop_id)
    eos = model.llm.config.eos_token_id
    model.llm.config.eos_token_id = stop_id
    try:
        again = generate_ids(model, batch, tok, max_new_tokens=6)
    finally:
        model.llm.config.eos_token_id = eos
    assert again[0] == rows[0][:cut]
    for r, a in zip(rows[1:], again[1:]):
        assert a == (r[: r.index(stop_id)] if stop_id in r else r)


def test_stop_strings_cut_the_text():
    model, tok = _model("qwen2")
    batch = _collator(model, tok)(_examples())
    full = generate(model, batch, tok, max_new_tokens=10)
    stop = full[1][3:5]                                      # a piece of the second answer
    assert stop and full[1].find(stop) >= 0
    cut = generate(model, batch, tok, max_new_tokens=10, stop_strings=[stop, "never-generated-string"])
    assert cut == [t[: t.find(stop)] if stop in t else t for t in full]
    assert stop not in cut[1] and full[1].startswith(cut[1])


def test_sampling_is_seeded():
    model, tok = _model("gemma")
    batch = _collator(model, tok)(_examples())
    kw = dict(max_new_tokens=8, do_sample=True, temperature=1.5, top_p=0.95)
    a = generate(model, batch, tok, seed=1, **kw)
    assert a == generate(model, batch, tok, seed=1, **kw)
    assert a != generate(model, batch, tok, seed=2, **kw)
    assert a != generate(model, batch, tok, max_new_tokens=8)
    # top_p so small that only the most likely token survives: sampling becomes greedy
    assert generate(model, batch, tok, max_new_tokens=8, do_sample=True, top_p=1e-6, seed=3) == \
        generate(model, batch, tok, max_new_tokens=8)


def test_bad_arguments():
    model, tok = _model("llama")
    right = MultimodalCollator(tok, 512, model.num_tokens, train=False, padding_side="right")(_examples())
    with pytest.raises(InputError, match="left padding"):
        generate(model, right, tok)
    batch = _collator(model, tok)(_examples())
    with pytest.raises(ConfigError):
        generate(model, batch, tok, max_new_tokens=0)
    with pytest.raises(ConfigError):
        generate(model, batch, tok, do_sample=True, temperature=0.0)
    model.train()
    generate(model, batch, tok, max_new_tokens=1)
    assert model.training                                   # mode restored
    model.eval()

"""serve/llama_step.py: the written-out decode step gives the library's logits and cache, or is not used."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from medmllm.serve import llama_step


def _llama(**kw):
    cfg = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128, attention_bias=True,
               rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 32})
    cfg.update(kw)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


def _qwen2(**kw):
    cfg = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=1, max_position_embeddings=128)
    cfg.update(kw)
    return Qwen2ForCausalLM(Qwen2Config(**cfg)).eval()


@pytest.mark.parametrize("build", [_llama, _qwen2], ids=["llama-gqa-bias-llama3rope", "qwen2-mqa"])
@pytest.mark.parametrize("padded", [False, True], ids=["no-mask", "left-padded"])
def test_one_step_gives_the_library_logits_and_cache(build, padded):
    torch.manual_seed(0)
    llm = build()
    assert llama_step.supports(llm)
    b, n = 3, 9
    ids = torch.randint(0, 97, (b, n))
    attention = torch.ones(b, n, dtype=torch.long)
    if padded:
        attention[0, :4] = 0                                               # row 0: 4 positions of left padding
        attention[2, :1] = 0
    positions = (attention.cumsum(-1) - 1).clamp_min(0)                     # each row's own positions
    with torch.inference_mode():
        out = llm(input_ids=ids, attention_mask=attention, position_ids=positions, use_cache=True)
        tok = out.logits[:, -1].argmax(-1)                                  # [B]
        nxt = positions[:, -1:] + 1                                         # [B, 1]
        grown = torch.cat([attention, attention.new_ones(b, 1)], dim=1) if padded else None
        ref_cache, cache = out.past_key_values, copy.deepcopy(out.past_key_values)
        ref = llm(input_ids=tok[:, None], attention_mask=grown, position_ids=nxt, past_key_values=ref_cache,
                  use_cache=True).logits[:, -1]
        got = llama_step.decode_step(llm, tok, nxt, grown, cache)
    assert got.shape == (b, 97)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    for mine, theirs in zip(cache.layers, ref_cache.layers):               # the step wrote the same position
        assert mine.keys.shape[2] == n + 1
        torch.testing.assert_close(mine.keys, theirs.keys, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(mine.values, theirs.values, atol=1e-6, rtol=1e-6)


def _one_step(llm, b=3, n=9, seed=0):
    """The library's next-token logits and cache after a prompt of ``n`` tokens, and this module's."""
    torch.manual_seed(seed)
    ids = torch.randint(0, llm.config.vocab_size, (b, n))
    with torch.inference_mode():
        out = llm(input_ids=ids, use_cache=True)
        tok, nxt = out.logits[:, -1].argmax(-1), torch.full((b, 1), n)
        cache = copy.deepcopy(out.past_key_values)
        ref = llm(input_ids=tok[:, None], position_ids=nxt, past_key_values=out.past_key_values,
                  use_cache=True).logits[:, -1]
        got = llama_step.decode_step(llm, tok, nxt, None, cache)
    return ref, got, out.past_key_values, cache


@pytest.mark.parametrize("build", [_llama, _qwen2], ids=["llama", "qwen2"])
def test_without_padding_the_step_is_the_library_bit_for_bit(build):
    """fp32, no mask: the same operators on the same shapes, so not one bit differs (F.rms_norm included)."""
    ref, got, ref_cache, cache = _one_step(build())
    assert torch.equal(got, ref)
    assert all(torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
               for a, b in zip(cache.layers, ref_cache.layers))


@pytest.mark.parametrize("build", [_llama, _qwen2], ids=["llama", "qwen2"])
def test_prefill_is_the_library_forward_bit_for_bit(build):
    """Unpadded prompts from embeddings: the library's last-position logits and the same cache, bit for bit."""
    from transformers.cache_utils import DynamicCache

    torch.manual_seed(0)
    llm = build()
    embeds = torch.randn(2, 13, 64)
    positions = torch.arange(13)[None].expand(2, -1)
    with torch.inference_mode():
        out = llm(inputs_embeds=embeds, position_ids=positions, use_cache=True, logits_to_keep=1)
        cache = DynamicCache(config=llm.config)
        got = llama_step.prefill(llm, embeds, positions, cache)
    assert torch.equal(got, out.logits[:, -1])
    assert all(torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
               for a, b in zip(cache.layers, out.past_key_values.layers))


def test_positions_past_the_first_rotary_table_grow_it():
    """The rotary table starts at 256 positions; a row at position 300 gets the library's values."""
    ref, got, _, _ = _one_step(_llama(max_position_embeddings=512), b=1, n=300)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_a_dynamic_rope_is_recomputed_as_the_library_does():
    llm = _llama(rope_scaling={"rope_type": "dynamic", "factor": 2.0}, max_position_embeddings=16)
    ref, got, _, _ = _one_step(llm, n=20)                              # past max_position_embeddings: rescaled
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_a_wrapped_projection_runs_its_own_forward():
    """A projection that is not a plain nn.Linear (an unmerged adapter, say) is called, not bypassed."""
    class Shifted(torch.nn.Linear):
        def forward(self, x):
            return super().forward(x) + 0.5

    llm = _llama()
    old = llm.model.layers[0].mlp.up_proj
    new = Shifted(old.in_features, old.out_features, bias=False)
    new.weight = old.weight
    llm.model.layers[0].mlp.up_proj = new
    ref, got, _, _ = _one_step(llm)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    llm.model.layers[0].mlp.up_proj = old
    plain, _, _, _ = _one_step(llm)
    assert not torch.allclose(plain, ref)                              # the shift mattered


def test_a_masked_position_is_not_attended():
    """Masking a cached position changes the logits exactly as the library's forward does."""
    torch.manual_seed(1)
    llm = _llama()
    ids = torch.randint(0, 97, (1, 6))
    with torch.inference_mode():
        out = llm(input_ids=ids, use_cache=True)
        tok, nxt = out.logits[:, -1].argmax(-1), torch.tensor([[6]])
        mask = torch.tensor([[1, 1, 0, 1, 1, 1, 1]])
        ref = llm(input_ids=tok[:, None], attention_mask=mask, position_ids=nxt,
                  past_key_values=copy.deepcopy(out.past_key_values), use_cache=True).logits[:, -1]
        full = llama_step.decode_step(llm, tok, nxt, None, copy.deepcopy(out.past_key_values))
        got = llama_step.decode_step(llm, tok, nxt, mask, copy.deepcopy(out.past_key_values))
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, full)


def test_other_architectures_keep_the_library_forward():
    assert not llama_step.supports(_llama(hidden_act="gelu"))
    assert not llama_step.supports(_qwen2(use_sliding_window=True, sliding_window=4, max_window_layers=0))
    assert not llama_step.supports(torch.nn.Linear(2, 2))


def test_packed_weights_give_the_library_logits_and_a_changed_weight_is_used_as_it_is():
    """oneDNN-packed projections: the library's logits up to float rounding; a weight changed in place after
    packing is used unpacked (the stale copy would move the logits by far more than the tolerance)."""
    llm = _llama()
    if not torch.backends.mkldnn.is_available():
        pytest.skip("no oneDNN in this torch build")
    n_linear = sum(type(m) is torch.nn.Linear for m in llm.modules())
    assert llama_step.pack_weights(llm) == n_linear
    assert llama_step.PACK_MIN_ROWS <= 5                               # the 5-row steps below use the packed copies
    ref, got, _, _ = _one_step(llm, b=5)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    embeds, positions = torch.randn(1, 7, 64), torch.arange(7)[None]
    from transformers.cache_utils import DynamicCache

    with torch.inference_mode():
        want = llm(inputs_embeds=embeds, position_ids=positions, logits_to_keep=1).logits[:, -1]
        torch.testing.assert_close(llama_step.prefill(llm, embeds, positions, DynamicCache(config=llm.config)), want,
                                   atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        llm.model.layers[0].mlp.up_proj.weight.mul_(3.0)
    ref, got, _, _ = _one_step(llm, b=5)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_nothing_is_packed_over_the_memory_budget():
    llm = _llama()
    assert llama_step.pack_weights(llm, max_bytes=0) == 0
    ref, got, _, _ = _one_step(llm, b=5)
    assert torch.equal(got, ref)                                       # F.linear: bit for bit

"""decode.Row: incremental text with held-back partial characters and stop-string prefixes,
end reasons, and per-row nucleus sampling (pick) — with a fake one-char-per-token decoder."""

from __future__ import annotations

import torch

from medmllm.serve.decode import Row, RowParams, _held_back, pick

VOCAB = {1: "a", 2: "b", 3: "E", 4: "N", 5: "D", 6: "\ufffd", 7: "é", 8: " "}


def _row(max_tokens=50, stop=(), **kw):
    out, ends = [], []
    row = Row(RowParams(max_tokens, stop=tuple(stop), **kw), lambda ids: "".join(VOCAB[i] for i in ids),
              emit=out.append, finish=ends.append)
    return row, out, ends


def test_held_back_tail():
    assert _held_back("abc", ()) == 0
    assert _held_back("ab\ufffd", ()) == 1            # an incomplete UTF-8 character
    assert _held_back("abEN", ("END",)) == 2          # "EN" may become "END"
    assert _held_back("abE", ("END", "Eb")) == 1
    assert _held_back("abX", ("END",)) == 0


def test_stream_holds_back_and_cuts_at_the_stop_string():
    row, out, ends = _row(stop=("END",))
    for tok in (1, 2, 3, 4):              # "abEN": "EN" is held back
        assert not row.push(tok, False)
    assert "".join(out) == "ab"
    assert row.push(5, False)             # "abEND": cut before the stop string
    assert "".join(out) == "ab" and row.text == "ab" and ends == ["stop"] and row.steps == 5


def test_a_false_alarm_prefix_is_released():
    row, out, _ = _row(stop=("END",))
    for tok in (1, 3, 4, 1):              # "aENa": "EN" was not the start of END after all
        row.push(tok, False)
    assert "".join(out) == "aENa"


def test_partial_character_released_at_the_end_and_length_reason():
    row, out, ends = _row(max_tokens=3)
    row.push(1, False)
    row.push(6, False)                    # "a\ufffd": held
    assert "".join(out) == "a"
    assert row.push(2, False)             # third token: max_tokens reached, everything is flushed
    assert "".join(out) == "a\ufffdb" and ends == ["length"] and row.steps == 3


def test_eos_ends_with_stop_and_counts_the_eos_step():
    row, out, ends = _row()
    row.push(1, False)
    assert row.push(99, True)
    assert row.text == "a" and ends == ["stop"] and row.steps == 2 and row.ids == [1]


def test_pick_greedy_rows_take_argmax_and_sampling_rows_follow_their_generator():
    logits = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 2.9]])
    greedy = [_row()[0], _row()[0]]
    assert pick(logits, greedy).tolist() == [1, 0]
    # top_p so small that only the most likely token survives: sampling == argmax
    narrow = [_row(temperature=1.0, top_p=1e-6)[0] for _ in range(2)]
    for r in narrow:
        r.generator = torch.Generator().manual_seed(0)
    assert pick(logits, narrow).tolist() == [1, 0]
    # the same seed gives the same draws, row by row
    draws = []
    for _ in range(2):
        rows = [_row(temperature=2.0)[0] for _ in range(2)]
        for k, r in enumerate(rows):
            r.generator = torch.Generator().manual_seed(10 + k)
        draws.append([pick(logits, rows).tolist() for _ in range(20)])
    assert draws[0] == draws[1]
    assert len({tuple(d) for d in draws[0]}) > 1      # temperature 2: not always the same tokens


def test_without_streaming_or_stop_strings_the_text_is_decoded_once_at_the_end():
    calls = []

    def decode(ids):
        calls.append(list(ids))
        return "".join(VOCAB[i] for i in ids)

    out, ends = [], []
    row = Row(RowParams(3), decode, emit=out.append, finish=ends.append, stream=False)
    assert not row.push(1, False) and not row.push(2, False)
    assert calls == [] and out == []
    assert row.push(7, False)
    assert calls == [[1, 2, 7]] and out == ["abé"] and row.text == "abé" and ends == ["length"]


def _layer(keys: torch.Tensor, values: torch.Tensor):
    from transformers.cache_utils import DynamicLayer

    layer = DynamicLayer()
    layer.update(keys, values)
    return layer


def test_growing_layer_appends_in_place_what_dynamic_layer_concatenates():
    """GrowingLayer holds exactly DynamicLayer's keys/values step after step, writing into one buffer
    (the same storage across steps), and copes with keys/values reassigned from outside (row selection)."""
    from medmllm.serve.decode import GrowingLayer

    g = torch.Generator().manual_seed(0)
    k0, v0 = torch.randn(3, 2, 5, 4, generator=g), torch.randn(3, 2, 5, 4, generator=g)
    ref, grow = _layer(k0, v0), GrowingLayer.adopt(_layer(k0, v0))
    ptrs = set()
    for step in range(GrowingLayer.spare + 20):                  # past the first buffer's capacity
        k, v = torch.randn(3, 2, 1, 4, generator=g), torch.randn(3, 2, 1, 4, generator=g)
        want, got = ref.update(k, v), grow.update(k, v)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        ptrs.add(grow.keys.data_ptr())
    assert len(ptrs) <= 2                                        # the first buffer, then one bigger one
    assert grow.get_seq_length() == ref.get_seq_length() == 5 + GrowingLayer.spare + 20
    keep = torch.tensor([2, 0])
    ref.batch_select_indices(keep)
    grow.batch_select_indices(keep)                              # DynamicLayer's own: assigns new tensors
    k, v = torch.randn(2, 2, 1, 4, generator=g), torch.randn(2, 2, 1, 4, generator=g)
    want, got = ref.update(k, v), grow.update(k, v)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_merge_pads_shorter_caches_on_the_left_and_drops_the_mask_when_none_is_needed():
    from transformers.cache_utils import DynamicCache

    from medmllm.serve.decode import DecodeState, merge

    def state(length: int, fill: float) -> DecodeState:
        cache = DynamicCache()
        cache.layers = [_layer(torch.full((1, 2, length, 4), fill), torch.full((1, 2, length, 4), -fill))]
        return DecodeState(cache, torch.zeros(1, 6), None, torch.tensor([[length]]), [], length)

    same = merge([state(3, 1.0), state(3, 2.0)])
    assert same.attention is None and same.length == 3 and same.cache.layers[0].keys.shape == (2, 2, 3, 4)
    mixed = merge([state(3, 1.0), state(5, 2.0), state(2, 3.0)])
    assert mixed.length == 5 and mixed.next_pos.flatten().tolist() == [3, 5, 2]
    assert mixed.attention.tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 1, 1]]
    keys = mixed.cache.layers[0].keys                                   # [3, 2, 5, 4]
    assert torch.equal(keys[0, :, :2], torch.zeros(2, 2, 4)) and torch.equal(keys[0, :, 2:], torch.ones(2, 3, 4))
    assert torch.equal(keys[2, :, 3:], torch.full((2, 2, 4), 3.0))


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128))
    with torch.no_grad():                             # larger weights than the init: sharp attention, so a
        for p in llm.parameters():                    # misplaced cache entry moves the logits visibly
            if p.ndim == 2:
                p.normal_(0.0, 0.3)
    return llm.eval()


def _alone(llm, prompt: torch.Tensor, name: str):
    """A one-row state after ``prompt`` (as the server prefills a request), its row named ``name``."""
    from medmllm.serve.decode import DecodeState, Row, RowParams, _grow_in_place

    with torch.inference_mode():
        out = llm(input_ids=prompt[None], use_cache=True)
    _grow_in_place(out.past_key_values)
    row = Row(RowParams(100), lambda ids: "")
    row.name = name
    n = prompt.shape[0]
    return DecodeState(out.past_key_values, out.logits[:, -1].float(), None, torch.tensor([[n]]), [row], n)


def test_rows_join_and_leave_in_place_and_each_row_decodes_as_alone():
    """Continuous batching on GrowingLayer buffers: a shorter prompt joins into a spare row, a row leaves by
    the last row taking its place, the masked lead is dropped by moving the view; no step, join or leave
    copies the cache to new buffers, and every row's logits are the ones it gets decoding alone."""
    import types

    from medmllm.serve.decode import _step, merge, step_rows

    llm = _tiny_llama()
    model = types.SimpleNamespace(llm=llm)
    g = torch.Generator().manual_seed(1)
    prompts = {name: torch.randint(0, 61, (n,), generator=g) for name, n in (("a", 7), ("b", 11), ("c", 5))}

    ref: dict[str, list[torch.Tensor]] = {}                       # each row decoding alone, greedy
    for name, prompt in prompts.items():
        st = _alone(llm, prompt, name)
        ref[name] = [st.logits[0]]
        for _ in range(12):
            _step(model, st, st.logits.argmax(-1))
            ref[name].append(st.logits[0])

    seen = {name: 0 for name in prompts}

    def check_and_step(st, keep=None):
        tok = st.logits.argmax(-1)
        for k, row in enumerate(st.rows):
            torch.testing.assert_close(st.logits[k], ref[row.name][seen[row.name]], atol=1e-5, rtol=1e-4)
            seen[row.name] += 1
        step_rows(model, st, tok, keep if keep is not None else list(range(len(st.rows))))

    st = merge([_alone(llm, prompts["a"], "a"), _alone(llm, prompts["b"], "b")])   # generic: cat, a padded
    check_and_step(st)                                            # the first step makes the buffers
    buffers = [x._kbuf.data_ptr() for x in st.cache.layers]
    for _ in range(3):
        check_and_step(st)
    st = merge([st, _alone(llm, prompts["c"], "c")])              # c joins into a spare row
    assert [r.name for r in st.rows] == ["a", "b", "c"] and st.attention is not None
    check_and_step(st)
    tok = st.logits.argmax(-1)
    for k, row in enumerate(st.rows):                             # b leaves now: c takes its row
        torch.testing.assert_close(st.logits[k], ref[row.name][seen[row.name]], atol=1e-5, rtol=1e-4)
        seen[row.name] += 1
    length = st.length
    step_rows(model, st, tok, [0, 2])                             # and the 4 positions a and c mask are dropped
    assert [r.name for r in st.rows] == ["a", "c"]
    assert st.length == length + 1 - 4 and all(x.start() == 4 for x in st.cache.layers)
    for _ in range(4):
        check_and_step(st)
    assert [x._kbuf.data_ptr() for x in st.cache.layers] == buffers   # the same buffers all along
    assert seen == {"a": 10, "b": 6, "c": 6}

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

"""MultimodalCollator: labels, placeholder expansion, mismatch errors, truncation, padding, modalities.

Expected token sequences are built independently: the conversation is written out by hand
in each family's format and tokenized as plain text, then compared with the collator's
output after collapsing each expanded placeholder run back to one token.
"""

from __future__ import annotations

import functools
import logging
import random
import re

import pytest
import torch

from medmllm.data.collate import IGNORE_INDEX, MultimodalCollator, flatten_messages
from medmllm.data.records import make_record, media, message
from medmllm.data.tokenizers import build_tokenizer, load_tokenizer
from medmllm.errors import ConfigError, InputError

FAMILIES = ("llama3", "qwen2", "gemma")
META = {"dataset": "toy", "split": "train"}
EOT = {"llama3": "<|eot_id|>", "qwen2": "<|im_end|>", "gemma": "<end_of_turn>"}
GEN_PROMPT = {"llama3": "<|start_header_id|>assistant<|end_header_id|>\n\n",
              "qwen2": "<|im_start|>assistant\n", "gemma": "<start_of_turn>model\n"}


def render_by_hand(family: str, turns: list[tuple[str, str]], gen: bool = False) -> str:
    """The family's official format, written out (no system turns in these tests)."""
    if family == "llama3":
        body = "".join(f"<|start_header_id|>{r}<|end_header_id|>\n\n{c}<|eot_id|>" for r, c in turns)
        return "<|begin_of_text|>" + body + (GEN_PROMPT[family] if gen else "")
    if family == "qwen2":
        body = "".join(f"<|im_start|>{r}\n{c}<|im_end|>\n" for r, c in turns)
        return "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n" + body + (GEN_PROMPT[family] if gen else "")
    body = "".join(f"<start_of_turn>{'model' if r == 'assistant' else r}\n{c}<end_of_turn>\n" for r, c in turns)
    return "<bos>" + body + (GEN_PROMPT[family] if gen else "")


@functools.lru_cache(maxsize=None)
def _tok(family):
    return build_tokenizer(family)


def two_turn(id="rec-1"):
    """user: [image, text], assistant, user: [text], assistant."""
    return {"id": id, "stage": "instruction", "meta": dict(META), "messages": [
        message("user", media("image", "a.png"), "What is shown?"),
        message("assistant", "A chest x-ray."),
        message("user", "Is there a pneumothorax?"),
        message("assistant", "No."),
    ]}


TWO_TURN_BY_HAND = [("user", "<image>\nWhat is shown?"), ("assistant", "A chest x-ray."),
                    ("user", "Is there a pneumothorax?"), ("assistant", "No.")]


def img(w: int) -> torch.Tensor:
    return torch.ones(3, 4, w)  # [C, H, W]


def width_tokens(kind, t):
    return int(t.shape[-1])  # a width-w image yields w feature tokens


def runs(values: list[int], keep) -> list[tuple[int, int, int]]:
    """Maximal runs (start, length, value) of consecutive positions where keep(value)."""
    out = []
    i = 0
    while i < len(values):
        if keep(values[i]):
            j = i
            while j < len(values) and values[j] == values[i]:
                j += 1
            out.append((i, j - i, values[i]))
            i = j
        else:
            i += 1
    return out


def collapse(ids: list[int], placeholder_ids) -> list[int]:
    out = []
    for i, t in enumerate(ids):
        if t in placeholder_ids and i > 0 and ids[i - 1] == t:
            continue
        out.append(t)
    return out


def label_runs(labels: list[int]) -> list[list[int]]:
    out, cur = [], []
    for lab in labels + [IGNORE_INDEX]:
        if lab != IGNORE_INDEX:
            cur.append(lab)
        elif cur:
            out.append(cur)
            cur = []
    return out


# ----------------------------------------------------------------------------- labels and expansion

@pytest.mark.parametrize("family", FAMILIES)
def test_labels_are_exactly_assistant_answers_plus_end_of_turn(family):
    tok = _tok(family)
    col = MultimodalCollator(tok, max_length=256, num_tokens_fn=lambda k, t: 6)
    batch = col([{"record": two_turn(), "modalities": [("image", img(8))]}])
    labels = batch["labels"][0].tolist()
    ids = batch["input_ids"][0].tolist()
    eot_id = tok.convert_tokens_to_ids(EOT[family])
    got = label_runs(labels)
    assert [tok.decode(r) for r in got] == [f"A chest x-ray.{EOT[family]}", f"No.{EOT[family]}"]
    assert got == [tok("A chest x-ray.", add_special_tokens=False)["input_ids"] + [eot_id],
                   tok("No.", add_special_tokens=False)["input_ids"] + [eot_id]]
    # Labels equal the input ids where set; never on the placeholders, never on padding.
    pid = col.placeholder_ids["image"]
    for i, lab in enumerate(labels):
        if lab != IGNORE_INDEX:
            assert lab == ids[i] and ids[i] != pid
    # The whole sequence is the hand-written rendering, with the placeholder expanded.
    expected = tok(render_by_hand(family, TWO_TURN_BY_HAND), add_special_tokens=False)["input_ids"]
    assert collapse(ids, {pid}) == expected
    assert batch["ids"] == ["rec-1"] and batch["dropped"] == []
    assert batch["attention_mask"].tolist() == [[1] * len(ids)]


@pytest.mark.parametrize("family", FAMILIES)
def test_placeholders_expand_to_num_tokens(family):
    tok = _tok(family)
    rec = make_record("rec-2", [media("image", "a.png"), "Compare", media("image", "b.png"), "these."],
                      "Same.", META)
    col = MultimodalCollator(tok, max_length=256, num_tokens_fn=width_tokens)
    batch = col([{"record": rec, "modalities": [("image", img(3)), ("image", img(5))]}])
    ids = batch["input_ids"][0].tolist()
    pid = col.placeholder_ids["image"]
    assert [(n, v) for _, n, v in runs(ids, lambda t: t == pid)] == [(3, pid), (5, pid)]
    assert ids.count(pid) == 8
    hand = [("user", "<image>\nCompare\n<image>\nthese."), ("assistant", "Same.")]
    assert collapse(ids, {pid}) == tok(render_by_hand(family, hand), add_special_tokens=False)["input_ids"]
    assert batch["modality_num_tokens"] == [[3, 5]] and batch["modality_order"] == [["image", "image"]]


@pytest.mark.parametrize("family", FAMILIES)
def test_fallback_without_generation_markers_gives_same_labels(family, tmp_path):
    tok = _tok(family)
    plain = build_tokenizer(family)
    plain.chat_template = re.sub(r"\{%-?\s*(end)?generation\s*-?%\}", "", tok.chat_template)
    ex = [{"record": two_turn(), "modalities": [("image", img(4))]}]
    a = MultimodalCollator(tok, 256, width_tokens)
    b = MultimodalCollator(plain, 256, width_tokens)
    assert a.uses_generation_markers and not b.uses_generation_markers
    ba, bb = a(ex), b(ex)
    assert torch.equal(ba["input_ids"], bb["input_ids"]) and torch.equal(ba["labels"], bb["labels"])


def test_fallback_rejects_template_that_is_not_prefix_stable():
    tok = build_tokenizer("chatml")
    # Renders the number of messages first: no rendering is a prefix of a longer one.
    tok.chat_template = "{{ messages | length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    col = MultimodalCollator(tok, 256, width_tokens)
    with pytest.raises(ConfigError, match="prefix-stable"):
        col([{"record": two_turn(), "modalities": [("image", img(4))]}])


# ----------------------------------------------------------------------------- errors

@pytest.mark.parametrize("family", FAMILIES)
def test_placeholder_mismatch_names_record_and_counts(family):
    col = MultimodalCollator(_tok(family), 256, width_tokens)
    rec = make_record("rec-bad", [media("image", "a.png"), "Look at <image> here"], "ok", META)
    with pytest.raises(InputError) as ei:
        col([{"record": rec, "modalities": [("image", img(4))]}])
    assert ei.value.path == "rec-bad"
    assert ei.value.reason == "expected 1 image placeholders for 1 image parts, found 2"
    rec2 = make_record("rec-bad2", ["No image, but <volume>"], "ok", META)
    with pytest.raises(InputError, match=r"rec-bad2: expected 0 volume placeholders for 0 volume parts, found 1"):
        col([{"record": rec2, "modalities": []}])


def test_modalities_must_match_parts():
    col = MultimodalCollator(_tok("llama3"), 256, width_tokens)
    with pytest.raises(InputError, match=r"rec-1: modalities: expected 1 tensors of kinds \['image'\].*got 0"):
        col([{"record": two_turn(), "modalities": []}])
    with pytest.raises(InputError, match=r"got 1 of kinds \['signal'\]"):
        col([{"record": two_turn(), "modalities": [("signal", torch.zeros(2, 10))]}])


def test_gemma_rejected_conversation_is_input_error():
    rec = two_turn("rec-3")
    rec["messages"] = rec["messages"][:1] + rec["messages"][2:]  # user, user, assistant
    col = MultimodalCollator(_tok("gemma"), 256, width_tokens)
    with pytest.raises(InputError, match="rec-3: the chat template rejected.*alternate"):
        col([{"record": rec, "modalities": [("image", img(4))]}])


def test_bad_settings():
    tok = _tok("llama3")
    with pytest.raises(ConfigError, match="truncation"):
        MultimodalCollator(tok, 10, width_tokens, truncation="cut")
    with pytest.raises(ConfigError, match="max_length"):
        MultimodalCollator(tok, 0, width_tokens)
    col = MultimodalCollator(tok, 256, lambda k, t: 0)
    with pytest.raises(ConfigError, match=r"num_tokens_fn\('image', tensor of shape \(3, 4, 4\)\).*got 0"):
        col([{"record": two_turn(), "modalities": [("image", img(4))]}])


# ----------------------------------------------------------------------------- truncation

def _len_of(family, turns, n_tokens):
    """Sequence length computed from the hand rendering: one token per placeholder -> n_tokens."""
    tok = _tok(family)
    return len(tok(render_by_hand(family, turns), add_special_tokens=False)["input_ids"]) + n_tokens - 1


@pytest.mark.parametrize("family", FAMILIES)
def test_overlong_sample_is_dropped_and_reported(family, caplog):
    full = _len_of(family, TWO_TURN_BY_HAND, 10)
    col = MultimodalCollator(_tok(family), max_length=full - 1, num_tokens_fn=lambda k, t: 10)
    short = make_record("short", [media("image", "b.png"), "Hi"], "Ok.", META)
    exs = [{"record": two_turn("long"), "modalities": [("image", img(4))]},
           {"record": short, "modalities": [("image", img(4))]}]
    with caplog.at_level(logging.WARNING, logger="medmllm.data.collate"):
        b1 = col(exs)
        b2 = col(exs)
    for b in (b1, b2):
        assert b["ids"] == ["short"] and b["input_ids"].shape[0] == 1
        assert b["dropped"] == [{"id": "long", "reason": f"length {full} > max_length {full - 1} (truncation='drop')"}]
        assert b["modality_inputs"]["image"].shape == (1, 3, 4, 4)
    assert len([r for r in caplog.records if "drops samples" in r.getMessage()]) == 1
    # Exactly at the limit: kept.
    assert MultimodalCollator(_tok(family), full, lambda k, t: 10)(exs[:1])["ids"] == ["long"]


@pytest.mark.parametrize("family", FAMILIES)
def test_shorten_text_cuts_user_text_only(family):
    tok = _tok(family)
    words = " ".join(f"finding{i}" for i in range(60))
    rec = make_record("long", [media("image", "a.png"), "Short question?", media("image", "b.png"), words],
                      "Answer stays.", META)
    full = _len_of(family, [("user", f"<image>\nShort question?\n<image>\n{words}"), ("assistant", "Answer stays.")], 7) + 6
    limit = full - 40
    col = MultimodalCollator(tok, limit, lambda k, t: 7, truncation="shorten_text")
    b = col([{"record": rec, "modalities": [("image", img(4)), ("image", img(4))]}])
    assert b["dropped"] == [] and b["ids"] == ["long"]
    ids = b["input_ids"][0].tolist()
    assert len(ids) <= limit
    pid = col.placeholder_ids["image"]
    assert [n for _, n, _ in runs(ids, lambda t: t == pid)] == [7, 7]
    text = tok.decode(collapse(ids, {pid}))
    assert "Short question?" in text  # the shorter part is untouched
    kept = text.split("Short question?\n<image>\n", 1)[1]
    kept = kept.split(EOT[family], 1)[0]
    assert 0 < len(kept) < len(words) and words.startswith(kept)  # a prefix of the longest part
    assert [tok.decode(r) for r in label_runs(b["labels"][0].tolist())] == [f"Answer stays.{EOT[family]}"]


def test_shorten_text_drops_when_modalities_alone_do_not_fit():
    col = MultimodalCollator(_tok("llama3"), 30, lambda k, t: 40, truncation="shorten_text")
    b = col([{"record": two_turn("big"), "modalities": [("image", img(4))]}])
    assert b["ids"] == [] and b["input_ids"].shape == (0, 0)
    assert b["dropped"][0]["id"] == "big"
    assert "with all user text removed" in b["dropped"][0]["reason"]


def test_no_modality_span_is_ever_cut_randomised():
    """Random records, random limits: every kept sample fits and holds every span whole."""
    rng = random.Random(1234)
    shortened = 0
    vocab = "lung heart nodule opacity effusion normal chest liver brain rhythm".split()
    for case in range(60):
        family = FAMILIES[case % 3]
        tok = _tok(family)
        parts, kinds = [], []
        for _ in range(rng.randint(1, 4)):
            if rng.random() < 0.6:
                kind = rng.choice(["image", "signal", "volume"])
                parts.append(media(kind, "x"))
                kinds.append(kind)
            else:
                parts.append(" ".join(rng.choice(vocab) for _ in range(rng.randint(1, 40))))
        if not kinds:
            parts.append(media("image", "x"))
            kinds.append("image")
        parts.append("question?")
        mods = [(k, torch.zeros(rng.randint(1, 9))) for k in kinds]
        answer = " ".join(rng.choice(vocab) for _ in range(rng.randint(1, 5)))
        rec = make_record(f"r{case}", parts, answer, META)
        truncation = rng.choice(["drop", "shorten_text"])
        limit = rng.randint(20, 140)
        col = MultimodalCollator(tok, limit, lambda k, t: int(t.shape[0]), truncation=truncation)
        b = col([{"record": rec, "modalities": mods}])
        if b["ids"] == []:
            assert b["dropped"][0]["id"] == f"r{case}" and "max_length" in b["dropped"][0]["reason"]
            continue
        ids = b["input_ids"][0].tolist()
        assert len(ids) <= limit
        spans = runs(ids, lambda t: t in col._kind_of_id)
        assert [(n, col._kind_of_id[v]) for _, n, v in spans] == [(int(t.shape[0]), k) for k, t in mods]
        assert all(b["labels"][0, s:s + n].eq(IGNORE_INDEX).all() for s, n, _ in spans)
        assert [tok.decode(r) for r in label_runs(b["labels"][0].tolist())] == [answer + EOT[family]]
        unlimited = MultimodalCollator(tok, 10**6, lambda k, t: int(t.shape[0]))
        if len(unlimited([{"record": rec, "modalities": mods}])["input_ids"][0]) > limit:
            assert truncation == "shorten_text"
            shortened += 1
    assert shortened >= 10  # the draw exercises shortening, not only fits and drops


# ----------------------------------------------------------------------------- padding

@pytest.mark.parametrize("family", FAMILIES)
def test_generation_left_padding(family):
    tok = _tok(family)
    col = MultimodalCollator(tok, 256, width_tokens, train=False)
    assert col.padding_side == "left"
    short = make_record("s", [media("image", "a.png"), "Hi?"], "Yes.", META)
    b = col([{"record": two_turn("long"), "modalities": [("image", img(2))]},
             {"record": short, "modalities": [("image", img(2))]}])
    pid = col.placeholder_ids["image"]
    hand = {"long": TWO_TURN_BY_HAND[:3], "s": [("user", "<image>\nHi?")]}
    L = b["input_ids"].shape[1]
    for row, rid in enumerate(b["ids"]):
        expected = tok(render_by_hand(family, hand[rid], gen=True), add_special_tokens=False)["input_ids"]
        n = len(expected) + 1  # the placeholder expands to 2
        ids, att = b["input_ids"][row].tolist(), b["attention_mask"][row].tolist()
        assert att == [0] * (L - n) + [1] * n
        assert ids[: L - n] == [tok.pad_token_id] * (L - n)
        assert collapse(ids[L - n:], {pid}) == expected  # prompt ends with the generation header
    assert b["labels"].eq(IGNORE_INDEX).all()
    assert b["attention_mask"][0].all() and not b["attention_mask"][1].all()


def test_training_right_padding():
    tok = _tok("qwen2")
    col = MultimodalCollator(tok, 256, width_tokens)
    short = make_record("s", [media("image", "a.png"), "Hi?"], "Yes.", META)
    b = col([{"record": two_turn("long"), "modalities": [("image", img(2))]},
             {"record": short, "modalities": [("image", img(2))]}])
    L = b["input_ids"].shape[1]
    n = int(b["attention_mask"][1].sum())
    assert n < L and b["attention_mask"][1].tolist() == [1] * n + [0] * (L - n)
    assert b["input_ids"][1, n:].eq(tok.pad_token_id).all() and b["labels"][1, n:].eq(IGNORE_INDEX).all()
    assert b["input_ids"][1, n - 1].item() == tok.convert_tokens_to_ids("\u010a")  # the "\n" after <|im_end|>


def test_no_assistant_turn_is_dropped_in_training():
    rec = make_record("q", [media("image", "a.png"), "Hi?"], None, META)
    b = MultimodalCollator(_tok("llama3"), 256, width_tokens)([{"record": rec, "modalities": [("image", img(2))]}])
    assert b["dropped"] == [{"id": "q", "reason": "no assistant tokens to train on"}]


# ----------------------------------------------------------------------------- modalities

def test_modalities_stacked_padded_and_indexed():
    col = MultimodalCollator(_tok("llama3"), 512, lambda k, t: 2)
    r1 = make_record("a", [media("image", "1"), media("signal", "s"), "Q?"], "A.", META)
    r2 = make_record("b", [media("image", "2"), media("image", "3"), "Q?"], "B.", META)
    b = col([{"record": r1, "modalities": [("image", img(4)), ("signal", torch.arange(6.).reshape(2, 3))]},
             {"record": r2, "modalities": [("image", img(4)), ("image", 2 * img(6))]}])
    assert b["modality_order"] == [["image", "signal"], ["image", "image"]]
    assert b["modality_batch_index"]["image"].tolist() == [0, 1, 1]
    assert b["modality_batch_index"]["signal"].tolist() == [0]
    images, mask = b["modality_inputs"]["image"], b["modality_masks"]["image"]
    assert images.shape == (3, 3, 4, 6) and mask.shape == (3, 3, 4, 6)
    assert mask[:2, :, :, :4].all() and not mask[:2, :, :, 4:].any() and mask[2].all()
    assert images[:2, :, :, 4:].eq(0).all() and images[:2, :, :, :4].eq(1).all() and images[2].eq(2).all()
    assert torch.equal(b["modality_inputs"]["signal"], torch.arange(6.).reshape(1, 2, 3))
    assert b["modality_masks"]["signal"].all()
    listed = MultimodalCollator(_tok("llama3"), 512, lambda k, t: 2, stack_modalities=False)(
        [{"record": r2, "modalities": [("image", img(4)), ("image", img(6))]}])
    assert [t.shape[-1] for t in listed["modality_inputs"]["image"]] == [4, 6]


def test_flatten_messages_uses_one_placeholder_per_part():
    msgs = [message("user", media("image", "a"), "  Q?  ", media("ehr", data={"x": 1}), "")]
    assert flatten_messages(msgs) == [{"role": "user", "content": "<image>\nQ?\n<ehr>"}]


# ----------------------------------------------------------------------------- save/load

@pytest.mark.parametrize("family", FAMILIES)
def test_saved_tokenizer_collates_identically(family, tmp_path):
    tok = _tok(family)
    tok.save_pretrained(tmp_path / family)
    back = load_tokenizer(tmp_path / family)
    ex = [{"record": two_turn(), "modalities": [("image", img(3))]}]
    a = MultimodalCollator(tok, 256, width_tokens)(ex)
    b = MultimodalCollator(back, 256, width_tokens)(ex)
    for key in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(a[key], b[key]), key

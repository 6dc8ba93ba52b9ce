"""Chat templates (exact renderings written by hand from each family's official format) and tokenizers."""

from __future__ import annotations

import functools

import pytest

from medmllm.data.chat_templates import CHAT_TEMPLATES, get_chat_template, has_generation_markers
from medmllm.data.tokenizers import (MODALITY_TOKENS, add_modality_tokens, build_tokenizer, ensure_pad_token,
                                     load_tokenizer, modality_token_ids, set_chat_template)
from medmllm.errors import ConfigError, InputError

FAMILIES = ("llama3", "qwen2", "gemma", "chatml")

CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is shown?"},
    {"role": "assistant", "content": "A chest x-ray."},
    {"role": "user", "content": "Any effusion?"},
    {"role": "assistant", "content": "No."},
]

# Expected renderings, typed by hand from the official template formats.
EXPECTED_FULL = {
    "llama3": ("<|begin_of_text|>"
               "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\nWhat is shown?<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\nA chest x-ray.<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\nAny effusion?<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\nNo.<|eot_id|>"),
    "qwen2": ("<|im_start|>system\nBe brief.<|im_end|>\n"
              "<|im_start|>user\nWhat is shown?<|im_end|>\n"
              "<|im_start|>assistant\nA chest x-ray.<|im_end|>\n"
              "<|im_start|>user\nAny effusion?<|im_end|>\n"
              "<|im_start|>assistant\nNo.<|im_end|>\n"),
    "gemma": ("<bos>"
              "<start_of_turn>user\nBe brief.\n\nWhat is shown?<end_of_turn>\n"
              "<start_of_turn>model\nA chest x-ray.<end_of_turn>\n"
              "<start_of_turn>user\nAny effusion?<end_of_turn>\n"
              "<start_of_turn>model\nNo.<end_of_turn>\n"),
}
EXPECTED_FULL["chatml"] = EXPECTED_FULL["qwen2"]

EXPECTED_PROMPT = {  # CONV[:2] with add_generation_prompt=True
    "llama3": ("<|begin_of_text|>"
               "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\nWhat is shown?<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\n"),
    "qwen2": ("<|im_start|>system\nBe brief.<|im_end|>\n"
              "<|im_start|>user\nWhat is shown?<|im_end|>\n"
              "<|im_start|>assistant\n"),
    "gemma": "<bos><start_of_turn>user\nBe brief.\n\nWhat is shown?<end_of_turn>\n<start_of_turn>model\n",
}
EXPECTED_PROMPT["chatml"] = EXPECTED_PROMPT["qwen2"]

EOT = {"llama3": "<|eot_id|>", "qwen2": "<|im_end|>", "gemma": "<end_of_turn>", "chatml": "<|im_end|>"}


@functools.lru_cache(maxsize=None)
def _tok(family):
    return build_tokenizer(family)


def test_registry_has_exact_names():
    assert CHAT_TEMPLATES.names() == sorted(FAMILIES)
    with pytest.raises(ConfigError, match="unknown chat template 'Llama3'"):
        get_chat_template("Llama3")


@pytest.mark.parametrize("family", FAMILIES)
def test_rendering_matches_official_format(family):
    tok = _tok(family)
    assert tok.apply_chat_template(CONV, tokenize=False) == EXPECTED_FULL[family]
    assert tok.apply_chat_template(CONV[:2], tokenize=False, add_generation_prompt=True) == EXPECTED_PROMPT[family]
    # Without add_generation_prompt the prompt ends at the user turn.
    no_gen = tok.apply_chat_template(CONV[:2], tokenize=False)
    assert EXPECTED_PROMPT[family].startswith(no_gen) and len(no_gen) < len(EXPECTED_PROMPT[family])


@pytest.mark.parametrize("family", FAMILIES)
def test_assistant_mask_covers_answer_and_end_of_turn(family):
    tok = _tok(family)
    assert has_generation_markers(tok.chat_template)
    out = tok.apply_chat_template(CONV, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    runs, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    assert [tok.decode(r) for r in runs] == [f"A chest x-ray.{EOT[family]}", f"No.{EOT[family]}"]


def test_qwen2_default_system_only_without_system():
    tok = _tok("qwen2")
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    assert text == "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    assert _tok("chatml").apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False) == \
        "<|im_start|>user\nHi<|im_end|>\n"


def test_gemma_requires_alternating_roles():
    import jinja2

    tok = _tok("gemma")
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(jinja2.TemplateError, match="alternate"):
        tok.apply_chat_template(bad, tokenize=False)


def test_has_generation_markers():
    assert has_generation_markers("{%- generation %}x{% endgeneration %}")
    assert not has_generation_markers("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert not has_generation_markers(None)


# ----------------------------------------------------------------------------- tokenizers

@pytest.mark.parametrize("family", FAMILIES)
def test_built_tokenizer_special_tokens(family):
    tok = _tok(family)
    spec = get_chat_template(family)
    assert tok.eos_token == spec.eot_token and tok.pad_token == spec.pad_token and tok.bos_token == spec.bos_token
    assert tok.pad_token_id != tok.eos_token_id
    for t in spec.special_tokens + list(MODALITY_TOKENS.values()):
        assert len(tok(t, add_special_tokens=False)["input_ids"]) == 1, t
    # Placeholders never merge with neighbouring text.
    ids = tok("x<image>y<volume><volume>z", add_special_tokens=False)["input_ids"]
    pid = modality_token_ids(tok)
    assert [i for i in ids if i in pid.values()] == [pid["image"], pid["volume"], pid["volume"]]
    assert len(ids) == 3 + 3
    # No special tokens added by plain tokenization; byte-level round trip is exact.
    text = "Naïve résumé: 5 mm nodule\n\tµSv ≥ 3 — 肺"
    enc = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(enc) == text


def test_build_tokenizer_rejects_bad_input():
    with pytest.raises(ConfigError, match="vocab_size"):
        build_tokenizer("llama3", vocab_size=100)
    with pytest.raises(ConfigError, match="corpus"):
        build_tokenizer("llama3", corpus=[])
    with pytest.raises(ConfigError, match="unknown chat template"):
        build_tokenizer("mistral")


@pytest.mark.parametrize("family", ["llama3", "gemma"])
def test_save_load_roundtrip(tmp_path, family):
    tok = build_tokenizer(family, corpus=["a small corpus about lungs and hearts"] * 3, vocab_size=320)
    tok.save_pretrained(tmp_path / "tok")
    back = load_tokenizer(tmp_path / "tok")
    text = "<image>\nlungs and hearts: Ünïcode"
    assert back(text, add_special_tokens=False)["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
    assert back.apply_chat_template(CONV, tokenize=False) == EXPECTED_FULL[family]
    assert (back.eos_token, back.pad_token, back.bos_token) == (tok.eos_token, tok.pad_token, tok.bos_token)
    assert modality_token_ids(back) == modality_token_ids(tok)
    with pytest.raises(InputError, match="save_pretrained"):
        load_tokenizer(tmp_path / "missing")


def _plain_tokenizer():
    """A 'hub-like' tokenizer without modality tokens or chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(["plain text only"], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|im_start|>", "<|im_end|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>",
                                   extra_special_tokens=["<|im_start|>"])


def test_add_modality_tokens_to_plain_tokenizer():
    tok = _plain_tokenizer()
    with pytest.raises(ConfigError, match="add_modality_tokens"):
        modality_token_ids(tok)
    n0 = len(tok)
    ids = add_modality_tokens(tok)
    assert sorted(ids) == sorted(MODALITY_TOKENS) and len(set(ids.values())) == 4
    assert len(tok) == n0 + 4
    assert all(i >= n0 for i in ids.values())
    assert add_modality_tokens(tok) == ids and len(tok) == n0 + 4  # idempotent
    assert tok("a<ehr>b", add_special_tokens=False)["input_ids"].count(ids["ehr"]) == 1
    assert "<|im_start|>" in tok.all_special_tokens  # existing extra specials kept

    assert tok.pad_token_id is None
    assert ensure_pad_token(tok) == tok.eos_token_id
    set_chat_template(tok, "chatml")
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == \
        "<|im_start|>user\nhi<|im_end|>\n"
    with pytest.raises(ConfigError, match="llama3 control tokens"):
        set_chat_template(tok, "llama3")

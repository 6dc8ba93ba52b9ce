"""Tokenizers: tiny locally trained ones (tests, offline quickstart) and modality tokens for real ones.

medmllm marks where a modality's features go with one placeholder token per kind
(:data:`MODALITY_TOKENS`): ``<image>``, ``<volume>``, ``<signal>``, ``<ehr>``. They are
added as *special* tokens so they are never split and never merged with neighbouring
text; the collator expands each into as many copies as the encoder yields features.
"""

from __future__ import annotations

import os
from pathlib import Path

from medmllm.data.chat_templates import get_chat_template
from medmllm.data.records import MODALITY_PARTS
from medmllm.errors import ConfigError, InputError

MODALITY_TOKENS: dict[str, str] = {kind: f"<{kind}>" for kind in MODALITY_PARTS}

# Enough text for a byte-level BPE to learn a few hundred merges (roles, common words).
DEFAULT_CORPUS: tuple[str, ...] = (
    "system user assistant model",
    "You are a helpful assistant. You are a helpful medical assistant.",
    "Describe the image. What abnormality is seen in this chest x-ray?",
    "Is there a pneumothorax? Is there a pleural effusion? Is the heart enlarged?",
    "No. Yes. There is no pneumothorax. There is a small right pleural effusion.",
    "The lungs are clear. The cardiomediastinal silhouette is within normal limits.",
    "Findings: no acute cardiopulmonary abnormality. Impression: normal chest radiograph.",
    "Axial CT of the abdomen shows a hypodense lesion in the liver.",
    "The MRI of the brain shows no acute infarct. The ventricles are normal in size.",
    "The ECG shows sinus rhythm with a heart rate of 72 beats per minute.",
    "Patient history: 65 year old male with cough and fever for 3 days.",
    "Answer with one word. Choose one of the options: A, B, C or D.",
)


def _min_vocab(n_special: int) -> int:
    return 256 + n_special + 1  # byte alphabet + specials + at least one merge


def build_tokenizer(family: str, corpus: list[str] | None = None, vocab_size: int = 512):
    """Train a tiny byte-level BPE tokenizer locally and dress it as ``family``'s chat tokenizer.

    Byte-level BPE (GPT-2 style pre-tokenizer, no prefix space, no trimmed offsets) encodes
    any text and decodes it back exactly. Added as special tokens (never split): the
    family's control tokens (:attr:`ChatTemplate.special_tokens`) and :data:`MODALITY_TOKENS`.
    ``eos_token`` is the family's end-of-turn token, ``pad_token`` its pad token,
    ``bos_token`` its bos (if any); ``chat_template`` is the family's template.
    No special tokens are added by ``tokenizer(text)`` itself: the chat template writes bos.

    ``corpus``: training texts (default :data:`DEFAULT_CORPUS`); ``vocab_size`` counts the
    256 byte symbols and the special tokens. Returns a ``transformers.PreTrainedTokenizerFast``
    that round-trips through ``save_pretrained`` / :func:`load_tokenizer` offline.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    spec = get_chat_template(family)
    specials = spec.special_tokens + [t for t in MODALITY_TOKENS.values() if t not in spec.special_tokens]
    if not isinstance(vocab_size, int) or vocab_size < _min_vocab(len(specials)):
        raise ConfigError(f"vocab_size: expected an int >= {_min_vocab(len(specials))} "
                          f"(256 bytes + {len(specials)} special tokens + 1), got {vocab_size!r}")
    texts = list(DEFAULT_CORPUS if corpus is None else corpus)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise ConfigError(f"corpus: expected a non-empty list of strings, got {type(corpus).__name__}")

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(texts, trainer)

    named = {"eos_token": spec.eot_token, "pad_token": spec.pad_token}
    if spec.bos_token is not None:
        named["bos_token"] = spec.bos_token
    extra = [t for t in specials if t not in named.values()]
    tok = PreTrainedTokenizerFast(tokenizer_object=core, extra_special_tokens=extra, **named)
    tok.chat_template = spec.template
    return tok


def load_tokenizer(path: str | os.PathLike):
    """Load a tokenizer saved with ``save_pretrained`` from a local folder (never the hub)."""
    from transformers import AutoTokenizer

    p = Path(path)
    if not (p / "tokenizer_config.json").is_file():
        raise InputError(p, "expected a folder written by save_pretrained (with tokenizer_config.json), "
                            "found none")
    return AutoTokenizer.from_pretrained(str(p), local_files_only=True)


def add_modality_tokens(tokenizer) -> dict[str, int]:
    """Add :data:`MODALITY_TOKENS` as special tokens (idempotent); return ``{kind: token id}``.

    For real hub tokenizers. Adding tokens grows the vocabulary: the language model must
    then ``model.resize_token_embeddings(len(tokenizer))`` before training or inference
    (the new rows are only written to, never read, when features replace the placeholders,
    but the embedding matrix must be large enough to index them).
    """
    missing = [t for t in MODALITY_TOKENS.values() if t not in tokenizer.get_vocab()
               or t not in tokenizer.all_special_tokens]
    if missing:
        tokenizer.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)
    return modality_token_ids(tokenizer)


def modality_token_ids(tokenizer) -> dict[str, int]:
    """``{kind: id}`` of the placeholder tokens; ConfigError if one is missing or splits into pieces."""
    ids: dict[str, int] = {}
    for kind, tok in MODALITY_TOKENS.items():
        enc = tokenizer(tok, add_special_tokens=False)["input_ids"]
        if len(enc) != 1 or tok not in tokenizer.get_vocab():
            raise ConfigError(f"tokenizer: expected {tok!r} to be one token, got {len(enc)} tokens "
                              f"{enc}; call medmllm.data.tokenizers.add_modality_tokens(tokenizer)")
        ids[kind] = enc[0]
    return ids


def set_chat_template(tokenizer, family: str) -> None:
    """Install medmllm's template of ``family`` (with generation markers) on ``tokenizer``.

    The family's control tokens must already be in the tokenizer (true for that family's
    hub tokenizer); ConfigError names the missing ones otherwise.
    """
    spec = get_chat_template(family)
    vocab = tokenizer.get_vocab()
    missing = [t for t in spec.control_tokens + (spec.eot_token,) if t not in vocab]
    if missing:
        raise ConfigError(f"tokenizer: expected the {family} control tokens {missing} in the vocabulary, "
                          f"they are missing; is this a {family} tokenizer?")
    tokenizer.chat_template = spec.template


def ensure_pad_token(tokenizer) -> int:
    """Give ``tokenizer`` a pad token if it has none (its eos token); return the pad id.

    Padding positions are masked out of attention and labels by the collator, so reusing
    eos as pad is harmless there.
    """
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ConfigError("tokenizer: expected a pad or eos token to pad with, found neither")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer.pad_token_id

"""Text generation from a collated multimodal batch, with a KV cache.

The prompt goes through :meth:`MedMLLM.embed_inputs` once (modality features scattered into the
placeholders), then one token per step is fed with ``past_key_values``. Batches must be
left-padded (``MultimodalCollator(train=False)`` pads left); positions are counted over real
tokens, so a left-padded row generates what it would alone (greedy, up to float rounding).

:func:`generate` returns texts, :func:`generate_ids` the new token ids of each row.
"""

from __future__ import annotations

from typing import Sequence

import torch

from medmllm.errors import ConfigError, InputError


def eos_ids(model, tokenizer) -> list[int]:
    """End-of-turn ids: the tokenizer's eos (medmllm sets it to the family's eot) and the LLM's."""
    ids = {tokenizer.eos_token_id}
    cfg = getattr(model.llm.config, "eos_token_id", None)
    ids.update(cfg if isinstance(cfg, (list, tuple)) else [cfg])
    return sorted(int(i) for i in ids if i is not None)


def _pick(logits: torch.Tensor, do_sample: bool, temperature: float, top_p: float,
          generator: torch.Generator | None) -> torch.Tensor:
    """Next token ids ``[B]`` from ``logits [B, V]``: argmax, or nucleus sampling at ``temperature``."""
    if not do_sample:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)              # [B, V]
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)               # [B, V]
        outside = sorted_p.cumsum(-1) - sorted_p > top_p                     # mass before token > p
        sorted_p = sorted_p.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)       # [B]


def _cut(text: str, stop_strings: Sequence[str]) -> tuple[str, bool]:
    """``text`` up to the earliest stop string, and whether one was found."""
    hits = [i for i in (text.find(s) for s in stop_strings) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


def model_inputs(model, batch: dict) -> dict:
    """The batch's forward inputs, moved to the model's device."""
    device = model.device

    def move(v):
        if isinstance(v, torch.Tensor):
            return v.to(device)
        if isinstance(v, dict):
            return {k: move(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [move(x) for x in v]
        return v

    keys = ("input_ids", "attention_mask", "modality_inputs", "modality_batch_index", "question_embeds",
            "modality_tokens")
    return {k: move(batch[k]) for k in keys if batch.get(k) is not None}


def generate(model, batch: dict, tokenizer, max_new_tokens: int = 64, do_sample: bool = False,
             temperature: float = 1.0, top_p: float = 1.0, stop_strings: Sequence[str] | None = None,
             seed: int | None = None) -> list[str]:
    """Generate one answer per row of a left-padded ``batch`` (collator keys); returns the texts.

    Greedy by default (deterministic). ``do_sample``: nucleus sampling at ``temperature`` and
    ``top_p``, reproducible with ``seed``. A row stops at an end-of-turn/eos token, after
    ``max_new_tokens``, or at the first of ``stop_strings`` (the text is cut before it). Special
    tokens are left out of the text. The model is run in eval mode (its mode is restored).
    """
    stop_strings = [s for s in (stop_strings or []) if s]
    rows = generate_ids(model, batch, tokenizer, max_new_tokens, do_sample, temperature, top_p, stop_strings, seed)
    return [_cut(tokenizer.decode(row, skip_special_tokens=True), stop_strings)[0] for row in rows]


@torch.no_grad()
def generate_ids(model, batch: dict, tokenizer, max_new_tokens: int = 64, do_sample: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, stop_strings: Sequence[str] | None = None,
                 seed: int | None = None) -> list[list[int]]:
    """As :func:`generate`, but returns each row's new token ids (the eos token and anything after it
    left out; a row stopped by a stop string keeps the tokens up to and including the one completing it).
    """
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens: expected >= 1, got {max_new_tokens}")
    if do_sample and (temperature <= 0 or not 0 < top_p <= 1):
        raise ConfigError(f"sampling needs temperature > 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    stop_strings = [s for s in (stop_strings or []) if s]
    inputs = model_inputs(model, batch)
    mask = inputs.get("attention_mask")
    if mask is not None and bool((mask[:, -1] == 0).any()):
        raise InputError("attention_mask", "expected left padding (every row ends with a real token), got a row "
                                           "ending in padding; collate with MultimodalCollator(train=False)")
    was_training = model.training
    model.eval()
    try:
        return _decode_loop(model, inputs, tokenizer, max_new_tokens, do_sample, temperature, top_p,
                            stop_strings, seed)
    finally:
        model.train(was_training)


def _decode_loop(model, inputs: dict, tokenizer, max_new_tokens: int, do_sample: bool, temperature: float,
                 top_p: float, stop_strings: list[str], seed: int | None) -> list[list[int]]:
    """The cached decoding loop; returns each row's new token ids (eos and what follows removed)."""
    llm = model.llm
    embeds, attention, positions = model.embed_inputs(**inputs)              # [B, L, H], [B, L], [B, L]
    b = embeds.shape[0]
    generator = torch.Generator(device=embeds.device).manual_seed(seed) if seed is not None else None
    eos = torch.tensor(eos_ids(model, tokenizer), device=embeds.device)
    out = llm(inputs_embeds=embeds, attention_mask=attention, position_ids=positions, use_cache=True,
              logits_to_keep=1)
    next_pos = positions[:, -1:] + 1                                          # [B, 1]
    full_attention = attention is None or bool(attention.all())               # no padding: no mask needed
    finished = torch.zeros(b, dtype=torch.bool, device=embeds.device)         # [B]
    rows: list[list[int]] = [[] for _ in range(b)]
    for _ in range(max_new_tokens):
        tok = _pick(out.logits[:, -1].float(), do_sample, temperature, top_p, generator)   # [B]
        hit_eos = torch.isin(tok, eos)
        for i in (~finished & ~hit_eos).nonzero().flatten().tolist():
            rows[i].append(int(tok[i]))
        finished |= hit_eos
        if stop_strings:
            for i in (~finished).nonzero().flatten().tolist():
                finished[i] = _cut(tokenizer.decode(rows[i], skip_special_tokens=True), stop_strings)[1]
        if bool(finished.all()):
            break
        if not full_attention:  # padded rows: the mask must grow with the cache
            attention = torch.cat([attention, attention.new_ones(b, 1)], dim=1)  # [B, L + t]
        out = llm(input_ids=tok[:, None], attention_mask=None if full_attention else attention,
                  position_ids=next_pos, past_key_values=out.past_key_values, use_cache=True)
        next_pos = next_pos + 1
    return rows

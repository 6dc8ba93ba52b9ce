"""One decode step of a Llama-family LLM written out: the serving loop's token-per-row forward pass.

``transformers``' forward of a ``LlamaForCausalLM`` for one new token per row spends much of its time
outside the arithmetic: building the attention mask, routing keyword arguments, dataclass outputs, module
calls, the rotary embedding recomputed every step, RMSNorm as six operators. :func:`decode_step` runs the
same weights with the same formulas and fewer calls:

* projections through ``F.linear`` on each ``nn.Linear``'s own weight and bias (read every step, so LoRA
  merges and loaded weights are seen; a module that is not a plain ``nn.Linear``, such as an unmerged
  adapter, is called as it is), or, after :func:`pack_weights` and for inputs of 4 rows or more, through a
  oneDNN-packed copy of the weight;
* RMSNorm (fp32 models) as the single ``F.rms_norm`` operator, which gives the library's values bit for bit;
* rotary cos/sin looked up in a table made once by the model's own rotary embedding (for the rope types whose
  frequencies do not depend on the sequence: default, linear, llama3; the others are recomputed per step);
* the cache's ``update`` called as the attention layer calls it.

Its logits and cache match the library's forward (tested; bit for bit in fp32 without padding and without
packed weights, which change the rounding only).
``python bench/decode_step.py`` measures it against the library's forward. :func:`prefill` does the same for
prompts without padding (the server's one-request prefills): 94 tokens of the bench model in 8.3 ms against
9.0 ms for the library's forward, bit for bit the same logits and cache (weights not packed).

Only plain architectures are taken (:func:`supports`): ``LlamaForCausalLM`` and ``Qwen2ForCausalLM``
with full attention in every layer and a SiLU MLP. Anything else keeps the library's forward.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

_CLASSES = ("LlamaForCausalLM", "Qwen2ForCausalLM")
_NORMS = ("LlamaRMSNorm", "Qwen2RMSNorm")                 # weight * (x * rsqrt(mean(x^2) + eps)), fp32 inside
_STATIC_ROPE = ("default", "linear", "llama3")            # inv_freq fixed at construction: a table is exact
_tables: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()
_packed: "weakref.WeakKeyDictionary[torch.nn.Linear, tuple]" = weakref.WeakKeyDictionary()
PACK_MAX_BYTES = 1 << 30
PACK_MIN_ROWS = 4   # below, F.linear's path for a few rows is as fast or faster (1 row: 1.3 vs 1.8 ms per step)


def supports(llm) -> bool:
    """Whether :func:`decode_step` reproduces ``llm``'s forward: a Llama or Qwen2 causal LM with full
    attention in every layer (no sliding window) and ``hidden_act == "silu"``."""
    if type(llm).__name__ not in _CLASSES:
        return False
    cfg = llm.config
    layer_types = getattr(cfg, "layer_types", None) or ["full_attention"]
    return (getattr(cfg, "hidden_act", None) == "silu" and not getattr(cfg, "use_sliding_window", False)
            and all(t == "full_attention" for t in layer_types))


def _linear(module, x: torch.Tensor) -> torch.Tensor:
    if type(module) is torch.nn.Linear:
        packed = _packed.get(module) if x.numel() >= PACK_MIN_ROWS * x.shape[-1] else None
        if packed is not None and packed[0] is module.weight and packed[1] == module.weight._version:
            return torch.ops.mkldnn._linear_pointwise(x, packed[2], module.bias, "none", [], "")
        return F.linear(x, module.weight, module.bias)
    return module(x)                                      # an adapter or another wrapper: its own forward


def pack_weights(llm, max_bytes: int = PACK_MAX_BYTES) -> int:
    """Give the plain fp32 CPU ``nn.Linear`` s of a :func:`supports` LLM a copy of their weight in oneDNN's
    blocked layout, which :func:`decode_step` and :func:`prefill` then use. ``F.linear`` repacks the weight on
    every call; with a few rows per step that repacking is most of the projection's time (measured here with
    weights that no longer sit in cache: a 6-row projection 2.3x faster, a 94-token one 1.3x). Inputs of fewer
    than ``PACK_MIN_ROWS`` rows keep ``F.linear``. The results differ from ``F.linear`` by float rounding
    only. A weight changed afterwards (``weight._version`` moves, or a new tensor) is used as it is, unpacked.
    Costs a second copy of those weights: nothing is packed when they exceed ``max_bytes``, or when oneDNN is
    not available. Returns the number of weights packed."""
    if not (supports(llm) and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return 0
    linears = [m for m in llm.modules() if type(m) is torch.nn.Linear and m.weight.dtype == torch.float32
               and m.weight.device.type == "cpu"]
    if sum(m.weight.numel() * 4 for m in linears) > max_bytes:
        return 0
    with torch.no_grad():
        for m in linears:
            _packed[m] = (m.weight, m.weight._version, torch.ops.mkldnn._reorder_linear_weight(m.weight.detach()))
    return len(linears)


def _norm(module, x: torch.Tensor) -> torch.Tensor:
    if x.dtype == torch.float32 and type(module).__name__ in _NORMS:
        return F.rms_norm(x, module.weight.shape, module.weight, module.variance_epsilon)
    return module(x)


def _rotary(rotary, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin ``[B, L, d]`` for ``positions [B, L]``, as ``rotary(x, positions)`` gives them."""
    if getattr(rotary, "rope_type", None) not in _STATIC_ROPE:
        return rotary(x, positions)
    need = int(positions.max()) + 1
    table = _tables.get(rotary)
    if table is None or table[0] is not rotary.inv_freq or table[1].shape[0] < need or table[1].dtype != x.dtype \
            or table[1].device != x.device:
        size = max(256, 1 << (need - 1).bit_length())
        cos, sin = rotary(x, torch.arange(size, device=x.device)[None])       # [1, size, d] each
        table = (rotary.inv_freq, cos[0], sin[0])
        _tables[rotary] = table
    return table[1][positions], table[2][positions]                           # [B, L, d] each


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@torch.inference_mode()
def decode_step(llm, ids: torch.Tensor, positions: torch.Tensor, attention: torch.Tensor | None,
                cache) -> torch.Tensor:
    """Feed one token per row and return the next-token logits ``[B, V]``.

    ``ids [B]``; ``positions [B, 1]`` (each row's own position); ``attention [B, L + 1]`` (1 = attend, the
    new position included) or None when no position is masked; ``cache`` a ``DynamicCache`` holding ``L``
    positions per layer, which grows by one (through each layer's ``update``).
    """
    x = F.embedding(ids, llm.model.embed_tokens.weight)[:, None]               # [B, 1, H]
    mask = None if attention is None else attention.bool()[:, None, None, :]    # [B, 1, 1, L+1]
    return _forward(llm, x, positions, mask, cache)


@torch.inference_mode()
def prefill(llm, embeds: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
    """Run unpadded prompts ``embeds [B, L, H]`` (every position attended, causally) at ``positions [B, L]``
    into an empty ``DynamicCache`` built for ``llm`` (``DynamicCache(config=llm.config)``); returns the
    last position's logits ``[B, V]`` (the library's forward with ``logits_to_keep=1``)."""
    return _forward(llm, embeds, positions, None, cache)


def _forward(llm, x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None, cache) -> torch.Tensor:
    """The decoder layers over new tokens ``x [B, T, H]`` at ``positions [B, T]``, appended to ``cache``; the
    last position's logits ``[B, V]``. ``mask [B, 1, 1, L+T]`` (True = attend) or None: every position, causal
    among the new tokens (T > 1 only into an empty cache)."""
    core = llm.model
    b, n, _ = x.shape
    cos, sin = _rotary(core.rotary_emb, x, positions)                           # [B, T, d] each
    cos, sin = cos[:, None], sin[:, None]                                       # [B, 1, T, d]
    for i, layer in enumerate(core.layers):
        attn, mlp = layer.self_attn, layer.mlp
        h = _norm(layer.input_layernorm, x)                                     # [B, T, H]
        q = _linear(attn.q_proj, h).view(b, n, -1, attn.head_dim).transpose(1, 2)   # [B, heads, T, d]
        k = _linear(attn.k_proj, h).view(b, n, -1, attn.head_dim).transpose(1, 2)   # [B, kv_heads, T, d]
        v = _linear(attn.v_proj, h).view(b, n, -1, attn.head_dim).transpose(1, 2)   # [B, kv_heads, T, d]
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        keys, values = cache.layers[i].update(k, v)                             # [B, kv_heads, L+T, d]
        o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=mask is None and n > 1,
                                           scale=attn.scaling, enable_gqa=keys.shape[1] != q.shape[1])
        x = x + _linear(attn.o_proj, o.transpose(1, 2).reshape(b, n, -1))       # [B, T, H]
        h = _norm(layer.post_attention_layernorm, x)
        if type(mlp).__name__ in ("LlamaMLP", "Qwen2MLP"):                      # down(silu(gate(h)) * up(h))
            x = x + _linear(mlp.down_proj, F.silu(_linear(mlp.gate_proj, h)) * _linear(mlp.up_proj, h))
        else:
            x = x + mlp(h)
    return _linear(llm.lm_head, _norm(core.norm, x[:, -1:]))[:, -1]            # [B, V]


__all__ = ["decode_step", "pack_weights", "prefill", "supports"]

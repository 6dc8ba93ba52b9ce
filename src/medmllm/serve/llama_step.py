"""One decode step of a Llama-family LLM written out: the serving loop's token-per-row forward pass.

``transformers``' forward of a ``LlamaForCausalLM`` for one new token per row spends part of its time
outside the arithmetic: building the attention mask, routing keyword arguments, dataclass outputs (on
2 CPU cores the decode loop runs 1.17x faster without them at 1 row, 1.09x at 8: ``python
bench/decode_step.py``). :func:`decode_step` runs the same modules (embedding, norms,
projections, MLP, head: their weights, biases and LoRA merges as they are) and the model's own rotary
embedding, and calls the cache's ``update`` as the attention layer does, so its logits match the
library's forward (tested); it leaves out what a decode step does not need.

Only plain architectures are taken (:func:`supports`): ``LlamaForCausalLM`` and ``Qwen2ForCausalLM``
with full attention in every layer and a SiLU MLP. Anything else keeps the library's forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_CLASSES = ("LlamaForCausalLM", "Qwen2ForCausalLM")


def supports(llm) -> bool:
    """Whether :func:`decode_step` reproduces ``llm``'s forward: a Llama or Qwen2 causal LM with full
    attention in every layer (no sliding window) and ``hidden_act == "silu"``."""
    if type(llm).__name__ not in _CLASSES:
        return False
    cfg = llm.config
    layer_types = getattr(cfg, "layer_types", None) or ["full_attention"]
    return (getattr(cfg, "hidden_act", None) == "silu" and not getattr(cfg, "use_sliding_window", False)
            and all(t == "full_attention" for t in layer_types))


@torch.inference_mode()
def decode_step(llm, ids: torch.Tensor, positions: torch.Tensor, attention: torch.Tensor | None,
                cache) -> torch.Tensor:
    """Feed one token per row and return the next-token logits ``[B, V]``.

    ``ids [B]``; ``positions [B, 1]`` (each row's own position); ``attention [B, L + 1]`` (1 = attend, the
    new position included) or None when no position is masked; ``cache`` a ``DynamicCache`` holding ``L``
    positions per layer, which grows by one (through each layer's ``update``).
    """
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    core = llm.model
    b = ids.shape[0]
    x = core.embed_tokens(ids[:, None])                                         # [B, 1, H]
    cos, sin = core.rotary_emb(x, positions)                                    # [B, 1, d] each
    mask = None if attention is None else attention.bool()[:, None, None, :]    # [B, 1, 1, L+1]
    for i, layer in enumerate(core.layers):
        attn = layer.self_attn
        h = layer.input_layernorm(x)                                            # [B, 1, H]
        q = attn.q_proj(h).view(b, 1, -1, attn.head_dim).transpose(1, 2)        # [B, heads, 1, d]
        k = attn.k_proj(h).view(b, 1, -1, attn.head_dim).transpose(1, 2)        # [B, kv_heads, 1, d]
        v = attn.v_proj(h).view(b, 1, -1, attn.head_dim).transpose(1, 2)        # [B, kv_heads, 1, d]
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        keys, values = cache.layers[i].update(k, v)                             # [B, kv_heads, L+1, d]
        o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=attn.scaling,
                                           enable_gqa=keys.shape[1] != q.shape[1])  # [B, heads, 1, d]
        x = x + attn.o_proj(o.transpose(1, 2).reshape(b, 1, -1))                # [B, 1, H]
        x = x + layer.mlp(layer.post_attention_layernorm(x))                    # [B, 1, H]
    return llm.lm_head(core.norm(x))[:, -1]                                     # [B, V]


__all__ = ["decode_step", "supports"]

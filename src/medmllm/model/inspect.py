"""Follow the feature vectors of one batch through encoders -> projectors -> LLM.

:func:`inspect_flow` runs a collated (left-padded, ``MultimodalCollator(train=False)``) batch through
:meth:`MedMLLM.embed_inputs` with forward hooks on each encoder and projector, then decodes greedily
with the LLM's attention weights switched on, and returns a JSON-serialisable dict::

    {"batch": {"rows": B, "length": L, "hidden": H},
     "modalities": {kind: {
         "input_shapes": [[...], ...]            one per item, without the batch dim
         "encoder":   {"shapes": [[n, T, D], ...] one per encoder call, "tokens_per_item": [T, ...],
                       "norm_mean", "norm_std"}  L2 norms of the real (mask True) feature tokens
         "projector": {"shapes": [[n, M, H], ...], "tokens_per_item": [M, ...], "norm_mean", "norm_std"}
         "spans": [{"row", "start", "end"}, ...] each item's placeholder positions, end exclusive
     }},
     "text": {"tokens", "norm_mean", "norm_std"}   the LLM's input embeddings of the real text tokens
     "generation": {"tokens": [[id, ...]], "texts": [...], "sources": [kind..., "text", "generated"],
                    "attention_share": [[share per source] per layer], "queries": n,
                    "attn_implementation": "eager"}}

Attention share: at decoding step t the query is the position whose logits give new token t (step 0:
the last prompt token; then each new token). Per layer, its attention weights (mean over heads) are
summed over the keys of each source — a modality's placeholder positions, the other prompt tokens
("text"), the tokens generated before it ("generated"); padding gets none — and averaged over the
steps and rows still generating. So each layer's shares sum to 1. The LLM runs with
``attn_implementation="eager"`` (SDPA / flash attention return no weights) and is switched back after.

:func:`format_flow` renders the dict as a text report, :func:`plot_flow` as a PNG;
:func:`modality_shapes_for` gives the :class:`~medmllm.data.dataset.ModalityShapes` a model's encoders
imply (for loading files with :class:`~medmllm.data.dataset.PartLoader`).
"""

from __future__ import annotations

import contextlib
import io
import os
from typing import Iterator

import torch

from medmllm.errors import ConfigError, InputError

_INPUT_KEYS = ("input_ids", "attention_mask", "modality_inputs", "modality_batch_index", "question_embeds")


# ============================================================================= the flow

@torch.no_grad()
def inspect_flow(model, batch: dict, tokenizer, max_new_tokens: int = 8) -> dict:
    """The flow of ``batch`` through ``model`` (see the module doc); greedy, ``max_new_tokens`` >= 1."""
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens: expected >= 1, got {max_new_tokens}")
    inputs = _inputs(model, batch)
    ids = inputs["input_ids"]                                                     # [B, L]
    real = inputs.get("attention_mask", torch.ones_like(ids)).bool()              # [B, L]
    if bool((~real[:, -1]).any()):
        raise InputError("attention_mask", "expected left padding (every row ends with a real token); "
                                           "collate with MultimodalCollator(train=False)")
    was_training = model.training
    model.eval()
    try:
        with _capture(model) as seen:
            embeds, attention, positions = model.embed_inputs(**inputs)          # [B, L, H], [B, L], [B, L]
        modalities = {k: _modality_entry(k, inputs["modality_inputs"][k], seen[k], ids,
                                         model.config.placeholder_token_ids[k]) for k in seen}
        placeholder = torch.zeros_like(real)
        for k in modalities:
            placeholder |= ids == model.config.placeholder_token_ids[k]
        text_norms = model.llm.get_input_embeddings()(ids)[real & ~placeholder].float().norm(dim=-1)  # [n_text]
        generation = _generate_with_attention(model, tokenizer, ids, embeds, attention, positions, real,
                                              list(modalities), max_new_tokens)
    finally:
        model.train(was_training)
    return {"batch": {"rows": int(ids.shape[0]), "length": int(ids.shape[1]), "hidden": int(embeds.shape[-1])},
            "modalities": modalities, "text": {"tokens": int(text_norms.numel()), **_stats(text_norms)},
            "generation": generation}


def _inputs(model, batch: dict) -> dict:
    """The batch's forward inputs on the model's device."""
    def move(v):
        if isinstance(v, torch.Tensor):
            return v.to(model.device)
        if isinstance(v, dict):
            return {k: move(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [move(x) for x in v]
        return v

    if batch.get("input_ids") is None:
        raise InputError("batch", "expected collator keys with 'input_ids', found none")
    out = {k: move(batch[k]) for k in _INPUT_KEYS if batch.get(k) is not None}
    out.setdefault("modality_inputs", {})
    return out


@contextlib.contextmanager
def _capture(model) -> Iterator[dict]:
    """Forward hooks recording each encoder's and projector's outputs: ``{kind: {"encoder": [...], ...}}``."""
    seen: dict[str, dict[str, list]] = {}
    handles = []

    def hook(kind: str, role: str):
        def record(module, args, output):
            if role == "encoder":
                features, mask = output.features, output.mask                     # [n, T, D], [n, T]
            else:
                features, mask = output                                           # [n, M, H], [n, M]
            seen.setdefault(kind, {"encoder": [], "projector": []})[role].append(
                (features.detach().float().cpu(), mask.detach().bool().cpu()))
        return record

    for kind in model.encoders:
        handles.append(model.encoders[kind].register_forward_hook(hook(kind, "encoder")))
        handles.append(model.projectors[kind].register_forward_hook(hook(kind, "projector")))
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def _stats(norms: torch.Tensor) -> dict:
    """Mean and (population) standard deviation of a 1-D tensor of norms; None when empty."""
    if norms.numel() == 0:
        return {"norm_mean": None, "norm_std": None}
    return {"norm_mean": float(norms.mean()), "norm_std": float(norms.std(unbiased=False))}


def _module_entry(calls: list[tuple[torch.Tensor, torch.Tensor]]) -> dict:
    norms = torch.cat([f.norm(dim=-1)[m] for f, m in calls])                      # [real tokens]
    per_item = [int(f.shape[1]) for f, _ in calls for _ in range(f.shape[0])]
    return {"shapes": [list(f.shape) for f, _ in calls], "tokens_per_item": per_item, **_stats(norms)}


def _modality_entry(kind: str, x, calls: dict, ids: torch.Tensor, token_id: int) -> dict:
    items = list(x) if isinstance(x, (list, tuple)) else list(x.unbind(0))
    projector = _module_entry(calls["projector"])
    where = (ids == token_id).nonzero().tolist()                                  # row-major [(row, col)]
    spans, i = [], 0
    for m in projector["tokens_per_item"]:                                         # item s fills the next m slots
        chunk = where[i : i + m]
        i += m
        spans.append({"row": chunk[0][0], "start": chunk[0][1], "end": chunk[-1][1] + 1})
    return {"input_shapes": [list(t.shape) for t in items], "encoder": _module_entry(calls["encoder"]),
            "projector": projector, "spans": spans}


# ============================================================================= decoding with attention

@contextlib.contextmanager
def _eager(llm) -> Iterator[None]:
    """Run ``llm`` with eager attention (the only implementation returning weights), then restore."""
    before = llm.config._attn_implementation
    if before != "eager":
        llm.set_attn_implementation("eager")
    try:
        yield
    finally:
        if before != "eager":
            llm.set_attn_implementation(before)


def _generate_with_attention(model, tokenizer, ids, embeds, attention, positions, real, kinds: list[str],
                             max_new_tokens: int) -> dict:
    """Greedy decoding with a KV cache, accumulating each layer's attention share per source."""
    sources = [*kinds, "text", "generated"]
    b = ids.shape[0]
    src = torch.full_like(ids, sources.index("text"))                            # [B, L] source of each key
    for k in kinds:
        src[ids == model.config.placeholder_token_ids[k]] = sources.index(k)
    src[~real] = len(sources)                                                    # padding: dropped below
    from medmllm.model.generate import eos_ids

    eos = torch.tensor(eos_ids(model, tokenizer), device=model.device)
    llm = model.llm
    with _eager(llm):
        out = llm(inputs_embeds=embeds, attention_mask=attention, position_ids=positions, use_cache=True,
                  output_attentions=True, logits_to_keep=1)
        next_pos = positions[:, -1:] + 1                                          # [B, 1]
        active = torch.ones(b, dtype=torch.bool, device=ids.device)              # rows still generating
        total, queries = None, 0
        rows: list[list[int]] = [[] for _ in range(b)]
        for _ in range(max_new_tokens):
            share = _shares(out.attentions, src, len(sources))                   # [layers, B, S]
            total = (share[:, active].sum(1) if total is None else total + share[:, active].sum(1))
            queries += int(active.sum())
            tok = out.logits[:, -1].argmax(dim=-1)                               # [B]
            hit = torch.isin(tok, eos)
            for i in (active & ~hit).nonzero().flatten().tolist():
                rows[i].append(int(tok[i]))
            active &= ~hit
            if not bool(active.any()):
                break
            attention = torch.cat([attention, attention.new_ones(b, 1)], dim=1)  # [B, L + t]
            src = torch.cat([src, src.new_full((b, 1), sources.index("generated"))], dim=1)
            out = llm(input_ids=tok[:, None], attention_mask=attention, position_ids=next_pos,
                      past_key_values=out.past_key_values, use_cache=True, output_attentions=True)
            next_pos = next_pos + 1
    mean = (total / queries).tolist()                                             # [layers, S]
    return {"tokens": rows, "texts": [tokenizer.decode(r, skip_special_tokens=True) for r in rows],
            "sources": sources, "attention_share": mean, "queries": queries, "attn_implementation": "eager"}


def _shares(attentions, src: torch.Tensor, n_sources: int) -> torch.Tensor:
    """``[layers, B, S]``: the last query's attention (mean over heads) summed per key source."""
    out = []
    for layer in attentions:                                                     # [B, heads, q, K]
        if layer is None:
            raise ConfigError("the LLM returned no attention weights even with eager attention")
        a = layer[:, :, -1, :].float().mean(dim=1)                               # [B, K]
        per = torch.zeros(a.shape[0], n_sources + 1, device=a.device).scatter_add_(1, src[:, -a.shape[1]:], a)
        out.append(per[:, :n_sources])                                           # padding column dropped
    return torch.stack(out)


# ============================================================================= shapes for files

def modality_shapes_for(model, **overrides):
    """The :class:`~medmllm.data.dataset.ModalityShapes` a model's encoders fix, defaults elsewhere.

    Fixed by the model: ``image_channels`` (the image encoder's ``in_channels``); ``image_size`` for a
    Hugging Face tower (its ``image_size``); ``ehr_features`` when the EHR encoder's ``n_features`` is
    the default list's length (else pass ``ehr_features``); 12 ``signal_leads`` for a 12-lead ECG
    encoder (else pass ``signal_leads``). Free (the encoders take any size; ModalityShapes' defaults
    unless given): CNN ``image_size``, ``volume_shape``, ``signal_fs``, ``signal_samples``. Overrides
    win; ConfigError when one contradicts the model.
    """
    from dataclasses import fields

    from medmllm.data.dataset import DEFAULT_EHR_FEATURES, ModalityShapes
    from medmllm.data.preprocess import STANDARD_12_LEADS

    known = {f.name for f in fields(ModalityShapes)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConfigError(f"unknown ModalityShapes fields {unknown}; known: {sorted(known)}")
    kw = {k: v for k, v in overrides.items() if v is not None}
    enc = model.encoders
    if "image" in enc:
        fixed = {"image_channels": int(getattr(enc["image"], "in_channels", 1))}
        tower = getattr(enc["image"], "vision_model", None)
        if tower is not None:
            fixed["image_size"] = int(tower.config.image_size)
        _merge(kw, fixed, "image")
    if "signal" in enc:
        leads = int(getattr(enc["signal"], "n_leads", 12))
        if "signal_leads" not in kw and leads != len(STANDARD_12_LEADS):
            raise ConfigError(f"the ECG encoder takes {leads} leads: pass signal_leads (their names)")
        _merge(kw, {"signal_leads": tuple(kw.get("signal_leads") or STANDARD_12_LEADS)}, "signal", n=leads)
    if "ehr" in enc:
        n = int(getattr(enc["ehr"], "n_features", len(DEFAULT_EHR_FEATURES)))
        if "ehr_features" not in kw and n != len(DEFAULT_EHR_FEATURES):
            raise ConfigError(f"the EHR encoder takes {n} features: pass ehr_features (their names)")
        _merge(kw, {"ehr_features": tuple(kw.get("ehr_features") or DEFAULT_EHR_FEATURES)}, "ehr", n=n)
    if "volume" in enc and "volume_window" not in kw:               # a 3-channel volume encoder: 3 windows
        inner = getattr(enc["volume"], "image_encoder", enc["volume"])
        if int(getattr(inner, "in_channels", 1)) == 3:
            kw["volume_window"] = "multi"
    if "volume_shape" in kw:
        kw["volume_shape"] = tuple(int(s) for s in kw["volume_shape"])
    return ModalityShapes(**kw)


def _merge(kw: dict, fixed: dict, kind: str, n: int | None = None) -> None:
    for key, value in fixed.items():
        given = kw.get(key, value)
        if n is not None and len(given) != n:
            raise ConfigError(f"{key}: the {kind} encoder takes {n}, got {len(given)}: {list(given)}")
        if n is None and given != value:
            raise ConfigError(f"{key}: the model's {kind} encoder fixes {value}, got {given}")
        kw[key] = given


# ============================================================================= report and plot

def _fmt(x, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}g}"


def format_flow(flow: dict) -> str:
    """A readable text report of :func:`inspect_flow`'s dict."""
    b = flow["batch"]
    lines = [f"MedMLLM flow: {b['rows']} row(s) x {b['length']} positions, LLM width {b['hidden']}", ""]
    head = f"{'kind':<8} {'input (per item)':<22} {'encoder out':<16} {'|enc| mean±std':<18} " \
           f"{'projector out':<16} {'|proj| mean±std':<18} LLM positions (row: start-end)"
    lines += [head, "-" * len(head)]
    for kind, m in flow["modalities"].items():
        enc, proj = m["encoder"], m["projector"]
        spans = ", ".join(f"{s['row']}: {s['start']}-{s['end']}" for s in m["spans"])
        lines.append(f"{kind:<8} {_shapes(m['input_shapes']):<22} {_shapes(enc['shapes']):<16} {_pm(enc):<18} "
                     f"{_shapes(proj['shapes']):<16} {_pm(proj):<18} {spans}")
    t = flow["text"]
    lines.append(f"{'text':<8} {str(t['tokens']) + ' tokens':<22} {'':<16} {'':<18} {'LLM embeddings':<16} "
                 f"{_pm(t):<18}")
    g = flow["generation"]
    lines += ["", f"Attention share of the generating positions ({g['queries']} queries, mean over heads; "
                  f"{g['attn_implementation']} attention), per layer:"]
    lines.append("layer  " + "".join(f"{s:>11}" for s in g["sources"]))
    for i, row in enumerate(g["attention_share"]):
        lines.append(f"{i:<7}" + "".join(f"{v:>11.3f}" for v in row))
    lines += ["", "Generated:"] + [f"  row {i}: {text!r}" for i, text in enumerate(g["texts"])]
    return "\n".join(lines)


def _pm(entry: dict) -> str:
    return f"{_fmt(entry['norm_mean'])} ± {_fmt(entry['norm_std'])}"


def _shapes(shapes: list[list[int]]) -> str:
    uniq = []
    for s in shapes:
        if s not in uniq:
            uniq.append(s)
    text = " ".join("x".join(map(str, s)) for s in uniq)
    return text if len(text) <= 21 else text[:18] + "..."


def plot_flow(flow: dict, path: str | os.PathLike) -> str:
    """Write a PNG: tokens per item and mean L2 norm per module and modality (bars), and the
    attention share per layer x source (heat map). Returns the path written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from medmllm.io import write_bytes

    kinds = list(flow["modalities"])
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    x = np.arange(len(kinds))
    mods = flow["modalities"]
    enc_tok = [float(np.mean(mods[k]["encoder"]["tokens_per_item"])) for k in kinds]
    proj_tok = [float(np.mean(mods[k]["projector"]["tokens_per_item"])) for k in kinds]
    axes[0].bar(x - 0.2, enc_tok, 0.4, label="encoder")
    axes[0].bar(x + 0.2, proj_tok, 0.4, label="projector (= LLM positions)")
    axes[0].set(xticks=x, xticklabels=kinds, ylabel="tokens per item", title="Tokens")
    axes[0].legend(fontsize=8)
    labels = kinds + ["text"]
    xn = np.arange(len(labels))
    enc_n = [mods[k]["encoder"]["norm_mean"] or 0.0 for k in kinds] + [0.0]
    proj_n = [mods[k]["projector"]["norm_mean"] or 0.0 for k in kinds] + [flow["text"]["norm_mean"] or 0.0]
    axes[1].bar(xn - 0.2, enc_n, 0.4, label="encoder output")
    axes[1].bar(xn + 0.2, proj_n, 0.4, label="LLM input (projector / text embedding)")
    axes[1].set(xticks=xn, xticklabels=labels, ylabel="mean L2 norm", title="Feature norms")
    axes[1].legend(fontsize=8)
    g = flow["generation"]
    share = np.asarray(g["attention_share"])                                    # [layers, S]
    im = axes[2].imshow(share, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0)
    axes[2].set(xticks=np.arange(len(g["sources"])), xticklabels=g["sources"], yticks=np.arange(share.shape[0]),
                ylabel="layer",
                title="Attention share while generating")
    for (i, j), v in np.ndenumerate(share):
        axes[2].text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w" if v < 0.5 else "k")
    fig.colorbar(im, ax=axes[2])
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    write_bytes(path, buf.getvalue())
    return str(path)


__all__ = ["format_flow", "inspect_flow", "modality_shapes_for", "plot_flow"]

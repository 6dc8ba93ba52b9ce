"""Builders of finished :class:`~medmllm.model.mllm.MedMLLM` models, each returning ``(model, tokenizer)``.

``BUILDERS`` (exact names):

- ``tiny``: random few-thousand-parameter models of every LLM family for tests (hidden 32).
- ``small``: a ~4M-parameter model for the CPU quickstart (CNN image encoder with a 4x4 grid +
  global token = 17 tokens, 3D CNN volume encoder (17 tokens), ECG transformer, EHR feature
  tokenizer, MLP projectors, a 4-layer Llama-style decoder of width 256).
- ``from_hub``: pretrained weights (a Hugging Face vision tower + a causal LM) from the hub or
  local folders via ``from_pretrained``; remote code is never trusted unless asked for.

Every builder records the encoder/projector specs (registry name + kwargs) in the model config,
so ``model.save_pretrained(dir)`` / ``AutoModel.from_pretrained(dir)`` round-trips.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from medmllm.errors import ConfigError
from medmllm.model.encoders import MODALITIES
from medmllm.model.mllm import MedMLLM, build_encoder_from_spec, build_projector_from_spec
from medmllm.registry import Registry

BUILDERS: Registry = Registry("model builder")

# family -> (chat template family, transformers config class, causal LM class)
LLM_FAMILIES: dict[str, tuple[str, str, str]] = {
    "llama": ("llama3", "LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2Config", "Qwen2ForCausalLM"),
    "gemma": ("gemma", "Gemma3TextConfig", "Gemma3ForCausalLM"),
}
_ALIASES = {"llama3": "llama"}

# LLM config model_type -> medmllm chat template family (from_hub)
_TEMPLATE_OF_MODEL_TYPE = {"llama": "llama3", "qwen2": "qwen2", "qwen3": "chatml", "gemma": "gemma",
                           "gemma2": "gemma", "gemma3": "gemma", "gemma3_text": "gemma"}

# Default projector kwargs beyond (in_dim, out_dim), scaled to the LLM width by _projector_spec.
_PROJECTOR_DEFAULTS: dict[str, dict[str, Any]] = {
    "linear": {}, "mlp": {}, "resampler": {"num_queries": 8, "heads": 4, "depth": 1}, "pool": {"factor": 2},
}


def _family(family: str) -> str:
    family = _ALIASES.get(family, family)
    if family not in LLM_FAMILIES:
        raise ConfigError(f"family: expected one of {sorted(LLM_FAMILIES)}, got {family!r}")
    return family


def _modalities(modalities: Sequence[str]) -> list[str]:
    kinds = [modalities] if isinstance(modalities, str) else list(modalities)
    bad = [k for k in kinds if k not in MODALITIES]
    if bad or not kinds or len(set(kinds)) != len(kinds):
        raise ConfigError(f"modalities: expected distinct kinds among {MODALITIES}, got {kinds}")
    return [k for k in MODALITIES if k in kinds]


def llm_config(family: str, tokenizer, hidden: int, layers: int, heads: int, kv_heads: int,
               intermediate: int, max_positions: int = 2048):
    """A small config of ``family`` with the tokenizer's vocabulary size and special token ids."""
    import transformers

    family = _family(family)
    _, config_cls, _ = LLM_FAMILIES[family]
    kw: dict[str, Any] = dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
                              num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                              max_position_embeddings=max_positions, pad_token_id=tokenizer.pad_token_id,
                              eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    if family == "gemma":
        # head_dim is explicit in Gemma 3; a sliding window longer than any test sequence keeps left-padded
        # and unpadded rows equivalent (the window counts padded positions).
        kw.update(head_dim=hidden // heads, query_pre_attn_scalar=hidden // heads, sliding_window=max_positions)
    if family == "qwen2":
        kw.update(tie_word_embeddings=True)  # as the small Qwen2.5 checkpoints
    return getattr(transformers, config_cls)(**kw)


def build_llm_for(family: str, config):
    """The family's causal LM class built from ``config`` (random weights)."""
    import transformers

    return getattr(transformers, LLM_FAMILIES[_family(family)][2])(config)


def _projector_spec(name: str, in_dim: int, out_dim: int, overrides: dict | None) -> dict:
    if name not in _PROJECTOR_DEFAULTS:
        from medmllm.model.projectors import PROJECTORS

        PROJECTORS.get(name)  # ConfigError listing the known names if unknown
    kw = dict(_PROJECTOR_DEFAULTS.get(name, {}))
    kw.update(overrides or {})
    return {"name": name, "kwargs": {"in_dim": in_dim, "out_dim": out_dim, **kw}}


def assemble(llm, tokenizer, encoder_specs: dict[str, dict], projector_specs: dict[str, dict],
             trainable: dict[str, bool] | None = None) -> MedMLLM:
    """Build encoders and projectors from their specs and compose them with ``llm``."""
    encoders = {k: build_encoder_from_spec(s) for k, s in encoder_specs.items()}
    projectors = {k: build_projector_from_spec(s) for k, s in projector_specs.items()}
    return MedMLLM.compose(llm, encoders, projectors, tokenizer, encoder_specs=encoder_specs,
                           projector_specs=projector_specs, trainable=trainable)


# ----------------------------------------------------------------------------- tiny

def tiny_encoder_specs(dim: int = 32, ehr_features: int = 12, leads: int = 12) -> dict[str, dict]:
    """Specs of tiny encoders of width ``dim``; tokens for a 1-channel image: 5 (2x2 grid + global),
    a ``[1, D, H, W]`` volume: ``2 D + 1``, a ``[leads, T]`` signal: ``ceil(ceil(T / 5) / 5)``, ehr: F."""
    return {
        "image": {"name": "cnn_image", "kwargs": dict(in_channels=1, width=8, depth=2, out_dim=dim, grid=2)},
        "volume": {"name": "slice3d", "kwargs": dict(
            image_encoder={"name": "cnn_image", "in_channels": 1, "width": 4, "depth": 2, "out_dim": dim,
                           "grid": 2}, k=2)},
        "signal": {"name": "ecg", "kwargs": dict(n_leads=leads, dim=dim, depth=1, heads=2, patch=[5, 5])},
        "ehr": {"name": "ehr", "kwargs": dict(n_features=ehr_features, dim=dim, depth=0)},
    }


@BUILDERS.register("tiny")
def tiny(family: str = "llama", modalities: Sequence[str] = MODALITIES, projector: str = "mlp",
         hidden: int = 32, layers: int = 2, encoder_dim: int = 32, projector_kwargs: dict | None = None,
         seed: int = 0):
    """A tiny random model of ``family`` ("llama", "qwen2", "gemma") + its tiny tokenizer, for tests.

    ``hidden``-wide LLM (4 heads, 2 kv heads, ``layers`` layers, MLP ``2 * hidden``), the vocabulary of
    :func:`medmllm.data.tokenizers.build_tokenizer`, encoders of :func:`tiny_encoder_specs`, one
    ``projector`` per kind. Deterministic for a ``seed`` (the global RNG state is left untouched).
    """
    from medmllm.data.tokenizers import build_tokenizer

    family, kinds = _family(family), _modalities(modalities)
    tokenizer = build_tokenizer(LLM_FAMILIES[family][0])
    enc = {k: s for k, s in tiny_encoder_specs(encoder_dim).items() if k in kinds}
    proj_kw = dict(projector_kwargs or {})
    if projector == "resampler":
        proj_kw = {"num_queries": 4, **proj_kw}
    proj = {k: _projector_spec(projector, encoder_dim, hidden, proj_kw) for k in kinds}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        llm = build_llm_for(family, llm_config(family, tokenizer, hidden, layers, heads=4, kv_heads=2,
                                               intermediate=2 * hidden))
        model = assemble(llm, tokenizer, enc, proj)
    return model.eval(), tokenizer


def example_input(kind: str, generator: torch.Generator | None = None, size: int = 16, depth: int = 3,
                  samples: int = 100, leads: int = 12, ehr_features: int = 12) -> torch.Tensor:
    """One random input of ``kind`` shaped as :mod:`medmllm.data.dataset` yields it (no batch dim).

    image ``[1, size, size]``, volume ``[1, depth, size, size]``, signal ``[leads, samples]``,
    ehr ``[ehr_features, 2]`` (z-scored value, missing flag in {0, 1}).
    """
    if kind == "image":
        return torch.rand(1, size, size, generator=generator)
    if kind == "volume":
        return torch.rand(1, depth, size, size, generator=generator)
    if kind == "signal":
        return torch.randn(leads, samples, generator=generator)
    if kind == "ehr":
        missing = (torch.rand(ehr_features, generator=generator) < 0.25).float()
        values = torch.randn(ehr_features, generator=generator) * (1 - missing)
        return torch.stack([values, missing], dim=1)
    raise ConfigError(f"kind: expected one of {MODALITIES}, got {kind!r}")


# ----------------------------------------------------------------------------- small

def small_encoder_specs(ehr_features: int | None = None, leads: int = 12, scale: float = 1.0) -> dict[str, dict]:
    """Encoders of :func:`small` (widths 128/64): image 17 tokens, volume 17 (a 3D U-Net: CNN
    stem, InstanceNorm, an additive decoder to half resolution whose voxel logits the tokens carry), signal
    ``ceil(T / 50) + 2`` (e.g. 2500 samples -> 50, + a mean and a max summary token), ehr one token per
    feature. The volume encoder takes 3 channels: the CT windows of ``ModalityShapes.volume_windows``
    (``volume_window="multi"``). ``scale`` multiplies every width (token counts stay the same), e.g. 0.5
    for a distillation student."""
    if ehr_features is None:
        from medmllm.data.dataset import DEFAULT_EHR_FEATURES

        ehr_features = len(DEFAULT_EHR_FEATURES)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale <= 4:
        raise ConfigError(f"encoder_scale: expected a number in (0, 4], got {scale!r}")

    def w(n: int, multiple: int = 4) -> int:  # scaled width, a multiple of the head count
        return max(multiple, int(round(n * scale / multiple)) * multiple)

    return {
        "image": {"name": "cnn_image", "kwargs": dict(in_channels=1, width=w(16), depth=4, out_dim=w(128), grid=4)},
        "volume": {"name": "cnn_volume", "kwargs": dict(in_channels=3, width=w(8), depth=4, out_dim=w(128),
                                                        grid=[4, 2, 2], decoder=True, norm="instance", merge="add")},
        "signal": {"name": "ecg", "kwargs": dict(n_leads=leads, dim=w(128), depth=2, heads=4, patch=[5, 5, 2],
                                                summary_tokens=True)},
        "ehr": {"name": "ehr", "kwargs": dict(n_features=ehr_features, dim=w(64), depth=1, heads=4)},
    }


@BUILDERS.register("small")
def small(family: str = "llama", modalities: Sequence[str] = MODALITIES, projector: str = "mlp",
          hidden: int = 256, layers: int = 4, projector_kwargs: dict | None = None, seed: int = 0,
          tokenizer=None, encoder_scale: float = 1.0):
    """A ~4M-parameter model for the CPU quickstart: :func:`small_encoder_specs` -> ``projector`` ->
    a ``layers``-layer decoder of width ``hidden`` (4 heads, MLP ``2 * hidden``) of ``family``.

    ``tokenizer``: one to use instead of the tiny BPE of ``family`` (it needs the modality tokens).
    ``encoder_scale``: encoder widths times this (0.5 with ``hidden=128, layers=2`` gives a ~1M
    distillation student of the default model, with the same tokens per input).
    """
    from medmllm.data.tokenizers import build_tokenizer

    family, kinds = _family(family), _modalities(modalities)
    tokenizer = tokenizer if tokenizer is not None else build_tokenizer(LLM_FAMILIES[family][0])
    enc = {k: s for k, s in small_encoder_specs(scale=encoder_scale).items() if k in kinds}
    proj = {k: _projector_spec(projector, _width(s), hidden, projector_kwargs) for k, s in enc.items()}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        llm = build_llm_for(family, llm_config(family, tokenizer, hidden, layers, heads=4, kv_heads=4,
                                               intermediate=2 * hidden))
        model = assemble(llm, tokenizer, enc, proj)
    return model.eval(), tokenizer


def _width(enc_spec: dict) -> int:
    """An encoder spec's token width: ``out_dim``, ``dim``, or its slice encoder's ``out_dim``."""
    kw = enc_spec["kwargs"]
    return int(kw.get("out_dim") or kw.get("dim") or kw["image_encoder"]["out_dim"])


# ----------------------------------------------------------------------------- from_hub

@BUILDERS.register("from_hub")
def from_hub(vision: str = "google/siglip-base-patch16-224", llm: str = "Qwen/Qwen2.5-0.5B-Instruct",
             projector: str = "mlp", projector_kwargs: dict | None = None, tokenizer: str | None = None,
             family: str | None = None, feature_layer: int = -2, dtype: str | torch.dtype = "float32",
             trust_remote_code: bool = False, **from_pretrained_kw):
    """A pretrained vision tower (image encoder) + a pretrained causal LM, joined by a new projector.

    ``vision``/``llm``/``tokenizer`` (default: ``llm``): hub ids or local folders, loaded with
    ``from_pretrained`` (``from_pretrained_kw`` such as ``local_files_only=True`` or ``revision`` are
    passed on). The tokenizer gets the modality tokens (the LLM's embeddings are resized), a pad token
    if it has none, and medmllm's chat template of ``family`` (default: from the LLM's
    ``model_type``) when its control tokens are in the vocabulary; otherwise its own template is kept.
    Everything is cast to ``dtype``. Only the ``image`` modality is wired.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from medmllm.data.tokenizers import add_modality_tokens, ensure_pad_token, set_chat_template
    from medmllm.model.encoders import hf_image_encoder

    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    kw = dict(from_pretrained_kw, trust_remote_code=trust_remote_code)
    encoder = hf_image_encoder(vision, feature_layer=feature_layer, dtype=dtype, **kw)
    try:
        lm = AutoModelForCausalLM.from_pretrained(llm, dtype=dtype, **kw)
        tok = AutoTokenizer.from_pretrained(tokenizer or llm, **kw)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load the LLM or tokenizer {tokenizer or llm!r}: {e}") from e
    add_modality_tokens(tok)
    ensure_pad_token(tok)
    template_family = family or _TEMPLATE_OF_MODEL_TYPE.get(lm.config.model_type)
    if template_family:
        try:
            set_chat_template(tok, template_family)
        except ConfigError:
            if not tok.chat_template:
                raise
    hidden = lm.get_input_embeddings().weight.shape[1]
    proj_spec = _projector_spec(projector, encoder.out_dim, hidden, projector_kwargs)
    projector_module = build_projector_from_spec(proj_spec).to(dtype)
    model = MedMLLM.compose(lm, {"image": encoder}, {"image": projector_module}, tok,
                            projector_specs={"image": proj_spec})
    return model.to(dtype), tok


__all__ = ["BUILDERS", "LLM_FAMILIES", "assemble", "build_llm_for", "example_input", "from_hub", "llm_config", "small",
           "small_encoder_specs", "tiny", "tiny_encoder_specs"]

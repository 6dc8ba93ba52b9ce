"""MedMLLM: modality encoders -> projectors -> any Hugging Face causal LM, composed.

A batch from :class:`medmllm.data.collate.MultimodalCollator` goes through the model as::

    input_ids [B, L] --embed_tokens--> embeds [B, L, H]
    for each modality kind k present (image, volume, signal, ehr):
        modality_inputs[k] [N_k, ...] --encoder--> features [N_k, T_k, D_k]
                                      --projector--> tokens [N_k, M_k, H]
        the N_k * M_k placeholder positions of kind k in input_ids (batch row by row,
        left to right) receive the tokens in order; positions whose projector mask is
        False get attention_mask 0
    llm(inputs_embeds=embeds [B, L, H], attention_mask, position_ids, labels) -> logits, loss

Everything is rebuilt from :class:`MedMLLMConfig` (so ``save_pretrained`` /
``AutoModel.from_pretrained`` work without remote code after ``import medmllm.model.mllm``);
:meth:`MedMLLM.compose` instead takes finished modules (a pretrained LLM, an encoder, a projector)
and records how to rebuild them. Module groups (``"llm"``, ``"encoder.<kind>"``,
``"projector.<kind>"``) can be frozen and given their own learning rates.
"""

from __future__ import annotations

import fnmatch
from typing import Sequence

import torch
from torch import nn
from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM, PretrainedConfig,
                          PreTrainedModel)

from medmllm.errors import ConfigError, InputError
from medmllm.model.encoders import MODALITIES, build_encoder
from medmllm.model.encoders.image import HFImageEncoder
from medmllm.model.projectors import build_projector


# Collator keys that describe the batch but are not model inputs (accepted and ignored by forward).
BATCH_ONLY_KEYS = ("modality_order", "modality_num_tokens", "ids", "dropped")


# ============================================================================= config

class MedMLLMConfig(PretrainedConfig):
    """Everything needed to rebuild a :class:`MedMLLM` (JSON-serialisable).

    - ``llm_config``: the LLM's ``config.to_dict()`` (rebuilt with ``AutoConfig.for_model``);
      ``llm_class``: its transformers class name (e.g. ``"Qwen2ForCausalLM"``), else
      ``AutoModelForCausalLM`` picks one from the config.
    - ``encoders``: ``{kind: {"name": ENCODERS name, "kwargs": {...}}}``. For ``"hf_image"`` the
      kwargs hold ``vision_config`` (the tower's config dict) and ``vision_class`` (its transformers
      class name) instead of a path, plus ``feature_layer``, ``drop_cls``, ``num_prefix_tokens``.
      A ``slice3d`` ``image_encoder`` may itself be such a spec.
    - ``projectors``: ``{kind: {"name": PROJECTORS name, "kwargs": {in_dim, out_dim, ...}}}``.
    - ``placeholder_token_ids``: ``{kind: token id}`` of ``<image>``, ``<volume>``...
    - ``trainable``: ``{group: bool}`` (groups ``"llm"``, ``"encoder.<kind>"``,
      ``"projector.<kind>"``); a group not listed is trainable.
    """

    model_type = "medmllm"

    llm_config: dict | None = None
    llm_class: str | None = None
    encoders: dict | None = None
    projectors: dict | None = None
    placeholder_token_ids: dict | None = None
    trainable: dict | None = None
    tie_word_embeddings: bool = False  # the LLM ties its own embeddings (its config says so)

    def __post_init__(self, **kwargs):
        self.llm_config = dict(self.llm_config or {})
        self.encoders = {k: dict(v) for k, v in (self.encoders or {}).items()}
        self.projectors = {k: dict(v) for k, v in (self.projectors or {}).items()}
        self.placeholder_token_ids = {k: int(v) for k, v in (self.placeholder_token_ids or {}).items()}
        self.trainable = {k: bool(v) for k, v in (self.trainable or {}).items()}
        super().__post_init__(**kwargs)

    def kinds(self) -> list[str]:
        """Modality kinds with an encoder, in :data:`MODALITIES` order."""
        return [k for k in MODALITIES if k in self.encoders]


# ============================================================================= building from specs

def _transformers_class(name: str, what: str) -> type:
    """A ``PreTrainedModel`` subclass exported by transformers (never remote code)."""
    import transformers

    cls = getattr(transformers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, PreTrainedModel)):
        raise ConfigError(f"{what}: expected a transformers model class name, got {name!r}")
    return cls


def config_from_dict(d: dict, what: str) -> PretrainedConfig:
    """``AutoConfig.for_model(model_type, **rest)`` of a ``config.to_dict()``."""
    d = dict(d)
    model_type = d.pop("model_type", None)
    if not model_type:
        raise ConfigError(f"{what}: expected a config dict with a 'model_type', got keys {sorted(d)[:8]}")
    return AutoConfig.for_model(model_type, **d)


def build_llm(llm_config: dict, llm_class: str | None = None) -> PreTrainedModel:
    """A randomly initialised causal LM from its config dict (weights come from a checkpoint)."""
    config = config_from_dict(llm_config, "llm_config")
    if llm_class:
        return _transformers_class(llm_class, "llm_class")._from_config(config)
    return AutoModelForCausalLM.from_config(config)


def _build_hf_image(vision_config: dict, vision_class: str | None = None, feature_layer: int = -2,
                    drop_cls: bool = True, num_prefix_tokens: int | None = None) -> HFImageEncoder:
    config = config_from_dict(vision_config, "hf_image vision_config")
    if vision_class:
        tower = _transformers_class(vision_class, "hf_image vision_class")._from_config(config)
    else:
        tower = AutoModel.from_config(config)
    return HFImageEncoder(tower, feature_layer=feature_layer, drop_cls=drop_cls, num_prefix_tokens=num_prefix_tokens)


def build_encoder_from_spec(spec: dict) -> nn.Module:
    """Build an encoder from ``{"name", "kwargs"}`` (see :class:`MedMLLMConfig`)."""
    if not isinstance(spec, dict) or "name" not in spec:
        raise ConfigError(f"encoder spec: expected {{'name': ..., 'kwargs': {{...}}}}, got {spec!r:.120}")
    name, kw = spec["name"], dict(spec.get("kwargs") or {})
    if name == "hf_image" and "vision_config" in kw:
        return _build_hf_image(**kw)
    inner = kw.get("image_encoder")
    if name == "slice3d" and isinstance(inner, dict) and "kwargs" in inner:
        kw["image_encoder"] = build_encoder_from_spec(inner)
    return build_encoder(name, **kw)


def build_projector_from_spec(spec: dict) -> nn.Module:
    """Build a projector from ``{"name", "kwargs": {"in_dim", "out_dim", ...}}``."""
    if not isinstance(spec, dict) or "name" not in spec:
        raise ConfigError(f"projector spec: expected {{'name': ..., 'kwargs': {{...}}}}, got {spec!r:.120}")
    kw = dict(spec.get("kwargs") or {})
    try:
        in_dim, out_dim = kw.pop("in_dim"), kw.pop("out_dim")
    except KeyError:
        raise ConfigError(f"projector spec {spec['name']!r}: kwargs need 'in_dim' and 'out_dim', "
                          f"got {sorted(kw)}") from None
    return build_projector(spec["name"], in_dim, out_dim, **kw)


def hf_image_spec(encoder: HFImageEncoder) -> dict:
    """The spec of a finished :class:`HFImageEncoder` (its tower's config instead of a path)."""
    import transformers

    tower = encoder.vision_model
    cls_name = type(tower).__name__
    exported = getattr(transformers, cls_name, None) is type(tower) and isinstance(tower, PreTrainedModel)
    return {"name": "hf_image", "kwargs": {
        "vision_config": tower.config.to_dict(), "vision_class": cls_name if exported else None,
        "feature_layer": encoder.feature_layer, "drop_cls": encoder.num_dropped > 0 or encoder.num_prefix == 0,
        "num_prefix_tokens": encoder.num_prefix}}


def _check_spec_matches(module: nn.Module, spec: dict, build, what: str) -> None:
    """ConfigError unless ``build(spec)`` has the same state-dict names and shapes as ``module``."""
    with torch.device("meta"):
        rebuilt = build(spec)
    want = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}
    if want != got:
        diff = sorted(set(want.items()) ^ set(got.items()))[:4]
        raise ConfigError(f"{what}: its spec {spec['name']!r} does not rebuild the module given "
                          f"(first differences in name/shape: {diff}); pass the spec used to build it")


# ============================================================================= the model

class MedMLLM(PreTrainedModel):
    """Encoders (``nn.ModuleDict`` by kind) -> projectors (by kind) -> causal LM (``self.llm``)."""

    config_class = MedMLLMConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def __init__(self, config: MedMLLMConfig, llm: PreTrainedModel | None = None,
                 encoders: dict[str, nn.Module] | None = None, projectors: dict[str, nn.Module] | None = None):
        """Build every module from ``config``; modules passed in (by :meth:`compose`) are used as they are."""
        super().__init__(config)
        encoders, projectors = dict(encoders or {}), dict(projectors or {})
        if set(config.encoders) != set(config.projectors):
            raise ConfigError(f"encoders and projectors must cover the same kinds, got "
                              f"{sorted(config.encoders)} and {sorted(config.projectors)}")
        self.llm = llm if llm is not None else build_llm(config.llm_config, config.llm_class)
        self.encoders = nn.ModuleDict({k: encoders[k] if encoders.get(k) is not None
                                       else build_encoder_from_spec(config.encoders[k]) for k in config.kinds()})
        self.projectors = nn.ModuleDict({k: projectors[k] if projectors.get(k) is not None
                                         else build_projector_from_spec(config.projectors[k]) for k in config.kinds()})
        self.apply_trainable_flags()
        self.lora_targets: dict[str, dict] | None = None   # set by medmllm.model.lora.apply_lora
        self.lora_modules_to_save: list[str] = []
        from transformers.initialization import no_init_weights

        with no_init_weights():  # submodules come initialised (or pretrained): only gather tied keys etc.
            self.post_init()

    @classmethod
    def from_pretrained(cls, *args, **kwargs) -> "MedMLLM":
        """``PreTrainedModel.from_pretrained``, then ``config.trainable`` applied (loading resets it)."""
        model = super().from_pretrained(*args, **kwargs)
        model.apply_trainable_flags()
        return model

    def apply_trainable_flags(self) -> None:
        """Set ``requires_grad`` of each group listed in ``config.trainable``."""
        groups = self.groups()
        for group, flag in self.config.trainable.items():
            if group in groups:
                groups[group].requires_grad_(flag)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Only reached for weights missing from a checkpoint: torch's default init of that layer."""
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()

    # ------------------------------------------------------------------ composition

    @classmethod
    def compose(cls, llm: PreTrainedModel, encoders: dict[str, nn.Module], projectors: dict[str, nn.Module],
                tokenizer, encoder_specs: dict[str, dict] | None = None,
                projector_specs: dict[str, dict] | None = None,
                trainable: dict[str, bool] | None = None) -> "MedMLLM":
        """Compose finished modules into a MedMLLM and record how to rebuild them in its config.

        ``encoders``/``projectors``: ``{kind: module}`` for the same kinds. ``tokenizer`` must hold the
        modality tokens (:func:`medmllm.data.tokenizers.add_modality_tokens`); the LLM's embeddings are
        resized when the tokenizer is longer. ``encoder_specs``/``projector_specs``: ``{kind: {"name",
        "kwargs"}}`` as used to build them (the builders know them; an :class:`HFImageEncoder`'s spec
        is read off the module); each spec is checked to rebuild a module of the same shapes.
        """
        from medmllm.data.tokenizers import modality_token_ids

        encoder_specs, projector_specs = dict(encoder_specs or {}), dict(projector_specs or {})
        kinds = _check_kinds(encoders, projectors)
        hidden = llm.get_input_embeddings().weight.shape[1]
        for kind in kinds:
            _check_dims(kind, encoders[kind], projectors[kind], hidden)
        ids = modality_token_ids(tokenizer)
        if len(tokenizer) > llm.get_input_embeddings().num_embeddings:
            llm.resize_token_embeddings(len(tokenizer))
        enc_specs = {k: _spec_for(k, encoders[k], encoder_specs, "encoder") for k in kinds}
        proj_specs = {k: _spec_for(k, projectors[k], projector_specs, "projector") for k in kinds}
        for k in kinds:
            _check_spec_matches(encoders[k], enc_specs[k], build_encoder_from_spec, f"encoder {k!r}")
            _check_spec_matches(projectors[k], proj_specs[k], build_projector_from_spec, f"projector {k!r}")
        config = MedMLLMConfig(llm_config=llm.config.to_dict(), llm_class=type(llm).__name__,
                               encoders=enc_specs, projectors=proj_specs,
                               placeholder_token_ids={k: ids[k] for k in kinds}, trainable=dict(trainable or {}))
        return cls(config, llm=llm, encoders=encoders, projectors=projectors)

    # ------------------------------------------------------------------ forward

    def embed_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                     modality_inputs: dict | None = None, modality_batch_index: dict | None = None,
                     question_embeds: torch.Tensor | None = None,
                     modality_tokens: dict | None = None, **ignored):
        """Token embeddings with modality features scattered into the placeholders.

        ``modality_tokens`` (optional): ``{kind: [(tokens [M, H], mask [M]), ...]}``, one pair per item
        in batch order, already encoded and projected by :meth:`encode_item` (e.g. by a server on
        another thread); a kind given here is not encoded again and its ``modality_inputs`` are ignored.
        Returns ``inputs_embeds [B, L, H]``, ``attention_mask [B, L]`` (0 on padding and on
        placeholders whose projector output is masked) and ``position_ids [B, L]`` (counted over
        non-padding tokens, so left padding gives the positions an unpadded row would have).
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)                          # [B, L]
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)       # [B, L]
        embeds = self.llm.get_input_embeddings()(input_ids)                      # [B, L, H]
        modality_tokens = modality_tokens or {}
        modality_inputs = {k: v for k, v in (modality_inputs or {}).items() if k not in modality_tokens}
        modality_batch_index = modality_batch_index or {}
        unknown = sorted((set(modality_inputs) | set(modality_tokens)) - set(self.encoders))
        if unknown:
            raise InputError("modality_inputs", f"expected kinds among {sorted(self.encoders)} (the model's "
                                                f"encoders), got {unknown}")
        for kind, token_id in self.config.placeholder_token_ids.items():
            where = input_ids == token_id                                        # [B, L] placeholders of kind
            x, done = modality_inputs.get(kind), modality_tokens.get(kind)
            if x is None and done is None:
                if where.any():
                    raise InputError("input_ids", f"expected 0 {_tok(kind)} placeholder tokens (no {kind} "
                                                  f"inputs given), found {int(where.sum())}")
                continue
            if done is not None:                                                 # encoded ahead, per item
                tokens = torch.cat([t.to(embeds.device) for t, _ in done])             # [S, H]
                mask = torch.cat([m.to(embeds.device) for _, m in done])               # [S]
                per_item = [int(t.shape[0]) for t, _ in done]                          # [N_k]
            else:
                # encoder + projector: [N_k, ...] -> [N_k, M_k, H] (a list of items may differ in M)
                tokens, mask, per_item = self._encode_project(kind, x, modality_batch_index.get(kind),
                                                              question_embeds)  # [S, H], [S], [N_k]
            _check_placeholders(kind, where, per_item, modality_batch_index.get(kind))
            # scatter: the s-th True position of `where` (row-major) gets tokens[s]
            embeds = embeds.masked_scatter(where[..., None], tokens.to(embeds.dtype))          # [B, L, H]
            attention_mask = attention_mask.masked_scatter(where, mask.to(attention_mask.dtype))  # [B, L]
        return embeds, attention_mask, position_ids

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, modality_inputs: dict | None = None,
                modality_masks: dict | None = None, modality_batch_index: dict | None = None,
                question_embeds: torch.Tensor | None = None, pack: bool = False, **kw):
        """Embed (:meth:`embed_inputs`), then run the LLM on ``inputs_embeds``.

        ``labels [B, L]`` are -100 off assistant tokens (the collator sets them, placeholders
        included); the loss is the LLM's shifted cross-entropy. ``modality_masks`` (the collator's
        zero-padding masks) are accepted and not used: inputs of one kind share a shape. Collator-only
        keys (:data:`BATCH_ONLY_KEYS`) are ignored, so ``model(**batch)`` works. Returns the LLM's
        ``CausalLMOutputWithPast``.

        ``pack=True`` (training, with ``labels``): the samples are packed into fewer rows without
        padding (:func:`medmllm.model.packing.pack_batch`) before the LLM; the loss is the padded
        batch's token-mean loss, and ``logits`` are per packed row ``[R, L, V]``. A batch with
        masked placeholder tokens (a projector mask), or called with its own ``position_ids``, is run
        padded instead.
        """
        for key in BATCH_ONLY_KEYS:
            kw.pop(key, None)
        padding = attention_mask
        embeds, attention, positions = self.embed_inputs(
            input_ids, attention_mask, modality_inputs, modality_batch_index, question_embeds)  # [B, L, H] ...
        if pack and "position_ids" not in kw:
            if labels is None:
                raise ConfigError("pack=True needs labels (packing is for training)")
            padding = torch.ones_like(attention) if padding is None else padding.to(attention.dtype)
            if torch.equal(attention, padding):                                  # no masked placeholders
                from medmllm.model.packing import pack_batch

                embeds, positions, labels = pack_batch(embeds, attention.bool(), positions, labels)  # [R, L, H] ...
                # no cache: the mask builders look for packed rows only without one
                return self.llm(inputs_embeds=embeds, attention_mask=None, position_ids=positions, labels=labels,
                                **{**kw, "use_cache": False})
        kw.setdefault("position_ids", positions)                                 # [B, L]
        return self.llm(inputs_embeds=embeds, attention_mask=attention, labels=labels, **kw)

    def encode_item(self, kind: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One ``kind`` input ``x [*S]`` (no batch dimension) -> its projected tokens ``[M, H]`` and
        mask ``[M]``, without question conditioning: what :meth:`embed_inputs` scatters for it.
        Pass the pairs back as ``modality_tokens`` to skip encoding (the caller sets no-grad/eval)."""
        if kind not in self.encoders:
            raise InputError("kind", f"expected one of {sorted(self.encoders)} (the model's encoders), got {kind!r}")
        tokens, mask, _ = self._encode_project(kind, x.unsqueeze(0), None, None)   # [M, H], [M]
        return tokens, mask

    def _encode_project(self, kind: str, x, batch_index: torch.Tensor | None, question: torch.Tensor | None):
        """``x [N, ...]`` (or a list of N tensors ``[...]``) -> tokens ``[sum M_i, H]``, mask, ``[M_i]``."""
        if question is not None and batch_index is not None:
            question = question[torch.as_tensor(batch_index, device=question.device)]   # [N, Q] per item
        if isinstance(x, (list, tuple)):                                           # items one by one
            items = [t.unsqueeze(0) for t in x]
            questions = [None if question is None else question[i : i + 1] for i in range(len(items))]
        else:
            items, questions = [x], [question]
        tokens, masks, per_item = [], [], []
        for item, q in zip(items, questions):
            features = self._encode(kind, item, q)                                # EncoderOutput [n, T, D]
            tok, mask = self.projectors[kind](features.features, features.mask)   # [n, M, H], [n, M]
            tokens.append(tok.reshape(-1, tok.shape[-1]))
            masks.append(mask.reshape(-1))
            per_item += [tok.shape[1]] * tok.shape[0]
        return torch.cat(tokens), torch.cat(masks), per_item                      # [S, H], [S], [N]

    def _encode(self, kind: str, x: torch.Tensor, question: torch.Tensor | None):
        """Run the ``kind`` encoder on a batch ``x`` (cast to its dtype and device)."""
        encoder = self.encoders[kind]
        if not isinstance(x, torch.Tensor):
            raise InputError(f"modality_inputs.{kind}", f"expected a tensor, got {type(x).__name__}")
        param = next(encoder.parameters(), None)
        x = x.to(device=param.device, dtype=param.dtype) if param is not None else x
        if kind == "ehr" and _has_missing_column(encoder, x.shape):
            return encoder(x[..., 0], missing=x[..., 1] > 0.5)                  # [N, F, 2] -> values, flags
        if question is not None and getattr(encoder, "question_proj", None) is not None:
            return encoder(x, question=question.to(x.dtype))
        return encoder(x)

    # ------------------------------------------------------------------ helpers for data and training

    def num_tokens(self, kind: str, tensor_or_shape) -> int:
        """Placeholder copies for one input of ``kind`` (the collator's ``num_tokens_fn``).

        ``projector.num_tokens(encoder.num_tokens(shape))``; ``tensor_or_shape`` is one item's
        tensor or shape (``[F, 2]`` or ``[F]`` for ehr, see :mod:`medmllm.data.dataset`).
        """
        if kind not in self.encoders:
            raise ConfigError(f"the model has no {kind!r} encoder; it has {sorted(self.encoders)}")
        shape = tuple(tensor_or_shape.shape) if hasattr(tensor_or_shape, "shape") else tuple(tensor_or_shape)
        encoder = self.encoders[kind]
        if kind == "ehr" and _has_missing_column(encoder, shape):
            shape = shape[:-1]
        return int(self.projectors[kind].num_tokens(encoder.num_tokens(shape)))

    def groups(self) -> dict[str, nn.Module]:
        """``{"llm": ..., "encoder.<kind>": ..., "projector.<kind>": ...}``."""
        out: dict[str, nn.Module] = {"llm": self.llm}
        out.update({f"encoder.{k}": m for k, m in self.encoders.items()})
        out.update({f"projector.{k}": m for k, m in self.projectors.items()})
        return out

    def match_groups(self, pattern: str) -> list[str]:
        """Groups named by ``pattern``: a group name, a prefix (``"encoder"``) or a glob (``"projector.*"``)."""
        names = [g for g in self.groups() if g == pattern or g.startswith(pattern + ".")
                 or fnmatch.fnmatchcase(g, pattern) or pattern in ("*", "all")]
        if not names:
            raise ConfigError(f"no module group matches {pattern!r}; groups: {list(self.groups())}")
        return names

    def set_trainable(self, group_or_prefix: str, flag: bool = True) -> list[str]:
        """Set ``requires_grad`` on every parameter of the matching groups; returns their names.

        The flags are recorded in ``config.trainable`` (so a saved model reloads with them).
        """
        names = self.match_groups(group_or_prefix)
        for g in names:
            self.groups()[g].requires_grad_(bool(flag))
            self.config.trainable[g] = bool(flag)
        return names

    def train(self, mode: bool = True):
        """Like ``nn.Module.train``, but a module group with no trainable parameter stays in eval mode:
        a frozen encoder keeps its BatchNorm statistics and disables its dropout. So does any submodule
        marked ``keep_eval = True`` (e.g. BatchNorm layers kept fixed while their encoder is fine-tuned)."""
        super().train(mode)
        if mode:
            for module in self.groups().values():
                if not any(p.requires_grad for p in module.parameters()):
                    module.eval()
            for module in self.modules():
                if getattr(module, "keep_eval", False):
                    module.eval()
        return self

    def param_groups(self, lrs: dict[str, float] | None = None, default_lr: float = 1e-4) -> list[dict]:
        """Optimizer parameter groups ``[{"name", "params", "lr"}]``: one per module group with trainable
        parameters. ``lrs`` maps a group name, prefix or glob to a learning rate; the most specific key
        wins (exact name, then the longest key); groups no key matches get ``default_lr``.
        """
        lrs = dict(lrs or {})
        matched = {key: self.match_groups(key) for key in lrs}
        out = []
        for g, module in self.groups().items():
            params = [p for p in module.parameters() if p.requires_grad]
            if not params:
                continue
            keys = [k for k, names in matched.items() if g in names]
            best = max(keys, key=lambda k: (k == g, len(k)), default=None)
            out.append({"name": g, "params": params, "lr": lrs[best] if best is not None else default_lr})
        return out

    def get_input_embeddings(self) -> nn.Module:
        return self.llm.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.llm.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.llm.get_output_embeddings()

    def sync_config(self) -> None:
        """Refresh ``config.llm_config`` and the hf_image specs from the modules (e.g. after a resize)."""
        self.config.llm_config = self.llm.config.to_dict()
        for kind, enc in self.encoders.items():
            if isinstance(enc, HFImageEncoder):
                self.config.encoders[kind] = hf_image_spec(enc)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """``PreTrainedModel.save_pretrained`` (safetensors) after :meth:`sync_config`.

        Refuses a model with LoRA layers still in it: :func:`medmllm.model.lora.merge` it first, or
        save the adapter with :func:`medmllm.model.lora.save_adapter`.
        """
        if any("lora_" in name for name, _ in self.named_parameters()):
            raise ConfigError("the model holds LoRA layers: merge them (medmllm.model.lora.merge) before "
                              "save_pretrained, or save the adapter with medmllm.model.lora.save_adapter")
        self.sync_config()
        return super().save_pretrained(save_directory, *args, **kwargs)

    def generate(self, batch: dict, tokenizer, **kw) -> list[str]:
        """:func:`medmllm.model.generate.generate` on this model."""
        from medmllm.model.generate import generate

        return generate(self, batch, tokenizer, **kw)


# ============================================================================= checks

def _tok(kind: str) -> str:
    return f"<{kind}>"


def _has_missing_column(encoder: nn.Module, shape: Sequence[int]) -> bool:
    """True for ehr inputs ``[..., F, 2]`` (value, missing flag) rather than ``[..., F]`` values."""
    f = getattr(encoder, "n_features", None)
    return len(shape) >= 2 and shape[-1] == 2 and (f is None or shape[-2] == f)


def _check_placeholders(kind: str, where: torch.Tensor, per_item: list[int], batch_index) -> None:
    """InputError unless ``where [B, L]`` holds one placeholder per feature token, row by row."""
    n, found = len(per_item), int(where.sum())
    expected = sum(per_item)
    if found != expected:
        m = per_item[0] if len(set(per_item)) == 1 else per_item
        raise InputError("input_ids", f"expected {expected} {_tok(kind)} placeholder tokens for {n} {kind} "
                                      f"inputs x {m} tokens, found {found}")
    if batch_index is None:
        return
    batch_index = torch.as_tensor(batch_index, device=where.device).long()
    if batch_index.numel() != n or bool((batch_index[1:] < batch_index[:-1]).any()):
        raise InputError("modality_batch_index", f"expected {n} non-decreasing {kind} row indices, "
                                                 f"got {batch_index.tolist()}")
    want = torch.zeros(where.shape[0], dtype=torch.long, device=where.device)
    want.index_add_(0, batch_index, torch.tensor(per_item, device=where.device))
    got = where.sum(dim=1)
    if not torch.equal(want, got):
        raise InputError("input_ids", f"expected {want.tolist()} {_tok(kind)} placeholder tokens per row "
                                      f"(from modality_batch_index), found {got.tolist()}")


def _check_kinds(encoders: dict, projectors: dict) -> list[str]:
    if set(encoders) != set(projectors):
        raise ConfigError(f"encoders and projectors must cover the same kinds, got {sorted(encoders)} "
                          f"and {sorted(projectors)}")
    bad = sorted(set(encoders) - set(MODALITIES))
    if bad or not encoders:
        raise ConfigError(f"modality kinds must be a non-empty subset of {MODALITIES}, got {sorted(encoders)}")
    for kind, enc in encoders.items():
        if getattr(enc, "modality", kind) != kind:
            raise ConfigError(f"encoder for {kind!r} is a {enc.modality!r} encoder ({type(enc).__name__})")
    return [k for k in MODALITIES if k in encoders]


def _check_dims(kind: str, encoder: nn.Module, projector: nn.Module, hidden: int) -> None:
    if getattr(projector, "in_dim", encoder.out_dim) != encoder.out_dim:
        raise ConfigError(f"projector {kind!r}: expected in_dim {encoder.out_dim} (the encoder's out_dim), "
                          f"got {projector.in_dim}")
    if getattr(projector, "out_dim", hidden) != hidden:
        raise ConfigError(f"projector {kind!r}: expected out_dim {hidden} (the LLM's hidden size), "
                          f"got {projector.out_dim}")


def _spec_for(kind: str, module: nn.Module, specs: dict, what: str) -> dict:
    spec = specs.get(kind)
    if spec is None and isinstance(module, HFImageEncoder):
        return hf_image_spec(module)
    if spec is None:
        raise ConfigError(f"{what} {kind!r}: pass its spec {{'name': ..., 'kwargs': {{...}}}} in "
                          f"{what}_specs so the model can be rebuilt by from_pretrained")
    if not isinstance(spec, dict) or "name" not in spec:
        raise ConfigError(f"{what} {kind!r}: expected a spec {{'name': ..., 'kwargs': {{...}}}}, got {spec!r:.120}")
    return {"name": spec["name"], "kwargs": dict(spec.get("kwargs") or {})}


# ============================================================================= Auto registration

def _register_auto() -> None:
    AutoConfig.register("medmllm", MedMLLMConfig, exist_ok=True)
    AutoModel.register(MedMLLMConfig, MedMLLM, exist_ok=True)
    AutoModelForCausalLM.register(MedMLLMConfig, MedMLLM, exist_ok=True)


_register_auto()

__all__ = ["BATCH_ONLY_KEYS", "MedMLLM", "MedMLLMConfig", "build_encoder_from_spec", "build_llm",
           "build_projector_from_spec", "config_from_dict", "hf_image_spec"]

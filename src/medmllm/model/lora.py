"""LoRA on a :class:`~medmllm.model.mllm.MedMLLM` through peft, saved with what else was trained.

:func:`apply_lora` injects peft LoRA layers in place (``peft.inject_adapter_in_model``) into the
module groups named in ``targets`` (``"llm"``, ``"encoder.image"``... each with its own
``LoraConfig`` kwargs), freezes everything else and unfreezes ``modules_to_save`` (by default every
projector, trained in full). :func:`save_adapter` writes the LoRA tensors *and* every other
tensor that may have changed: all trainable parameters (projectors, unfrozen encoders), the
full state of ``modules_to_save`` groups, and the buffers of encoders and projectors (BatchNorm
statistics move in train mode even when frozen). Forgetting the projector is the classic way to
lose a LLaVA-style fine-tune (LLaVA issues #1519, #1592). :func:`load_adapter` rebuilds it on a
fresh base; :func:`merge` folds LoRA into the base weights and returns a plain MedMLLM.

Files in an adapter folder: ``medmllm_adapter.json`` (LoRA kwargs per group, modules_to_save,
tensor names) and ``adapter_model.safetensors`` (tensors named as in ``model.state_dict()``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch

from medmllm.errors import ConfigError, InputError

ADAPTER_CONFIG = "medmllm_adapter.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_NAME = "default"
DEFAULT_TARGETS: dict[str, dict[str, Any]] = {
    "llm": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": "all-linear"},
}


def _lora_config(group: str, kwargs: dict):
    from peft import LoraConfig

    try:
        return LoraConfig(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"LoRA kwargs of {group!r}: {e}") from None


def _inject(model, lora: dict[str, dict]) -> None:
    """Inject one LoRA adapter per group, with that group's ``LoraConfig`` kwargs."""
    from peft import inject_adapter_in_model

    groups = model.groups()
    for group, kwargs in lora.items():
        try:
            inject_adapter_in_model(_lora_config(group, kwargs), groups[group], adapter_name=ADAPTER_NAME)
        except ValueError as e:  # e.g. target modules not found
            raise ConfigError(f"LoRA on {group!r}: {e}") from None


def _is_lora(name: str) -> bool:
    return ".lora_" in name or name.startswith("lora_")


def apply_lora(model, targets: dict[str, dict] | None = None,
               modules_to_save: Sequence[str] = ("projector.*",), freeze_rest: bool = True):
    """Add LoRA to ``model`` in place and return it.

    ``targets``: ``{group or pattern: LoraConfig kwargs}`` (default :data:`DEFAULT_TARGETS`: rank 8 on
    every linear layer of the LLM). Patterns are those of :meth:`MedMLLM.match_groups`
    (``"encoder.image"``, ``"encoder"``, ``"projector.*"``). ``freeze_rest``: freeze every group first;
    then the LoRA matrices and the ``modules_to_save`` groups (full weights) are trainable.
    peft freezes the non-LoRA weights of each targeted group.
    """
    if getattr(model, "lora_targets", None):
        raise ConfigError(f"the model already has LoRA on {sorted(model.lora_targets)}; merge it first")
    targets = DEFAULT_TARGETS if targets is None else targets
    lora = {g: dict(kw) for pattern, kw in targets.items() for g in model.match_groups(pattern)}
    if not lora:
        raise ConfigError("targets: expected at least one group to put LoRA on, got none")
    save = [g for pattern in modules_to_save for g in model.match_groups(pattern)]
    if freeze_rest:
        model.set_trainable("*", False)
    _inject(model, lora)
    for g in save:
        model.set_trainable(g, True)
    model.lora_targets = lora
    model.lora_modules_to_save = sorted(set(save))
    return model


def adapter_state_dict(model) -> dict[str, torch.Tensor]:
    """The tensors :func:`save_adapter` writes (names as in ``model.state_dict()``).

    LoRA matrices, every trainable parameter, the whole state of the ``modules_to_save`` groups
    and every buffer of the encoders and projectors.
    """
    state = model.state_dict()
    names = {n for n in state if _is_lora(n)}
    names |= {n for n, p in model.named_parameters() if p.requires_grad}
    prefixes = [_prefix(model, g) for g in getattr(model, "lora_modules_to_save", [])]
    names |= {n for n in state if any(n.startswith(p) for p in prefixes)}
    names |= {n for n, _ in model.named_buffers() if n.startswith(("encoders.", "projectors.")) and n in state}
    return {n: state[n].detach().contiguous() for n in sorted(names)}


def _prefix(model, group: str) -> str:
    """State-dict prefix of a group: ``llm.``, ``encoders.<kind>.``, ``projectors.<kind>.``."""
    if group == "llm":
        return "llm."
    head, kind = group.split(".", 1)
    return f"{head}s.{kind}."


def save_adapter(model, directory: str | os.PathLike) -> Path:
    """Write the adapter of a model prepared with :func:`apply_lora` to ``directory``; returns it."""
    from safetensors.torch import save as save_bytes

    from medmllm.io import write_bytes, write_json

    lora = getattr(model, "lora_targets", None)
    if not lora:
        raise ConfigError("the model has no LoRA layers (call apply_lora first)")
    tensors = adapter_state_dict(model)
    meta = {"format": "medmllm-lora", "version": 1, "lora": lora,
            "modules_to_save": list(model.lora_modules_to_save), "tensors": sorted(tensors),
            "base": {"llm_model_type": model.config.llm_config.get("model_type"),
                     "kinds": model.config.kinds()}}
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    write_bytes(out / ADAPTER_WEIGHTS, save_bytes(tensors, metadata={"format": "pt"}))
    write_json(out / ADAPTER_CONFIG, meta)
    return out


def load_adapter(base_model, directory: str | os.PathLike):
    """Put the adapter saved in ``directory`` on ``base_model`` (in place) and return it.

    The LoRA layers are injected as when saved, then every saved tensor is loaded; InputError when
    the folder is not an adapter or a tensor is missing, ConfigError when the base does not fit.
    """
    from safetensors.torch import load_file

    d = Path(directory)
    if not (d / ADAPTER_CONFIG).is_file() or not (d / ADAPTER_WEIGHTS).is_file():
        raise InputError(d, f"expected an adapter folder with {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}, "
                            f"found {sorted(p.name for p in d.iterdir()) if d.is_dir() else 'no folder'}")
    meta = json.loads((d / ADAPTER_CONFIG).read_text())
    if meta.get("format") != "medmllm-lora":
        raise InputError(d / ADAPTER_CONFIG, f"expected format 'medmllm-lora', got {meta.get('format')!r}")
    missing_groups = sorted((set(meta["lora"]) | set(meta["modules_to_save"])) - set(base_model.groups()))
    if missing_groups:
        raise ConfigError(f"the base model has no groups {missing_groups}; it has {list(base_model.groups())}")
    if getattr(base_model, "lora_targets", None):
        raise ConfigError("the base model already has LoRA layers; load the adapter into a fresh base")
    tensors = load_file(str(d / ADAPTER_WEIGHTS))
    if sorted(tensors) != sorted(meta["tensors"]):
        raise InputError(d / ADAPTER_WEIGHTS, f"expected the {len(meta['tensors'])} tensors listed in "
                                              f"{ADAPTER_CONFIG}, found {len(tensors)}")
    flags = {n: p.requires_grad for n, p in base_model.named_parameters()}
    trainable = dict(base_model.config.trainable)
    apply_lora(base_model, meta["lora"], modules_to_save=meta["modules_to_save"])
    try:
        _load_tensors(base_model, tensors, d)
    except Exception:  # leave the base as it was
        _unload(base_model, merge_weights=False)
        for n, p in base_model.named_parameters():
            p.requires_grad_(flags[n])
        base_model.config.trainable = trainable
        raise
    return base_model


def _load_tensors(model, tensors: dict[str, torch.Tensor], d: Path) -> None:
    state = model.state_dict()
    unexpected = sorted(set(tensors) - set(state))
    if unexpected:
        raise ConfigError(f"adapter {d}: the model has no tensors {unexpected[:4]} (different base model?)")
    lora_missing = sorted(n for n in state if _is_lora(n) and n not in tensors)
    if lora_missing:
        raise InputError(d / ADAPTER_WEIGHTS, f"expected every LoRA tensor of the model, missing {lora_missing[:4]}")
    wrong = [(n, tuple(t.shape), tuple(state[n].shape)) for n, t in tensors.items() if t.shape != state[n].shape]
    if wrong:
        raise ConfigError(f"adapter {d}: shape mismatch (name, saved, model) {wrong[:4]} (different base model?)")
    model.load_state_dict(tensors, strict=False)


def merge(model):
    """Fold every LoRA layer into its base weight (``W += B A * scale``) and remove the LoRA modules.

    Returns the same object, now a plain MedMLLM (no peft modules left): it saves with
    ``save_pretrained`` and reloads with ``AutoModel.from_pretrained``.
    """
    if not _unload(model, merge_weights=True):
        raise ConfigError("the model has no LoRA layers to merge")
    return model


def _unload(model, merge_weights: bool) -> int:
    """Replace every peft layer by its base layer (merged into it first if ``merge_weights``)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    for name, layer in layers:
        if merge_weights:
            layer.merge(safe_merge=True)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.get_base_layer())
    for module in model.groups().values():
        if hasattr(module, "peft_config"):
            del module.peft_config
    model.lora_targets = None
    model.lora_modules_to_save = []
    return len(layers)


__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "DEFAULT_TARGETS", "adapter_state_dict", "apply_lora",
           "load_adapter", "merge", "save_adapter"]

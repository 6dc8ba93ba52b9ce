"""Checkpoints that lose nothing, written atomically.

Layout of ``run_dir/checkpoints/step_000123/``::

    model.safetensors   model weights (tied/shared tensors stored once, aliases in the metadata)
    optimizer.pt        optimizer.state_dict()            (torch.save)
    scheduler.pt        scheduler.state_dict()            (torch.save)
    rng.pt              RNG states per process: python, numpy, torch CPU, CUDA (all devices)
    trainer_state.pt    data position (epoch, batch index, sampler state) + ``extra``
    meta.json           step, unix time, metrics, data position   (written last)

A checkpoint is written into ``checkpoints/.tmp-step_000123`` and renamed into place in one
``os.rename``, so a killed save leaves a ``.tmp-*`` directory and never a half ``step_*``.
Those leftovers are ignored by :func:`latest_checkpoint` and removed by
:func:`clean_partial_checkpoints` (called on save and by ``latest_checkpoint(clean=True)``).
Only one process may write to a run directory (in distributed runs: the main process).

Every file is loaded with ``torch.load(weights_only=True)`` (no arbitrary pickles).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from medmllm.errors import InputError

log = logging.getLogger(__name__)

CKPT_DIRNAME = "checkpoints"
_STEP_RE = re.compile(r"^step_(\d+)$")
_PARTIAL_PREFIXES = (".tmp-", ".trash-")
MODEL_FILE, OPTIM_FILE, SCHED_FILE = "model.safetensors", "optimizer.pt", "scheduler.pt"
RNG_FILE, STATE_FILE, META_FILE = "rng.pt", "trainer_state.pt", "meta.json"


# ----------------------------------------------------------------------------- RNG
def capture_rng_state() -> dict:
    """This process's RNG states: python ``random``, global numpy, torch CPU and every CUDA device.

    Plain types and tensors only, so it survives ``torch.load(weights_only=True)``.
    """
    np_state = np.random.get_state(legacy=False)
    np_state["state"] = {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                         "pos": int(np_state["state"]["pos"])}
    version, internal, gauss = random.getstate()
    state = {"python": {"version": version, "internal": list(internal), "gauss": gauss},
             "numpy": np_state, "torch": torch.get_rng_state(), "cuda": []}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping) -> None:
    """Inverse of :func:`capture_rng_state` (CUDA states restored when the device count matches)."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss"]))
    np_state = dict(state["numpy"])
    np_state["state"] = {"key": np_state["state"]["key"].numpy().astype(np.uint32),
                         "pos": np_state["state"]["pos"]}
    np.random.set_state(np_state)
    torch.set_rng_state(state["torch"])
    cuda = list(state.get("cuda") or [])
    if cuda and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            log.warning("checkpoint holds %d CUDA RNG states but %d devices are visible: CUDA RNG not restored",
                        len(cuda), torch.cuda.device_count())


# ----------------------------------------------------------------------------- model weights
def _as_state_dict(obj: Any) -> Mapping[str, torch.Tensor]:
    return obj.state_dict() if hasattr(obj, "state_dict") and not isinstance(obj, Mapping) else obj


def save_weights(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Write a state dict as safetensors. Tensors that are the same view of the same storage
    (tied weights) are stored once; the other names go to the ``aliases`` metadata. Other views
    of shared storage are copied (their values are kept, their sharing is not)."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, t in state_dict.items():
        if not isinstance(t, torch.Tensor):
            raise InputError(name, f"expected a tensor in the model state dict, got {type(t).__name__}")
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
               tuple(t.stride()), t.dtype) if t.numel() else None
        if key is not None and key in seen:
            aliases[name] = seen[key]
            continue
        if key is not None:
            seen[key] = name
        tensors[name] = t.detach().to("cpu").contiguous().clone()
    save_file(tensors, str(path), metadata={"format": "pt", "aliases": json.dumps(aliases, sort_keys=True)})


def load_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read :func:`save_weights` output back into a full state dict (aliases re-expanded)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    sd = load_file(str(path))
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
    for alias, target in json.loads(meta.get("aliases", "{}")).items():
        sd[alias] = sd[target]
    return sd


# ----------------------------------------------------------------------------- directory helpers
def checkpoint_root(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / CKPT_DIRNAME


def step_dirname(step: int) -> str:
    return f"step_{int(step):06d}"


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints (``step_*`` with a ``meta.json``), oldest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir() and (p / META_FILE).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def clean_partial_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Delete leftovers of interrupted saves/prunes (``.tmp-*``, ``.trash-*``). Returns what was removed."""
    root = checkpoint_root(run_dir)
    removed = []
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(_PARTIAL_PREFIXES):
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
                removed.append(p)
    if removed:
        log.info("removed %d partial checkpoint(s): %s", len(removed), ", ".join(p.name for p in removed))
    return removed


def latest_checkpoint(run_dir: str | os.PathLike, *, clean: bool = True) -> Path | None:
    """The newest complete checkpoint of a run, or None. ``clean`` first removes partial ones
    (call it on the writing process only)."""
    if clean:
        clean_partial_checkpoints(run_dir)
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def prune_checkpoints(run_dir: str | os.PathLike, keep_last: int | None) -> list[Path]:
    """Keep the ``keep_last`` newest checkpoints (None or <= 0: keep all). Returns the removed ones."""
    found = list_checkpoints(run_dir)
    if not keep_last or keep_last <= 0 or len(found) <= keep_last:
        return []
    removed = found[:-keep_last]
    for p in removed:  # rename first: a prune killed half-way leaves a .trash-*, never a half step_*
        trash = p.with_name(f".trash-{p.name}-{os.getpid()}")
        os.rename(p, trash)
        shutil.rmtree(trash, ignore_errors=True)
    return removed


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _torch_save(obj: Any, path: Path) -> None:
    with open(path, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())


_DROP = object()


def _json_safe(obj: Any) -> Any:
    """Keep what JSON can hold; one-element tensors/arrays become numbers, anything else is dropped."""
    if isinstance(obj, Mapping):
        out = {str(k): _json_safe(v) for k, v in obj.items()}
        return {k: v for k, v in out.items() if v is not _DROP}
    if isinstance(obj, (list, tuple)):
        return [v for v in map(_json_safe, obj) if v is not _DROP]
    if isinstance(obj, torch.Tensor):
        return obj.item() if obj.numel() == 1 else _DROP
    if isinstance(obj, (np.ndarray, np.generic)):
        return obj.item() if obj.size == 1 else _DROP
    if obj is None or isinstance(obj, (str, bool, int, float)):
        return obj
    return _DROP


# ----------------------------------------------------------------------------- save / load
def save_checkpoint(run_dir: str | os.PathLike, step: int, state: Mapping[str, Any], *,
                    keep_last: int | None = None) -> Path:
    """Write ``run_dir/checkpoints/step_{step:06d}/`` atomically and return its path.

    ``state`` keys (all optional):
      ``model``      a module or a state dict (tensors)              -> model.safetensors
      ``optimizer``  an optimizer or its state dict                  -> optimizer.pt
      ``scheduler``  a scheduler or its state dict                   -> scheduler.pt
      ``rng``        a list of per-process RNG states (default: ``[capture_rng_state()]``)
      ``data``       data position, e.g. ``{"epoch", "batch", "sampler"}`` -> trainer_state.pt
      ``metrics``    scalars for meta.json
      ``extra``      anything else torch.save can write with plain types/tensors
    An existing checkpoint of the same step is replaced. Then the oldest are pruned to ``keep_last``.
    """
    root = checkpoint_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    clean_partial_checkpoints(run_dir)
    final = root / step_dirname(step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    tmp.mkdir()
    try:
        _write_parts(tmp, int(step), state)
        _fsync_dir(tmp)
        _commit(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(root)
    prune_checkpoints(run_dir, keep_last)
    return final


def _write_parts(tmp: Path, step: int, state: Mapping[str, Any]) -> None:
    if state.get("model") is not None:
        save_weights(_as_state_dict(state["model"]), tmp / MODEL_FILE)
    if state.get("optimizer") is not None:
        _torch_save(_as_state_dict(state["optimizer"]), tmp / OPTIM_FILE)
    if state.get("scheduler") is not None:
        _torch_save(_as_state_dict(state["scheduler"]), tmp / SCHED_FILE)
    rng = state.get("rng")
    _torch_save({"per_process": list(rng) if rng is not None else [capture_rng_state()]}, tmp / RNG_FILE)
    data = dict(state.get("data") or {})
    _torch_save({"step": step, "data": data, "extra": state.get("extra") or {}}, tmp / STATE_FILE)
    meta = {"step": step, "time": time.time(), "metrics": _json_safe(dict(state.get("metrics") or {})),
            "data": _json_safe(data), "files": sorted(p.name for p in tmp.iterdir()) + [META_FILE]}
    with open(tmp / META_FILE, "w", encoding="utf-8") as fh:  # written last: marks the content complete
        json.dump(meta, fh, indent=2, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())


def _commit(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``; an existing ``final`` is moved aside first and then deleted."""
    if final.exists():
        trash = final.with_name(f".trash-{final.name}-{os.getpid()}")
        os.rename(final, trash)
        os.rename(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp, final)


def _load(path: Path, map_location: Any) -> Any:
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise InputError(path, f"cannot read checkpoint part: {exc}") from exc


def load_checkpoint(path: str | os.PathLike, model: Any = None, optimizer: Any = None, scheduler: Any = None,
                    *, restore_rng: bool = True, process_index: int = 0, strict: bool = True,
                    map_location: Any = "cpu") -> dict:
    """Restore a checkpoint into the given objects; returns its state.

    ``model`` gets the weights (``load_state_dict``, ``strict``), ``optimizer``/``scheduler``
    their state dicts; with ``restore_rng`` this process's RNG states (entry ``process_index``)
    are restored. Returns ``{"step", "data", "extra", "metrics", "time", "path", "rng"}``
    (``rng``: the saved per-process states). InputError if a needed part is missing; the weights
    alone can be read with :func:`load_weights`.
    """
    path = Path(path)
    if not (path / META_FILE).is_file():
        raise InputError(path, f"not a complete checkpoint: expected {META_FILE} in it")
    meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
    trainer = _load(path / STATE_FILE, map_location)
    out = {"step": int(trainer["step"]), "data": trainer.get("data", {}), "extra": trainer.get("extra", {}),
           "metrics": meta.get("metrics", {}), "time": meta.get("time"), "path": path}
    if model is not None:
        _need(path / MODEL_FILE, True)
        model.load_state_dict(load_weights(path / MODEL_FILE), strict=strict)
    if optimizer is not None:
        _need(path / OPTIM_FILE, True)
        optimizer.load_state_dict(_load(path / OPTIM_FILE, map_location))
    if scheduler is not None:
        _need(path / SCHED_FILE, True)
        scheduler.load_state_dict(_load(path / SCHED_FILE, map_location))
    rng = _load(path / RNG_FILE, "cpu")["per_process"] if (path / RNG_FILE).is_file() else []
    out["rng"] = rng
    if restore_rng:
        if process_index < len(rng):
            restore_rng_state(rng[process_index])
        else:
            log.warning("%s holds RNG states of %d process(es); none for process %d: RNG not restored",
                        path, len(rng), process_index)
    return out


def _need(p: Path, needed: bool) -> None:
    if needed and not p.is_file():
        raise InputError(p.parent, f"checkpoint has no {p.name} (files: {sorted(x.name for x in p.parent.iterdir())})")

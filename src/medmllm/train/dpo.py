"""Recipe of the `dpo` stage (preference optimisation): setup -> reference -> train -> save -> cleanup.

Trains on ``stage="preference"`` records (a prompt in ``messages`` — with images, volumes, signals
or EHR — plus ``chosen`` and ``rejected`` assistant turns) with the sigmoid DPO loss
(:func:`medmllm.train.rl_losses.dpo_loss`). The reference policy is the frozen starting model: its
summed response log-probs of every pair are computed **once**, before training, under the same
precision as training, and stored with the run (``run_dir/reference_logps.pt``, keyed by the data,
the model section and the tokenisation settings), so a resumed run loads them instead of
recomputing them and a second model never has to sit in memory. Full fine-tuning or LoRA
(``lora.enabled``; projector weights are trained fully and saved with the adapter), on the
engine's :class:`~medmllm.train.engine.TrainLoop` with its exact resume.

Config (YAML + ``key=value`` overrides, see :class:`DPOConfig`)::

    stage: dpo
    run_dir: runs/dpo
    model: {path: runs/quickstart/instruct/model}
    data: {train: [data/medphantom/records/preference.jsonl], max_length: 256}
    dpo: {beta: 0.1, rpo_alpha: 0.0}   # rpo_alpha > 0 adds the chosen answers' NLL (RPO)
    optim: {lr: 5.0e-5, projector_lr: 5.0e-5}
    train: {max_steps: 200, batch_size: 8}

A batch holds ``B`` pairs as ``2B`` rows (chosen rows first, then rejected rows, as one padded
batch). A pair the collator cannot fit (``max_length``) or whose file cannot be read is left out
of its batch (both sides).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Literal

import torch

from medmllm.errors import ConfigError, InputError
from medmllm.train.engine import zero_loss
from medmllm.train.rl_losses import dpo_loss, sequence_logprobs
from medmllm.train.sft import DataConfig, LoraConfig, ModelConfig, OptimConfig, SFTTrain, save_final_model

log = logging.getLogger(__name__)

REFERENCE_FILE = "reference_logps.pt"
SIDES = ("chosen", "rejected")
_FORWARD_KEYS = ("input_ids", "attention_mask", "modality_inputs", "modality_batch_index")


@dataclasses.dataclass
class DPOSettings:
    beta: float = 0.1                 # strength of the implicit KL to the reference
    reference_batch_size: int = 8     # pairs per forward pass when precomputing reference log-probs
    rpo_alpha: float = 0.0            # weight of the chosen answers' per-token NLL (RPO; TRL's rpo_alpha)

    def __post_init__(self) -> None:
        if isinstance(self.beta, bool) or not (isinstance(self.beta, (int, float)) and self.beta > 0):
            raise ConfigError(f"dpo.beta: expected a number > 0, got {self.beta!r}")
        if isinstance(self.rpo_alpha, bool) or not (isinstance(self.rpo_alpha, (int, float)) and self.rpo_alpha >= 0):
            raise ConfigError(f"dpo.rpo_alpha: expected a number >= 0, got {self.rpo_alpha!r}")
        if not isinstance(self.reference_batch_size, int) or self.reference_batch_size < 1:
            raise ConfigError(f"dpo.reference_batch_size: expected an int >= 1, got {self.reference_batch_size!r}")


@dataclasses.dataclass
class DPOConfig:
    stage: Literal["dpo"]
    run_dir: str
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=lambda: OptimConfig(lr=5e-5, projector_lr=5e-5,
                                                                                warmup_steps=10))
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)
    train: SFTTrain = dataclasses.field(default_factory=SFTTrain)
    dpo: DPOSettings = dataclasses.field(default_factory=DPOSettings)
    resume: bool = True


# ----------------------------------------------------------------------------- data

def side_record(rec: dict, side: str) -> dict:
    """The instruction record ``prompt + rec[side]`` of a preference record (id ``<id>::<side>``)."""
    return {"id": f"{rec['id']}::{side}", "stage": "instruction", "messages": list(rec["messages"]) + list(rec[side]),
            "meta": rec["meta"]}


class MultiBaseRecords(torch.utils.data.Dataset):
    """:class:`~medmllm.data.dataset.RecordDataset` over records of several JSONL files, each
    resolving its relative paths from its own folder (``bases[i]`` for ``records[i]``)."""

    def __init__(self, records: list[dict], bases: list[Path], loader):
        from medmllm.data.dataset import RecordDataset

        self.parts: dict[Path, RecordDataset] = {}
        self.index: list[tuple[Path, int]] = [None] * len(records)  # type: ignore[list-item]
        for base in dict.fromkeys(bases):
            idx = [i for i, b in enumerate(bases) if b == base]
            self.parts[base] = RecordDataset([records[i] for i in idx], loader, base_dir=base)
            for j, i in enumerate(idx):
                self.index[i] = (base, j)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int):
        base, j = self.index[i]
        return self.parts[base][j]

    def errors(self) -> list[str]:
        return [e for p in self.parts.values() for e in p.errors]


class PairDataset(torch.utils.data.Dataset):
    """Item ``i``: ``{"index": i, "chosen": example, "rejected": example}`` (collator examples of
    prompt + each response), or None when a file of the pair cannot be read."""

    def __init__(self, records: list[dict], bases: list[Path], loader):
        sides = [side_record(r, s) for r in records for s in SIDES]
        self.inner = MultiBaseRecords(sides, [b for b in bases for _ in SIDES], loader)
        self.ids = [r["id"] for r in records]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int):
        chosen, rejected = self.inner[2 * i], self.inner[2 * i + 1]
        if chosen is None or rejected is None:
            return None
        return {"index": i, "chosen": chosen, "rejected": rejected}


class PairCollator:
    """Pairs -> one batch of ``2B`` rows (``B`` chosen rows, then the ``B`` rejected rows).

    Keys: ``ref_logps`` ``[B, 2]`` (when reference log-probs are given; first, so the engine counts
    pairs), the :class:`~medmllm.data.collate.MultimodalCollator` keys over the ``2B`` rows,
    ``pair_index`` ``[B]`` (dataset indices), ``dropped_pairs`` (count). A pair is left out when a
    file could not be read or either side cannot be fitted.
    """

    def __init__(self, collator, reference: torch.Tensor | None = None):
        self.collator, self.reference = collator, reference

    def _fits(self, item: dict) -> bool:
        from medmllm.data.collate import SampleDropped

        try:
            for side in SIDES:
                self.collator.encode(item[side])
        except SampleDropped:
            return False
        return True

    def __call__(self, items: list) -> dict:
        pairs = [it for it in items if it is not None and self._fits(it)]
        rows = self.collator([p["chosen"] for p in pairs] + [p["rejected"] for p in pairs])
        index = torch.tensor([p["index"] for p in pairs], dtype=torch.long)            # [B]
        out: dict = {}
        if self.reference is not None:
            out["ref_logps"] = self.reference[index]                                     # [B, 2]
        out.update(rows)
        out["pair_index"] = index
        out["dropped_pairs"] = len(items) - len(pairs)
        return out


def pair_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs of the chosen and the rejected rows of a pair batch -> ``[B]``, ``[B]``."""
    logits = model(**{k: batch[k] for k in _FORWARD_KEYS if k in batch}).logits      # [2B, L, V]
    logps = sequence_logprobs(logits, batch["labels"])                                # [2B]
    b = logps.shape[0] // 2
    return logps[:b], logps[b:]


# ----------------------------------------------------------------------------- reference log-probs

def reference_key(cfg: DPOConfig, data_hash: str) -> str:
    """What the reference log-probs depend on: data, starting model, tokenisation and precision."""
    from medmllm.config import dump_config

    d = cfg.data
    parts = {"data": data_hash, "model": dump_config(cfg.model), "max_length": d.max_length,
             "truncation": d.truncation, "image_size": d.image_size, "image_channels": d.image_channels,
             "precision": cfg.train.mixed_precision}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


@torch.no_grad()
def compute_reference_logps(model, dataset: PairDataset, collate: PairCollator, batch_size: int, accelerator,
                            progress: bool = False) -> torch.Tensor:
    """Summed response log-probs of every pair under ``model`` (eval mode) -> ``[N, 2]`` float32
    (chosen, rejected); NaN for pairs that are left out of every batch (unreadable or too long)."""
    from accelerate.utils import send_to_device

    was_training = model.training
    model.eval()
    out = torch.full((len(dataset), 2), float("nan"))
    starts = range(0, len(dataset), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="reference log-probs", unit="batch")
    try:
        for start in starts:
            batch = collate([dataset[i] for i in range(start, min(len(dataset), start + batch_size))])
            if batch["pair_index"].numel() == 0:
                continue
            batch = send_to_device(batch, accelerator.device)
            with accelerator.autocast():
                chosen, rejected = pair_logps(model, batch)
            out[batch["pair_index"].cpu()] = torch.stack([chosen, rejected], dim=1).float().cpu()
    finally:
        model.train(was_training)
    return out


def load_or_compute_reference(path: Path, key: str, ids: list[str], compute) -> tuple[torch.Tensor, bool]:
    """Reference log-probs from ``path`` when it was written for the same ``key`` and ``ids``; else
    ``compute()`` and write them (atomically). Returns ``(logps [N, 2], loaded)``."""
    from medmllm.io import atomic_open

    if path.is_file():
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - a damaged file is recomputed
            log.warning("cannot read %s (%s): recomputing the reference log-probs", path, exc)
            saved = None
        if saved is not None and saved.get("key") == key and saved.get("ids") == ids:
            log.info("reference log-probs loaded from %s", path)
            return saved["logps"], True
        if saved is not None:
            log.warning("%s was computed for other data or another starting model: recomputing", path)
    logps = compute()
    with atomic_open(path, "wb") as fh:
        torch.save({"key": key, "ids": list(ids), "logps": logps}, fh)
    return logps, False


# ----------------------------------------------------------------------------- loss

def chosen_nll(chosen_logps: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token NLL of the chosen answers: ``-sum(chosen log-probs) / number of chosen answer tokens``.
    ``labels [2B, L]`` are the pair batch's (chosen rows first); a label counts from position 1 on."""
    b = chosen_logps.shape[0]
    n_tokens = (labels[:b, 1:] != -100).sum().clamp_min(1)
    return -chosen_logps.sum() / n_tokens


def make_loss_fn(beta: float, rpo_alpha: float = 0.0):
    """``loss_fn(model, batch)`` of the engine: DPO loss (+ ``rpo_alpha`` x the chosen answers' per-token
    NLL, RPO) and implicit reward statistics."""

    def loss_fn(model, batch: dict) -> dict:
        if batch["input_ids"].shape[0] == 0:  # every pair of this micro-batch was left out
            zero = zero_loss(model)
            return {"loss": zero, "reward_accuracy": zero.detach(), "reward_margin": zero.detach(),
                    "chosen_reward": zero.detach(), "rejected_reward": zero.detach(), "nll": zero.detach()}
        chosen, rejected = pair_logps(model, batch)                                    # [B], [B]
        ref = batch["ref_logps"]                                                       # [B, 2]
        out = dpo_loss(chosen, rejected, ref[:, 0], ref[:, 1], beta)
        cr, rr = out["chosen_rewards"], out["rejected_rewards"]
        nll = chosen_nll(chosen, batch["labels"])
        loss = out["loss"] + rpo_alpha * nll if rpo_alpha > 0 else out["loss"]
        return {"loss": loss, "reward_accuracy": (cr > rr).float().mean(), "reward_margin": (cr - rr).mean(),
                "chosen_reward": cr.mean(), "rejected_reward": rr.mean(), "nll": nll.detach()}

    return loss_fn


# ----------------------------------------------------------------------------- the recipe

def load_preference_records(cfg: DPOConfig) -> tuple[list[dict], list[Path], str]:
    """The ``preference`` records of ``data.train`` (task filters applied), their folders and a data hash."""
    from medmllm.train.sft import load_records

    records, bases, data_hash = load_records(cfg.data)
    keep = [i for i, r in enumerate(records) if r.get("stage") == "preference"]
    if len(keep) < len(records):
        log.warning("dpo: %d record(s) of other stages left out", len(records) - len(keep))
    if not keep:
        raise ConfigError(f"data.train: expected stage 'preference' records (prompt + chosen + rejected) in "
                          f"{cfg.data.train}, found none")
    return [records[i] for i in keep], [bases[i] for i in keep], data_hash


def pair_lengths(records: list[dict], model, tokenizer, shapes) -> list[int]:
    """Estimated token length of each pair's longer side (for length-grouped batches)."""
    from medmllm.train.sft import estimate_lengths

    per_side = [estimate_lengths([side_record(r, s) for r in records], model, tokenizer, shapes) for s in SIDES]
    return [max(a, b) for a, b in zip(*per_side)]


def run(cfg: DPOConfig, progress: bool = True) -> dict:
    """Train the DPO stage; the model and tokenizer end up in ``run_dir/model``. Returns a summary."""
    from medmllm.data.collate import MultimodalCollator
    from medmllm.data.dataset import PartLoader
    from medmllm.train.engine import LengthGroupedBatchSampler, TrainLoop, make_accelerator, make_loader_factory
    from medmllm.train.engine import seed_everything
    from medmllm.train.sft import load_model, make_scheduler, set_stage_trainable

    # setup ------------------------------------------------------------------
    run_dir = Path(cfg.run_dir)
    seed_everything(cfg.train.seed)
    records, bases, data_hash = load_preference_records(cfg)       # bad data fails before any training
    model, tokenizer = load_model(cfg.model)
    acc = make_accelerator(cfg.train.mixed_precision, cfg.train.grad_accum)
    from medmllm.train.sft import data_shapes

    shapes = data_shapes(model, cfg.data)
    dataset = PairDataset(records, bases, PartLoader(shapes, cache_items=20000))
    collator = MultimodalCollator(tokenizer, max_length=cfg.data.max_length, num_tokens_fn=model.num_tokens,
                                  truncation=cfg.data.truncation)
    # reference log-probs of the frozen starting model (once; reloaded on resume) ----------------
    model.to(acc.device)
    ref_path = run_dir / REFERENCE_FILE

    def compute() -> torch.Tensor:
        return compute_reference_logps(model, dataset, PairCollator(collator), cfg.dpo.reference_batch_size, acc,
                                       progress=progress and acc.is_main_process)

    if acc.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        reference, loaded = load_or_compute_reference(ref_path, reference_key(cfg, data_hash), dataset.ids, compute)
    acc.wait_for_everyone()
    if not acc.is_main_process:
        reference, loaded = torch.load(ref_path, map_location="cpu", weights_only=True)["logps"], True
    usable = [i for i in range(len(records)) if bool(torch.isfinite(reference[i]).all())]
    if not usable:
        raise InputError(cfg.data.train[0], f"no preference pair fits max_length={cfg.data.max_length} with readable "
                                            "files")
    if len(usable) < len(records):  # too long for max_length, or a file could not be read: never batched
        log.warning("dpo: %d of %d pairs left out (longer than max_length=%d or unreadable)",
                    len(records) - len(usable), len(records), cfg.data.max_length)
    # trainable groups, LoRA, optimizer --------------------------------------
    lrs = set_stage_trainable(model, "instruction", cfg.optim)
    if cfg.lora.enabled:
        from medmllm.model.lora import apply_lora

        apply_lora(model, targets={"llm": dict(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout)})
    groups = model.param_groups(lrs, default_lr=cfg.optim.lr)
    optimizer = torch.optim.AdamW([{"params": g["params"], "lr": g["lr"]} for g in groups],
                                  weight_decay=cfg.optim.weight_decay)
    scheduler = make_scheduler(optimizer, cfg.optim, cfg.train.max_steps)
    lengths = pair_lengths([records[i] for i in usable], model, tokenizer, shapes)
    sampler = LengthGroupedBatchSampler(lengths, cfg.train.batch_size, seed=cfg.train.seed,
                                        num_replicas=acc.num_processes, rank=acc.process_index)
    train_set = torch.utils.data.Subset(dataset, usable)           # items keep their index into `reference`
    t = cfg.train
    loader = make_loader_factory(train_set, sampler, PairCollator(collator, reference))
    loop = TrainLoop(model, optimizer, scheduler, loader, make_loss_fn(cfg.dpo.beta, cfg.dpo.rpo_alpha), run_dir=run_dir,
                     max_steps=t.max_steps, grad_accum=t.grad_accum, log_every=t.log_every,
                     ckpt_every=t.ckpt_every, keep_last=t.keep_last,
                     mixed_precision=t.mixed_precision, grad_clip=t.grad_clip, seed=t.seed,
                     gradient_checkpointing=t.gradient_checkpointing, tensorboard=t.tensorboard, accelerator=acc,
                     config=cfg, manifest_hash=data_hash, progress=progress)
    if cfg.resume:
        loop.resume("latest")
    log.info("dpo: %d pairs (%d usable), beta %g, reference %s, trainable groups %s", len(records), len(usable),
             cfg.dpo.beta, "loaded" if loaded else "computed", [g["name"] for g in groups])
    # train ------------------------------------------------------------------
    result = loop.run()
    # save -------------------------------------------------------------------
    out = save_final_model(acc, loop, tokenizer, run_dir, lora=cfg.lora.enabled)
    # cleanup ----------------------------------------------------------------
    skipped = dataset.inner.errors()
    if skipped:
        log.warning("%d preference side(s) skipped for unreadable files (first: %s)", len(skipped), skipped[0])
    loss = result["loss"]
    return {"stage": "dpo", "steps": result["step"], "loss": None if loss is None or math.isnan(loss) else loss,
            "model": str(out), "pairs": len(records), "usable_pairs": len(usable),
            "reference": "loaded" if loaded else "computed", "metrics": dict(loop.last_metrics),
            "run_dir": str(run_dir)}


__all__ = ["DPOConfig", "DPOSettings", "PairCollator", "PairDataset", "chosen_nll", "compute_reference_logps",
           "load_or_compute_reference", "make_loss_fn", "pair_logps", "run", "side_record"]

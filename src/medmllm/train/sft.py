"""Recipe for the `alignment` and `instruction` stages: setup -> train -> save -> cleanup.

* ``alignment``: encoders and LLM frozen; the projectors learn to map encoder features into the
  LLM's embedding space on caption pairs.
* ``instruction``: projectors + LLM trained (full, or LoRA through peft with projector weights
  saved alongside); encoders frozen unless ``optim.encoder_lr > 0`` (then their BatchNorm layers stay
  frozen: statistics and affine parameters).

Config (YAML + ``key=value`` overrides, see :class:`SFTConfig`)::

    stage: instruction
    run_dir: runs/instruction
    model: {path: runs/alignment/model}          # or {builder: small, family: llama}
    data: {train: [data/medphantom/records/train.jsonl], max_length: 256}
    optim: {lr: 3.0e-4, projector_lr: 1.0e-3}
    train: {max_steps: 1000, mixed_precision: bf16}
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import math
from pathlib import Path
from typing import Literal, Optional

import torch

from medmllm.errors import ConfigError

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ModelConfig:
    path: Optional[str] = None            # a saved MedMLLM folder (model + tokenizer); else build one:
    builder: str = "small"                # BUILDERS name: tiny | small | from_hub
    family: str = "llama"
    projector: str = "mlp"
    # the LLM's attention kernel (None: as loaded). "eager" trained the quickstart's small LLM at 0.82x the
    # step time of "sdpa" on 2 CPU cores (bench/packing.py); on a GPU keep "sdpa"
    attn_implementation: Optional[Literal["eager", "sdpa"]] = None


@dataclasses.dataclass
class DataConfig:
    train: list = dataclasses.field(default_factory=list)     # JSONL files of instruction records
    weights: Optional[list] = None                            # mixing weights (default: by size)
    tasks: Optional[list] = None                              # keep only these meta.task values
    exclude_tasks: list = dataclasses.field(default_factory=list)
    max_length: int = 256
    truncation: Literal["drop", "shorten_text"] = "drop"
    image_size: Optional[int] = None                          # None: what the model fixes, else 128
    image_channels: Optional[int] = None                      # None: the image encoder's in_channels
    length_grouping: int = 0                                  # see instruction_loader; 0 = shuffled batches

    def __post_init__(self) -> None:
        if isinstance(self.length_grouping, bool) or not isinstance(self.length_grouping, int) \
                or self.length_grouping < 0:
            raise ConfigError(f"data.length_grouping: expected an integer >= 0, got {self.length_grouping!r}")


@dataclasses.dataclass
class OptimConfig:
    lr: float = 3e-4                      # LLM
    projector_lr: float = 1e-3
    encoder_lr: float = 0.0               # 0 = encoders frozen
    weight_decay: float = 0.0
    warmup_steps: int = 20
    schedule: Literal["cosine", "constant"] = "cosine"


@dataclasses.dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0


@dataclasses.dataclass
class SFTTrain:
    max_steps: int = 200
    batch_size: int = 16
    grad_accum: int = 1
    log_every: int = 10
    ckpt_every: int = 0
    keep_last: int = 2
    mixed_precision: Literal["no", "bf16"] = "bf16"
    grad_clip: Optional[float] = 1.0
    seed: int = 0
    gradient_checkpointing: bool = False
    tensorboard: bool = True
    loss_average: Literal["token", "sample"] = "token"   # see lm_loss
    # pack each batch's samples into fewer rows without padding (medmllm.model.packing): the same
    # token-mean loss, 0.85x the forward + backward time of the quickstart's batches with sdpa attention
    # (bench/packing.py). Needs loss_average="token"
    packing: bool = False

    def __post_init__(self) -> None:
        if self.packing and self.loss_average != "token":
            raise ConfigError(f"train.packing: needs train.loss_average='token' (a packed batch gives one "
                              f"token-mean loss), got loss_average={self.loss_average!r}")


@dataclasses.dataclass
class SFTConfig:
    stage: Literal["alignment", "instruction"]
    run_dir: str
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)
    train: SFTTrain = dataclasses.field(default_factory=SFTTrain)
    resume: bool = True


# ----------------------------------------------------------------------------- setup

def load_model(cfg: ModelConfig):
    """A saved MedMLLM + its tokenizer (``path``), or a fresh one from a builder."""
    from medmllm.model.builders import BUILDERS
    from medmllm.model.mllm import MedMLLM

    if cfg.path:
        from medmllm.data.tokenizers import load_tokenizer

        path = Path(cfg.path)
        if not (path / "config.json").exists():
            raise ConfigError(f"model.path: {path} holds no saved model (config.json missing)")
        model, tokenizer = MedMLLM.from_pretrained(path), load_tokenizer(path)
    else:
        model, tokenizer = BUILDERS.get(cfg.builder)(family=cfg.family, projector=cfg.projector)
    if cfg.attn_implementation:
        model.llm.set_attn_implementation(cfg.attn_implementation)
    return model, tokenizer


def set_stage_trainable(model, stage: str, optim: OptimConfig) -> dict[str, float]:
    """Freeze/unfreeze module groups for ``stage``; returns the learning rate per group pattern."""
    model.set_trainable("*", False)
    model.set_trainable("projector.*", True)
    lrs = {"projector.*": optim.projector_lr}
    if stage == "instruction":
        model.set_trainable("llm", True)
        lrs["llm"] = optim.lr
        if optim.encoder_lr > 0:
            model.set_trainable("encoder.*", True)
            lrs["encoder.*"] = optim.encoder_lr
            # BatchNorm layers keep their statistics and affine parameters: a modality's share of a mixed
            # batch (a few volumes among 32 records) is too small for batch statistics
            for module in model.encoders.modules():
                if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                    module.requires_grad_(False)
                    module.keep_eval = True                    # MedMLLM.train() leaves it in eval mode
    return lrs


def load_records(data: DataConfig) -> tuple[list[dict], list[Path], str]:
    """Records of every training file (filtered by task), their base folders, and a data hash."""
    from medmllm.data.records import read_records

    if not data.train:
        raise ConfigError("data.train: expected at least one JSONL file")
    records, bases, h = [], [], hashlib.sha256()
    for f in data.train:
        path = Path(f)
        if not path.is_file():
            raise ConfigError(f"data.train: {path} does not exist")
        recs, report = read_records(path, on_error="skip")
        for err in report.errors[:5]:
            log.warning("skipped: %s", err)
        keep = [r for r in recs if (data.tasks is None or r["meta"].get("task") in data.tasks)
                and r["meta"].get("task") not in data.exclude_tasks]
        records += keep
        bases += [path.parent] * len(keep)
        h.update(f"{path}:{len(keep)}:".encode())
        h.update(path.read_bytes())
    if not records:
        raise ConfigError(f"data: no records left after task filters in {data.train}")
    return records, bases, h.hexdigest()


class _MultiBaseDataset(torch.utils.data.Dataset):
    """RecordDataset over records from several files (each with its own base folder)."""

    def __init__(self, records, bases, loader):
        from medmllm.data.dataset import RecordDataset

        self.parts = {}
        self.index = []
        for base in dict.fromkeys(bases):
            idx = [i for i, b in enumerate(bases) if b == base]
            self.parts[base] = RecordDataset([records[i] for i in idx], loader, base_dir=base)
            self.index += [(base, j) for j in range(len(idx))]

    def __len__(self):
        return len(self.index)

    def __getitem__(self, i):
        base, j = self.index[i]
        return self.parts[base][j]


def modality_shapes_of(shapes) -> dict[str, tuple[int, ...]]:
    """Input tensor shape per kind (no batch dim) as :class:`~medmllm.data.dataset.PartLoader` yields it."""
    return {"image": (shapes.image_channels, shapes.image_size, shapes.image_size),
            "volume": (1, *shapes.volume_shape),
            "signal": (len(shapes.signal_leads), shapes.signal_samples),
            "ehr": (len(shapes.ehr_features), 2)}


def instruction_loader(records: list[dict], bases: list[Path], data: DataConfig, train: SFTTrain, model, tokenizer,
                       shapes, acc):
    """``(dataset, loader_factory)`` of instruction records for the engine: files read at ``shapes``,
    unreadable items and samples over ``data.max_length`` left out, resumable batches of
    ``train.batch_size`` per process. Token counts per input come from ``model``.

    ``data.length_grouping`` = k > 0: each batch comes from a shuffled pool of k batches sorted by
    length (less padding); 0: plain shuffled batches. Grouping makes batches homogeneous: a record's
    length mostly follows its modality and question template, so with k = 50 a batch holds one or two
    templates."""
    from medmllm.data.collate import MultimodalCollator
    from medmllm.data.dataset import PartLoader, skip_bad_items
    from medmllm.train.engine import LengthGroupedBatchSampler, RandomBatchSampler, make_loader_factory

    dataset = _MultiBaseDataset(records, bases, PartLoader(shapes, cache_items=20000))
    collate = skip_bad_items(MultimodalCollator(tokenizer, max_length=data.max_length, num_tokens_fn=model.num_tokens,
                                                truncation=data.truncation))
    placement = dict(seed=train.seed, num_replicas=acc.num_processes, rank=acc.process_index)
    if data.length_grouping > 0:
        sampler = LengthGroupedBatchSampler(estimate_lengths(records, model, tokenizer, shapes), train.batch_size,
                                            mega_batch_mult=data.length_grouping, **placement)
    else:
        sampler = RandomBatchSampler(len(records), train.batch_size, **placement)
    return dataset, make_loader_factory(dataset, sampler, collate)


def warn_skipped(dataset: "_MultiBaseDataset") -> None:
    skipped = sum(len(p.errors) for p in dataset.parts.values())
    if skipped:
        log.warning("%d record(s) skipped for unreadable files", skipped)


def estimate_lengths(records: list[dict], model, tokenizer, shapes) -> list[int]:
    """Token length of each record without loading its files: text tokens + modality tokens."""
    from medmllm.data.collate import flatten_messages

    per_kind = {k: model.num_tokens(k, shape) for k, shape in modality_shapes_of(shapes).items() if k in model.encoders}
    out = []
    for r in records:
        text = " ".join(m["content"] for m in flatten_messages(r["messages"], "\n"))
        n_text = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        n_mod = sum(per_kind.get(p["type"], 0) for m in r["messages"] if isinstance(m["content"], list)
                    for p in m["content"] if p["type"] != "text")
        out.append(n_text + n_mod)
    return out


def make_scheduler(optimizer, optim: OptimConfig, max_steps: int):
    def factor(step: int) -> float:
        if step < optim.warmup_steps:
            return (step + 1) / max(1, optim.warmup_steps)
        if optim.schedule == "constant":
            return 1.0
        progress = (step - optim.warmup_steps) / max(1, max_steps - optim.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def lm_loss(model, batch, average: str = "token", pack: bool = False) -> torch.Tensor:
    """Next-token loss on assistant tokens: ``average="token"`` the mean over every assistant token of
    the batch (the LLM's own loss), ``"sample"`` each sample's mean over its tokens, then the mean
    over samples (a one-word answer weighs as much as a long one). ``pack`` (token average only): the
    batch runs packed (``MedMLLM.forward(pack=True)``), same loss, fewer padding tokens. A batch whose samples were all
    dropped by the collator (e.g. every one longer than ``data.max_length``) gives a zero loss that
    still reaches every trainable weight, so the step is a no-op and multi-process gradient syncs
    stay in step."""
    if batch["input_ids"].shape[0] == 0:
        dropped = batch.get("dropped") or []
        log.warning("empty batch: all %d samples dropped (first: %s)", len(dropped),
                    dropped[0] if dropped else "-")
        from medmllm.train.engine import zero_loss

        return zero_loss(model)
    keys = ("input_ids", "attention_mask", "labels", "modality_inputs", "modality_batch_index")
    if average == "token":
        return model(**{k: batch[k] for k in keys if k in batch}, **({"pack": True} if pack else {})).loss
    if pack:
        raise ConfigError("lm_loss: pack=True needs average='token'")
    from medmllm.train.rl_losses import IGNORE_INDEX, sequence_logprobs

    logits = model(**{k: batch[k] for k in keys if k in batch and k != "labels"}).logits   # [B, L, V]
    labels = batch["labels"].to(logits.device)                                            # [B, L]
    n = (labels[:, 1:] != IGNORE_INDEX).sum(dim=1)                                        # [B] answer tokens
    keep = n > 0
    return (-sequence_logprobs(logits, labels)[keep] / n[keep]).mean()


# ----------------------------------------------------------------------------- the recipe

def data_shapes(model, data: DataConfig):
    """The :class:`ModalityShapes` records are loaded with: what the model's encoders fix (image
    channels, a HF tower's size, 3-window volumes...; see ``modality_shapes_for``), with
    ``data.image_size`` / ``data.image_channels`` where set (ConfigError if they contradict it)."""
    from medmllm.model.inspect import modality_shapes_for

    given = {k: v for k, v in (("image_size", data.image_size), ("image_channels", data.image_channels))
             if v is not None}
    return modality_shapes_for(model, **given)


def save_final_model(acc, loop, tokenizer, run_dir: Path, *, lora: bool) -> Path:
    """Save the trained model (and tokenizer) to ``run_dir/model`` on the main process; with ``lora``
    the adapter goes to ``run_dir/adapter`` and the saved model is the merged one. Returns the folder."""
    model = acc.unwrap_model(loop.model)
    out = run_dir / "model"
    if acc.is_main_process:
        if lora:
            from medmllm.model.lora import merge, save_adapter

            save_adapter(model, run_dir / "adapter")
            model = merge(model)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    acc.wait_for_everyone()
    return out


def run(cfg: SFTConfig, progress: bool = True) -> dict:
    """Train one stage; the model and tokenizer end up in ``run_dir/model``. Returns a summary."""
    from medmllm.train.engine import TrainLoop, make_accelerator, seed_everything

    # setup ------------------------------------------------------------------
    run_dir = Path(cfg.run_dir)
    seed_everything(cfg.train.seed)
    records, bases, data_hash = load_records(cfg.data)           # bad data fails before any training
    model, tokenizer = load_model(cfg.model)
    lrs = set_stage_trainable(model, cfg.stage, cfg.optim)
    if cfg.lora.enabled:
        if cfg.stage != "instruction":
            raise ConfigError("lora.enabled: LoRA applies to the instruction stage only")
        from medmllm.model.lora import apply_lora

        apply_lora(model, targets={"llm": dict(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout)})
    groups = model.param_groups(lrs, default_lr=cfg.optim.lr)
    optimizer = torch.optim.AdamW([{"params": g["params"], "lr": g["lr"]} for g in groups],
                                  weight_decay=cfg.optim.weight_decay)
    scheduler = make_scheduler(optimizer, cfg.optim, cfg.train.max_steps)
    shapes = data_shapes(model, cfg.data)
    acc = make_accelerator(cfg.train.mixed_precision, cfg.train.grad_accum)
    dataset, loader = instruction_loader(records, bases, cfg.data, cfg.train, model, tokenizer, shapes, acc)
    t = cfg.train
    loss_fn = functools.partial(lm_loss, average=cfg.train.loss_average, pack=cfg.train.packing)
    loop = TrainLoop(model, optimizer, scheduler, loader, loss_fn,
                     run_dir=run_dir, max_steps=t.max_steps, grad_accum=t.grad_accum, log_every=t.log_every,
                     ckpt_every=t.ckpt_every, keep_last=t.keep_last, mixed_precision=t.mixed_precision,
                     grad_clip=t.grad_clip, seed=t.seed, gradient_checkpointing=t.gradient_checkpointing,
                     tensorboard=t.tensorboard, accelerator=acc, config=cfg, manifest_hash=data_hash,
                     progress=progress)
    if cfg.resume:
        loop.resume("latest")
    log.info("%s: %d records, trainable groups %s", cfg.stage, len(records), [g["name"] for g in groups])
    # train ------------------------------------------------------------------
    result = loop.run()
    # save -------------------------------------------------------------------
    out = save_final_model(acc, loop, tokenizer, run_dir, lora=cfg.lora.enabled)
    # cleanup ----------------------------------------------------------------
    warn_skipped(dataset)
    return {"stage": cfg.stage, "steps": result["step"], "loss": result["loss"], "model": str(out),
            "records": len(records), "run_dir": str(run_dir)}

"""The training engine: plain, linear, on HF accelerate, with exact resume.

A recipe does::

    cfg = load_config(path, overrides, schema=MyRecipeConfig)      # bad configs fail here
    seed_everything(cfg.train.seed)                                 # before building the model
    model, optimizer, scheduler = ...
    sampler = LengthGroupedBatchSampler(lengths, batch_size, seed=cfg.train.seed,
                                        num_replicas=acc.num_processes, rank=acc.process_index)
    loop = TrainLoop(model, optimizer, scheduler, make_loader_factory(dataset, sampler, collate),
                     loss_fn, run_dir=run_dir, accelerator=acc, config=cfg,
                     manifest_hash=h, **dataclasses.asdict(cfg.train))
    loop.resume("latest")                                           # no-op on a fresh run dir
    loop.run()

Pieces
* :class:`TrainSettings` — the loop's knobs as a config dataclass (validated on construction).
* :func:`make_accelerator`, :func:`seed_everything`, :func:`enable_gradient_checkpointing`.
* Data order: :class:`RandomBatchSampler` and :class:`LengthGroupedBatchSampler` give the batches
  of an epoch as a pure function of ``(seed, epoch)`` and start at any batch index;
  :class:`MixtureDataset` mixes datasets by weight as a pure function of ``(seed, epoch)``;
  :func:`make_loader_factory` turns them into ``factory(epoch, start_batch) -> iterable``.
* :class:`TrainLoop` — accumulation, clipping, mixed precision, logging, checkpoints, resume.

Exact resume: with the same world size and hardware, a run stopped after checkpoint ``k`` and
resumed ends with the same weights as an uninterrupted run (bitwise on CPU with deterministic
ops), because the checkpoint holds weights, optimizer, scheduler, every process's RNG states and
the data position (epoch, batches consumed), and the data order depends only on (seed, epoch).
Limits: see :class:`TrainLoop`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, Mapping, Optional, Sequence

import numpy as np
import torch

from medmllm.errors import ConfigError, InputError
from medmllm.train import checkpoint as ckpt
from medmllm.train import logging as runlog

log = logging.getLogger(__name__)

LoaderFactory = Callable[[int, int], Iterable[Any]]  # (epoch, start_batch) -> this process's batches
LossFn = Callable[[torch.nn.Module, Any], Any]        # (model, batch) -> scalar loss | {"loss": ..., ...}


# ============================================================================= settings
@dataclasses.dataclass
class TrainSettings:
    """The loop's settings (embed as ``train:`` in a recipe's config schema).

    ``max_steps`` optimizer steps; each takes ``grad_accum`` micro-batches per process.
    ``ckpt_every`` 0 = only at the end; ``keep_last`` 0 = keep all checkpoints.
    ``grad_clip`` max global grad norm (None: no clipping). ``mixed_precision`` "bf16" autocasts
    the forward pass (weights stay fp32). ``deterministic`` asks torch for deterministic kernels.
    """

    max_steps: int
    grad_accum: int = 1
    log_every: int = 10
    ckpt_every: int = 0
    keep_last: int = 3
    mixed_precision: Literal["no", "bf16"] = "no"
    grad_clip: Optional[float] = None
    seed: int = 0
    gradient_checkpointing: bool = False
    deterministic: bool = False
    tensorboard: bool = True

    def __post_init__(self) -> None:
        for name, low in (("max_steps", 1), ("grad_accum", 1), ("log_every", 1), ("ckpt_every", 0),
                          ("keep_last", 0), ("seed", 0)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise ConfigError(f"train.{name}: expected an int >= {low}, got {v!r}")
        if self.mixed_precision not in ("no", "bf16"):
            raise ConfigError(f"train.mixed_precision: expected 'no' or 'bf16', got {self.mixed_precision!r}")
        if self.grad_clip is not None and not (isinstance(self.grad_clip, (int, float)) and self.grad_clip > 0):
            raise ConfigError(f"train.grad_clip: expected a positive number or null, got {self.grad_clip!r}")


# ============================================================================= setup helpers
def seed_everything(seed: int, *, deterministic: bool = False) -> None:
    """Seed python, numpy, torch (CPU and CUDA). ``deterministic`` also turns on torch's
    deterministic algorithms (and sets ``CUBLAS_WORKSPACE_CONFIG`` if unset)."""
    from accelerate.utils import set_seed

    set_seed(int(seed))
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def make_accelerator(mixed_precision: str = "no", grad_accum: int = 1, *, cpu: bool | None = None, **kwargs: Any):
    """An ``accelerate.Accelerator`` for this process (DDP/FSDP/DeepSpeed come from ``accelerate launch``
    with a config from ``recipes/accelerate/``, or from ``torchrun``).

    ``mixed_precision`` "no" | "bf16"; ConfigError if bf16 is not supported here. ``cpu=None``
    means: CPU (gloo) when the job was launched on several processes and CUDA is absent, else
    accelerate's default device. In a single, non-distributed process an earlier accelerate state
    with another precision is reset (accelerate keeps one per process).
    """
    from accelerate import Accelerator

    if mixed_precision not in ("no", "bf16"):
        raise ConfigError(f"mixed_precision: expected 'no' or 'bf16', got {mixed_precision!r}")
    if cpu is None:
        cpu = _launched() and not torch.cuda.is_available()
    _reset_stale_accelerate_state(mixed_precision)
    try:
        acc = Accelerator(mixed_precision=mixed_precision, gradient_accumulation_steps=int(grad_accum),
                          cpu=cpu, **kwargs)
    except ValueError as exc:
        raise ConfigError(f"cannot set up accelerate (mixed_precision={mixed_precision!r}): {exc}") from exc
    if acc.gradient_accumulation_steps != grad_accum and acc.distributed_type.value != "DEEPSPEED":
        raise ConfigError(f"grad_accum: asked for {grad_accum}, accelerate uses {acc.gradient_accumulation_steps} "
                          "(is ACCELERATE_GRADIENT_ACCUMULATION_STEPS set by the launch config?)")
    return acc


def _launched() -> bool:
    """True inside ``torchrun`` / ``accelerate launch`` with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _reset_stale_accelerate_state(mixed_precision: str) -> None:
    from accelerate.state import AcceleratorState, GradientState

    shared = AcceleratorState._shared_state
    if not shared or shared.get("_mixed_precision") == mixed_precision:
        return
    if _launched():
        return  # a launched job: never tear down the process group; accelerate will complain clearly
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()


def enable_gradient_checkpointing(model: torch.nn.Module) -> bool:
    """Call ``model.gradient_checkpointing_enable()`` (non-reentrant where supported). Returns False
    (and logs a warning) when the model has no such method."""
    fn = getattr(model, "gradient_checkpointing_enable", None)
    if fn is None:
        log.warning("gradient checkpointing requested but %s has no gradient_checkpointing_enable()",
                    type(model).__name__)
        return False
    try:
        fn(gradient_checkpointing_kwargs={"use_reentrant": False})
    except TypeError:
        fn()
    if hasattr(getattr(model, "config", None), "use_cache"):
        model.config.use_cache = False  # a KV cache is useless (and wasteful) while training
    return True


# ============================================================================= data order
def _rng(*keys: int) -> np.random.Generator:
    """A numpy Generator that is a pure function of non-negative integer ``keys``."""
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in keys]))


class ResumableBatchSampler:
    """Base of the batch samplers: the *global* batches of an epoch are a pure function of
    ``(seed, epoch)``; process ``rank`` gets slice ``[rank*b, (rank+1)*b)`` of each global batch of
    ``b * num_replicas`` indices, so a run on N processes sees the same global batches as one
    process with batch ``b * N``. ``set_epoch(epoch, start_batch)`` resumes mid-epoch.

    ``drop_last`` (default) drops the last incomplete global batch; otherwise it is completed by
    wrapping around to the start of the epoch's order when ``num_replicas`` > 1 (every process
    needs a full slice) and kept short with one process.
    """

    def __init__(self, batch_size: int, *, seed: int, num_replicas: int = 1, rank: int = 0,
                 drop_last: bool = True):
        if batch_size < 1 or num_replicas < 1 or not 0 <= rank < num_replicas or seed < 0:
            raise ConfigError(f"batch sampler: need batch_size >= 1, seed >= 0, 0 <= rank < num_replicas; got "
                              f"batch_size={batch_size}, seed={seed}, rank={rank}, num_replicas={num_replicas}")
        self.batch_size, self.seed = int(batch_size), int(seed)
        self.num_replicas, self.rank, self.drop_last = int(num_replicas), int(rank), bool(drop_last)
        self.epoch, self.start_batch = 0, 0
        self._cache: tuple[int, list[np.ndarray]] | None = None

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.num_replicas

    def _epoch_batches(self, epoch: int) -> list[np.ndarray]:
        """Global batches (arrays of dataset indices) of ``epoch``; subclasses implement."""
        raise NotImplementedError

    def global_batches(self, epoch: int) -> list[np.ndarray]:
        if self._cache is None or self._cache[0] != epoch:
            self._cache = (epoch, self._epoch_batches(epoch))
        return self._cache[1]

    def _chunk(self, order: np.ndarray) -> list[np.ndarray]:
        """Cut an epoch's index order into global batches, handling the last one (see class doc)."""
        g = self.global_batch_size
        n_full = len(order) // g
        batches = [order[i * g:(i + 1) * g] for i in range(n_full)]
        rest = order[n_full * g:]
        if len(rest) and not self.drop_last:
            if self.num_replicas > 1:
                rest = np.concatenate([rest, np.resize(order, g - len(rest))])
            batches.append(rest)
        return batches

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = int(epoch), int(start_batch)

    def batches_per_epoch(self, epoch: int | None = None) -> int:
        return len(self.global_batches(self.epoch if epoch is None else epoch))

    def __len__(self) -> int:
        return max(0, self.batches_per_epoch() - self.start_batch)

    def __iter__(self) -> Iterator[list[int]]:
        b, r = self.batch_size, self.rank
        for gb in self.global_batches(self.epoch)[self.start_batch:]:
            yield gb[r * b:(r + 1) * b].tolist()  # short last batch (1 process) is kept whole

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "start_batch": self.start_batch, "seed": self.seed}

    def load_state_dict(self, state: Mapping) -> None:
        self.set_epoch(state["epoch"], state.get("start_batch", 0))


class RandomBatchSampler(ResumableBatchSampler):
    """Shuffled (or sequential) batches over ``num_samples`` items; order = f(seed, epoch)."""

    def __init__(self, num_samples: int, batch_size: int, *, seed: int, shuffle: bool = True, **kw: Any):
        super().__init__(batch_size, seed=seed, **kw)
        if num_samples < 1:
            raise ConfigError(f"batch sampler: the dataset is empty (num_samples={num_samples})")
        self.num_samples, self.shuffle = int(num_samples), bool(shuffle)

    def _epoch_batches(self, epoch: int) -> list[np.ndarray]:
        order = _rng(self.seed, epoch).permutation(self.num_samples) if self.shuffle else np.arange(self.num_samples)
        return self._chunk(order)


class LengthGroupedBatchSampler(ResumableBatchSampler):
    """Batches of similar-length samples, in a seeded random order.

    Per epoch: a random permutation (seed, epoch) is cut into mega-batches of
    ``mega_batch_mult`` global batches; each is sorted by length (longest first) and cut into
    global batches; the order of the full batches is then shuffled. Padding waste drops while
    each batch still draws from a random pool.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, *, seed: int, mega_batch_mult: int = 50, **kw: Any):
        super().__init__(batch_size, seed=seed, **kw)
        self.lengths = np.asarray(lengths, dtype=np.int64)
        if self.lengths.ndim != 1 or len(self.lengths) < 1:
            raise ConfigError(f"length-grouped sampler: expected a non-empty 1-D list of lengths, got shape "
                              f"{self.lengths.shape}")
        if mega_batch_mult < 1:
            raise ConfigError(f"length-grouped sampler: mega_batch_mult must be >= 1, got {mega_batch_mult}")
        self.mega_batch_mult = int(mega_batch_mult)

    def _epoch_batches(self, epoch: int) -> list[np.ndarray]:
        rng = _rng(self.seed, epoch)
        order = rng.permutation(len(self.lengths))
        mega = self.mega_batch_mult * self.global_batch_size
        grouped = [chunk[np.argsort(-self.lengths[chunk], kind="stable")]
                   for chunk in (order[i:i + mega] for i in range(0, len(order), mega))]
        batches = self._chunk(np.concatenate(grouped))
        full = [b for b in batches if len(b) == self.global_batch_size]
        tail = batches[len(full):]
        return [full[i] for i in rng.permutation(len(full))] + tail


class MixtureDataset(torch.utils.data.Dataset):
    """Weighted mix of map-style datasets: item ``i`` is item ``j`` of dataset ``k``, a pure function
    of ``(seed, epoch, i)``.

    ``num_samples`` (default: the sum of the lengths) items per epoch; dataset ``k`` contributes
    ``round(weights[k] / sum(weights) * num_samples)`` of them (largest-remainder rounding, so the
    counts add up), walking through its items in a fresh random order each pass (no repeats
    before every item was used once). ``set_epoch(epoch)`` redraws the mix; resume is exact
    because nothing depends on how many items were read before.
    """

    def __init__(self, datasets: Sequence[Any], weights: Sequence[float], seed: int, num_samples: int | None = None):
        if len(datasets) == 0 or len(datasets) != len(weights):
            raise ConfigError(f"mixture: need one weight per dataset, got {len(datasets)} datasets and "
                              f"{len(weights)} weights")
        w = np.asarray(weights, dtype=np.float64)
        if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
            raise ConfigError(f"mixture: weights must be finite, >= 0 and not all 0, got {list(weights)}")
        empty = [k for k, d in enumerate(datasets) if len(d) == 0 and w[k] > 0]
        if empty:
            raise ConfigError(f"mixture: dataset(s) {empty} are empty but have a positive weight")
        self.datasets, self.weights, self.seed = list(datasets), w / w.sum(), int(seed)
        self.num_samples = int(num_samples if num_samples is not None else sum(len(d) for d in datasets))
        if self.num_samples < 1:
            raise ConfigError(f"mixture: num_samples must be >= 1, got {self.num_samples}")
        self.counts = self._counts()
        self.set_epoch(0)

    def _counts(self) -> np.ndarray:
        raw = self.weights * self.num_samples
        counts = np.floor(raw).astype(np.int64)
        short = self.num_samples - int(counts.sum())
        order = np.lexsort((np.arange(len(raw)), -(raw - counts)))  # largest remainder, ties by index
        counts[order[:short]] += 1
        return counts

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        source = np.repeat(np.arange(len(self.datasets)), self.counts)
        source = source[_rng(self.seed, self.epoch, 0).permutation(len(source))]
        item = np.empty(len(source), dtype=np.int64)
        for k, n in enumerate(self.counts):
            if n == 0:
                continue
            m = len(self.datasets[k])
            passes = -(-int(n) // m)
            walk = np.concatenate([_rng(self.seed, self.epoch, 1 + k, p).permutation(m) for p in range(passes)])
            item[source == k] = walk[:n]
        self._source, self._item = source, item

    def source(self, i: int) -> tuple[int, int]:
        """``(dataset index, item index)`` behind mixture item ``i``."""
        return int(self._source[i]), int(self._item[i])

    def lengths(self, per_dataset: Sequence[Sequence[int]]) -> list[int]:
        """Per-item lengths of the mixture (for :class:`LengthGroupedBatchSampler`) from each dataset's."""
        return [int(per_dataset[k][j]) for k, j in zip(self._source, self._item)]

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> Any:
        k, j = self.source(i)
        return self.datasets[k][j]


def make_loader_factory(dataset: Any, batch_sampler: ResumableBatchSampler, collate_fn: Callable | None = None,
                        *, num_workers: int = 0, pin_memory: bool = False, **loader_kwargs: Any) -> LoaderFactory:
    """``factory(epoch, start_batch) -> DataLoader`` over this process's batches of ``epoch`` from
    ``start_batch`` on. Calls ``dataset.set_epoch(epoch)`` when the dataset has it. The loader gets
    its own generator seeded from (seed, epoch, start_batch), so building it draws nothing from
    torch's global RNG (which would break exact resume)."""

    def factory(epoch: int, start_batch: int) -> Iterable[Any]:
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        batch_sampler.set_epoch(epoch, start_batch)
        seed = int(np.random.SeedSequence([batch_sampler.seed, epoch, start_batch]).generate_state(1)[0])
        return torch.utils.data.DataLoader(dataset, batch_sampler=batch_sampler, collate_fn=collate_fn,
                                           num_workers=num_workers, pin_memory=pin_memory,
                                           generator=torch.Generator().manual_seed(seed), **loader_kwargs)

    return factory


# ============================================================================= batches
def zero_loss(model: torch.nn.Module) -> torch.Tensor:
    """A loss of exactly 0 that reaches every trainable weight: the loss of a micro-batch whose samples
    were all dropped, so the step is a no-op and multi-process gradient syncs stay in step."""
    return sum((p.sum() * 0.0 for p in model.parameters() if p.requires_grad), torch.zeros(()))


def batch_size_of(batch: Any) -> int:
    """Samples in a batch: dim 0 of its first tensor (dicts/lists searched in order), else ``len``."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.ndim else 1
    items = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (list, tuple)) else ()
    for v in items:
        if isinstance(v, torch.Tensor) and v.ndim:
            return int(v.shape[0])
    for v in items:
        if isinstance(v, (Mapping, list, tuple)):
            return batch_size_of(v)
    return len(batch) if hasattr(batch, "__len__") else 1


def _split_loss(out: Any) -> tuple[torch.Tensor, dict[str, Any]]:
    if isinstance(out, torch.Tensor):
        return out, {}
    if isinstance(out, Mapping) and isinstance(out.get("loss"), torch.Tensor):
        return out["loss"], {k: v for k, v in out.items() if k != "loss"}
    raise InputError("loss_fn", f"expected a scalar tensor or a mapping with a 'loss' tensor, got {type(out).__name__}")


# ============================================================================= the loop
class TrainLoop:
    """Train ``model`` for ``max_steps`` optimizer steps; log, checkpoint, resume exactly.

    * ``train_loader_factory(epoch, start_batch)`` returns this process's micro-batches of
      ``epoch`` from batch ``start_batch`` on (see :func:`make_loader_factory`); it must not draw
      from torch's global RNG and must yield the same number of batches on every process.
    * ``loss_fn(model, batch)`` returns the mean loss of the micro-batch (a scalar tensor) or
      ``{"loss": tensor, other scalars...}`` (same keys every step); the batch arrives on the device.
    * The scheduler (optional) is stepped once per optimizer step, whatever the world size.
    * Per step each process consumes ``grad_accum`` micro-batches; logged ``loss`` is the mean over
      micro-batches and processes (and steps since the last log); ``samples_per_s`` counts all processes.
    * A fresh run seeds with ``seed + process_index`` at its start; a resumed run restores the
      RNG states instead.

    Resume guarantee: stopping after checkpoint ``k`` and calling :meth:`resume` then :meth:`run`
    gives the same weights as an uninterrupted run, bitwise on CPU with deterministic ops, when
    the world size, hardware, library versions, ``grad_accum`` and data are the same. Not covered:
    randomness inside DataLoader workers (make per-sample randomness a function of
    (seed, epoch, index)); sharded optimizer states (FSDP, DeepSpeed): their checkpoints hold the
    full weights but not the optimizer state, and resuming them raises.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                 train_loader_factory: LoaderFactory, loss_fn: LossFn, *, run_dir: str | os.PathLike,
                 max_steps: int, grad_accum: int = 1, log_every: int = 10, ckpt_every: int = 0,
                 keep_last: int = 3, mixed_precision: str = "no", grad_clip: float | None = None,
                 seed: int = 0, gradient_checkpointing: bool = False, deterministic: bool = False,
                 tensorboard: bool = True, accelerator: Any = None, config: Any = None,
                 manifest_hash: str | None = None, progress: bool = True, progress_file: Any = None):
        self.settings = TrainSettings(max_steps=max_steps, grad_accum=grad_accum, log_every=log_every,
                                      ckpt_every=ckpt_every, keep_last=keep_last, mixed_precision=mixed_precision,
                                      grad_clip=grad_clip, seed=seed, gradient_checkpointing=gradient_checkpointing,
                                      deterministic=deterministic, tensorboard=tensorboard)
        self.accelerator = accelerator or make_accelerator(mixed_precision, grad_accum)
        if self.accelerator.mixed_precision != mixed_precision and not self._sharded:
            raise ConfigError(f"mixed_precision: the loop asks for {mixed_precision!r}, the accelerator given "
                              f"uses {self.accelerator.mixed_precision!r}")
        if self._sharded:
            log.warning("%s: checkpoints hold the full weights but not the sharded optimizer state; "
                        "resume is not supported", self.accelerator.distributed_type.value)
        self.run_dir = Path(run_dir)
        self.config, self.manifest_hash = config, manifest_hash
        self.loader_factory, self.loss_fn, self.scheduler = train_loader_factory, loss_fn, scheduler
        self.progress, self.progress_file = progress, progress_file
        if gradient_checkpointing:
            enable_gradient_checkpointing(model)
        if deterministic:
            torch.use_deterministic_algorithms(True)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.step = self.epoch = self.batch_in_epoch = self.samples_seen = 0
        self.resumed_from: Path | None = None
        self.last_metrics: dict[str, float] = {}
        self.last_checkpoint: Path | None = None  # the newest checkpoint written or resumed from

    # ------------------------------------------------------------------ properties
    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def _sharded(self) -> bool:
        return self.accelerator.distributed_type.value in ("FSDP", "DEEPSPEED")

    # ------------------------------------------------------------------ resume
    def resume(self, checkpoint: str | os.PathLike | None = "latest") -> Path | None:
        """Restore from ``checkpoint`` (a ``step_*`` dir) or the run's latest one ("latest"; None
        if the run has none). Returns the checkpoint used."""
        acc = self.accelerator
        if checkpoint is None:
            return None
        if checkpoint == "latest":
            if self.is_main:
                ckpt.clean_partial_checkpoints(self.run_dir)
            acc.wait_for_everyone()
            path = ckpt.latest_checkpoint(self.run_dir, clean=False)
            if path is None:
                return None
        else:
            path = Path(checkpoint)
        if self._sharded:
            raise ConfigError(f"resume: {acc.distributed_type.value} shards the optimizer state, which these "
                              "checkpoints do not hold; exact resume is supported for single-process and DDP runs")
        state = ckpt.load_checkpoint(path, acc.unwrap_model(self.model), self.optimizer, self.scheduler,
                                     process_index=acc.process_index)
        data = state["data"]
        if data.get("world_size", acc.num_processes) != acc.num_processes:
            log.warning("resuming a %s-process run on %d processes: data order and RNG streams differ, "
                        "the result will not match an uninterrupted run", data.get("world_size"), acc.num_processes)
        if data.get("grad_accum", self.settings.grad_accum) != self.settings.grad_accum:
            log.warning("resuming with grad_accum=%d, the run used %s", self.settings.grad_accum, data.get("grad_accum"))
        self.step = state["step"]
        self.epoch, self.batch_in_epoch = int(data.get("epoch", 0)), int(data.get("batch", 0))
        self.samples_seen = int(data.get("samples_seen", 0))
        self.last_metrics = dict(state.get("metrics") or {})
        self.resumed_from = self.last_checkpoint = path
        log.info("resumed from %s at step %d (epoch %d, batch %d)", path, self.step, self.epoch, self.batch_in_epoch)
        return path

    # ------------------------------------------------------------------ data
    def _batches(self) -> Iterator[Any]:
        """Micro-batches forever, epoch after epoch; the position counts batches handed out."""
        while True:
            handed = False
            for batch in self.loader_factory(self.epoch, self.batch_in_epoch):
                handed = True
                self.batch_in_epoch += 1
                yield batch
            if not handed and self.batch_in_epoch == 0:
                raise InputError("train loader", f"expected batches for epoch {self.epoch}, got none")
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0

    # ------------------------------------------------------------------ checkpoint
    def save_checkpoint(self) -> Path | None:
        """Checkpoint the current step (all processes must call it). Returns the path on the main process."""
        acc = self.accelerator
        rng = [ckpt.capture_rng_state()]
        if acc.num_processes > 1:
            from accelerate.utils import gather_object

            rng = gather_object(rng)
        weights = acc.get_state_dict(self.model)
        path = None
        if self.is_main:
            state = {"model": weights, "scheduler": self.scheduler, "rng": rng, "metrics": self.last_metrics,
                     "optimizer": None if self._sharded else self.optimizer.state_dict(),
                     "data": {"epoch": self.epoch, "batch": self.batch_in_epoch, "samples_seen": self.samples_seen,
                              "world_size": acc.num_processes, "grad_accum": self.settings.grad_accum}}
            path = ckpt.save_checkpoint(self.run_dir, self.step, state, keep_last=self.settings.keep_last)
            runlog.plot_loss_curve(self.run_dir / runlog.METRICS_FILE, self.run_dir / runlog.PLOT_FILE)
        acc.wait_for_everyone()
        self.last_checkpoint = ckpt.checkpoint_root(self.run_dir) / ckpt.step_dirname(self.step)
        return path

    # ------------------------------------------------------------------ run
    def run(self) -> dict:
        """Train from the current step to ``max_steps``; returns ``{"step", "loss", "checkpoint", "run_dir"}``."""
        acc, s = self.accelerator, self.settings
        acc.gradient_accumulation_steps = s.grad_accum  # accelerate keeps this per process, not per Accelerator
        acc.step = 0
        fresh = self.resumed_from is None
        if fresh:
            if self.is_main and ckpt.list_checkpoints(self.run_dir):
                log.warning("%s already holds checkpoints; starting fresh (call resume() to continue)", self.run_dir)
            seed_everything(s.seed + acc.process_index)
        handler, metrics, bar = self._open_outputs(fresh)
        try:
            self._train(metrics, bar)
            if self.last_checkpoint is None or self.last_checkpoint.name != ckpt.step_dirname(self.step):
                self.save_checkpoint()
        finally:
            bar.close()
            if metrics is not None:
                metrics.close()
            if handler is not None:
                logging.getLogger("medmllm").removeHandler(handler)
                handler.close()
        return {"step": self.step, "loss": self.last_metrics.get("loss"), "checkpoint": self.last_checkpoint,
                "run_dir": self.run_dir}

    def _open_outputs(self, fresh: bool):
        s = self.settings
        handler = metrics = None
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            handler = runlog.attach_file_log(self.run_dir)
            runlog.write_run_info(self.run_dir, self.config, manifest_hash=self.manifest_hash,
                                  world_size=self.accelerator.num_processes, resumed_from=self.resumed_from,
                                  extra={"train": dataclasses.asdict(s)})
            metrics = runlog.MetricsLogger(self.run_dir, tensorboard=s.tensorboard,
                                           resume_step=None if fresh else self.step)
        bar = runlog.Progress(s.max_steps, self.step, enabled=self.progress and self.is_main, file=self.progress_file)
        self.accelerator.wait_for_everyone()
        return handler, metrics, bar

    def _train(self, metrics: runlog.MetricsLogger | None, bar: runlog.Progress) -> None:
        acc, s = self.accelerator, self.settings
        self.model.train()
        data = self._batches()
        window = _Window(time.perf_counter())
        while self.step < s.max_steps:
            lr = self.optimizer.param_groups[0]["lr"]
            for _ in range(s.grad_accum):
                batch = next(data)
                window.add_micro(*self._micro_step(batch))
            if not acc.sync_gradients:  # accelerate's counter must agree with ours
                raise RuntimeError(f"accelerate did not sync gradients after {s.grad_accum} micro-batches")
            if self.scheduler is not None:
                self.scheduler.step()
            self.step += 1
            window.steps += 1
            at_ckpt = bool(s.ckpt_every) and self.step % s.ckpt_every == 0
            if self.step % s.log_every == 0 or self.step == s.max_steps or at_ckpt:  # checkpoints get fresh metrics
                self._log(window, lr, metrics)
                window = _Window(time.perf_counter())
            bar.update(1, self.last_metrics)
            if at_ckpt:
                self.save_checkpoint()

    def _micro_step(self, batch: Any) -> tuple[torch.Tensor, dict, int]:
        acc, s = self.accelerator, self.settings
        from accelerate.utils import send_to_device

        batch = send_to_device(batch, acc.device)
        n = batch_size_of(batch)
        with acc.accumulate(self.model):
            with acc.autocast():
                loss, extra = _split_loss(self.loss_fn(self.model, batch))
            acc.backward(loss)
            if acc.sync_gradients and s.grad_clip is not None:
                norm = acc.clip_grad_norm_(self.model.parameters(), s.grad_clip)  # None under DeepSpeed
                if norm is not None:
                    extra = {**extra, "grad_norm": norm}
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return loss.detach().float(), extra, n

    def _log(self, w: "_Window", lr: float, metrics: runlog.MetricsLogger | None) -> None:
        acc = self.accelerator
        keys = sorted(w.extra)
        dev = w.loss_sum.device
        counts = torch.tensor([float(w.micro), float(w.samples)], dtype=torch.float64, device=dev)
        local = torch.cat([w.loss_sum.reshape(1), counts, *[w.extra[k].reshape(1) for k in keys]])
        total = acc.reduce(local, reduction="sum").cpu() if acc.num_processes > 1 else local.cpu()
        elapsed = max(time.perf_counter() - w.t0, 1e-9)
        self.samples_seen += int(total[2])
        row = {"loss": float(total[0] / total[1]), "lr": float(lr), "epoch": self.epoch,
               "samples": self.samples_seen, "samples_per_s": float(total[2]) / elapsed,
               "step_time_s": elapsed / max(w.steps, 1)}
        for i, k in enumerate(keys):  # extras are averaged over the micro-batches (or steps) that reported them
            row[k] = float(total[3 + i]) / (acc.num_processes * w.extra_n[k])
        self.last_metrics = row
        if metrics is not None:
            metrics.log(self.step, row)
            log.info(runlog.format_metrics(self.step, row))


class _Window:
    """Sums since the last log line, kept on the device (no sync per step); reduced when logged."""

    def __init__(self, t0: float):
        self.t0, self.steps, self.micro, self.samples = t0, 0, 0, 0
        self.loss_sum: torch.Tensor | None = None
        self.extra: dict[str, torch.Tensor] = {}
        self.extra_n: dict[str, int] = {}

    def add_micro(self, loss: torch.Tensor, extra: Mapping[str, Any], n: int) -> None:
        loss = loss.to(torch.float64)
        self.loss_sum = loss if self.loss_sum is None else self.loss_sum + loss
        self.micro += 1
        self.samples += n
        for k, v in extra.items():
            v = torch.as_tensor(v, device=loss.device).detach().to(torch.float64).reshape(())
            self.extra[k] = self.extra[k] + v if k in self.extra else v
            self.extra_n[k] = self.extra_n.get(k, 0) + 1

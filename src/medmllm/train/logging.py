"""What a run leaves behind for people: run info, metrics, TensorBoard, a progress bar, a loss plot.

Run directory::

    config.yaml        the resolved config (medmllm.config.dump_config_yaml)
    run_info.json      versions (python, torch, transformers, accelerate, medmllm, ...), git revision,
                       data manifest hash, command line, world size, start time, resumes
    train.log          the ``medmllm`` logger's records
    metrics.jsonl      one JSON object per logged step: {"step", "loss", "lr", "samples_per_s", ...}
    tensorboard/       the same scalars (when the ``tensorboard`` package is installed)
    loss.png           the loss curve (written atomically)

Only the main process should create these (the engine takes care of that).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

log = logging.getLogger(__name__)

METRICS_FILE, RUN_INFO_FILE, CONFIG_FILE = "metrics.jsonl", "run_info.json", "config.yaml"
LOG_FILE, PLOT_FILE, TB_DIR = "train.log", "loss.png", "tensorboard"
_VERSIONED = ("torch", "transformers", "accelerate", "safetensors", "numpy", "peft", "tokenizers")


# ----------------------------------------------------------------------------- run info
def collect_versions() -> dict[str, str | None]:
    """Versions of python, medmllm and the main libraries (None for a library not installed)."""
    from importlib import metadata

    import medmllm

    out: dict[str, str | None] = {"python": platform.python_version(), "medmllm": medmllm.__version__,
                                  "platform": platform.platform()}
    for name in _VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    try:
        import torch

        out["cuda"] = torch.version.cuda
    except ImportError:  # pragma: no cover - torch is a dependency
        out["cuda"] = None
    return out


def git_revision(path: str | os.PathLike | None = None) -> dict | None:
    """``{"commit", "dirty"}`` of the git checkout holding ``path`` (default: this package), else None."""
    where = Path(path) if path is not None else Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                                capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": bool(status.strip())} if commit else None


def write_run_info(run_dir: str | os.PathLike, config: Any = None, *, manifest_hash: str | None = None,
                   world_size: int = 1, resumed_from: str | os.PathLike | None = None,
                   extra: Mapping[str, Any] | None = None) -> dict:
    """Write ``config.yaml`` (when ``config`` is given) and ``run_info.json``; return the info.

    On a resume (``resumed_from`` set) the earlier info is kept and the resume is appended to
    ``info["resumes"]``; a different ``manifest_hash`` than the first run's is logged as a warning.
    """
    from medmllm.config import save_config
    from medmllm.io import write_json

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if config is not None:
        save_config(config, run_dir / CONFIG_FILE)
    now = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": list(sys.argv), "world_size": world_size,
           "versions": collect_versions(), "git": git_revision(), "manifest_hash": manifest_hash}
    info_path = run_dir / RUN_INFO_FILE
    old = json.loads(info_path.read_text(encoding="utf-8")) if info_path.is_file() else None
    if resumed_from is not None and old is not None:
        if old.get("manifest_hash") != manifest_hash:
            log.warning("resuming with data manifest %s, the run started with %s", manifest_hash,
                        old.get("manifest_hash"))
        info = {**old, "resumes": [*old.get("resumes", []), {**now, "from": str(resumed_from)}]}
    else:
        info = {**now, "resumes": []}
    if extra:
        info["extra"] = dict(extra)
    write_json(info_path, info)
    return info


def attach_file_log(run_dir: str | os.PathLike, level: int = logging.INFO) -> logging.Handler:
    """Send the ``medmllm`` logger's records to ``run_dir/train.log`` (appending). Returns the handler
    (remove it with ``logging.getLogger("medmllm").removeHandler(h); h.close()``)."""
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(Path(run_dir) / LOG_FILE, encoding="utf-8")
    handler.setLevel(level)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("medmllm")
    root.addHandler(handler)
    if root.level == logging.NOTSET or root.level > level:
        root.setLevel(level)
    return handler


# ----------------------------------------------------------------------------- metrics
def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Rows of a metrics JSONL file; a torn last line (a killed writer) is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


class MetricsLogger:
    """Scalars to ``metrics.jsonl`` and (if installed) TensorBoard.

    ``resume_step``: rows logged after that step (by a run killed after its last checkpoint) are
    dropped from the JSONL and purged from TensorBoard, so the curve has no duplicate steps.
    """

    def __init__(self, run_dir: str | os.PathLike, *, tensorboard: bool = True, resume_step: int | None = None):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS_FILE
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            self._truncate_after(resume_step)
        elif self.path.exists():
            self.path.unlink()  # a fresh run in an old directory starts a fresh curve
        self._fh = open(self.path, "a", encoding="utf-8")
        self._tb = _tensorboard_writer(self.run_dir / TB_DIR, resume_step) if tensorboard else None

    def _truncate_after(self, step: int) -> None:
        from medmllm.io import write_jsonl

        rows = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
        write_jsonl(self.path, rows)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        row = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        self._fh.write(json.dumps(row, sort_keys=True) + "\n")
        self._fh.flush()
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(f"train/{k}", v, global_step=int(step))

    def flush(self) -> None:
        self._fh.flush()
        os.fsync(self._fh.fileno())
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if not self._fh.closed:
            self.flush()
            self._fh.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    @property
    def has_tensorboard(self) -> bool:
        return self._tb is not None


def _plain(v: Any) -> Any:
    return v.item() if hasattr(v, "item") else v


def _tensorboard_writer(log_dir: Path, resume_step: int | None):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.warning("tensorboard is not installed: scalars go to metrics.jsonl only (pip install tensorboard)")
        return None
    purge = resume_step + 1 if resume_step is not None else None
    return SummaryWriter(log_dir=str(log_dir), purge_step=purge)


# ----------------------------------------------------------------------------- plot
def plot_loss_curve(rows: Iterable[Mapping[str, Any]] | str | os.PathLike, out_png: str | os.PathLike,
                    key: str = "loss", title: str | None = None) -> Path | None:
    """Plot ``key`` against ``step`` from metrics rows (or a metrics.jsonl path) to a PNG, atomically.
    Returns the path, or None when there is nothing to plot."""
    if isinstance(rows, (str, os.PathLike)):
        rows = read_metrics(rows)
    pts = [(r["step"], r[key]) for r in rows if key in r and isinstance(r[key], (int, float))]
    if not pts:
        return None
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    from medmllm.io import atomic_open

    fig = Figure(figsize=(6, 3.5), dpi=100)
    ax = fig.add_subplot()
    steps, values = zip(*pts)
    ax.plot(steps, values, lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.set_title(title or f"{key} ({len(pts)} points, last {values[-1]:.4g})")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_open(out_png, "wb") as fh:
        fig.savefig(fh, format="png")
    return Path(out_png)


# ----------------------------------------------------------------------------- progress
class Progress:
    """A tqdm bar over optimizer steps showing loss, lr, samples/s (and tqdm's own ETA).

    ``enabled=False`` (non-main processes) makes every call a no-op.
    """

    def __init__(self, total: int, initial: int = 0, *, enabled: bool = True, file: Any = None,
                 desc: str = "train"):
        self._bar = None
        if enabled:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit="step", file=file,
                             dynamic_ncols=True, mininterval=0.5)

    def update(self, n: int, metrics: Mapping[str, float]) -> None:
        if self._bar is None:
            return
        post = {}
        for k, fmt in (("loss", "{:.4f}"), ("lr", "{:.2e}"), ("samples_per_s", "{:.1f}")):
            if k in metrics:
                post["samples/s" if k == "samples_per_s" else k] = fmt.format(metrics[k])
        self._bar.set_postfix(post, refresh=False)
        self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def format_metrics(step: int, metrics: Mapping[str, Any], keys: Sequence[str] = ("loss", "lr", "samples_per_s")) -> str:
    """``"step 12 loss=0.1234 lr=1.00e-03 samples_per_s=88.1"`` for the log file."""
    parts = [f"step {step}"]
    for k in keys:
        if k in metrics and isinstance(metrics[k], (int, float)):
            parts.append(f"{k}={metrics[k]:.4g}" if k != "lr" else f"lr={metrics[k]:.2e}")
    return " ".join(parts)

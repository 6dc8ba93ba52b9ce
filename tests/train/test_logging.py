"""medmllm.train.logging: run info, metrics JSONL / TensorBoard, loss plot, progress bar."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
from dataclasses import dataclass, field

import pytest
import torch

from medmllm.config import load_config
from medmllm.train import logging as runlog


@dataclass
class Small:
    lr: float = 1e-3
    tags: list[str] = field(default_factory=lambda: ["a"])


def test_metrics_jsonl_and_resume_truncation(tmp_path):
    m = runlog.MetricsLogger(tmp_path, tensorboard=False)
    for step in range(1, 8):
        m.log(step, {"loss": 1.0 / step, "lr": torch.tensor(0.1)})
    m.close()
    rows = runlog.read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 8))
    assert rows[2] == {"step": 3, "loss": 1.0 / 3, "lr": pytest.approx(0.1)}

    # the run died after step 7 but its last checkpoint is step 5: a resume drops steps 6 and 7
    m = runlog.MetricsLogger(tmp_path, tensorboard=False, resume_step=5)
    m.log(6, {"loss": 0.5})
    m.close()
    assert [r["step"] for r in runlog.read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]

    # a fresh run in the same directory starts a fresh file
    runlog.MetricsLogger(tmp_path, tensorboard=False).close()
    assert runlog.read_metrics(tmp_path / "metrics.jsonl") == []


def test_read_metrics_skips_a_torn_line(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    assert runlog.read_metrics(p) == [{"step": 1, "loss": 2.0}]


def test_tensorboard_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    m = runlog.MetricsLogger(tmp_path)
    assert m.has_tensorboard
    for step in (1, 2, 3):
        m.log(step, {"loss": float(step) * 2})
    m.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    events = acc.Scalars("train/loss")
    assert [(e.step, e.value) for e in events] == [(1, 2.0), (2, 4.0), (3, 6.0)]


def test_loss_plot_is_a_png(tmp_path):
    import matplotlib.image

    rows = [{"step": s, "loss": 1.0 / s} for s in range(1, 20)]
    out = runlog.plot_loss_curve(rows, tmp_path / "loss.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = matplotlib.image.imread(out)
    assert img.shape[0] == 350 and img.shape[1] == 600  # figsize 6x3.5 in at 100 dpi
    assert [p.name for p in tmp_path.iterdir()] == ["loss.png"]  # no temp file left
    assert runlog.plot_loss_curve([{"step": 1, "lr": 0.1}], tmp_path / "none.png") is None


def test_run_info_and_resolved_config(tmp_path):
    cfg = load_config({}, ["lr=3e-4", "tags=[x,y]"], Small)
    info = runlog.write_run_info(tmp_path, cfg, manifest_hash="abc123", world_size=2)
    assert load_config(tmp_path / "config.yaml", [], Small) == cfg
    on_disk = json.loads((tmp_path / "run_info.json").read_text())
    assert on_disk == info
    assert info["manifest_hash"] == "abc123" and info["world_size"] == 2
    assert info["versions"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert info["versions"]["python"].count(".") == 2 and info["resumes"] == []
    again = runlog.write_run_info(tmp_path, cfg, manifest_hash="abc123", resumed_from=tmp_path / "ck")
    assert again["time"] == info["time"] and len(again["resumes"]) == 1
    assert again["resumes"][0]["from"] == str(tmp_path / "ck")


@pytest.mark.skipif(shutil.which("git") is None, reason="git not installed")
def test_git_revision(tmp_path):
    assert runlog.git_revision(tmp_path) is None  # not a repository
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@e", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@e", "PATH": "/usr/bin:/bin"}
    run = lambda *a: subprocess.run(["git", *a], cwd=tmp_path, env=env, check=True, capture_output=True, text=True)
    run("init", "-q")
    (tmp_path / "f.txt").write_text("1")
    run("add", "f.txt")
    run("commit", "-q", "-m", "one")
    head = run("rev-parse", "HEAD").stdout.strip()
    assert runlog.git_revision(tmp_path) == {"commit": head, "dirty": False}
    (tmp_path / "f.txt").write_text("2")
    assert runlog.git_revision(tmp_path) == {"commit": head, "dirty": True}


def test_progress_bar_shows_loss_lr_and_samples_per_second():
    out = io.StringIO()
    bar = runlog.Progress(10, 2, file=out)
    bar.update(1, {"loss": 0.25, "lr": 1e-3, "samples_per_s": 123.4})
    bar.close()
    text = out.getvalue()
    assert "loss=0.2500" in text and "lr=1.00e-03" in text and "samples/s=123.4" in text
    assert "3/10" in text
    silent = io.StringIO()
    runlog.Progress(10, enabled=False, file=silent).update(1, {"loss": 1.0})
    assert silent.getvalue() == ""


def test_format_metrics():
    assert runlog.format_metrics(7, {"loss": 0.123456, "lr": 0.001, "samples_per_s": 50.0}) == \
        "step 7 loss=0.1235 lr=1.00e-03 samples_per_s=50"

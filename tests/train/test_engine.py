"""medmllm.train.engine: exact resume, gradient accumulation, multi-process equivalence, outputs,
resumable samplers and dataset mixing."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch

from medmllm.config import ConfigError, load_config
from medmllm.train import checkpoint as ckpt
from medmllm.train.engine import (LengthGroupedBatchSampler, MixtureDataset, RandomBatchSampler, TrainLoop,
                                  TrainSettings, enable_gradient_checkpointing, make_loader_factory)
from medmllm.train.logging import read_metrics

REPO = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------- fixtures
def regression_data(n: int = 64) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 4, generator=g)
    return torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True).sin())  # [n, 4], [n, 1]


def mlp(dropout: float = 0.0) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 32), torch.nn.Tanh(), torch.nn.Dropout(dropout),
                               torch.nn.Linear(32, 1))


def mse(model, batch):
    x, y = batch
    return torch.nn.functional.mse_loss(model(x), y)


class Killed(Exception):
    """Stands for the process being killed (raised from inside a training step)."""


def train(run_dir, *, batch=8, grad_accum=1, steps=12, kill_after_micro=None, resume=False, dropout=0.1,
          optim="adamw", **kw):
    """Build model/optimizer/scheduler/data from fixed seeds and run (or resume) a TrainLoop."""
    model = mlp(dropout)
    if optim == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.01)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + 0.1 * s))
    ds = regression_data()
    sampler = RandomBatchSampler(len(ds), batch, seed=3)
    calls = {"n": 0}

    def loss_fn(m, b):
        calls["n"] += 1
        if kill_after_micro is not None and calls["n"] > kill_after_micro:
            raise Killed
        return mse(m, b)

    kw = {"log_every": 1, "ckpt_every": 5, "tensorboard": False, "progress": False, **kw}
    loop = TrainLoop(model, opt, sched, make_loader_factory(ds, sampler), loss_fn, run_dir=run_dir,
                     max_steps=steps, grad_accum=grad_accum, seed=0, **kw)
    if resume:
        assert loop.resume("latest") is not None
    try:
        loop.run()
    except Killed:
        pass
    return model, loop


def losses(run_dir):
    return [(r["step"], r["loss"]) for r in read_metrics(Path(run_dir) / "metrics.jsonl")]


# ----------------------------------------------------------------------------- exact resume
def test_resume_after_kill_equals_uninterrupted_run(tmp_path):
    ref, _ = train(tmp_path / "ref")
    # killed during step 8 (8 batches/epoch: the run is in epoch 1); the last checkpoint is step 5
    _, dead = train(tmp_path / "cut", kill_after_micro=7, log_every=2)
    assert dead.step == 7 and ckpt.latest_checkpoint(tmp_path / "cut").name == "step_000005"
    resumed, loop = train(tmp_path / "cut", resume=True, log_every=2)
    assert loop.step == 12
    for (name, a), (_, b) in zip(ref.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
    ref_curve = dict(losses(tmp_path / "ref"))
    cut_curve = losses(tmp_path / "cut")
    assert [s for s, _ in cut_curve] == [2, 4, 5, 6, 8, 10, 12]  # steps 6, 7 of the dead run were dropped
    for step, loss in cut_curve:
        if step % 2 == 1:
            assert loss == ref_curve[step]  # a window of one step: the same number, bit for bit


def test_resume_depends_on_restoring_rng(tmp_path, monkeypatch):
    """Negative control: with dropout, skipping the RNG restore changes the result."""
    ref, _ = train(tmp_path / "ref", steps=8)
    train(tmp_path / "cut", steps=8, kill_after_micro=6)
    monkeypatch.setattr(ckpt, "restore_rng_state", lambda state: None)
    resumed, _ = train(tmp_path / "cut", steps=8, resume=True)
    assert not all(torch.equal(a, b) for a, b in zip(ref.parameters(), resumed.parameters()))


def test_resume_from_final_checkpoint_does_nothing_more(tmp_path):
    model, _ = train(tmp_path / "r", steps=6)
    again, loop = train(tmp_path / "r", steps=6, resume=True)
    assert loop.step == 6 and all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))


# ----------------------------------------------------------------------------- accumulation
def test_grad_accumulation_matches_larger_batch(tmp_path):
    big, _ = train(tmp_path / "b8", batch=8, grad_accum=1, dropout=0.0, optim="sgd")
    acc, _ = train(tmp_path / "b4x2", batch=4, grad_accum=2, dropout=0.0, optim="sgd")
    for a, b in zip(big.parameters(), acc.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    la, lb = losses(tmp_path / "b8"), losses(tmp_path / "b4x2")
    assert [s for s, _ in la] == [s for s, _ in lb] == list(range(1, 13))
    np.testing.assert_allclose([v for _, v in la], [v for _, v in lb], rtol=1e-5)
    # and accumulating really changes something: 4 x 1 is not the same run as 8 x 1
    small, _ = train(tmp_path / "b4", batch=4, grad_accum=1, dropout=0.0, optim="sgd")
    assert not torch.allclose(small[0].weight, big[0].weight, atol=1e-4)


# ----------------------------------------------------------------------------- two processes
WORKER = r'''
import sys
import torch
from medmllm.train.engine import RandomBatchSampler, TrainLoop, make_accelerator, make_loader_factory, seed_everything

run_dir, batch, steps, kill, resume = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1"
torch.set_num_threads(1)
acc = make_accelerator("no", 1)
seed_everything(0)
model = torch.nn.Sequential(torch.nn.Linear(4, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
g = torch.Generator().manual_seed(1)
x = torch.randn(64, 4, generator=g)
ds = torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True).sin())
opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
sampler = RandomBatchSampler(len(ds), batch, seed=3, num_replicas=acc.num_processes, rank=acc.process_index)
calls = [0]
def loss_fn(m, b):
    calls[0] += 1
    if kill and calls[0] > kill:
        raise SystemExit(3)
    return torch.nn.functional.mse_loss(m(b[0]), b[1])
loop = TrainLoop(model, opt, None, make_loader_factory(ds, sampler), loss_fn, run_dir=run_dir, max_steps=steps,
                 log_every=1, ckpt_every=5, accelerator=acc, progress=False, tensorboard=False)
if resume:
    loop.resume("latest")
loop.run()
if acc.is_main_process:
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, run_dir + "/final.pt")
    print("WORLD", acc.num_processes, acc.distributed_type)
'''


def launch(tmp_path, run_dir, *args, nproc=2, check=True):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "recipes/accelerate/ddp_cpu.yaml"), "--num_processes", str(nproc), str(script),
           str(run_dir), *map(str, args)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    if check:
        assert out.returncode == 0, out.stderr[-3000:]
    return out


def sgd_reference(tmp_path, run_dir, batch, steps=12):
    """The worker's run in this process (1 process, no launcher)."""
    from medmllm.train.engine import seed_everything

    seed_everything(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ds = regression_data()
    loop = TrainLoop(model, opt, None, make_loader_factory(ds, RandomBatchSampler(len(ds), batch, seed=3)), mse,
                     run_dir=run_dir, max_steps=steps, log_every=1, ckpt_every=5, progress=False, tensorboard=False)
    loop.run()
    return model


def test_two_processes_match_one_process_with_the_global_batch(tmp_path):
    """2 CPU processes (gloo DDP via accelerate launch + recipes/accelerate/ddp_cpu.yaml), batch 4 each,
    give the loss curve of 1 process with batch 8 within 1e-5 relative (float32 reduction order)."""
    out = launch(tmp_path, tmp_path / "two", 4, 12, 0, 0)
    assert "WORLD 2 DistributedType.MULTI_CPU" in out.stdout
    ref = sgd_reference(tmp_path, tmp_path / "one", 8)
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert [s for s, _ in one] == [s for s, _ in two] == list(range(1, 13))
    np.testing.assert_allclose([v for _, v in two], [v for _, v in one], rtol=1e-5)
    final = torch.load(tmp_path / "two" / "final.pt")
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(final[k], v, rtol=1e-5, atol=1e-6)
    info = json.loads((tmp_path / "two" / "run_info.json").read_text())
    assert info["world_size"] == 2


@pytest.mark.slow
def test_two_process_resume_is_exact(tmp_path):
    launch(tmp_path, tmp_path / "ref", 4, 12, 0, 0)
    dead = launch(tmp_path, tmp_path / "cut", 4, 12, 7, 0, check=False)
    assert dead.returncode != 0
    assert ckpt.latest_checkpoint(tmp_path / "cut").name == "step_000005"
    launch(tmp_path, tmp_path / "cut", 4, 12, 0, 1)
    a, b = torch.load(tmp_path / "ref" / "final.pt"), torch.load(tmp_path / "cut" / "final.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_sigkill_then_resume_is_exact(tmp_path):
    """A real SIGKILL (no cleanup at all) in the middle of training, then a resume."""
    script = tmp_path / "slow_worker.py"
    script.write_text(WORKER.replace("return torch.nn.functional", "import time; time.sleep(0.05); return torch.nn.functional"))
    args = lambda d, resume: [sys.executable, str(script), str(d), "8", "40", "0", resume]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(args(tmp_path / "ref", "0"), env=env, check=True, capture_output=True, timeout=240)
    proc = subprocess.Popen(args(tmp_path / "cut", "0"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (ckpt.list_checkpoints(tmp_path / "cut")[-1:] and
                                          ckpt.list_checkpoints(tmp_path / "cut")[-1].name >= "step_000015"):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL  # killed, not finished
    assert ckpt.latest_checkpoint(tmp_path / "cut").name < "step_000040"
    subprocess.run(args(tmp_path / "cut", "1"), env=env, check=True, capture_output=True, timeout=240)
    a, b = torch.load(tmp_path / "ref" / "final.pt"), torch.load(tmp_path / "cut" / "final.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [s for s, _ in losses(tmp_path / "cut")] == list(range(1, 41))


# ----------------------------------------------------------------------------- outputs
@dataclass
class RecipeCfg:
    train: TrainSettings
    name: str = "tiny"
    tags: list[str] = field(default_factory=list)


def test_run_directory_outputs(tmp_path):
    cfg = load_config({"train": {"max_steps": 7}}, ["train.log_every=3", "train.ckpt_every=4", "tags=[x]"], RecipeCfg)
    bar = io.StringIO()
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    ds = regression_data()
    loop = TrainLoop(model, opt, None, make_loader_factory(ds, RandomBatchSampler(len(ds), 8, seed=0)), mse,
                     run_dir=tmp_path, config=cfg, manifest_hash="sha256:feed", progress_file=bar,
                     **{**cfg.train.__dict__, "tensorboard": True})
    result = loop.run()
    assert result["step"] == 7 and result["checkpoint"].name == "step_000007"
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [3, 4, 6, 7]  # every 3, at the checkpoint (4), at the end
    assert {"loss", "lr", "samples_per_s", "samples", "epoch"} <= rows[0].keys()
    assert [r["samples"] for r in rows] == [24, 32, 48, 56]
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert load_config(tmp_path / "config.yaml", [], RecipeCfg) == cfg
    info = json.loads((tmp_path / "run_info.json").read_text())
    assert info["manifest_hash"] == "sha256:feed" and info["versions"]["torch"] and "git" in info
    assert "step 7 loss=" in (tmp_path / "train.log").read_text()
    assert list((tmp_path / "tensorboard").iterdir())
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_000004", "step_000007"]
    assert "samples/s=" in bar.getvalue() and "7/7" in bar.getvalue()


def test_bad_settings_fail_before_training(tmp_path):
    calls = []

    def loss_fn(m, b):
        calls.append(1)
        return mse(m, b)

    ds = regression_data()
    model = mlp()
    for bad in ({"max_steps": 0}, {"max_steps": 3, "grad_accum": 0}, {"max_steps": 3, "mixed_precision": "fp16"},
                {"max_steps": 3, "grad_clip": -1.0}):
        with pytest.raises(ConfigError):
            TrainLoop(model, torch.optim.SGD(model.parameters(), lr=0.1), None,
                      make_loader_factory(ds, RandomBatchSampler(len(ds), 8, seed=0)), loss_fn,
                      run_dir=tmp_path / "x", progress=False, **bad)
    with pytest.raises(ConfigError, match="train.mixed_precision"):
        load_config({"train": {"max_steps": 3}}, ["train.mixed_precision=fp16"], RecipeCfg)
    with pytest.raises(ConfigError, match="did you mean 'grad_accum'"):
        load_config({"train": {"max_steps": 3}}, ["train.grad_acum=2"], RecipeCfg)
    assert calls == [] and not (tmp_path / "x").exists()


def test_bf16_autocast_on_cpu(tmp_path):
    dtypes = []
    model = mlp()
    model[0].register_forward_hook(lambda mod, inp, out: dtypes.append(out.dtype))  # inside the forward
    ds = regression_data()
    loop = TrainLoop(model, torch.optim.SGD(model.parameters(), lr=0.05), None,
                     make_loader_factory(ds, RandomBatchSampler(len(ds), 8, seed=0)), mse, run_dir=tmp_path,
                     max_steps=3, mixed_precision="bf16", progress=False, tensorboard=False, grad_clip=1.0)
    loop.run()
    assert dtypes == [torch.bfloat16] * 3
    assert model[0].weight.dtype == torch.float32  # weights stay fp32
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert all(np.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in rows)


def test_gradient_checkpointing_toggle(tmp_path, caplog):
    class WithGC(torch.nn.Sequential):
        enabled_with = None

        def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
            self.enabled_with = gradient_checkpointing_kwargs

    model = WithGC(torch.nn.Linear(4, 1))
    ds = regression_data()
    TrainLoop(model, torch.optim.SGD(model.parameters(), lr=0.1), None,
              make_loader_factory(ds, RandomBatchSampler(len(ds), 8, seed=0)), mse, run_dir=tmp_path,
              max_steps=1, gradient_checkpointing=True, progress=False)
    assert model.enabled_with == {"use_reentrant": False}
    assert enable_gradient_checkpointing(torch.nn.Linear(2, 2)) is False
    assert "no gradient_checkpointing_enable" in caplog.text


# ----------------------------------------------------------------------------- samplers
def test_random_batches_are_a_function_of_seed_and_epoch_and_resume_mid_epoch():
    s = RandomBatchSampler(20, 4, seed=7)
    s.set_epoch(0)
    e0 = list(s)
    assert sorted(i for b in e0 for i in b) == list(range(20)) and all(len(b) == 4 for b in e0)
    s.set_epoch(1)
    e1 = list(s)
    assert e1 != e0
    s.set_epoch(0, start_batch=3)
    assert list(s) == e0[3:] and len(s) == 2
    again = RandomBatchSampler(20, 4, seed=7)
    assert list(again) == e0
    other = RandomBatchSampler(20, 4, seed=8)
    assert list(other) != e0
    seq = RandomBatchSampler(10, 4, seed=0, shuffle=False, drop_last=False)
    assert list(seq) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_sharded_batches_recompose_the_single_process_batches():
    one = RandomBatchSampler(30, 6, seed=1)
    shards = [RandomBatchSampler(30, 3, seed=1, num_replicas=2, rank=r) for r in (0, 1)]
    for epoch in (0, 1):
        for s in (one, *shards):
            s.set_epoch(epoch)
        assert [a + b for a, b in zip(*map(list, shards))] == list(one)
    # without drop_last every process still gets full, equal batches (wrap-around padding)
    pad = [RandomBatchSampler(10, 3, seed=1, num_replicas=2, rank=r, drop_last=False) for r in (0, 1)]
    b0, b1 = list(pad[0]), list(pad[1])
    assert len(b0) == len(b1) == 2 and all(len(b) == 3 for b in b0 + b1)
    assert set(i for b in b0 + b1 for i in b) == set(range(10))


def test_length_grouped_batches():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 500, size=96).tolist()
    grouped = LengthGroupedBatchSampler(lengths, 8, seed=3, mega_batch_mult=100)  # one mega-batch: global sort
    batches = list(grouped)
    assert sorted(i for b in batches for i in b) == list(range(96))
    spans = sorted((min(lengths[i] for i in b), max(lengths[i] for i in b)) for b in batches)
    assert all(hi <= nxt_lo for (_, hi), (nxt_lo, _) in zip(spans, spans[1:]))  # disjoint length ranges

    def waste(bs):  # padding tokens when each batch is padded to its longest sample
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in bs)

    local = LengthGroupedBatchSampler(lengths, 8, seed=3, mega_batch_mult=4)
    assert waste(list(local)) < 0.5 * waste(list(RandomBatchSampler(96, 8, seed=3)))
    grouped.set_epoch(0, start_batch=5)
    assert list(grouped) == batches[5:]
    grouped.set_epoch(1)
    assert list(grouped) != batches
    assert [b for b in batches] != sorted(batches, key=lambda b: -max(lengths[i] for i in b))  # order shuffled


def test_mixture_dataset():
    a = [("a", i) for i in range(10)]
    b = [("b", i) for i in range(3)]
    mix = MixtureDataset([a, b], [3.0, 1.0], seed=0, num_samples=8)
    items = [mix[i] for i in range(len(mix))]
    assert len(mix) == 8
    assert sum(1 for s, _ in items if s == "a") == 6 and sum(1 for s, _ in items if s == "b") == 2  # 3:1 of 8
    assert len({x for x in items if x[0] == "a"}) == 6  # no repeats before a dataset is used up
    up = MixtureDataset([a, b], [1.0, 1.0], seed=0, num_samples=12)  # b (3 items) must cycle twice
    bs = [up[i] for i in range(12) if up[i][0] == "b"]
    assert len(bs) == 6 and sorted(bs[:3]) == sorted(b) and sorted(bs[3:]) == sorted(b)
    assert [mix[i] for i in range(8)] == [MixtureDataset([a, b], [3, 1], seed=0, num_samples=8)[i] for i in range(8)]
    mix.set_epoch(1)
    assert [mix[i] for i in range(8)] != items
    assert mix.lengths([[1] * 10, [100] * 3]).count(100) == 2
    for bad in (([a, b], [1.0]), ([a, b], [0.0, 0.0]), ([a, b], [1.0, -1.0]), ([a, []], [1.0, 1.0])):
        with pytest.raises(ConfigError):
            MixtureDataset(*bad, seed=0)


def test_mixture_largest_remainder_counts():
    mix = MixtureDataset([list(range(5))] * 3, [1, 1, 1], seed=0, num_samples=10)
    assert sorted(mix.counts.tolist()) == [3, 3, 4] and mix.counts[0] == 4  # 10/3 each; the tie goes to the first

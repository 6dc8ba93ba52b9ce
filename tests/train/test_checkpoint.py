"""medmllm.train.checkpoint: atomic, complete checkpoints (weights, optimizer, scheduler, RNG, data)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from safetensors import safe_open

from medmllm.errors import InputError
from medmllm.train import checkpoint as ckpt


class Tied(torch.nn.Module):
    """Embedding and output layer share one weight (as in many LLMs)."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(10, 4)
        self.mid = torch.nn.Linear(4, 4)
        self.out = torch.nn.Linear(4, 10, bias=False)
        self.out.weight = self.emb.weight
        self.register_buffer("count", torch.tensor(3))

    def forward(self, idx):
        return self.out(torch.tanh(self.mid(self.emb(idx))))


def trained(seed: int):
    """A Tied model, AdamW and a step scheduler after 3 training steps."""
    torch.manual_seed(seed)
    model = Tied()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for _ in range(3):
        idx = torch.randint(0, 10, (8,))
        loss = torch.nn.functional.cross_entropy(model(idx), idx)
        loss.backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    return model, opt, sched


def draws():
    return random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist(), torch.randn(2).tolist()


def test_save_load_restores_everything(tmp_path):
    model, opt, sched = trained(0)
    data = {"epoch": 2, "batch": 7, "sampler": {"epoch": 2, "start_batch": 7},
            "generator": torch.Generator().manual_seed(5).get_state()}
    path = ckpt.save_checkpoint(tmp_path, 123, {"model": model, "optimizer": opt, "scheduler": sched,
                                                "data": data, "metrics": {"loss": torch.tensor(0.5)}})
    assert path == tmp_path / "checkpoints" / "step_000123"
    expected = draws()  # what the run would draw next, right after the save

    random.random(), np.random.rand(5), torch.rand(5)  # the process moves on ...
    model2, opt2, sched2 = trained(1)  # ... and a fresh process builds different objects
    assert not torch.equal(model2.mid.weight, model.mid.weight)
    state = ckpt.load_checkpoint(path, model2, opt2, sched2)

    assert draws() == expected
    for (k, a), (_, b) in zip(model.state_dict().items(), model2.state_dict().items()):
        assert torch.equal(a, b), k
    assert model2.out.weight is model2.emb.weight  # still tied after loading
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    for i in s1["state"]:
        for key in s1["state"][i]:
            assert torch.equal(torch.as_tensor(s1["state"][i][key]), torch.as_tensor(s2["state"][i][key]))
    assert sched2.state_dict() == sched.state_dict() and sched2.get_last_lr() == sched.get_last_lr()
    assert state["step"] == 123 and state["data"]["epoch"] == 2 and state["data"]["sampler"]["start_batch"] == 7
    assert torch.equal(state["data"]["generator"], data["generator"])
    assert state["metrics"] == {"loss": 0.5}
    meta = json.loads((path / "meta.json").read_text())
    assert meta["step"] == 123 and meta["data"]["batch"] == 7 and "generator" not in meta["data"]


def test_tied_weights_are_stored_once(tmp_path):
    model, _, _ = trained(0)
    path = ckpt.save_checkpoint(tmp_path, 1, {"model": model.state_dict()})
    with safe_open(str(path / "model.safetensors"), framework="pt") as fh:
        keys = set(fh.keys())
        aliases = json.loads(fh.metadata()["aliases"])
    assert len(keys) == len(model.state_dict()) - 1
    assert aliases in ({"out.weight": "emb.weight"}, {"emb.weight": "out.weight"})
    sd = ckpt.load_weights(path / "model.safetensors")
    assert sd.keys() == model.state_dict().keys()
    assert torch.equal(sd["out.weight"], model.emb.weight)


def test_keep_last_k(tmp_path):
    model = torch.nn.Linear(2, 2)
    for step in range(1, 6):
        ckpt.save_checkpoint(tmp_path, step * 10, {"model": model}, keep_last=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_000040", "step_000050"]
    assert ckpt.latest_checkpoint(tmp_path).name == "step_000050"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000040", "step_000050"]


def test_leftover_temp_dir_is_ignored_and_cleaned(tmp_path):
    model = torch.nn.Linear(2, 2)
    ckpt.save_checkpoint(tmp_path, 5, {"model": model})
    # a save of step 9 killed half-way: its temp dir holds a truncated weights file and no meta.json
    partial = tmp_path / "checkpoints" / ".tmp-step_000009-4242"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"\x00\x01truncated")
    # and a step_ dir without meta.json (e.g. copied by hand) is not complete either
    (tmp_path / "checkpoints" / "step_000011").mkdir()
    assert ckpt.latest_checkpoint(tmp_path).name == "step_000005"
    assert not partial.exists()
    with pytest.raises(InputError, match="not a complete checkpoint"):
        ckpt.load_checkpoint(tmp_path / "checkpoints" / "step_000011", model)


def test_failure_mid_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    good = ckpt.save_checkpoint(tmp_path, 1, {"model": model, "optimizer": opt})
    saved = {k: v.clone() for k, v in model.state_dict().items()}

    with torch.no_grad():
        model.weight.add_(1.0)
    real_save = ckpt._torch_save

    def failing_save(obj, path):
        if path.name == "rng.pt":  # the weights and optimizer are already written at this point
            raise OSError(28, "No space left on device")
        real_save(obj, path)

    monkeypatch.setattr(ckpt, "_torch_save", failing_save)
    with pytest.raises(OSError):
        ckpt.save_checkpoint(tmp_path, 2, {"model": model, "optimizer": opt})
    monkeypatch.undo()

    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_000001"]
    assert ckpt.latest_checkpoint(tmp_path) == good
    fresh = torch.nn.Linear(3, 3)
    ckpt.load_checkpoint(good, fresh, torch.optim.SGD(fresh.parameters(), lr=0.1), restore_rng=False)
    assert all(torch.equal(fresh.state_dict()[k], saved[k]) for k in saved)


def test_resaving_a_step_replaces_it(tmp_path):
    model = torch.nn.Linear(2, 1)
    ckpt.save_checkpoint(tmp_path, 3, {"model": model, "metrics": {"loss": 1.0}})
    ckpt.save_checkpoint(tmp_path, 3, {"model": model, "metrics": {"loss": 2.0}})
    (only,) = ckpt.list_checkpoints(tmp_path)
    assert json.loads((only / "meta.json").read_text())["metrics"] == {"loss": 2.0}
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_000003"]


def test_per_process_rng_states(tmp_path):
    torch.manual_seed(1)
    first = ckpt.capture_rng_state()
    a = torch.rand(2)
    torch.manual_seed(2)
    second = ckpt.capture_rng_state()
    b = torch.rand(2)
    path = ckpt.save_checkpoint(tmp_path, 1, {"rng": [first, second]})
    ckpt.load_checkpoint(path, process_index=1)
    assert torch.equal(torch.rand(2), b)
    ckpt.load_checkpoint(path, process_index=0)
    assert torch.equal(torch.rand(2), a)


def test_missing_parts_are_reported(tmp_path):
    path = ckpt.save_checkpoint(tmp_path, 1, {"model": torch.nn.Linear(2, 2)})
    model = torch.nn.Linear(2, 2)
    with pytest.raises(InputError, match="no optimizer.pt"):
        ckpt.load_checkpoint(path, model, torch.optim.SGD(model.parameters(), lr=1.0))
    with pytest.raises(RuntimeError):  # a model of another shape: strict load_state_dict refuses
        ckpt.load_checkpoint(path, torch.nn.Linear(3, 2))

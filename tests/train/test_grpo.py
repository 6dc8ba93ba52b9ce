"""The GRPO recipe on a tiny model and the MedPhantom reasoning split: rollouts, updates, exact resume."""

import json

import pytest
import torch

from medmllm.config import load_config
from medmllm.errors import ConfigError
from medmllm.train import checkpoint as ckpt
from medmllm.train import grpo as G
from medmllm.train import rewards as R

VARIETY = "test_grpo_distinct_chars"


def distinct_chars(completion, record):
    """A reward a random tiny model earns unevenly (accuracy and format are all 0 for it): advantages != 0."""
    return len(set(completion)) / 10.0


class Killed(Exception):
    """Stands for the process dying in the middle of a step."""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from medmllm.data.phantoms.build import build_phantoms
    from medmllm.data.phantoms.reasoning import build_reasoning
    from medmllm.model.builders import tiny

    out = tmp_path_factory.getbasetemp() / "medphantom40_seed0"   # shared by the modules of a session (cached)
    build_phantoms(out, 40, seed=0, workers=1, progress=False)
    build_reasoning(out, seed=0)
    start = tmp_path_factory.mktemp("start") / "model"            # starting model + build_tokenizer tokenizer
    model, tok = tiny()
    model.save_pretrained(start)
    tok.save_pretrained(start)
    if VARIETY not in R.REWARDS:
        R.register_reward(VARIETY, distinct_chars)
    yield out / "records" / "reasoning_train.jsonl", start
    R.REWARDS._items.pop(VARIETY, None)


def _cfg(setup, run_dir, **over):
    data, start = setup
    base = {"stage": "grpo", "run_dir": str(run_dir), "model": {"path": str(start)},
            "data": {"train": [str(data)], "image_size": 32},
            "grpo": {"group_size": 2, "iterations": 2, "max_new_tokens": 6, "kl_beta": 0.1,
                     "rewards": {"accuracy": 1.0, "format": 0.5, VARIETY: 1.0}},
            "optim": {"lr": 1e-2, "projector_lr": 1e-2, "warmup_steps": 0, "schedule": "constant"},
            "train": {"max_steps": 4, "batch_size": 2, "log_every": 1, "ckpt_every": 1, "keep_last": 0,
                      "mixed_precision": "no", "tensorboard": False}}
    for k, v in over.items():
        base[k] = {**base.get(k, {}), **v} if isinstance(v, dict) else v
    return load_config(base, [], schema=G.GRPOConfig)


def _metrics(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _weights(run_dir, step):
    return ckpt.load_weights(run_dir / "checkpoints" / ckpt.step_dirname(step) / ckpt.MODEL_FILE)


# ----------------------------------------------------------------------------- pieces
def test_sampling_is_seeded_and_never_emits_banned_tokens(setup):
    from medmllm.data.collate import MultimodalCollator
    from medmllm.data.tokenizers import load_tokenizer
    from medmllm.model.mllm import MedMLLM

    _, start = setup
    model, tok = MedMLLM.from_pretrained(start), load_tokenizer(start)
    coll = MultimodalCollator(tok, 64, model.num_tokens, train=False)
    ex = [{"record": {"id": str(i), "messages": [{"role": "user", "content": q}]}, "modalities": []}
          for i, q in enumerate(["Is there a nodule?", "What is the heart rate?"])]
    batch = coll(ex)
    allowed = tok.convert_tokens_to_ids(["a", "b", "c"]) + [tok.eos_token_id]
    banned = [i for i in range(len(tok)) if i not in allowed]
    kw = dict(max_new_tokens=12, temperature=1.0, banned_ids=banned)
    one = G.sample_completions(model, batch, tok, seed=1, **kw)
    assert one == G.sample_completions(model, batch, tok, seed=1, **kw)           # same seed, same samples
    assert one != G.sample_completions(model, batch, tok, seed=2, **kw)
    assert all(t in allowed for row in one for t in row)
    assert all(len(row) == 12 or row[-1] == tok.eos_token_id for row in one)       # ends on eos or the budget
    torch.manual_seed(0)
    state = torch.get_rng_state()
    G.sample_completions(model, batch, tok, seed=3, **kw)
    assert torch.equal(state, torch.get_rng_state())                                # global RNG untouched


def test_prompts_get_the_cot_format_and_unverifiable_records_are_left_out(setup):
    data, _ = setup
    from medmllm.data.records import read_records

    cfg = _cfg(setup, "unused", data={"train": [str(data), str(data.parent / "train.jsonl")]})
    prompts, _, _ = G.load_prompts(cfg)
    n_reasoning = len(read_records(data)[0])
    assert n_reasoning < len(prompts)                                    # + the verifiable build questions
    assert all(p["meta"]["answer_type"] in ("closed", "open", "choice") for p in prompts)
    for p in prompts:
        assert p["messages"][-1]["role"] == "user"
        texts = [x["text"] for x in p["messages"][-1]["content"] if x["type"] == "text"]
        assert sum(G.COT_INSTRUCTION in t for t in texts) == 1           # appended once, never twice


# ----------------------------------------------------------------------------- the recipe
@pytest.fixture(scope="module")
def trained(setup, tmp_path_factory):
    """An uninterrupted 6-step run (checkpoints at 3 and 6); the resume test compares with it."""
    run_dir = tmp_path_factory.mktemp("grpo") / "run"
    return run_dir, G.run(_cfg(setup, run_dir, train={"max_steps": 6, "ckpt_every": 3}), progress=False)


def test_grpo_updates_the_policy_logs_reward_format_kl_and_prunes_rollouts(setup, trained):
    from medmllm.model.mllm import MedMLLM

    run_dir, res = trained
    rows = _metrics(run_dir)
    assert res["steps"] == 6 and len(rows) == 6
    for key in ("reward", "accuracy", "format_rate", "kl", "clip_fraction", "completion_tokens", "reward_" + VARIETY):
        assert key in rows[0], key
    assert all(0.0 <= r["format_rate"] <= 1.0 and 0.0 <= r["accuracy"] <= 1.0 for r in rows)
    # each rollout feeds 2 updates: the first is on-policy (ratio 1; at step 1 the policy is the reference too)
    assert rows[0]["kl"] == 0.0 and rows[0]["clip_fraction"] == 0.0
    assert rows[1]["kl"] > 0.0                                          # the update moved the policy off the reference
    assert rows[0]["reward"] == rows[1]["reward"] and rows[2]["reward"] == rows[3]["reward"]  # same rollout
    start = MedMLLM.from_pretrained(setup[1]).state_dict()
    tuned = MedMLLM.from_pretrained(res["model"]).state_dict()
    assert any(not torch.equal(start[k], tuned[k]) for k in start if k.startswith("llm."))
    assert all(torch.equal(start[k], tuned[k]) for k in start if k.startswith("encoders."))
    # rollouts 0, 1, 2 feed steps 1-2, 3-4, 5-6; the checkpoint of step 3 sits inside rollout 1, so its file stays;
    # no checkpoint sits inside rollout 0 (deleted); rollout 2 is the newest (written before its updates)
    files = sorted(p.name for p in (run_dir / G.ROLLOUT_DIR).iterdir())
    assert files == ["rank0_e00000_g000001.pt", "rank0_e00000_g000002.pt"], files


def test_grpo_resume_after_a_kill_equals_the_uninterrupted_run(setup, trained, tmp_path, monkeypatch):
    # 2 updates per rollout: steps 1-2 use rollout 0, 3-4 rollout 1, 5-6 rollout 2. Killed during step 4, the run
    # resumes from the checkpoint of step 3, between the two updates of rollout 1: that rollout is reloaded as
    # saved (not sampled again), then rollout 2 is sampled with the resumed weights and seed.
    over = {"train": {"max_steps": 6, "ckpt_every": 3}}
    real, calls = G.grpo_loss, {"n": 0}

    def dying(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 4:
            raise Killed
        return real(*a, **kw)

    monkeypatch.setattr(G, "grpo_loss", dying)
    with pytest.raises(Killed):
        G.run(_cfg(setup, tmp_path / "cut", **over), progress=False)
    assert ckpt.latest_checkpoint(tmp_path / "cut").name == ckpt.step_dirname(3)
    monkeypatch.setattr(G, "grpo_loss", real)
    rolls = {"n": 0}
    real_call = G.Roller.__call__

    def counting(self, *a, **kw):
        rolls["n"] += 1
        return real_call(self, *a, **kw)

    monkeypatch.setattr(G.Roller, "__call__", counting)
    G.run(_cfg(setup, tmp_path / "cut", **over), progress=False)
    assert rolls["n"] == 1                                              # rollout 2 only
    a, b = _weights(trained[0], 6), _weights(tmp_path / "cut", 6)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]
    assert any(not torch.equal(a[k], _weights(tmp_path / "cut", 3)[k]) for k in a)   # steps 4-6 changed weights
    ref_rows, cut_rows = _metrics(trained[0]), _metrics(tmp_path / "cut")
    assert [r["step"] for r in cut_rows] == [1, 2, 3, 4, 5, 6]                        # step 4 of the dead run dropped
    for r, c in zip(ref_rows[3:], cut_rows[3:]):
        assert (c["reward"], c["loss"], c["kl"]) == (r["reward"], r["loss"], r["kl"])


def test_config_errors_fail_before_training(setup, tmp_path):
    with pytest.raises(ConfigError, match="group_size"):
        _cfg(setup, tmp_path / "x", grpo={"group_size": 1})
    with pytest.raises(ConfigError, match="unknown reward"):
        G.run(_cfg(setup, tmp_path / "y", grpo={"rewards": {"acuracy": 1.0}}), progress=False)
    with pytest.raises(ConfigError, match="verifiable"):
        G.run(_cfg(setup, tmp_path / "z", data={"train": [str(setup[0].parent / "alignment.jsonl")]}), progress=False)
    assert not (tmp_path / "y").exists() and not (tmp_path / "z").exists()


@pytest.mark.slow
def test_grpo_raises_a_simple_reward(setup, tmp_path):
    """End to end, the sign is right: rewarding the share of "e" in the completion makes the policy write more "e"."""
    name = "test_grpo_share_e"

    def share_e(completion, record):
        return completion.count("e") / max(1, len(completion))

    if name not in R.REWARDS:
        R.register_reward(name, share_e)
    try:
        G.run(_cfg(setup, tmp_path / "run", grpo={"group_size": 4, "max_new_tokens": 8, "kl_beta": 0.01,
                                                  "rewards": {name: 1.0}},
                   optim={"lr": 2e-2, "projector_lr": 2e-2},
                   train={"max_steps": 30, "batch_size": 4, "log_every": 2, "ckpt_every": 0}), progress=False)
    finally:
        R.REWARDS._items.pop(name, None)
    rewards = [r["reward"] for r in _metrics(tmp_path / "run")]
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.1, rewards


def _roller(setup, **grpo):
    """A Roller over the first prompts of the reasoning split, as ``G.run`` builds it (no reference model)."""
    from accelerate import Accelerator

    from medmllm.data.collate import MultimodalCollator
    from medmllm.data.dataset import PartLoader
    from medmllm.train.dpo import MultiBaseRecords
    from medmllm.train.sft import data_shapes, load_model

    cfg = _cfg(setup, "unused", grpo=grpo, data={"max_length": 1024})      # every prompt fits: no group dropped
    prompts, bases, _ = G.load_prompts(cfg)
    model, tok = load_model(cfg.model)
    dataset = MultiBaseRecords(prompts, bases, PartLoader(data_shapes(model, cfg.data)))
    collator = MultimodalCollator(tok, max_length=cfg.data.max_length, num_tokens_fn=model.num_tokens, train=False)
    roller = G.Roller(cfg, tok, collator, G.make_reward(cfg.grpo), Accelerator(cpu=True))
    roller.policy = model.eval()
    return roller, dataset


def test_drop_uniform_groups_keeps_only_the_groups_whose_rewards_differ(setup):
    """Prompts 0 and 2 get a constant reward (their groups are uniform), prompts 1 and 3 a varying one: with
    ``drop_uniform_groups`` only the rows of 1 and 3 are left to update on, the same rows as without it, and
    the statistics still count every completion."""
    name = "test_grpo_uniform_on_even"

    def uneven(completion, record):
        return 1.0 if record["_k"] % 2 == 0 else len(completion) / 10.0 + len(set(completion)) / 100.0

    if name not in R.REWARDS:
        R.register_reward(name, uneven)
    try:
        grpo = {"group_size": 3, "max_new_tokens": 8, "kl_beta": 0.0, "temperature": 1.5, "rewards": {name: 1.0}}
        full_roller, dataset = _roller(setup, **grpo)
        drop_roller, _ = _roller(setup, **grpo, drop_uniform_groups=True)
        items = [dataset[i] for i in range(4)]
        for k, it in enumerate(items):
            it["record"]["_k"] = k
        full, drop = full_roller(items, seed=5), drop_roller(items, seed=5)
    finally:
        R.REWARDS._items.pop(name, None)
    g = 3
    assert full["stats"]["mixed_groups"].tolist() == [0.0] * g + [1.0] * g + [0.0] * g + [1.0] * g
    assert torch.equal(full["advantages"][:g], torch.zeros(g))          # a uniform group: advantage 0
    kept = [1 * g + j for j in range(g)] + [3 * g + j for j in range(g)]
    assert drop["input_ids"].shape[0] == len(kept) == drop["old_logps"].shape[0]
    assert torch.equal(drop["advantages"], full["advantages"][kept])
    for row, k in enumerate(kept):                                       # same completion tokens, same log-probs
        fmask, dmask = full["labels"][k] != -100, drop["labels"][row] != -100
        assert torch.equal(full["labels"][k][fmask], drop["labels"][row][dmask])
        assert torch.allclose(full["old_logps"][k][fmask], drop["old_logps"][row][dmask], atol=1e-5)
    for key in ("rewards", "accuracy", "mixed_groups"):                  # statistics of all 12 completions
        assert torch.equal(drop["stats"][key], full["stats"][key])


def test_drop_uniform_groups_with_no_mixed_group_leaves_nothing_to_update(setup):
    name = "test_grpo_constant"
    if name not in R.REWARDS:
        R.register_reward(name, lambda completion, record: 1.0)
    try:
        roller, dataset = _roller(setup, group_size=2, max_new_tokens=4, kl_beta=0.0, rewards={name: 1.0},
                                  drop_uniform_groups=True)
        out = roller([dataset[0], dataset[1]], seed=0)
    finally:
        R.REWARDS._items.pop(name, None)
    assert out["input_ids"].shape[0] == 0 and out["advantages"].numel() == 0
    assert out["stats"]["rewards"].tolist() == [1.0] * 4 and out["stats"]["mixed_groups"].tolist() == [0.0] * 4

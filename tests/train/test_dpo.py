"""The DPO recipe on a tiny model and MedPhantom preference pairs: learning, reference log-probs, exact resume."""

import json
import math

import pytest
import torch

from medmllm.config import load_config
from medmllm.errors import ConfigError
from medmllm.train import checkpoint as ckpt
from medmllm.train import dpo as D


class Killed(Exception):
    """Stands for the process dying in the middle of a step."""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from medmllm.data.phantoms.build import build_phantoms
    from medmllm.data.phantoms.preference import build_preference
    from medmllm.data.records import read_records, write_records
    from medmllm.model.builders import tiny

    out = tmp_path_factory.getbasetemp() / "medphantom40_seed0"   # shared by the modules of a session (cached)
    build_phantoms(out, 40, seed=0, workers=1, progress=False)
    build_preference(out, seed=0)
    pairs = read_records(out / "records" / "preference.jsonl")[0]
    small = out / "records" / "preference_dpo_test.jsonl"        # 4 pairs of every kind: fast steps
    pick = [r for r in pairs if r["meta"]["modality"] in ("xray", "ehr", "ct")
            and r["meta"]["extra"]["pair_kind"] in ("hallucination", "omission", "statement")][:4]
    assert {r["meta"]["extra"]["pair_kind"] for r in pick} == {"hallucination", "omission", "statement"}
    write_records(small, pick)
    start = tmp_path_factory.mktemp("start") / "model"            # starting model + build_tokenizer tokenizer
    model, tok = tiny()
    model.save_pretrained(start)
    tok.save_pretrained(start)
    return small, start, pick


def _cfg(setup, run_dir, **over):
    small, start, _ = setup
    base = {"stage": "dpo", "run_dir": str(run_dir), "model": {"path": str(start)},
            "data": {"train": [str(small)], "image_size": 32},
            "optim": {"lr": 5e-3, "projector_lr": 5e-3, "warmup_steps": 0, "schedule": "constant"},
            "dpo": {"beta": 0.5, "reference_batch_size": 16},
            "train": {"max_steps": 4, "batch_size": 4, "log_every": 1, "ckpt_every": 2, "mixed_precision": "no",
                      "tensorboard": False, "grad_clip": 1.0}}
    for k, v in over.items():
        base[k] = {**base.get(k, {}), **v} if isinstance(v, dict) else v
    return load_config(base, [], schema=D.DPOConfig)


def _metrics(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _manual_logp(model, tok, rec, base):
    """Summed log-prob of the chosen answer, token by token with log_softmax (independent of rl_losses)."""
    from medmllm.data.collate import MultimodalCollator
    from medmllm.data.dataset import ModalityShapes, PartLoader, RecordDataset

    ds = RecordDataset([D.side_record(rec, "chosen")], PartLoader(ModalityShapes(image_size=32)), base_dir=base)
    batch = MultimodalCollator(tok, 256, model.num_tokens)([ds[0]])
    with torch.no_grad():
        logits = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "modality_inputs",
                                                "modality_batch_index")}).logits[0]
    labels = batch["labels"][0]
    total = 0.0
    for t in range(1, labels.shape[0]):
        if labels[t] != -100:
            total += torch.log_softmax(logits[t - 1].double(), -1)[labels[t]].item()
    return total


@pytest.fixture(scope="module")
def trained(setup, tmp_path_factory):
    """An uninterrupted 4-step run (one batch of the 4 pairs per step); the resume test compares with it."""
    run_dir = tmp_path_factory.mktemp("dpo") / "run"
    return run_dir, D.run(_cfg(setup, run_dir, train={"ckpt_every": 0}), progress=False)


def test_dpo_learns_the_preferences_and_stores_the_reference(setup, trained):
    from medmllm.data.tokenizers import load_tokenizer
    from medmllm.model.mllm import MedMLLM

    small, start, pick = setup
    run_dir, res = trained
    assert res["reference"] == "computed" and res["usable_pairs"] == 4 and res["steps"] == 4
    rows = _metrics(run_dir)
    # step 1: the policy is the reference, so every pair's loss is -log sigmoid(0) = log 2
    assert rows[0]["loss"] == pytest.approx(math.log(2.0), abs=1e-4)
    assert rows[0]["reward_margin"] == pytest.approx(0.0, abs=1e-4)
    # one batch holds the 4 pairs, seen at every step: the loss falls step after step
    losses = [r["loss"] for r in rows]
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < math.log(2.0) - 0.1, losses
    assert rows[-1]["reward_margin"] > 0.1 and rows[-1]["chosen_reward"] > rows[-1]["rejected_reward"]
    # the stored reference = the starting model's log-prob of each chosen answer
    saved = torch.load(run_dir / D.REFERENCE_FILE, weights_only=True)
    assert saved["ids"] == [r["id"] for r in pick] and saved["logps"].shape == (4, 2)
    base_model, tok = MedMLLM.from_pretrained(start), load_tokenizer(start)
    for i in (0, 2):
        assert saved["logps"][i, 0].item() == pytest.approx(_manual_logp(base_model, tok, pick[i], small.parent),
                                                           abs=1e-4)
    tuned = MedMLLM.from_pretrained(res["model"])
    changed = [k for k, v in base_model.state_dict().items() if not torch.equal(v, tuned.state_dict()[k])]
    assert any(k.startswith("llm.") for k in changed) and any(k.startswith("projectors.") for k in changed)
    assert not any(k.startswith("encoders.") for k in changed)               # encoders stay frozen


def test_dpo_with_lora_saves_an_adapter_and_a_merged_model(setup, tmp_path):
    from medmllm.model.lora import load_adapter
    from medmllm.model.mllm import MedMLLM

    _, start, _ = setup
    res = D.run(_cfg(setup, tmp_path / "lora", lora={"enabled": True, "r": 4, "alpha": 8},
                     train={"max_steps": 2, "ckpt_every": 0}), progress=False)
    merged = MedMLLM.from_pretrained(res["model"])
    reloaded = load_adapter(MedMLLM.from_pretrained(start), tmp_path / "lora" / "adapter")
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        a, b = merged(input_ids=ids).logits, reloaded(input_ids=ids).logits
        c = MedMLLM.from_pretrained(start)(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-5) and not torch.allclose(a, c, atol=1e-5)
    assert _metrics(tmp_path / "lora")[-1]["loss"] < math.log(2.0)


def _final_weights(run_dir, step):
    return ckpt.load_weights(run_dir / "checkpoints" / ckpt.step_dirname(step) / ckpt.MODEL_FILE)


def test_dpo_resume_after_a_kill_equals_the_uninterrupted_run(setup, trained, tmp_path, monkeypatch):
    # killed during step 3, the run resumes from the checkpoint of step 2 and must end where the uninterrupted
    # run ended, bit for bit, without recomputing the reference log-probs
    over = {"train": {"ckpt_every": 2, "keep_last": 0}}
    real, calls = D.dpo_loss, {"n": 0}

    def dying(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise Killed
        return real(*a, **kw)

    monkeypatch.setattr(D, "dpo_loss", dying)
    with pytest.raises(Killed):
        D.run(_cfg(setup, tmp_path / "cut", **over), progress=False)
    assert ckpt.latest_checkpoint(tmp_path / "cut").name == "step_000002"
    monkeypatch.setattr(D, "dpo_loss", real)
    ref_file = tmp_path / "cut" / D.REFERENCE_FILE
    stamp = ref_file.stat().st_mtime_ns

    def no_recompute(*a, **kw):
        raise AssertionError("the reference log-probs were recomputed on resume")

    monkeypatch.setattr(D, "compute_reference_logps", no_recompute)
    res = D.run(_cfg(setup, tmp_path / "cut", **over), progress=False)
    assert res["reference"] == "loaded" and res["steps"] == 4 and ref_file.stat().st_mtime_ns == stamp
    a, b = _final_weights(trained[0], 4), _final_weights(tmp_path / "cut", 4)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]
    start = _final_weights(tmp_path / "cut", 2)
    assert any(not torch.equal(start[k], a[k]) for k in a)                   # steps 3-4 did change the weights
    ref_rows, cut_rows = _metrics(trained[0]), _metrics(tmp_path / "cut")
    assert [r["step"] for r in cut_rows] == [1, 2, 3, 4] and cut_rows[-1]["loss"] == ref_rows[-1]["loss"]


def test_dpo_config_and_data_errors(setup, tmp_path):
    with pytest.raises(ConfigError, match="beta"):
        _cfg(setup, tmp_path / "x", dpo={"beta": 0})
    with pytest.raises(ConfigError, match="stage"):
        load_config({"stage": "grpo", "run_dir": "x"}, [], schema=D.DPOConfig)
    train = setup[0].parent / "train.jsonl"            # instruction records: no pairs
    with pytest.raises(ConfigError, match="preference"):
        D.run(_cfg(setup, tmp_path / "y", data={"train": [str(train)]}), progress=False)
    assert not (tmp_path / "y").exists()


def test_rpo_term_adds_the_chosen_answers_per_token_nll(monkeypatch):
    # 2 pairs: chosen rows 0-1, rejected rows 2-3; chosen answers have 2 and 1 label tokens after position 0
    labels = torch.tensor([[-100, 5, 6, -100], [-100, -100, 7, -100], [-100, 8, -100, -100], [-100, 9, 9, -100]])
    chosen, rejected = torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.5])
    ref = torch.tensor([[-1.5, -2.5], [-2.0, -2.0]])
    monkeypatch.setattr(D, "pair_logps", lambda model, batch: (chosen, rejected))
    batch = {"input_ids": torch.zeros(4, 4, dtype=torch.long), "labels": labels, "ref_logps": ref}
    beta, alpha = 0.5, 0.7
    plain = D.make_loss_fn(beta)(None, batch)
    rpo = D.make_loss_fn(beta, alpha)(None, batch)
    dpo = sum(-math.log(1 / (1 + math.exp(-beta * ((c - rc) - (r - rr)))))
              for c, r, rc, rr in [(-1.0, -3.0, -1.5, -2.5), (-2.0, -1.5, -2.0, -2.0)]) / 2
    nll = (1.0 + 2.0) / 3                                     # -(sum of chosen log-probs) / 3 chosen tokens
    assert plain["loss"].item() == pytest.approx(dpo, rel=1e-6)
    assert rpo["loss"].item() == pytest.approx(dpo + alpha * nll, rel=1e-6)
    assert rpo["nll"].item() == pytest.approx(nll)
    with pytest.raises(ConfigError, match="dpo.rpo_alpha"):
        D.DPOSettings(rpo_alpha=-1)

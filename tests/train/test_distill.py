"""The distillation recipe: the KL and feature terms against hand formulas, a small teacher -> student run,
exact resume after a kill, and config errors."""

import json
import math

import pytest
import torch

from medmllm.config import load_config
from medmllm.errors import ConfigError
from medmllm.train import checkpoint as ckpt
from medmllm.train import distill as D


class Killed(Exception):
    """Stands for the process dying in the middle of a step."""


# ----------------------------------------------------------------------------- loss terms by hand

def _softmax(xs):
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]


def test_answer_kl_is_the_temperature_scaled_kl_on_answer_positions_only():
    student = torch.tensor([[[1.0, 0.0, -1.0], [0.5, 0.5, 0.0], [9.0, -9.0, 0.0]]])   # [1, 3, 3]
    teacher = torch.tensor([[[0.0, 2.0, 0.0], [1.0, 0.0, 1.0], [-9.0, 9.0, 0.0]]])
    labels = torch.tensor([[-100, 2, 1]])       # tokens 1 and 2 are answers: predicted at positions 0 and 1
    T = 2.0
    expected = 0.0
    for pos in (0, 1):                          # position 2 predicts nothing and must not count
        p = _softmax([x / T for x in teacher[0, pos].tolist()])
        q = _softmax([x / T for x in student[0, pos].tolist()])
        expected += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    expected = expected / 2 * T ** 2
    got = D.answer_kl(student, teacher, labels, T)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    assert D.answer_kl(teacher, teacher, labels, T).item() == pytest.approx(0.0, abs=1e-7)
    assert D.answer_kl(student, teacher, torch.full_like(labels, -100), T).item() == 0.0


def test_normalised_mse_is_one_for_a_zero_prediction_at_any_scale():
    target = torch.tensor([[3.0, -4.0], [1.0, 2.0]])
    assert D.normalised_mse(torch.zeros(2, 2), target).item() == pytest.approx(1.0)
    assert D.normalised_mse(torch.zeros(2, 2), 100 * target).item() == pytest.approx(1.0)
    assert D.normalised_mse(target, target).item() == 0.0
    pred = torch.tensor([[2.0, -4.0], [1.0, 0.0]])                   # errors 1 and 2: mse 5/4, mean t^2 30/4
    assert D.normalised_mse(pred, target).item() == pytest.approx(5 / 30)


def test_settings_reject_bad_values():
    with pytest.raises(ConfigError, match="distill.temperature"):
        D.DistillSettings(temperature=0)
    with pytest.raises(ConfigError, match="distill.kl_weight"):
        D.DistillSettings(kl_weight=-1)
    with pytest.raises(ConfigError, match="at least one"):
        D.DistillSettings(ce_weight=0, kl_weight=0, feature_weight=0, hidden_weight=0)


# ----------------------------------------------------------------------------- the recipe

@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from medmllm.data.phantoms.build import build_phantoms
    from medmllm.data.records import read_records, write_records
    from medmllm.data.tokenizers import build_tokenizer
    from medmllm.model.builders import LLM_FAMILIES, small

    out = tmp_path_factory.getbasetemp() / "medphantom40_seed0"   # shared by the modules of a session (cached)
    build_phantoms(out, 40, seed=0, workers=1, progress=False)
    recs = read_records(out / "records" / "train.jsonl")[0]
    pick = [r for r in recs if r["meta"]["modality"] in ("xray", "ehr", "ecg") and r["meta"]["task"] == "vqa"][:4]
    data = out / "records" / "distill_test.jsonl"                 # 4 records: one batch per step
    write_records(data, pick)
    teacher_dir = tmp_path_factory.mktemp("teacher") / "model"
    model, tok = small(hidden=128, layers=2, encoder_scale=0.25, tokenizer=build_tokenizer(LLM_FAMILIES["llama"][0]))
    model.save_pretrained(teacher_dir)
    tok.save_pretrained(teacher_dir)
    return data, teacher_dir


def _cfg(setup, run_dir, **over):
    data, teacher = setup
    base = {"stage": "distill", "run_dir": str(run_dir), "teacher": {"path": str(teacher)},
            "student": {"builder": "small", "hidden": 32, "layers": 1, "encoder_scale": 0.125},
            "data": {"train": [str(data)], "image_size": 32},
            "distill": {"ce_weight": 0.0, "hidden_weight": 0.5},   # only the teacher teaches
            "optim": {"lr": 3e-3, "projector_lr": 3e-3, "warmup_steps": 0, "schedule": "constant"},
            "train": {"max_steps": 6, "batch_size": 4, "log_every": 1, "ckpt_every": 0, "mixed_precision": "no",
                      "tensorboard": False, "grad_clip": 1.0}}
    for k, v in over.items():
        base[k] = {**base.get(k, {}), **v} if isinstance(v, dict) else v
    return load_config(base, [], schema=D.DistillConfig)


@pytest.fixture(scope="module")
def trained(setup, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("distill") / "run"
    return run_dir, D.run(_cfg(setup, run_dir), progress=False)


def _metrics(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_student_is_smaller_learns_from_the_teacher_and_reloads(setup, trained):
    from medmllm.model.mllm import MedMLLM

    run_dir, res = trained
    assert res["steps"] == 6 and res["student_parameters"] < res["teacher_parameters"] / 4
    rows = _metrics(run_dir)
    assert {"ce", "kl", "feature", "hidden"} <= set(rows[0])
    for term in ("kl", "feature", "hidden"):                        # the same batch every step: each term falls
        assert rows[-1][term] < rows[0][term], (term, rows[0][term], rows[-1][term])
    student = MedMLLM.from_pretrained(res["model"])
    assert sum(p.numel() for p in student.parameters()) == res["student_parameters"]
    teacher = MedMLLM.from_pretrained(setup[1])
    assert student.config.placeholder_token_ids == teacher.config.placeholder_token_ids


def test_teacher_is_left_unchanged(setup, trained):
    from medmllm.model.builders import LLM_FAMILIES, small
    from medmllm.data.tokenizers import build_tokenizer
    from medmllm.model.mllm import MedMLLM

    fresh, _ = small(hidden=128, layers=2, encoder_scale=0.25, tokenizer=build_tokenizer(LLM_FAMILIES["llama"][0]))
    saved = MedMLLM.from_pretrained(setup[1]).state_dict()
    assert all(torch.equal(v, saved[k]) for k, v in fresh.state_dict().items())


def test_resume_after_a_kill_equals_the_uninterrupted_run(setup, trained, tmp_path, monkeypatch):
    over = {"train": {"ckpt_every": 2, "keep_last": 0}}
    real, calls = D.answer_kl, {"n": 0}

    def dying(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 5:                                         # during step 5: latest checkpoint is step 4
            raise Killed
        return real(*a, **kw)

    monkeypatch.setattr(D, "answer_kl", dying)
    with pytest.raises(Killed):
        D.run(_cfg(setup, tmp_path / "cut", **over), progress=False)
    assert ckpt.latest_checkpoint(tmp_path / "cut").name == "step_000004"
    monkeypatch.setattr(D, "answer_kl", real)
    res = D.run(_cfg(setup, tmp_path / "cut", **over), progress=False)
    assert res["steps"] == 6
    path = lambda d: d / "checkpoints" / ckpt.step_dirname(6) / ckpt.MODEL_FILE  # noqa: E731
    a, b = ckpt.load_weights(path(trained[0])), ckpt.load_weights(path(tmp_path / "cut"))
    assert a.keys() == b.keys() and any(k.startswith("feature_adapter.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]


def test_config_errors_name_the_field(setup, tmp_path):
    from medmllm.model.builders import tiny
    from medmllm.model.mllm import MedMLLM

    with pytest.raises(ConfigError, match="teacher.path"):
        D.run(_cfg(setup, tmp_path / "a", teacher={"path": ""}), progress=False)
    with pytest.raises(ConfigError, match="student.path"):
        D.run(_cfg(setup, tmp_path / "b", student={"path": str(tmp_path / "nothing")}), progress=False)
    teacher = MedMLLM.from_pretrained(setup[1])
    other_vocab = MedMLLM.from_pretrained(setup[1])
    other_vocab.llm.resize_token_embeddings(teacher.llm.config.vocab_size + 8)
    with pytest.raises(ConfigError, match="vocabulary size"):
        D.check_compatible(teacher, other_vocab)
    fewer_tokens, _ = tiny()                                         # a 2x2 grid + global: 5 image tokens
    assert fewer_tokens.num_tokens("image", (1, 32, 32)) != teacher.num_tokens("image", (1, 32, 32))
    with pytest.raises(ConfigError, match="image inputs"):
        D.check_same_tokens(teacher, fewer_tokens, {"image": (1, 32, 32)})

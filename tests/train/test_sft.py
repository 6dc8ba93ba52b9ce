"""The alignment/instruction recipe on a tiny model and a small MedPhantom build."""

import pytest
import torch

from medmllm.config import load_config
from medmllm.errors import ConfigError
from medmllm.train.sft import SFTConfig, run


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    from medmllm.data.phantoms.build import build_phantoms

    out = tmp_path_factory.mktemp("ph")
    build_phantoms(out, 24, seed=2, workers=1, progress=False)
    return out


def _cfg(build, run_dir, stage="alignment", **over):
    base = {"stage": stage, "run_dir": str(run_dir), "model": {"builder": "tiny"},
            "data": {"train": [str(build / "records" / ("alignment.jsonl" if stage == "alignment" else "train.jsonl"))],
                     "exclude_tasks": ["report"], "image_size": 32},
            "train": {"max_steps": 3, "batch_size": 4, "log_every": 1, "mixed_precision": "no", "tensorboard": False}}
    for k, v in over.items():
        base[k] = {**base.get(k, {}), **v} if isinstance(v, dict) else v
    return load_config(base, [], schema=SFTConfig)


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_alignment_trains_only_the_projectors(build, tmp_path):
    from medmllm.model.builders import tiny
    from medmllm.model.mllm import MedMLLM

    before, _ = tiny()  # the recipe's `tiny` builder with its fixed seed builds these same weights
    res = run(_cfg(build, tmp_path / "align"), progress=False)
    after = MedMLLM.from_pretrained(res["model"])
    w0, w1 = _weights(before), _weights(after)
    changed = {k for k in w0 if not torch.equal(w0[k], w1[k])}
    assert changed, "nothing trained"
    assert all(k.startswith("projectors.") for k in changed), sorted(changed)[:5]
    assert any(k.startswith("projectors.image") for k in changed)
    assert (tmp_path / "align" / "metrics.jsonl").exists()


def test_instruction_with_encoder_lr_tunes_encoders_but_keeps_batchnorm(build, tmp_path):
    from medmllm.model.builders import tiny
    from medmllm.model.mllm import MedMLLM

    before, _ = tiny()
    res = run(_cfg(build, tmp_path / "enc", stage="instruction", optim={"encoder_lr": 1e-2}), progress=False)
    w0, w1 = _weights(before), _weights(MedMLLM.from_pretrained(res["model"]))
    changed = {k for k in w0 if not torch.equal(w0[k], w1[k])}
    bn = {n for n, m in before.encoders.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert bn, "the tiny image encoder has BatchNorm layers"
    bn_keys = {k for k in w0 if any(k.startswith(f"encoders.{n}.") for n in bn)}
    assert any(k.startswith("encoders.image.stem") and k.endswith("weight") and k not in bn_keys for k in changed)
    assert not (changed & bn_keys), sorted(changed & bn_keys)[:4]     # running stats and affine untouched


def test_instruction_lora_saves_adapter_that_reloads_and_merges(build, tmp_path):
    from medmllm.model.lora import load_adapter
    from medmllm.model.builders import tiny
    from medmllm.model.mllm import MedMLLM

    res = run(_cfg(build, tmp_path / "lora", stage="instruction", lora={"enabled": True, "r": 4, "alpha": 8},
                   optim={"lr": 5e-3, "projector_lr": 5e-3}), progress=False)
    merged = MedMLLM.from_pretrained(res["model"])
    base, _ = tiny()
    reloaded = load_adapter(base, tmp_path / "lora" / "adapter")
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        a = merged(input_ids=ids).logits
        b = reloaded(input_ids=ids).logits
        c = tiny()[0](input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-5)          # adapter + base == merged model
    assert not torch.allclose(a, c, atol=1e-4)      # and the fine-tune changed the model
    assert torch.equal(merged.state_dict()["projectors.image.net.0.weight"]
                       if "projectors.image.net.0.weight" in merged.state_dict() else torch.zeros(1),
                       reloaded.state_dict().get("projectors.image.net.0.weight", torch.zeros(1)))


def test_bad_config_fails_before_training(build, tmp_path):
    with pytest.raises(ConfigError, match="data.train"):
        run(_cfg(build, tmp_path / "x", data={"train": [str(tmp_path / "missing.jsonl")]}), progress=False)
    with pytest.raises(ConfigError, match="trian"):
        load_config({"stage": "alignment", "run_dir": "x", "trian": {}}, [], schema=SFTConfig)
    with pytest.raises(ConfigError, match="model.path"):
        run(_cfg(build, tmp_path / "y", model={"path": str(tmp_path)}), progress=False)
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").rglob("step_*"))


def test_batch_with_every_sample_dropped_is_a_no_op_step(build, tmp_path):
    from medmllm.model.builders import tiny
    from medmllm.model.mllm import MedMLLM

    before, _ = tiny()
    res = run(_cfg(build, tmp_path / "empty", stage="instruction", data={"max_length": 8}), progress=False)
    after = MedMLLM.from_pretrained(res["model"])
    w0, w1 = _weights(before), _weights(after)
    assert all(torch.equal(w0[k], w1[k]) for k in w0)  # every sample is longer than 8 tokens: nothing trains


def test_sample_average_loss_matches_a_hand_computation():
    import math

    from medmllm.train.sft import lm_loss

    class Fixed(torch.nn.Module):          # logits fixed per position; the loss only reads them
        def __init__(self, logits):
            super().__init__()
            self.logits = logits

        def forward(self, input_ids, labels=None, **kw):
            from types import SimpleNamespace

            loss = None
            if labels is not None:
                loss = torch.nn.functional.cross_entropy(self.logits[:, :-1].transpose(1, 2), labels[:, 1:],
                                                         ignore_index=-100)
            return SimpleNamespace(logits=self.logits, loss=loss)

    logits = torch.log(torch.tensor([[[0.5, 0.5], [0.8, 0.2], [0.1, 0.9], [0.5, 0.5]],
                                     [[0.5, 0.5], [0.5, 0.5], [0.25, 0.75], [0.5, 0.5]]]))   # [B=2, L=4, V=2]
    labels = torch.tensor([[-100, 0, 1, 1], [-100, -100, -100, 1]])   # sample 0: 3 tokens, sample 1: 1 token
    batch = {"input_ids": torch.zeros(2, 4, dtype=torch.long), "labels": labels}
    # targets at positions 1..3 are predicted by logits 0..2
    nll0 = [-math.log(0.5), -math.log(0.2), -math.log(0.9)]
    nll1 = [-math.log(0.75)]
    token = sum(nll0 + nll1) / 4
    sample = (sum(nll0) / 3 + nll1[0]) / 2
    model = Fixed(logits)
    assert lm_loss(model, batch, average="token").item() == pytest.approx(token, rel=1e-6)
    assert lm_loss(model, batch, average="sample").item() == pytest.approx(sample, rel=1e-6)


def test_length_grouping_off_gives_shuffled_mixed_batches_and_bad_values_fail(build, tmp_path):
    with pytest.raises(ConfigError, match="length_grouping"):
        _cfg(build, tmp_path / "bad", data={"length_grouping": -1})
    res = run(_cfg(build, tmp_path / "mixed", stage="instruction", data={"length_grouping": 0},
                   train={"loss_average": "sample"}), progress=False)
    assert (tmp_path / "mixed" / "model" / "config.json").exists() and res["steps"] == 3
    assert res["loss"] == res["loss"] and res["loss"] > 0     # finite, positive (not NaN from empty samples)


def test_packing_and_attention_choice_are_validated_and_a_packed_run_trains(build, tmp_path):
    with pytest.raises(ConfigError, match="train.packing"):
        _cfg(build, tmp_path / "p", train={"packing": True, "loss_average": "sample"})
    with pytest.raises(ConfigError, match="attn_implementation"):
        _cfg(build, tmp_path / "p", model={"attn_implementation": "flash"})
    res = run(_cfg(build, tmp_path / "packed", stage="instruction", model={"attn_implementation": "eager"},
                   train={"packing": True, "max_steps": 2}), progress=False)
    assert res["steps"] == 2 and res["loss"] == res["loss"]              # trained, finite (not NaN)

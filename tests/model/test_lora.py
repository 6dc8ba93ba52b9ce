"""LoRA: apply, one training step, save_adapter -> load_adapter on a fresh base (identical logits),
trained projector / encoder / BatchNorm tensors kept, merge (close to unmerged, then an exact
save_pretrained round trip), and errors."""

from __future__ import annotations

import pytest
import torch

from medmllm.data.collate import MultimodalCollator
from medmllm.data.records import make_record, media
from medmllm.errors import ConfigError, InputError
from medmllm.model.builders import example_input, tiny
from medmllm.model.lora import ADAPTER_WEIGHTS, apply_lora, load_adapter, merge, save_adapter

META = {"dataset": "toy", "split": "train"}
KINDS = ("image", "ehr")
TARGETS = {"llm": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": "all-linear"},
           "encoder.image": {"r": 2, "lora_alpha": 4, "target_modules": ["proj"]}}


def _base():
    return tiny("qwen2", modalities=KINDS)


def _batch(model, tok):
    g = torch.Generator().manual_seed(0)
    exs = [{"record": make_record(f"r{i}", [media(k, "x") for k in kinds] + ["Is it normal?"], ans, META),
            "modalities": [(k, example_input(k, g)) for k in kinds]}
           for i, (kinds, ans) in enumerate([(["image", "ehr"], "Yes."), (["image"], "No, there is a nodule.")])]
    return MultimodalCollator(tok, 512, model.num_tokens)(exs)


def _logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


def _sub_state(model, prefix):
    return {k: v.clone() for k, v in model.state_dict().items() if k.startswith(prefix)}


def test_train_save_load_merge_round_trip(tmp_path):
    from peft.tuners.tuners_utils import BaseTunerLayer
    from safetensors import safe_open
    from transformers import AutoModel

    model, tok = _base()
    batch = _batch(model, tok)
    base_logits = _logits(model, batch)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}

    apply_lora(model, TARGETS, modules_to_save=["projector.*", "encoder.ehr"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters()
                         if ".lora_" in n or n.startswith(("projectors.", "encoders.ehr."))}
    assert any(n.startswith("llm.") for n in trainable) and any(n.startswith("encoders.image.") for n in trainable)
    assert torch.equal(_logits(model, batch), base_logits)          # LoRA B starts at zero: no change yet

    model.train()                                                   # BatchNorm statistics move too
    opt = torch.optim.AdamW(model.param_groups(default_lr=1e-2))
    model(**batch).loss.backward()
    opt.step()
    trained_logits = _logits(model, batch)
    assert not torch.allclose(trained_logits, base_logits)
    trained = {p: _sub_state(model, p) for p in ("projectors.", "encoders.ehr.", "encoders.image.stem.1.")}
    for prefix, state in trained.items():                          # each of these did change
        assert any(not torch.equal(v, base_state[k]) for k, v in state.items()), prefix

    out = save_adapter(model, tmp_path / "adapter")
    with safe_open(str(out / ADAPTER_WEIGHTS), "pt") as f:
        keys = set(f.keys())
    assert "projectors.image.mlp.0.weight" in keys and "encoders.ehr.weight" in keys
    assert "encoders.image.stem.1.running_mean" in keys
    assert not any(k.startswith("llm.") and ".lora_" not in k for k in keys)   # no frozen LLM weights

    fresh, _ = _base()
    assert torch.equal(_logits(fresh, batch), base_logits)
    load_adapter(fresh, out)
    assert torch.equal(_logits(fresh, batch), trained_logits)
    for prefix, state in trained.items():
        got = _sub_state(fresh, prefix)
        assert sorted(got) == sorted(state) and all(torch.equal(got[k], v) for k, v in state.items()), prefix

    merged = merge(fresh)
    assert not any(isinstance(m, BaseTunerLayer) for m in merged.modules())
    assert not any("lora" in k or "base_layer" in k for k in merged.state_dict())
    merged_logits = _logits(merged, batch)
    torch.testing.assert_close(merged_logits, trained_logits, rtol=0, atol=1e-5)
    for k, v in trained["projectors."].items():
        assert torch.equal(merged.state_dict()[k], v)
    merged.save_pretrained(tmp_path / "merged")
    reloaded = AutoModel.from_pretrained(tmp_path / "merged")
    assert torch.equal(_logits(reloaded, batch), merged_logits)


def test_projector_left_out_would_change_the_answer(tmp_path):
    """The failure the adapter format guards against: LoRA alone without the trained projector."""
    from safetensors.torch import load_file

    model, tok = _base()
    batch = _batch(model, tok)
    apply_lora(model, {"llm": TARGETS["llm"]})
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(**batch).loss.backward()
    opt.step()
    trained = _logits(model, batch)
    save_adapter(model, tmp_path)
    tensors = load_file(str(tmp_path / ADAPTER_WEIGHTS))
    lora_only = {k: v for k, v in tensors.items() if ".lora_" in k}
    fresh, _ = _base()
    apply_lora(fresh, {"llm": TARGETS["llm"]})
    fresh.load_state_dict(lora_only, strict=False)
    assert not torch.allclose(_logits(fresh, batch), trained)
    again, _ = _base()                                             # the full adapter restores it
    load_adapter(again, tmp_path)
    assert torch.equal(_logits(again, batch), trained)


def test_default_targets_put_lora_on_every_llm_linear_layer():
    from peft.tuners.tuners_utils import BaseTunerLayer

    model, _ = _base()
    linear = {n for n, m in model.llm.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    apply_lora(model)
    wrapped = {n for n, m in model.llm.named_modules() if isinstance(m, BaseTunerLayer)}
    assert wrapped == linear and len(linear) == 2 * 7          # q k v o gate up down per layer
    assert not any(p.requires_grad for n, p in model.named_parameters()
                   if ".lora_" not in n and not n.startswith("projectors."))


def test_errors(tmp_path):
    model, tok = _base()
    with pytest.raises(ConfigError, match="no LoRA"):
        save_adapter(model, tmp_path / "a")
    with pytest.raises(ConfigError, match="no LoRA layers to merge"):
        merge(model)
    with pytest.raises(ConfigError, match="no module group"):
        apply_lora(model, {"encoder.volume": {"r": 2, "target_modules": ["proj"]}})
    apply_lora(model, {"llm": TARGETS["llm"]})
    with pytest.raises(ConfigError, match="already has LoRA"):
        apply_lora(model, {"llm": TARGETS["llm"]})
    with pytest.raises(ConfigError, match="merge them"):
        model.save_pretrained(tmp_path / "m")
    save_adapter(model, tmp_path / "a")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="expected an adapter folder"):
        load_adapter(_base()[0], tmp_path / "empty")
    wider, _ = tiny("qwen2", modalities=KINDS, hidden=64)
    before = {k: v.clone() for k, v in wider.state_dict().items()}
    with pytest.raises(ConfigError, match="shape mismatch"):
        load_adapter(wider, tmp_path / "a")
    after = wider.state_dict()                                      # left as it was
    assert sorted(after) == sorted(before) and all(torch.equal(after[k], v) for k, v in before.items())
    assert all(p.requires_grad for p in wider.parameters()) and not wider.lora_targets
    with pytest.raises(ConfigError, match="no groups"):
        load_adapter(tiny("qwen2", modalities=("image",))[0], tmp_path / "a")

"""The encoder stage: heads, dense targets, and train_encoders on a tiny model and a small build."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from medmllm.data.dataset import ModalityShapes
from medmllm.data.phantoms.build import build_phantoms
from medmllm.errors import ConfigError
from medmllm.model.builders import tiny
from medmllm.train.checkpoint import list_checkpoints
from medmllm.train.encoder_stage import (EncoderHeads, EncoderStageConfig, MapLayout, dense_losses, map_layout,
                                         pool_features, train_encoders)

SHAPES = ModalityShapes(image_size=32, volume_shape=(8, 16, 16), signal_samples=500)


def test_pool_features_masked_mean_and_max_by_hand():
    f = torch.tensor([[[1.0, -2.0], [3.0, 4.0], [100.0, 100.0]],
                      [[-1.0, -5.0], [0.0, 0.0], [0.0, 0.0]]])                 # [2, 3, 2]
    mask = torch.tensor([[True, True, False], [True, False, False]])
    out = pool_features(f, mask)
    assert torch.equal(out, torch.tensor([[2.0, 1.0, 3.0, 4.0], [-1.0, -5.0, -1.0, -5.0]]))
    assert torch.equal(pool_features(f, torch.zeros(2, 3, dtype=torch.bool)), torch.zeros(2, 4))


def test_map_layout_targets_by_hand():
    grid = MapLayout(channels=3, rows=2, cols=2)
    # a box in the top-right quarter only, then one across the vertical midline of the bottom half
    assert grid.targets((0.1, 0.6, 0.2, 0.7)).tolist() == [0, 1, 0, 0]
    assert grid.targets((0.7, 0.4, 0.8, 0.6)).tolist() == [0, 0, 1, 1]
    assert grid.targets(()).tolist() == [0, 0, 0, 0]
    assert torch.isnan(grid.targets(None)).all()
    vol = MapLayout(channels=3, rows=2, cols=2, depth=4)
    # slices [0.3, 0.6) -> slices 1 and 2 of 4; the left half of the top row -> cell 0
    want = [0] * 16
    want[1 * 4 + 0] = want[2 * 4 + 0] = 1
    assert vol.targets((0.3, 0.1, 0.1, 0.6, 0.4, 0.4)).tolist() == want


def test_map_layout_flatten_orders_depth_rows_cols():
    vol = MapLayout(channels=2, rows=2, cols=3, depth=4)
    fmap = torch.randn(5 * 4, 2, 2, 3)                                       # [B * D, C, h, w]
    cells = vol.flatten(fmap, 5)                                             # [B, D*h*w, C]
    assert cells.shape == (5, 24, 2)
    assert torch.equal(cells[3, 2 * 6 + 1 * 3 + 2], fmap[3 * 4 + 2, :, 1, 2])  # item 3, slice 2, row 1, col 2


def test_map_layouts_of_the_tiny_encoders():
    model, _ = tiny()
    # tiny image CNN: depth 2 -> one stride-2 block: 32 px -> 16 x 16 cells of width 8 * 2
    assert map_layout(model.encoders["image"], "image", SHAPES) == MapLayout(16, 16, 16)
    # tiny slice CNN (width 4, depth 2) on 16 x 16 slices, 8 of them
    assert map_layout(model.encoders["volume"], "volume", SHAPES) == MapLayout(8, 8, 8, depth=8)
    assert map_layout(model.encoders["signal"], "signal", SHAPES) is None
    assert not model.encoders["image"].training                               # the probe left eval mode alone


def test_heads_shapes_and_dense_loss_masks_rows_not_applicable():
    heads = EncoderHeads({"image": 6}, {"image": {"a": 3, "r": 0}}, dense={"image": ("w",)},
                         layouts={"image": MapLayout(channels=5, rows=2, cols=2)})
    out = heads("image", torch.randn(5, 5, 6), torch.ones(5, 5, dtype=torch.bool), torch.randn(5, 4, 5))
    assert {k: tuple(v.shape) for k, v in out.items()} == {"a": (5, 3), "r": (5, 1), "w": (5, 4)}
    target = torch.zeros(5, 1, 4)
    target[0, 0, 1] = 1.0
    target[3:] = float("nan")                                                # two items: task n/a
    loss = dense_losses({"image": out}, {"image": target}, {"image": ("w",)}, {"image": {"w": 3.0}})
    want = torch.nn.functional.binary_cross_entropy_with_logits(out["w"][:3], target[:3, 0],
                                                                pos_weight=torch.tensor(3.0))
    assert torch.allclose(loss["image"]["w"], want)


def test_config_rejects_bad_values():
    with pytest.raises(ConfigError, match="steps"):
        EncoderStageConfig(data="x", steps=0)
    with pytest.raises(ConfigError, match="lr"):
        EncoderStageConfig(data="x", lr=0.0)


# ----------------------------------------------------------------------------- train_encoders

@pytest.fixture(scope="module")
def build(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantoms")
    build_phantoms(out, 40, seed=0, workers=1, progress=False)
    return out


def _cfg(build, run_dir, **kw) -> EncoderStageConfig:
    base = dict(data=str(build), run_dir=str(run_dir), steps=12, batch_size=12, lr=3e-3, warmup_steps=0,
                log_every=4, eval_split="train", seed=0)
    return EncoderStageConfig(**{**base, **kw})


def _state(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_train_encoders_trains_only_the_encoders(build, tmp_path):
    model, _ = tiny()
    hooks = {k: len(m._forward_hooks) for k, m in model.named_modules()}
    llm, proj, enc = _state(model.llm), _state(model.projectors), _state(model.encoders)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    result = train_encoders(model, build, _cfg(build, tmp_path / "run"), shapes=SHAPES, progress=False)

    assert all(torch.equal(v, model.llm.state_dict()[k]) for k, v in llm.items())
    assert all(torch.equal(v, model.projectors.state_dict()[k]) for k, v in proj.items())
    after = model.encoders.state_dict()
    for kind in ("image", "volume", "signal", "ehr"):
        assert any(not torch.equal(v, after[k]) for k, v in enc.items() if k.startswith(kind + ".")), kind
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    assert not model.encoders["image"].training                               # tiny() returns eval mode
    assert all(p.is_contiguous() for p in model.encoders.parameters())
    assert hooks == {k: len(m._forward_hooks) for k, m in model.named_modules()}   # stem hooks removed

    assert result["kinds"] == ["image", "volume", "signal", "ehr"]
    assert set(result["val"]) == {"image", "volume", "signal", "ehr"}
    assert set(result["val"]["image"]) >= {"nodule_present", "ct_lesion_present", "ct_organ", "nodule_where"}
    assert "lesion_where" in result["val"]["volume"]
    assert 0.0 <= result["val"]["ehr"]["fever"] <= 1.0 and result["val"]["signal"]["heart_rate"] >= 0.0
    assert result["steps"] == 12 and result["train_seconds"] > 0 and result["samples_per_s"] > 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [4, 8, 12]
    assert rows[-1]["loss"] < rows[0]["loss"]                                # last window of 4 steps vs first
    assert (tmp_path / "run" / "heads.safetensors").is_file()


def test_resume_from_a_checkpoint_matches_an_uninterrupted_run(build, tmp_path):
    cfg = dict(steps=6, ckpt_every=3, keep_last=0, batch_size=8)
    whole, _ = tiny()
    train_encoders(whole, build, _cfg(build, tmp_path / "a", **cfg), shapes=SHAPES, progress=False)
    first = list_checkpoints(tmp_path / "a")[0]
    assert first.name == "step_000003"
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    shutil.copytree(first, tmp_path / "b" / "checkpoints" / first.name)      # as if stopped after step 3
    resumed, _ = tiny()
    out = train_encoders(resumed, build, _cfg(build, tmp_path / "b", **cfg), shapes=SHAPES, progress=False)
    assert out["steps"] == 6
    a, b = whole.encoders.state_dict(), resumed.encoders.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)

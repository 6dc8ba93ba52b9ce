"""The encoder stage: heads, dense targets, and train_encoders on a tiny model and a small build."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from medmllm.data.dataset import ModalityShapes
from medmllm.data.phantoms.build import build_phantoms
from medmllm.errors import ConfigError, InputError
from medmllm.model.builders import small, tiny
from medmllm.train.checkpoint import list_checkpoints
from medmllm.train.encoder_stage import (EncoderHeads, EncoderStageConfig, MapLayout, boost_factor, boosted,
                                         collate, dense_losses, lesion_boost_map, lesion_voxels, load_items,
                                         map_layouts, pool_features, read_cases, region_box, train_encoders,
                                         voxel_loss)

SHAPES = ModalityShapes(image_size=32, volume_shape=(8, 16, 16), signal_samples=500)


def test_pool_features_masked_mean_and_max_by_hand():
    f = torch.tensor([[[1.0, -2.0], [3.0, 4.0], [100.0, 100.0]],
                      [[-1.0, -5.0], [0.0, 0.0], [0.0, 0.0]]])                 # [2, 3, 2]
    mask = torch.tensor([[True, True, False], [True, False, False]])
    out = pool_features(f, mask)
    assert torch.equal(out, torch.tensor([[2.0, 1.0, 3.0, 4.0], [-1.0, -5.0, -1.0, -5.0]]))
    assert torch.equal(pool_features(f, torch.zeros(2, 3, dtype=torch.bool)), torch.zeros(2, 4))


def test_map_layout_targets_by_hand():
    grid = MapLayout("m", channels=3, rows=2, cols=2)
    boxes = torch.stack([region_box((0.1, 0.6, 0.2, 0.7)),   # inside the top-right quarter
                         region_box((0.7, 0.4, 0.8, 0.6)),   # across the vertical midline, bottom half
                         region_box(()), region_box(None)])
    t = grid.targets(boxes)
    assert t[:3].tolist() == [[0, 1, 0, 0], [0, 0, 1, 1], [0, 0, 0, 0]]
    assert torch.isnan(t[3]).all()
    vol = MapLayout("m", channels=3, rows=2, cols=2, depth=4)
    # slices [0.3, 0.6) -> slices 1 and 2 of 4; the upper-left quarter -> cell 0 of each
    want = [0.0] * 16
    want[1 * 4 + 0] = want[2 * 4 + 0] = 1.0
    assert vol.targets(region_box((0.3, 0.1, 0.1, 0.6, 0.4, 0.4))[None]).tolist() == [want]


def test_map_layout_flatten_orders_depth_rows_cols():
    vol = MapLayout("m", channels=2, rows=2, cols=3, depth=4)
    fmap = torch.randn(5 * 4, 2, 2, 3)                                       # [B * D, C, h, w]
    cells = vol.flatten(fmap, 5)                                             # [B, D*h*w, C]
    assert cells.shape == (5, 24, 2)
    assert torch.equal(cells[3, 2 * 6 + 1 * 3 + 2], fmap[3 * 4 + 2, :, 1, 2])  # item 3, slice 2, row 1, col 2
    tokens = torch.arange(2 * 9 * 3, dtype=torch.float32).view(2, 9, 3)      # 4 slices x 2 tokens + 1
    per_slice = MapLayout("", 3, 1, 1, 4, source="tokens", per_slice=2).flatten(tokens, 2)
    assert torch.equal(per_slice, tokens[:, 1:8:2])                          # max of a slice = its 2nd token
    grid = MapLayout("", 3, 2, 2, source="tokens").flatten(tokens, 2)
    assert torch.equal(grid, tokens[:, :4])
    fmap3d = torch.randn(5, 2, 4, 2, 3)                                     # a 3D stem map [B, C, D, h, w]
    cells3d = vol.flatten(fmap3d, 5)
    assert torch.equal(cells3d[3, 2 * 6 + 1 * 3 + 2], fmap3d[3, :, 2, 1, 2])   # item 3, slice 2, row 1, col 2


def test_map_layouts_of_the_small_and_tiny_encoders():
    model, _ = small()
    shapes = ModalityShapes()
    # small image CNN (width 16, 4 blocks of 6 layers): 128 px -> block outputs at 64, 32, 16 px
    # then its 4 x 4 grid tokens of width 128
    assert map_layouts(model.encoders["image"], "image", shapes) == [
        MapLayout("11", 32, 64, 64), MapLayout("17", 64, 32, 32), MapLayout("23", 128, 16, 16),
        MapLayout("", 128, 4, 4, source="tokens")]
    # small 3D CNN (width 8, 4 levels) on a 32 x 64 x 64 volume: levels 1, 2 and 3 at 16x32x32, 8x16x16
    # and 4x8x8, then its 4 x 2 x 2 grid tokens of width 128
    assert map_layouts(model.encoders["volume"], "volume", shapes) == [
        MapLayout("1", 16, 32, 32, 16), MapLayout("2", 32, 16, 16, 8), MapLayout("3", 64, 8, 8, 4),
        MapLayout("", 128, 2, 2, 4, source="tokens")]
    assert map_layouts(model.encoders["signal"], "signal", shapes) == []
    model, _ = tiny()
    assert map_layouts(model.encoders["image"], "image", SHAPES) == [
        MapLayout("11", 16, 16, 16), MapLayout("", 32, 2, 2, source="tokens")]
    assert not model.encoders["image"].training                               # the probe left eval mode alone


def test_heads_shapes_and_dense_loss_masks_rows_not_applicable():
    lays = [MapLayout("a", channels=5, rows=2, cols=2), MapLayout("b", channels=3, rows=1, cols=1)]
    heads = EncoderHeads({"image": 6}, {"image": {"a": 3, "r": 0}}, dense={"image": ("w",)}, layouts={"image": lays})
    cells = [torch.randn(5, 4, 5), torch.randn(5, 1, 3)]
    out = heads("image", torch.randn(5, 5, 6), torch.ones(5, 5, dtype=torch.bool), cells)
    assert {k: tuple(v.shape) for k, v in out.items() if k != "w"} == {"a": (5, 3), "r": (5, 1)}
    assert [tuple(v.shape) for v in out["w"]] == [(5, 4), (5, 1)]
    boxes = torch.stack([region_box((0.1, 0.6, 0.2, 0.7))] + [region_box(())] * 2 + [region_box(None)] * 2)
    loss = dense_losses({"image": out}, {"image": boxes[:, None]}, heads, {"image": {"w": [3.0, 1.0]}})
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    want = (bce(out["w"][0][:3], torch.tensor([[0.0, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]), pos_weight=torch.tensor(3.0))
            + bce(out["w"][1][:3], torch.tensor([[1.0], [0], [0]]))) / 2
    assert torch.allclose(loss["image"]["w"], want)


def test_class_recall_shows_what_accuracy_hides():
    """A head that answers 'no' to every lesion: accuracy 0.6 on 3 no / 2 yes, recall no 1.0, yes 0.0;
    a three-class task scored per class by hand; NaN labels (task not applicable) are left out."""
    from medmllm.train.encoder_stage import _Scores, _score_batch

    heads = EncoderHeads({"volume": 4}, {"volume": {"lesion_present": 2, "lesion_band": 3}})
    nan = float("nan")
    labels = torch.tensor([[0, nan], [0, nan], [0, nan], [1, 0], [1, 2]])        # [5, tasks]
    present = torch.tensor([[3.0, 0.0]] * 5)                                     # argmax 0 ("no") for all
    band = torch.tensor([[9.0, 0, 0], [9.0, 0, 0], [9.0, 0, 0], [9.0, 0, 0], [0, 9.0, 0]])  # preds 0,0,0,0,1
    scores = _Scores()
    _score_batch(scores, heads, {"volume": {"lesion_present": present, "lesion_band": band}},
                 {"labels": {"volume": labels}})
    metrics, counts = scores.result()
    assert metrics["volume"] == {"lesion_present": 0.6, "lesion_band": 0.5}
    assert counts["volume"] == {"lesion_present": 5, "lesion_band": 2}
    recall = scores.class_recall({"volume": {"lesion_present": ("no", "yes"), "lesion_band": ("low", "mid", "high")}})
    assert recall == {"volume": {"lesion_present": {"no": 1.0, "yes": 0.0}, "lesion_band": {"low": 1.0, "high": 0.0}}}


def test_config_rejects_bad_values():
    with pytest.raises(ConfigError, match="steps"):
        EncoderStageConfig(data="x", steps=0)
    with pytest.raises(ConfigError, match="lr"):
        EncoderStageConfig(data="x", lr=0.0)
    with pytest.raises(ConfigError, match="lesion_boost"):
        EncoderStageConfig(data="x", lesion_boost=0.5)
    with pytest.raises(ConfigError, match="lesion_boost"):
        EncoderStageConfig(data="x", lesion_boost=4.0, lesion_boost_hold=0.9, lesion_boost_until=0.5)


def test_boost_factor_holds_then_falls_linearly_to_one():
    f = [boost_factor(s, 10, 5.0, 0.4, 0.8) for s in range(10)]
    assert f == pytest.approx([5, 5, 5, 5, 5, 4, 3, 2, 1, 1])
    assert boost_factor(3, 10, 1.0, 0.4, 0.8) == 1.0
    assert boost_factor(0, 10, 3.0, 0.0, 0.0) == 1.0                      # no hold, no ramp: off from step 0


def test_boosted_adds_the_scaled_map_clamps_and_leaves_other_kinds():
    x = {"volume": torch.tensor([[0.5, 0.95, 0.1]]), "image": torch.ones(2)}
    out = boosted(x, {"volume": torch.tensor([[0.1, 0.1, -0.2]])}, 3.0)
    assert torch.allclose(out["volume"], torch.tensor([[0.7, 1.0, 0.0]]))
    assert out["image"] is x["image"]
    assert boosted(x, {"volume": torch.ones(1, 3)}, 1.0) is x


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
    recall = result["val_class_recall"]
    assert set(recall["image"]["nodule_present"]) <= {"no", "yes"} and "heart_rate" not in recall["signal"]
    assert all(0.0 <= r <= 1.0 for tasks in recall.values() for per in tasks.values() for r in per.values())
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


# ----------------------------------------------------------------------------- the recipe (CLI)

def test_encoder_recipe_from_the_cli_trains_the_encoders_and_saves_the_model(build, tmp_path):
    """`medmllm train recipes/encoder.yaml` (tiny model, a few steps): the saved model differs from a fresh
    build of the same seed in its encoders only, and reloads."""
    from pathlib import Path

    from typer.testing import CliRunner

    from medmllm.cli import app
    from medmllm.model.mllm import MedMLLM

    recipe = Path(__file__).resolve().parents[2] / "recipes" / "encoder.yaml"
    run_dir = tmp_path / "enc"
    args = ["train", str(recipe), f"data={build}", f"run_dir={run_dir}", "model.builder=tiny", "steps=4",
            "batch_size=8", "eval_split=train"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output[res.output.index("{"):])
    assert summary["stage"] == "encoder" and summary["steps"] == 4 and set(summary["val"]) >= {"image", "signal"}
    trained, fresh = MedMLLM.from_pretrained(run_dir / "model"), tiny()[0]
    t, f = trained.state_dict(), fresh.state_dict()
    changed = {k.split(".")[0] for k in t if not torch.equal(t[k], f[k])}
    assert changed == {"encoders"}
    assert (run_dir / "encoder_metrics.json").is_file() and (run_dir / "config.yaml").is_file()


def test_encoder_recipe_errors_come_before_training(build, tmp_path):
    from pathlib import Path

    from typer.testing import CliRunner

    from medmllm.cli import app

    recipe = Path(__file__).resolve().parents[2] / "recipes" / "encoder.yaml"
    runner = CliRunner()
    res = runner.invoke(app, ["train", str(recipe), f"data={build}", f"run_dir={tmp_path / 'a'}", "stepz=3"])
    assert res.exit_code != 0 and "stepz" in res.output and not (tmp_path / "a").exists()
    res = runner.invoke(app, ["train", str(recipe), f"data={tmp_path / 'nowhere'}", f"run_dir={tmp_path / 'b'}"])
    assert res.exit_code != 0 and "cases.jsonl" in res.output and not (tmp_path / "b").exists()


# ----------------------------------------------------------------------------- contrast curriculum

def test_lesion_boost_map_redraws_the_lesion_of_the_truth(build):
    """Only lesion volumes get a map; it covers the truth's lesion voxels and, per channel, equals the
    windowed change of adding the lesion's HU difference once more (checked on the liver window)."""
    import numpy as np

    from medmllm.data.dataset import PartLoader
    from medmllm.data.preprocess import multi_window_rgb

    shapes = ModalityShapes(volume_window="multi")
    cases = [c for c in read_cases(build) if c["modality"] == "ct3d"]
    items = load_items(build, cases, ["volume"], PartLoader(shapes), boost=True)
    with_lesion = [(c, it) for c, it in zip(cases, items) if c["truth"]["findings"]["lesion"]["present"]]
    assert with_lesion and all(it.boost is None for c, it in zip(cases, items)
                               if not c["truth"]["findings"]["lesion"]["present"])
    case, item = with_lesion[0]
    assert item.boost.shape == item.tensor.shape == (3, *shapes.volume_shape)
    les = case["truth"]["findings"]["lesion"]
    changed = item.boost.abs().sum(0) > 0
    assert 0 < int(changed.sum()) < changed.numel() // 20
    # the same change, made in HU: twice the delta inside the lesion's voxels, then windowed
    hu = np.zeros(shapes.volume_shape, np.float32) + 60.0
    ref = multi_window_rgb(hu, shapes.volume_windows)[..., 1]
    twice = multi_window_rgb(hu + les["hu_delta"] * changed.numpy(), shapes.volume_windows)[..., 1]
    assert torch.allclose(torch.from_numpy(ref) + item.boost[1], torch.from_numpy(twice), atol=1e-5)
    # a volume-only batch carries the maps, shaped as its inputs
    batch = collate(items[:6])
    assert batch["boost"]["volume"].shape == batch["inputs"]["volume"].shape


def test_train_encoders_with_the_curriculum_changes_only_the_volume_encoder(build, tmp_path):
    a, _ = tiny()
    b, _ = tiny()
    ra = train_encoders(a, build, _cfg(build, tmp_path / "a", steps=4, eval_split="validation"), shapes=SHAPES,
                        progress=False)
    rb = train_encoders(b, build, _cfg(build, tmp_path / "b", steps=4, eval_split="validation", lesion_boost=6.0),
                        shapes=SHAPES, progress=False)
    va, vb = a.encoders["volume"].state_dict(), b.encoders["volume"].state_dict()
    assert any(not torch.equal(va[k], vb[k]) for k in va)                 # the boosted volumes trained differently
    ia, ib = a.encoders["image"].state_dict(), b.encoders["image"].state_dict()
    assert all(torch.equal(ia[k], ib[k]) for k in ia)                      # other kinds untouched by it
    assert ra["steps"] == rb["steps"] == 4


# ----------------------------------------------------------------------------- voxel loss

def test_lesion_voxels_are_where_the_lesion_twin_differs(build):
    """A lesion volume and its counterfactual twin (same case, lesion removed) differ exactly on the
    voxels :func:`lesion_voxels` marks; the twin's mask is empty; non-CT cases have none."""
    from medmllm.data.dataset import PartLoader

    shapes = ModalityShapes(volume_window="multi")
    cases = read_cases(build)
    by_id = {c["case_id"]: c for c in cases}
    pairs = [(by_id[c["counterfactual_of"]], c) for c in cases
             if c["modality"] == "ct3d" and c.get("counterfactual_of") in by_id]
    assert pairs
    checked = 0
    for a, b in pairs:
        la, lb = a["truth"]["findings"]["lesion"]["present"], b["truth"]["findings"]["lesion"]["present"]
        if la == lb:
            continue
        with_lesion, without = (a, b) if la else (b, a)
        items = load_items(build, [with_lesion, without], ["volume"], PartLoader(shapes), voxels=True)
        differs = (items[0].tensor - items[1].tensor).abs().sum(0) > 1e-3              # [D, H, W]
        marked = lesion_voxels(with_lesion, items[0].tensor.shape)[0] > 0.5
        assert int(differs.sum()) > 0 and torch.equal(differs, marked)
        assert torch.equal(items[0].voxels.float() / 255, lesion_voxels(with_lesion, items[0].tensor.shape))
        assert not lesion_voxels(without, items[1].tensor.shape).any()
        checked += 1
    assert checked
    other = next(c for c in cases if c["modality"] != "ct3d")
    assert lesion_voxels(other, (1, 8, 16, 16)) is None


def test_voxel_loss_by_hand_skips_unlabelled_rows():
    logits = torch.zeros(3, 1, 2, 2, 2)
    voxels = torch.zeros(3, 1, 4, 4, 4)
    voxels[0, 0, :2, :2, :2] = 1.0                                   # one whole half-resolution voxel of 8
    voxels[2] = math.nan                                             # row 2: not labelled
    # balanced BCE at p = 0.5: log 2 over the lesion voxel + log 2 over the 15 others;
    # Dice over the 2 labelled rows: p sums to 8, target to 1
    want = 2 * math.log(2) + 1 - (2 * 0.5 + 1) / (8 + 1 + 1)
    assert voxel_loss(logits, voxels, lesion_weight=1.0).item() == pytest.approx(want, rel=1e-6)
    assert voxel_loss(logits[2:], voxels[2:]) is None
    # a confident right answer costs far less than a confident wrong one
    right = torch.full((1, 1, 2, 2, 2), -8.0)
    right[0, 0, 0, 0, 0] = 8.0
    assert voxel_loss(right, voxels[:1]) < 0.05 < voxel_loss(-right, voxels[:1])


def test_voxel_loss_weighs_lesion_and_background_voxels_as_classes():
    # 1 lesion voxel of 64 at logit 0 among confident background: the lesion term is log 2 whatever
    # the count of background voxels (a plain mean would give it 1/64 of that)
    voxels = torch.zeros(1, 1, 4, 4, 4)
    voxels[0, 0, 0, 0, 0] = 1.0
    logits = torch.full((1, 1, 4, 4, 4), -30.0)
    logits[0, 0, 0, 0, 0] = 0.0
    dice = 1 - (2 * 0.5 + 1) / (0.5 + 1 + 1)
    assert voxel_loss(logits, voxels, lesion_weight=1.0).item() == pytest.approx(math.log(2) + dice, abs=1e-6)
    # the default weighs the lesion voxels' mean 0.1 (a calibrated background: README)
    assert voxel_loss(logits, voxels).item() == pytest.approx(0.1 * math.log(2) + dice, abs=1e-6)
    # soft targets: a voxel half inside the lesion counts half to each class; by hand at logit 0
    soft = torch.zeros(1, 1, 1, 1, 2)
    soft[0, 0, 0, 0, 0] = 0.5
    want = (0.5 * math.log(2)) / 0.5 + (0.5 * math.log(2) + math.log(2)) / 1.5 + 1 - (2 * 0.25 + 1) / (1.0 + 0.5 + 1)
    assert voxel_loss(torch.zeros(1, 1, 1, 1, 2), soft, lesion_weight=1.0).item() == pytest.approx(want, rel=1e-6)
    # no lesion voxel in the batch: background term and Dice only (no division by zero)
    empty = voxel_loss(torch.zeros(1, 1, 1, 1, 2), torch.zeros(1, 1, 1, 1, 2))
    assert empty.item() == pytest.approx(math.log(2) + 1 - 1 / (1.0 + 1), rel=1e-6)


def _decoder_model():
    from medmllm.model.encoders.volume import CNNVolumeEncoder

    model, _ = tiny()
    torch.manual_seed(0)
    model.encoders["volume"] = CNNVolumeEncoder(in_channels=1, width=2, depth=3, out_dim=16, grid=(2, 2, 2),
                                                decoder=True)
    return model


def test_train_encoders_voxel_loss_trains_the_decoder_and_extra_builds_add_cases(build, tmp_path):
    a, b = _decoder_model(), _decoder_model()
    start = {k: v.clone() for k, v in a.encoders["volume"].state_dict().items()}
    kw = dict(steps=4, kinds=["volume"], eval_split="validation")
    ra = train_encoders(a, build, _cfg(build, tmp_path / "a", voxel_weight=0.0, **kw), shapes=SHAPES, progress=False)
    rb = train_encoders(b, build, _cfg(build, tmp_path / "b", voxel_weight=5.0, extra_data=[str(build)], **kw),
                        shapes=SHAPES, progress=False)
    head_a, head_b = a.encoders["volume"].voxel_head.weight, b.encoders["volume"].voxel_head.weight
    assert not torch.equal(head_a, start["voxel_head.weight"])          # the tokens' tasks reach it too
    assert not torch.equal(head_a, head_b)                               # the voxel loss changes what it learns
    n_ct3d = sum(c["modality"] == "ct3d" for c in read_cases(build))
    assert rb["train_cases"] == ra["train_cases"] + n_ct3d              # every split of the extra build
    with pytest.raises(InputError, match="cases.jsonl"):
        train_encoders(_decoder_model(), build, _cfg(build, tmp_path / "c", extra_data=[str(tmp_path / "none")], **kw),
                       shapes=SHAPES, progress=False)
    assert not (tmp_path / "c").exists()
    with pytest.raises(ConfigError, match="voxel_weight"):
        EncoderStageConfig(data="x", voxel_weight=-1.0)
    with pytest.raises(ConfigError, match="voxel_lesion_weight"):
        EncoderStageConfig(data="x", voxel_lesion_weight=0.0)

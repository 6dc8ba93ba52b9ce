"""scripts/volume_heldout.py: the summary by hand, and the scores of a tiny volume encoder with a decoder."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "volume_heldout.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("volume_heldout", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _case(organ):
    return {"truth": {"findings": {"lesion": {"organ": organ} if organ else {}}}}


def test_summary_by_hand(script):
    cases = [_case("kidney"), _case("kidney"), _case("lung"), _case(None), _case(None)]
    scores = [2.0, -1.0, 0.5, -2.0, 0.5]
    out = script.summarise(cases, scores)
    # calls at 0: yes, no, yes, no, yes -> right: 1, 0, 1, 1, 0
    assert out["right"] == 3 and out["accuracy"] == pytest.approx(0.6)
    # positives 2, -1, 0.5 against negatives -2, 0.5: pairs won 2 + 1 + 1.5 (0.5 vs 0.5 ties) = 4.5 of 6
    assert out["auc"] == pytest.approx(4.5 / 6)
    assert out["by_organ"] == {"kidney": {"right": 1, "n": 2}, "lung": {"right": 1, "n": 1},
                               "none": {"right": 1, "n": 2}}
    assert script.summarise(cases, scores, threshold=1.0)["right"] == 3   # yes, no, no, no, no


def test_scores_come_from_the_voxel_logits_of_each_volume(script, tmp_path):
    import torch

    from medmllm.data.phantoms.build import build_phantoms
    from medmllm.errors import InputError
    from medmllm.model.builders import small

    build = tmp_path / "ct3d"
    build_phantoms(build, 4, seed=3, workers=1, modalities=["ct3d"], progress=False)
    model, _ = small(modalities=("volume",))
    cases, scores = script.volume_scores(model, build, batch=3)
    assert len(cases) == len(scores) >= 4
    from medmllm.data.dataset import PartLoader
    from medmllm.model.inspect import modality_shapes_for
    from medmllm.train.encoder_stage import load_items

    item = load_items(build, cases[:1], ["volume"], PartLoader(modality_shapes_for(model), cache_items=0))[0]
    with torch.no_grad():
        want = model.encoders["volume"](item.tensor[None]).aux["voxel_logits"].max().item()
    assert scores[0] == pytest.approx(want, rel=1e-5, abs=1e-5)
    model_img, _ = small(modalities=("image",))
    with pytest.raises(InputError, match="volume encoder"):
        script.volume_scores(model_img, build)

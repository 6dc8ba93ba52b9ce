"""Every recipe YAML the README points at parses into its stage's config (no unknown key, valid values)."""

from pathlib import Path

import pytest

from medmllm.config import load_config, read_yaml

RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("*.yaml"))


def _schema(stage):
    from medmllm.train.distill import DistillConfig
    from medmllm.train.dpo import DPOConfig
    from medmllm.train.encoder_stage import EncoderRecipe
    from medmllm.train.grpo import GRPOConfig
    from medmllm.train.sft import SFTConfig

    return {"alignment": SFTConfig, "instruction": SFTConfig, "dpo": DPOConfig, "grpo": GRPOConfig,
            "distill": DistillConfig, "encoder": EncoderRecipe}[stage]


def test_the_recipes_folder_has_every_stage():
    stages = {read_yaml(p)["stage"] for p in RECIPES}
    assert {"encoder", "alignment", "instruction", "dpo", "grpo", "distill"} <= stages


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_parses(path):
    stage = read_yaml(path)["stage"]
    cfg = load_config(path, [], schema=_schema(stage))
    assert cfg.stage == stage and cfg.run_dir.startswith("runs/")
    if stage == "encoder":                                   # the encoder stage's keys are flat
        assert load_config(path, ["steps=7"], schema=_schema(stage)).steps == 7
        return
    override = load_config(path, ["train.max_steps=7"], schema=_schema(stage))
    assert override.train.max_steps == 7

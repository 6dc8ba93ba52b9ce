"""Shared fixtures of the evaluation tests: a 16-case X-ray MedPhantom build, a saved tiny image model
and a task YAML over the build's train split, built once per session."""

from functools import partial
from pathlib import Path

import pytest

TASK_YAML = """\
name: phantom_xray_train
version: 1
description: MedPhantom x-ray questions of the train split (test fixture)
data:
  source: medphantom
  records: medphantom/records/train.jsonl
  manifest: medphantom/records/manifest.json
  split: train
prompt:
  template: "{question}"
generation:
  max_new_tokens: 4
protocols: [exact, llava-med, mcq]
filters:
  modality: [xray]
  answer_types: [closed, open, choice]
"""


def _shared(tmp_path_factory, model: bool = True) -> tuple[Path, Path, Path]:
    """(data root with a 16-case x-ray MedPhantom build, saved tiny image model, task YAML), built once per
    session."""
    root = tmp_path_factory.getbasetemp() / "eval_shared"
    data, model_dir, task = root / "data", root / "model", root / "tasks" / "phantom_xray_train.yaml"
    if not (data / "medphantom" / "records" / "manifest.json").exists():
        from medmllm.data.phantoms.build import build_phantoms

        build_phantoms(data / "medphantom", 16, seed=0, workers=1, modalities=["xray"], progress=False)
    if model and not (model_dir / "config.json").exists():
        from medmllm.model.builders import tiny

        net, tok = tiny(modalities=["image"], seed=0)
        net.save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
    if not task.exists():
        task.parent.mkdir(parents=True, exist_ok=True)
        task.write_text(TASK_YAML, encoding="utf-8")
    return data, model_dir, task


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return _shared(tmp_path_factory)


@pytest.fixture(scope="session")
def shared_env(tmp_path_factory):
    """``shared_env(model=True)`` -> the same (data root, model folder, task YAML) as ``env``."""
    return partial(_shared, tmp_path_factory)


@pytest.fixture(scope="session")
def task_yaml() -> str:
    return TASK_YAML

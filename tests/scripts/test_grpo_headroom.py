"""scripts/grpo_headroom.py: the shares by hand, and a run on a tiny model whose numbers must hang together."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "grpo_headroom.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("grpo_headroom", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_shares_by_hand(script):
    rows = [{"template": "a", "greedy": 1.0, "samples": [1.0, 1.0, 1.0]},     # all right: not mixed
            {"template": "a", "greedy": 0.0, "samples": [0.0, 1.0, 0.0]},     # mixed
            {"template": "b", "greedy": 0.0, "samples": [0.0, 0.0, 0.0]},     # all wrong: not mixed
            {"template": "b", "greedy": 1.0, "samples": [1.0, 0.0, 1.0]}]     # mixed
    out = script.summarise(rows)
    assert out["a"] == pytest.approx({"n": 2, "greedy": 0.5, "per_sample": (1 + 1 / 3) / 2, "pass_at_k": 1.0,
                                      "mixed": 0.5})
    assert out["b"] == pytest.approx({"n": 2, "greedy": 0.5, "per_sample": (0 + 2 / 3) / 2, "pass_at_k": 0.5,
                                      "mixed": 0.5})
    assert out["all"] == pytest.approx({"n": 4, "greedy": 0.5, "per_sample": 0.5, "pass_at_k": 0.75, "mixed": 0.5})


def test_a_run_on_a_tiny_model_writes_a_consistent_summary(script, tmp_path_factory, tmp_path):
    from medmllm.data.phantoms.build import build_phantoms
    from medmllm.data.phantoms.reasoning import build_reasoning
    from medmllm.model.builders import tiny

    build = tmp_path_factory.getbasetemp() / "medphantom40_seed0"   # shared by the modules of a session (cached)
    build_phantoms(build, 40, seed=0, workers=1, progress=False)
    build_reasoning(build, seed=0)
    model, tok = tiny()
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    records = build / "records" / "reasoning_train.jsonl"
    args = ["--model", str(tmp_path / "model"), "--records", str(records), "--limit", "6", "--samples", "3",
            "--temperature", "1.5", "--out", str(tmp_path / "headroom.json")]
    result = script.main(args)
    assert json.loads((tmp_path / "headroom.json").read_text()) == json.loads(json.dumps(result))
    summary = result["summary"]
    assert summary["all"]["n"] == 6                                   # every record fits the collator's 1024
    assert sum(s["n"] for name, s in summary.items() if name != "all") == 6
    for s in summary.values():
        assert 0.0 <= s["mixed"] <= s["pass_at_k"] <= 1.0
        assert s["per_sample"] <= s["pass_at_k"]
    assert script.main(args)["summary"] == summary                   # seeded: the same samples again

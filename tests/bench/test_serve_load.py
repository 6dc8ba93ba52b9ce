"""bench/serve_load.py's baselines (behaviour, never speed): both sequential baselines answer with exactly
``max_tokens`` new tokens per request, so their token counts compare with the server's."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def bench_model(tmp_path_factory, bench_script):
    bench = bench_script("serve_load")
    out = tmp_path_factory.mktemp("serve_load") / "llava"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        params = bench.build_model(out, "llava")
    finally:
        torch.set_num_threads(threads)
    return bench, out, params


def test_build_model_saves_and_exports(bench_model):
    _, out, params = bench_model
    assert (out / "config.json").is_file() and (out / "hf_llava" / "config.json").is_file()
    assert params["image_tokens"] == 64 and 0 < params["llm"] < params["total"]


@pytest.mark.parametrize("side", ["hf", "medmllm"])
def test_baseline_answers_run_to_max_tokens(bench_model, side, tmp_path):
    bench, out, _ = bench_model
    png = bench.phantom_png()
    answer = bench.hf_answer(out / "hf_llava", png, 5) if side == "hf" else \
        bench.medmllm_answer(out, png, 5, tmp_path)
    r = bench.sequential(answer, duration=0.3)
    assert r["requests"] >= 1
    assert r["completion_tokens"] == 5 * r["requests"]       # end-of-turn never chosen: every answer is full


def test_bracketed_runs_every_baseline_before_and_after_the_level(bench_script):
    bench = bench_script("serve_load")
    calls = []

    def answer_for(name):
        def answer(i):
            calls.append(name)
            return 3
        return answer

    result, base = bench.bracketed({"a": answer_for("a"), "b": answer_for("b")}, 0.08,
                                   lambda: calls.append("level") or {"tokens_per_s": 1.0})
    assert result == {"tokens_per_s": 1.0}
    level = calls.index("level")
    assert {"a", "b"} <= set(calls[:level]) and {"a", "b"} <= set(calls[level + 1:])
    for name in "ab":
        b = base[name]
        assert b["combined"]["requests"] == b["before_load"]["requests"] + b["after_load"]["requests"]
        assert b["combined"]["completion_tokens"] == 3 * b["combined"]["requests"]


def test_unknown_model_kind_is_refused(tmp_path, bench_script):
    with pytest.raises(SystemExit, match="--model"):
        bench_script("serve_load").build_model(tmp_path / "x", "vicuna")

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
def test_baseline_answers_run_to_max_tokens(bench_model, side):
    bench, out, _ = bench_model
    png = bench.phantom_png()
    run = bench.hf_baseline if side == "hf" else bench.medmllm_baseline
    path = out / "hf_llava" if side == "hf" else out
    r = run(path, png, max_tokens=5, duration=0.3)
    assert r["requests"] >= 1
    assert r["completion_tokens"] == 5 * r["requests"]       # end-of-turn never chosen: every answer is full


def test_unknown_model_kind_is_refused(tmp_path, bench_script):
    with pytest.raises(SystemExit, match="--model"):
        bench_script("serve_load").build_model(tmp_path / "x", "vicuna")

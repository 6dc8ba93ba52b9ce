"""The decode loop's ceiling: milliseconds per step of the serving loop as the batch grows.

The server's throughput at N clients is bounded by N rows / (time of one decode step with N rows),
before any prefill, media loading or HTTP. This measures that step on the model ``serve_load.py``
serves by default (``build_model(..., "llava")``: SigLIP tower -> MLP -> 4-layer Llama, untrained,
end-of-turn logits pinned at 0 so every row runs to ``--tokens``): N copies of the same image request
are prepared by the engine, collated and run through ``medmllm.serve.decode.run_batch`` (no
admissions), timed over the whole batch, ``--repeats`` times; the median is kept. ``tokens_per_s`` =
N x tokens / time; ``ceiling_vs_1_row`` = that over the 1-row figure of the same run: the most a
batched server can gain over one-at-a-time decoding of the same model, when it does nothing but decode.

Two KV caches, in alternating runs: ``growing`` (the server's: :class:`medmllm.serve.decode.GrowingLayer`
appends each step's position in place) and ``dynamic`` (``transformers``' ``DynamicLayer``, which
concatenates the whole cache every step); ``growing_vs_dynamic`` is the median over repeats of the
per-repeat tokens/s ratio (the two runs of a repeat see the same machine load).

Two forwards, in alternating runs with the growing cache: ``written`` (the server's: the Llama LLM's decode step
and prefill written out, :mod:`medmllm.serve.llama_step`, with the weights the engine packs for inputs of 4
rows or more) and ``library`` (``transformers``' forward); ``written_vs_library`` is the median per-repeat
tokens/s ratio.

``--compile`` repeats the steps with ``torch.compile(model.llm, dynamic=True)`` (needs a C++ compiler;
the first call compiles for tens of seconds and is not timed).

    python bench/decode_step.py [--rows 1,2,4,8,16,32] [--tokens 64] [--repeats 5] [--compile]

Results -> bench/results/decode_step.json. One torch thread (as serve_load.py).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def _time_rows(engine, messages, rows: int, tokens: int) -> tuple[float, int]:
    """Seconds to decode ``rows`` prepared copies of ``messages`` for ``tokens`` tokens, and the steps run."""
    from medmllm.serve.decode import Row, run_batch
    from medmllm.serve.engine import SamplingParams

    prepared = [engine.prepare(messages, SamplingParams(max_tokens=tokens)) for _ in range(rows)]
    decode = lambda ids: engine._worker_tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    batch = engine.collate(prepared)                                          # as the worker builds it
    out = [Row(p.params, decode, stream=False) for p in prepared]
    stats: dict = {}
    t0 = time.perf_counter()
    run_batch(engine.model, engine._worker_tokenizer, batch, out, stats=stats)
    dt = time.perf_counter() - t0
    if any(r.steps != tokens for r in out):
        raise RuntimeError(f"rows ended early: {[r.steps for r in out]} (expected {tokens} each)")
    return dt, stats.get("decode_steps", 0)


def use_cache(kind: str) -> None:
    """``growing`` (the server's GrowingLayer) or ``dynamic`` (transformers' DynamicLayer, left as it is)."""
    import medmllm.serve.decode as decode

    if not hasattr(decode, "_real_grow_in_place"):
        decode._real_grow_in_place = decode._grow_in_place
    decode._grow_in_place = decode._real_grow_in_place if kind == "growing" else (lambda cache: None)


def use_forward(kind: str) -> None:
    """``written`` (the server's: :func:`medmllm.serve.llama_step.decode_step` for a Llama LLM) or ``library``
    (``transformers``' forward for every step)."""
    import types

    import medmllm.serve.decode as decode
    from medmllm.serve import llama_step

    off = types.SimpleNamespace(supports=lambda llm: False, decode_step=llama_step.decode_step)
    decode.llama_step = llama_step if kind == "written" else off


def _use(kind: str) -> None:
    (use_cache if kind in ("growing", "dynamic") else use_forward)(kind)


def _summary(times: list, rows: int, tokens: int) -> dict:
    dt = statistics.median(t for t, _ in times)
    return {"rows": rows, "seconds": round(dt, 4), "ms_per_step": round(dt / max(times[0][1], 1) * 1e3, 3),
            "tokens_per_s": round(rows * tokens / dt, 1)}


def measure(engine, messages, rows_list: list[int], tokens: int, repeats: int, kinds=("growing", "dynamic")) -> dict:
    """{kind: {rows_N: summary}} and, with two kinds ``a, b``, ``a_vs_b`` {rows_N: tokens/s ratio, median over
    repeats}; the kinds alternate. Kinds: ``growing``/``dynamic`` (KV cache), ``written``/``library`` (forward)."""
    _time_rows(engine, messages, 1, 4)                                       # warm-up
    out: dict = {k: {} for k in kinds}
    ratios = {}
    for rows in rows_list:
        times: dict = {k: [] for k in kinds}
        for r in range(repeats):
            for kind in (kinds if r % 2 == 0 else kinds[::-1]):
                _use(kind)
                times[kind].append(_time_rows(engine, messages, rows, tokens))
        for kind in kinds:
            out[kind][f"rows_{rows}"] = _summary(times[kind], rows, tokens)
        line = ", ".join(f"{k} {out[k][f'rows_{rows}']['ms_per_step']} ms/step" for k in kinds)
        if len(kinds) == 2:
            a, b = kinds
            per_repeat = [tb / ta for (ta, _), (tb, _) in zip(times[a], times[b])]     # tokens/s of a over b
            ratios[f"rows_{rows}"] = round(statistics.median(per_repeat), 3)
            line += f"; {a} vs {b} {ratios[f'rows_{rows}']}x"
        print(f"{rows:>3} rows: {line}", flush=True)
    use_cache("growing")
    use_forward("written")
    for kind in kinds:
        one = out[kind][f"rows_{rows_list[0]}"]["tokens_per_s"]
        for r in out[kind].values():
            r["ceiling_vs_1_row"] = round(r["tokens_per_s"] / one, 2)
    if ratios:
        out[f"{kinds[0]}_vs_{kinds[1]}"] = ratios
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1,2,4,8,16,32")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "decode_step.json")
    args = ap.parse_args()
    import torch

    from medmllm.io import write_json
    from medmllm.serve.engine import Engine
    from serve_load import QUESTIONS, build_model, phantom_png

    torch.set_num_threads(args.threads)
    rows_list = sorted({int(r) for r in args.rows.split(",")} | {1})
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        params = build_model(Path(tmp) / "llava")
        engine = Engine.from_pretrained(Path(tmp) / "llava", max_batch=max(rows_list))
        png = Path(tmp) / "x.png"
        png.write_bytes(phantom_png())
        messages = [{"role": "user", "content": [{"type": "image", "path": str(png)},
                                                 {"type": "text", "text": QUESTIONS[2]}]}]
        results = {"eager": measure(engine, messages, rows_list, args.tokens, args.repeats),
                   "forward": measure(engine, messages, rows_list, args.tokens, args.repeats,
                                      kinds=("written", "library"))}
        if args.compile:
            engine.model.llm = torch.compile(engine.model.llm, dynamic=True)
            print("compiling ...", flush=True)
            _time_rows(engine, messages, 2, 4)
            results["compiled"] = measure(engine, messages, rows_list, args.tokens, args.repeats, kinds=("growing",))
    report = {"benchmark": "decode_step", "unit": "ms per decode step and generated tokens/s of the serving loop alone",
              "model": {"builder": "serve_load.build_model llava (untrained; end-of-turn logits pinned at 0)", "params": params,
                        "request": f"one 128 px PNG + a question, {args.tokens} new tokens per row, greedy"},
              "repeats": args.repeats, "results": results,
              "env": {"torch": torch.__version__, "threads": args.threads, "python": platform.python_version()},
              "wall_seconds": round(time.perf_counter() - t0, 1)}
    write_json(args.out, report)
    print(f"-> {args.out} ({report['wall_seconds']} s)")


if __name__ == "__main__":
    main()

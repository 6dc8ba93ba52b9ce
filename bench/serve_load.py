"""Load on the OpenAI-compatible server: 1, 8 and 32 concurrent clients on loopback vs naive baselines.

The model (``--model llava``, the default): an exportable image-only MedMLLM, as in
bench/train_throughput.py (a SigLIP tower from a config, 128 px, patch 16 -> 64 image tokens, width 192,
4 layers -> MLP projector -> a Llama of width 256, 4 layers) with ``medmllm.model.builders.small``'s
tokenizer; or ``--model small`` (the quickstart's architecture, CNN image encoder, not exportable to
Llava). Untrained: throughput does not depend on the weights. The LM-head rows of the end-of-turn ids are
zeroed (logit exactly 0 while the others spread around 0), so answers run to ``max_tokens`` on every side
and the token counts compare. Saved with ``save_pretrained`` (and, for ``llava``, exported with
``medmllm export``'s ``export_hf_llava``) and served by ``medmllm.serve`` (dynamic batching,
``--max-batch``) in a child process (uvicorn on a free loopback port).

Each load level runs closed-loop clients (threads with keep-alive ``http.client`` connections in this
process) for ``--duration`` seconds: every client sends its next request as soon as the previous one
is answered. A request: a 128 px MedPhantom chest radiograph as a PNG data URL + a question (cycled),
``max_tokens`` new tokens, greedy, non-streaming. The server batches continuously: a request that
arrives while others decode joins them at the next step. Measured: completed requests, generated tokens
(from ``usage``), throughput (tokens/s and requests/s over the wall time until the last answer),
latency p50/p99, error count (non-200 answers and connection errors), the mean number of rows per
decode step and how many requests joined a running batch (engine stats from ``/health``).

Naive baselines, in the same run, one request at a time in this process (no server, no batching), the
same prompts and PNG. The machine's speed drifts (a shared VM: the same baseline has measured 250 and
360 tokens/s minutes apart), so each load level is bracketed by its own baseline runs: every baseline
for ``duration / 4`` seconds just before the level and again just after it (both halves reported), and
the level's ratios are against those two halves together:

- ``hf_generate`` (``--model llava`` only; the issue's baseline): ``transformers``' own
  ``LlavaForConditionalGeneration.generate`` on the exported folder, inputs from its ``LlavaProcessor``
  (the PNG decoded per request), greedy;
- ``medmllm_generate``: ``PartLoader`` -> ``MultimodalCollator`` -> ``medmllm.model.generate.generate_ids``
  (greedy with KV cache), the stricter baseline: the server's own decode code without batching.

``ratio`` = the level's server tokens/s / its bracketing baseline tokens/s, one per baseline.

    python bench/serve_load.py [--model llava|small] [--duration 20] [--clients 1,8,32] [--max-tokens 32]
                               [--threads 1] [--[no-]decode-process] [--prepare-concurrency 1]

``--decode-process`` / ``--no-decode-process``: the server is ``Engine(decode_process=True / False)``; by default
``"auto"``, as ``medmllm serve``: decode steps in a child process (prompts prefilled where requests are prepared)
for the CPU Llama models benchmarked here. ``--prepare-concurrency N``: requests the server prepares at once
(default 1, as ``medmllm serve``).

Results -> bench/results/serve_load.json. One torch thread by default (see
bench/generation_throughput.py: on a shared 2-core machine two OpenMP threads compete badly).
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))     # the other bench scripts, as bench/decode_step.py does

QUESTIONS = ["Is there a pleural effusion?", "Describe the image.", "Is the heart enlarged in this chest x-ray?",
             "What abnormality is seen in this chest x-ray?", "Is there a pneumothorax? Answer with one word.",
             "Findings?"]


def _pin_end_of_turn(model, tok) -> None:
    """Zero the LM-head rows of the end-of-turn ids: their logit is exactly 0, so greedy never picks them."""
    import torch

    with torch.no_grad():
        cfg = model.llm.config.eos_token_id
        eos = {tok.eos_token_id, *(cfg if isinstance(cfg, (list, tuple)) else [cfg])} - {None}
        for i in eos:
            model.llm.lm_head.weight[i] = 0.0


def build_model(out: Path, kind: str = "llava", seed: int = 0) -> dict:
    """The bench model (end-of-turn logits pinned at 0) saved to ``out``; for ``llava`` also exported to
    ``out / "hf_llava"``. Returns its parameter counts."""
    from medmllm.data.tokenizers import build_tokenizer
    from medmllm.model.builders import small

    if kind == "small":
        model, tok = small(seed=seed)
    elif kind == "llava":                                # small's tokenizer (the llama3 BPE), an exportable model
        from train_throughput import build_model as build_llava   # bench/train_throughput.py's exportable builder

        tok = build_tokenizer("llama3")
        model = build_llava(tok, seed=seed)
    else:
        raise SystemExit(f"--model: expected 'llava' or 'small', got {kind!r}")
    _pin_end_of_turn(model, tok)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    if kind == "llava":
        from medmllm.model.export import export_hf_llava

        export_hf_llava(model, tok, out / "hf_llava")
    return {"total": sum(p.numel() for p in model.parameters()),
            "llm": sum(p.numel() for p in model.llm.parameters()),
            "image_tokens": model.num_tokens("image", (3, 128, 128))}


def phantom_png() -> bytes:
    from PIL import Image

    from medmllm.data.phantoms.radiograph import generate_xray

    img, _ = generate_xray(np.random.default_rng(0), size=128)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------- server (child process)

def _serve(model_dir: str, model_id: str, threads: int, max_batch: int, queue_size: int, port_box,
           decode_process: bool | str = False, prepare_concurrency: int = 1) -> None:
    import torch
    import uvicorn

    from medmllm.serve.app import create_app
    from medmllm.serve.engine import Engine

    torch.set_num_threads(threads)
    engine = Engine.from_pretrained(model_dir, max_batch=max_batch, queue_size=queue_size, model_id=model_id,
                                    decode_process=decode_process, prepare_concurrency=prepare_concurrency)
    server = uvicorn.Server(uvicorn.Config(create_app(engine, close_engine_on_shutdown=True), host="127.0.0.1",
                                           port=0, log_level="warning", access_log=False))

    def report_port():
        while not server.started:
            time.sleep(0.05)
        port_box.put(server.servers[0].sockets[0].getsockname()[1])

    threading.Thread(target=report_port, daemon=True).start()
    server.run()


def _get(port: int, path: str) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", path)
    data = json.loads(conn.getresponse().read())
    conn.close()
    return data


# ----------------------------------------------------------------------------- load

def _client(port: int, bodies: list[bytes], t_end: float, out: list, offset: int) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    i = offset
    while time.perf_counter() < t_end:
        body = bodies[i % len(bodies)]
        i += 1
        t0 = time.perf_counter()
        try:
            conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            data = resp.read()
            t1 = time.perf_counter()
            if resp.status == 200:
                out.append((t0, t1, json.loads(data)["usage"]["completion_tokens"], None))
            else:
                out.append((t0, t1, 0, resp.status))
        except (OSError, http.client.HTTPException) as exc:
            out.append((t0, time.perf_counter(), 0, type(exc).__name__))
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    conn.close()


def load_level(port: int, bodies: list[bytes], clients: int, duration: float) -> dict:
    before = _get(port, "/health")["stats"]
    records: list = []
    t_start = time.perf_counter()
    t_end = t_start + duration
    threads = [threading.Thread(target=_client, args=(port, bodies, t_end, records, k)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = _get(port, "/health")["stats"]
    ok = [r for r in records if r[3] is None]
    wall = max((r[1] for r in records), default=t_end) - t_start
    lat = np.array([r[1] - r[0] for r in ok]) * 1000.0
    tokens = sum(r[2] for r in ok)
    steps = after["decode_steps"] - before["decode_steps"]
    rows = after["row_steps"] - before["row_steps"]
    return {"clients": clients, "requests": len(ok), "errors": len(records) - len(ok),
            "error_kinds": sorted({str(r[3]) for r in records if r[3] is not None}),
            "completion_tokens": tokens, "wall_s": round(wall, 2),
            "tokens_per_s": round(tokens / wall, 2), "requests_per_s": round(len(ok) / wall, 3),
            "latency_ms_p50": round(float(np.percentile(lat, 50)), 1) if lat.size else None,
            "latency_ms_p99": round(float(np.percentile(lat, 99)), 1) if lat.size else None,
            "mean_rows_per_decode_step": round(rows / steps, 2) if steps else None,
            "joined_running_batch": after["joined_running_batch"] - before["joined_running_batch"]}


# ----------------------------------------------------------------------------- baseline

def medmllm_answer(model_dir: Path, png: bytes, max_tokens: int, work: Path):
    """``answer(i) -> new tokens`` for request i, unbatched: PartLoader -> collator ->
    medmllm.model.generate.generate_ids (the PNG written once under ``work``, read per request)."""
    from medmllm.data.collate import MultimodalCollator
    from medmllm.data.dataset import PartLoader, RecordDataset
    from medmllm.data.records import make_record, media
    from medmllm.data.tokenizers import load_tokenizer
    from medmllm.model.generate import generate_ids
    from medmllm.model.inspect import modality_shapes_for
    from medmllm.model.mllm import MedMLLM

    model, tok = MedMLLM.from_pretrained(model_dir).eval(), load_tokenizer(model_dir)
    collate = MultimodalCollator(tok, 4096, model.num_tokens, train=False)
    loader = PartLoader(modality_shapes_for(model))
    path = Path(work) / "baseline.png"
    path.write_bytes(png)
    records = [make_record(f"b{i}", [media("image", str(path)), q], None, {"dataset": "bench", "split": "test"})
               for i, q in enumerate(QUESTIONS)]
    ds = RecordDataset(records, loader, base_dir=work)

    def answer(i: int) -> int:
        batch = collate([ds[i % len(ds)]])                # the file is read per request, as the server does
        rows = generate_ids(model, batch, tok, max_new_tokens=max_tokens)
        tok.decode(rows[0], skip_special_tokens=True)
        return len(rows[0])

    return answer


def sequential(answer, duration: float) -> dict:
    """Call ``answer(i) -> new tokens`` for request i = 0, 1, ... until ``duration`` seconds have passed."""
    lat, tokens, i = [], 0, 0
    t_start = time.perf_counter()
    while time.perf_counter() - t_start < duration:
        t0 = time.perf_counter()
        tokens += answer(i)
        lat.append(time.perf_counter() - t0)
        i += 1
    wall = time.perf_counter() - t_start
    lat_ms = np.array(lat) * 1000.0
    return {"requests": i, "completion_tokens": tokens, "wall_s": round(wall, 2),
            "tokens_per_s": round(tokens / wall, 2), "requests_per_s": round(i / wall, 3),
            "latency_ms_p50": round(float(np.percentile(lat_ms, 50)), 1),
            "latency_ms_p99": round(float(np.percentile(lat_ms, 99)), 1)}


def hf_answer(llava_dir: Path, png: bytes, max_tokens: int):
    """``answer(i) -> new tokens`` for request i, unbatched: transformers' LlavaProcessor ->
    LlavaForConditionalGeneration.generate (greedy)."""
    import torch
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(llava_dir).eval()
    processor = AutoProcessor.from_pretrained(llava_dir)
    prompts = [processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
                                             add_generation_prompt=True) for q in QUESTIONS]

    def answer(i: int) -> int:
        image = Image.open(io.BytesIO(png)).convert("RGB")     # decoded per request, as the server does
        inputs = processor(images=image, text=prompts[i % len(prompts)], return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False)
        new = out[0, inputs["input_ids"].shape[1]:]
        processor.decode(new, skip_special_tokens=True)
        return int(new.numel())

    return answer


def combine(a: dict, b: dict) -> dict:
    """Two baseline runs as one (tokens and requests over the summed wall time)."""
    wall = a["wall_s"] + b["wall_s"]
    tokens, reqs = a["completion_tokens"] + b["completion_tokens"], a["requests"] + b["requests"]
    return {"requests": reqs, "completion_tokens": tokens, "wall_s": round(wall, 2),
            "tokens_per_s": round(tokens / wall, 2), "requests_per_s": round(reqs / wall, 3)}


# ----------------------------------------------------------------------------- main

def baseline_answers(kind: str, model_dir: Path, png: bytes, max_tokens: int) -> dict:
    """{baseline name: ``answer(i)``}: ``medmllm_generate`` always, ``hf_generate`` for ``llava``."""
    out = {"medmllm_generate": medmllm_answer(model_dir, png, max_tokens, model_dir)}
    if kind == "llava":
        out["hf_generate"] = hf_answer(model_dir / "hf_llava", png, max_tokens)
    return out


def bracketed(answers: dict, duration: float, run_level) -> tuple[dict, dict]:
    """Every baseline for ``duration / 4`` s, then ``run_level()``, then every baseline again: the level's
    result and {baseline name: {"combined", "before_load", "after_load"}}."""
    before = {name: sequential(a, duration / 4) for name, a in answers.items()}
    result = run_level()
    after = {name: sequential(a, duration / 4) for name, a in answers.items()}
    return result, {name: {"combined": combine(before[name], after[name]), "before_load": before[name],
                           "after_load": after[name]} for name in answers}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llava", choices=["llava", "small"],
                    help="llava: exportable SigLIP model, both baselines; small: the quickstart's architecture")
    ap.add_argument("--duration", type=float, default=20.0, help="seconds per load level (and per baseline)")
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--decode-process", action=argparse.BooleanOptionalAction, default=None,
                    help="the server decodes in a child process (default: where it can, as medmllm serve)")
    ap.add_argument("--prepare-concurrency", type=int, default=1,
                    help="requests the server prepares (loads, encodes, prefills) at the same time")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "serve_load.json")
    args = ap.parse_args()
    import torch

    from medmllm.io import write_json

    torch.set_num_threads(args.threads)
    levels = [int(c) for c in args.clients.split(",")]
    t0 = time.perf_counter()
    load_before = os.getloadavg()
    png = phantom_png()
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    bodies = [json.dumps({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                                     {"type": "text", "text": q}]}],
                          "max_tokens": args.max_tokens, "temperature": 0}).encode() for q in QUESTIONS]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / args.model
        params = build_model(model_dir, args.model)
        answers = baseline_answers(args.model, model_dir, png, args.max_tokens)
        for a in answers.values():
            a(0)                                                           # warm-up
        ctx = mp.get_context("spawn")
        port_box = ctx.Queue()
        proc = ctx.Process(target=_serve, args=(str(model_dir), args.model, args.threads, args.max_batch,
                                                4 * max(levels), port_box,
                                                "auto" if args.decode_process is None else args.decode_process,
                                                args.prepare_concurrency), daemon=True)
        proc.start()
        try:
            port = port_box.get(timeout=300)
            load_level(port, bodies[:1], 1, 2.0)                           # warm-up (first calls are slow)
            results = {}
            for c in levels:
                r, base = bracketed(answers, args.duration, lambda: load_level(port, bodies, c, args.duration))
                r["baselines"] = base
                for name, b in base.items():
                    r[f"ratio_tokens_per_s_vs_{name}"] = round(r["tokens_per_s"] / b["combined"]["tokens_per_s"], 2)
                results[f"clients_{c}"] = r
                print(f"{c:>3} clients: {r['tokens_per_s']} tok/s, {r['requests_per_s']} req/s, p50 "
                      f"{r['latency_ms_p50']} ms, p99 {r['latency_ms_p99']} ms, errors {r['errors']}, "
                      f"mean rows per step {r['mean_rows_per_decode_step']}; " + ", ".join(
                          f"{r[f'ratio_tokens_per_s_vs_{n}']}x {n} ({b['combined']['tokens_per_s']} tok/s: "
                          f"{b['before_load']['tokens_per_s']} before, {b['after_load']['tokens_per_s']} after)"
                          for n, b in base.items()), flush=True)
        finally:
            proc.terminate()
            proc.join(10)
            port_box.close()
            port_box.join_thread()
    report = {"benchmark": "serve_load",
              "unit": "generated tokens / s over the wall time; latency per request (ms), loopback HTTP included",
              "model": {"kind": args.model, "params": params, "untrained": True, "end_of_turn_logits": "pinned at 0",
                        "request": f"one 128 px PNG data URL + a question, max_tokens {args.max_tokens}, greedy"},
              "server": {"max_batch": args.max_batch, "queue_size": 4 * max(levels), "batch_window_ms": 5.0,
                         "decode_process": "auto" if args.decode_process is None else args.decode_process,
                         "prepare_concurrency": args.prepare_concurrency},
              "duration_s": args.duration, "results": results,
              "env": {"torch": torch.__version__, "threads": args.threads, "python": platform.python_version(),
                      "cpus": os.cpu_count(), "loadavg_before": [round(x, 2) for x in load_before],
                      "loadavg_after": [round(x, 2) for x in os.getloadavg()]},
              "wall_seconds": round(time.perf_counter() - t0, 1)}
    write_json(args.out, report)
    print(f"-> {args.out} ({report['wall_seconds']} s)")


if __name__ == "__main__":
    main()

"""Generation throughput (new tokens/s): medmllm's generate vs transformers' Llava generate, same weights.

The model: a small SigLIP-like vision tower (112 px, patch 14 -> 64 image tokens, width 192, 4 layers)
-> MLP projector -> a small Llama (width 384, 6 layers, 6 heads / 2 kv heads, MLP 1024), random
weights built from configs, composed as a MedMLLM and exported with
:func:`medmllm.model.export.export_hf_llava`; the exported folder is loaded with plain
``LlavaForConditionalGeneration.from_pretrained``.

Both sides: greedy, the same left-padded prompts and pixels, ``max_new_tokens`` new tokens, KV cache,
prefill (vision tower included) timed. The LM-head rows of the end-of-turn ids are zeroed before the
export (logit exactly 0 while the other logits spread around 0), so no row stops early on either side:
the lengths are equal without ``min_new_tokens`` (whose logits processor would add work to HF's side
only) and the real new tokens are counted and checked equal. Rounds alternate between the two; the
median round time gives the tokens/s; ``ratio_medmllm_over_hf`` is the median over rounds of the
per-round throughput ratio (the two runs of a round see the same machine load), with the ratio of the
medians and of the best rounds next to it. Batch 1 and batch 8.
Results -> bench/results/generation_throughput.json.

    python bench/generation_throughput.py [--rounds 7] [--max-new-tokens 64] [--threads 1]

One torch thread by default: on the shared 2-core CI machine, 2 OpenMP threads competing with other
jobs made every run 10-50x slower and noisy (measured: 32 tokens, batch 1: 0.26 s with 1 thread,
3.5 s with 2). Pass ``--threads 2`` on an idle machine.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

QUESTIONS = ["What is shown?", "Is there a pleural effusion? Answer with one word.",
             "Describe the image.", "Is the heart enlarged in this chest x-ray?",
             "Findings?", "Is there a pneumothorax? Choose one of the options: A, B, C or D.",
             "What abnormality is seen in this chest x-ray?", "Impression?"]
IMAGE = 112


def build(seed: int = 0):
    """The composed MedMLLM (eval) and its tokenizer."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    from medmllm.data.tokenizers import build_tokenizer
    from medmllm.model.builders import build_llm_for, llm_config
    from medmllm.model.encoders.image import HFImageEncoder
    from medmllm.model.mllm import MedMLLM
    from medmllm.model.projectors import MLPProjector

    torch.manual_seed(seed)
    tok = build_tokenizer("llama3")
    tower = SiglipVisionModel(SiglipVisionConfig(hidden_size=192, intermediate_size=768, num_hidden_layers=4,
                                                 num_attention_heads=3, image_size=IMAGE, patch_size=14))
    llm = build_llm_for("llama", llm_config("llama", tok, hidden=384, layers=6, heads=6, kv_heads=2,
                                            intermediate=1024))
    spec = {"name": "mlp", "kwargs": {"in_dim": 192, "out_dim": 384}}
    model = MedMLLM.compose(llm, {"image": HFImageEncoder(tower, feature_layer=-2)}, {"image": MLPProjector(192, 384)},
                            tok, projector_specs={"image": spec})
    with torch.no_grad():
        for name, p in model.llm.named_parameters():        # a spread that gives varied greedy tokens
            if p.ndim == 2:
                p.normal_(0.0, 0.05)
        eos = {tok.eos_token_id, *([llm.config.eos_token_id] if isinstance(llm.config.eos_token_id, int)
                                   else llm.config.eos_token_id or [])}
        for i in eos - {None}:
            model.llm.lm_head.weight[i] = 0.0               # logit 0: never the argmax in practice
    return model.eval(), tok


def batch_for(model, tok, n: int, seed: int = 0) -> dict:
    from medmllm.data.collate import MultimodalCollator
    from medmllm.data.records import make_record, media

    g = torch.Generator().manual_seed(seed)
    exs = [{"record": make_record(f"q{i}", [media("image", "x"), QUESTIONS[i % len(QUESTIONS)]], None,
                                  {"dataset": "bench", "split": "test"}),
            "modalities": [("image", torch.rand(3, IMAGE, IMAGE, generator=g))]} for i in range(n)]
    return MultimodalCollator(tok, 4096, model.num_tokens, train=False)(exs)


def run_medmllm(model, tok, batch, n: int) -> list[list[int]]:
    from medmllm.model.generate import generate_ids

    return generate_ids(model, batch, tok, max_new_tokens=n)


@torch.no_grad()
def run_hf(llava, batch, n: int) -> list[list[int]]:
    seq = llava.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         pixel_values=batch["modality_inputs"]["image"], max_new_tokens=n, do_sample=False)
    eos = llava.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    rows = []
    for row in seq[:, batch["input_ids"].shape[1]:].tolist():
        cut = next((i for i, t in enumerate(row) if t in eos), len(row))
        rows.append(row[:cut])
    return rows


def timed(fn) -> tuple[float, list[list[int]]]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def measure(model, tok, llava, b: int, n: int, rounds: int) -> dict:
    batch = batch_for(model, tok, b)
    ours_fn = lambda: run_medmllm(model, tok, batch, n)                 # noqa: E731
    hf_fn = lambda: run_hf(llava, batch, n)                             # noqa: E731
    ours_tokens, hf_tokens = ours_fn(), hf_fn()                          # warm-up (and the tokens)
    ours_fn(), hf_fn()                                                   # first calls of a shape are slow
    t_ours, t_hf = [], []
    for i in range(rounds):                                              # alternate who goes first
        for side in ((ours_fn, t_ours), (hf_fn, t_hf))[:: 1 if i % 2 == 0 else -1]:
            side[1].append(timed(side[0])[0])
    new_ours, new_hf = sum(map(len, ours_tokens)), sum(map(len, hf_tokens))
    med_ours, med_hf = statistics.median(t_ours), statistics.median(t_hf)
    # per round (the two runs back to back see the same machine load): throughput ratio, then the median
    paired = statistics.median((new_ours / a) / (new_hf / h) for a, h in zip(t_ours, t_hf))
    return {"batch": b, "max_new_tokens": n, "prompt_length": int(batch["input_ids"].shape[1]),
            "new_tokens_medmllm": new_ours, "new_tokens_hf": new_hf, "same_tokens": ours_tokens == hf_tokens,
            "seconds_medmllm": [round(t, 4) for t in t_ours], "seconds_hf": [round(t, 4) for t in t_hf],
            "tokens_per_s_medmllm": round(new_ours / med_ours, 2), "tokens_per_s_hf": round(new_hf / med_hf, 2),
            "best_tokens_per_s_medmllm": round(new_ours / min(t_ours), 2),
            "best_tokens_per_s_hf": round(new_hf / min(t_hf), 2),
            "ratio_medmllm_over_hf": round(paired, 3),
            "ratio_of_medians": round((new_ours / med_ours) / (new_hf / med_hf), 3),
            "ratio_of_best": round((new_ours / min(t_ours)) / (new_hf / min(t_hf)), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: the 2 cores are shared; two OpenMP "
                                                             "threads on a busy core pair spin-wait, 10x+ slower)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "generation_throughput.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import transformers
    from transformers import LlavaForConditionalGeneration

    from medmllm.io import write_json
    from medmllm.model.export import export_hf_llava

    t0 = time.perf_counter()
    model, tok = build()
    with tempfile.TemporaryDirectory() as tmp:
        llava = LlavaForConditionalGeneration.from_pretrained(export_hf_llava(model, tok, Path(tmp) / "llava")).eval()
    results = [measure(model, tok, llava, b, args.max_new_tokens, args.rounds) for b in (1, 8)]
    params = {"vision": sum(p.numel() for p in model.encoders.parameters()),
              "projector": sum(p.numel() for p in model.projectors.parameters()),
              "llm": sum(p.numel() for p in model.llm.parameters())}
    report = {"benchmark": "generation_throughput", "unit": "new tokens / s (median round, prefill included)",
              "model": {"vision": f"SigLIP {IMAGE}px patch 14 width 192 x 4 layers",
                        "llm": "Llama width 384 x 6 layers, 6/2 heads, vocab 512", "params": params,
                        "image_tokens": model.num_tokens("image", (3, IMAGE, IMAGE))},
              "results": {f"batch_{r['batch']}": r for r in results},
              "env": {"torch": torch.__version__, "transformers": transformers.__version__,
                      "threads": torch.get_num_threads(), "python": platform.python_version(),
                      "machine": platform.machine()},
              "rounds": args.rounds, "wall_seconds": round(time.perf_counter() - t0, 1)}
    write_json(args.out, report)
    for r in results:
        print(f"batch {r['batch']}: medmllm {r['tokens_per_s_medmllm']} tok/s, HF Llava {r['tokens_per_s_hf']} tok/s, "
              f"ratio {r['ratio_medmllm_over_hf']} (same tokens: {r['same_tokens']}, "
              f"{r['new_tokens_medmllm']} / {r['new_tokens_hf']} new tokens)")
    print(f"-> {args.out} ({report['wall_seconds']} s)")


if __name__ == "__main__":
    main()

"""Evaluation throughput (records/s) of the in-process backend: batched vs an unbatched loop.

The same untrained ``small`` model (medmllm.model.builders.small: CNN image encoder, slice-wise
volume encoder, ECG transformer, EHR tokenizer, 4-layer width-256 Llama) answers the same
MedPhantom VQA records (every modality, a seeded ``build_phantoms(n, seed=0)``) through
:class:`medmllm.eval.backends.InProcessBackend` twice: ``batch_size=B`` (batched greedy generation)
and ``batch_size=1`` (one record per ``generate`` call: the unbatched loop). Both include file
reading, preprocessing, collation and decoding — what an evaluation spends. The untrained model
rarely stops early, so both sides decode about ``max_new_tokens`` tokens per record; the new
tokens are counted and reported.

Rounds alternate batched and unbatched (both see the same machine load); the ratio reported is
the median over rounds of ``unbatched seconds / batched seconds``, with the medians' ratio beside
it. The fraction of records whose batched and unbatched answers are identical is reported too
(left padding: equal up to float rounding). Results -> bench/results/eval_throughput.json.

    python bench/eval_throughput.py [--n-cases 60] [--records 64] [--batch 16] [--rounds 3]
                                    [--max-new-tokens 16] [--threads 1]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path


def records_for(data: Path, n: int) -> list[dict]:
    """The first ``n`` VQA records (closed/open/choice) of the build, train split first."""
    from medmllm.data.records import read_records

    out: list[dict] = []
    for split in ("train", "validation", "test"):
        recs, _ = read_records(data / "records" / f"{split}.jsonl")
        out += [r for r in recs if r["meta"]["answer_type"] in ("closed", "open", "choice")]
    return out[:n]


def timed(backend, records, base_dir, gen) -> tuple[float, list]:
    t = time.perf_counter()
    answers = backend.answer(records, base_dir, gen)
    return time.perf_counter() - t, answers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-cases", type=int, default=60)
    ap.add_argument("--records", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "eval_throughput.json")
    args = ap.parse_args()

    import torch
    import transformers

    from medmllm.data.phantoms.build import build_phantoms
    from medmllm.eval.backends import InProcessBackend
    from medmllm.io import write_json
    from medmllm.model.builders import small

    torch.set_num_threads(args.threads)
    model, tok = small(seed=0)
    gen = {"max_new_tokens": args.max_new_tokens, "temperature": 0}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "medphantom"
        build_phantoms(data, args.n_cases, seed=0, progress=False)
        recs = records_for(data, args.records)
        base = data / "records"
        batched = InProcessBackend.from_model(model, tok, "small (untrained)", batch_size=args.batch, device="cpu")
        single = InProcessBackend.from_model(model, tok, "small (untrained)", batch_size=1, device="cpu")
        timed(batched, recs[: args.batch], base, gen)  # warm-up: imports, allocator, file cache
        timed(single, recs[:2], base, gen)
        rounds = []
        for _ in range(args.rounds):
            tb, ab = timed(batched, recs, base, gen)
            t1, a1 = timed(single, recs, base, gen)
            rounds.append({"batched_s": round(tb, 3), "unbatched_s": round(t1, 3), "ratio": round(t1 / tb, 3)})
        kinds = sorted({p["type"] for r in recs for m in r["messages"] for p in m["content"] if p["type"] != "text"})

    def new_tokens(answers):
        return sum(len(tok(a or "", add_special_tokens=False)["input_ids"]) for a in answers)

    med_b = statistics.median(r["batched_s"] for r in rounds)
    med_1 = statistics.median(r["unbatched_s"] for r in rounds)
    report = {
        "benchmark": "eval_throughput",
        "model": {"builder": "small", "trained": False, "parameters": sum(p.numel() for p in model.parameters())},
        "data": {"medphantom_cases": args.n_cases, "records": len(recs), "modalities": kinds},
        "settings": {"batch_size": args.batch, "max_new_tokens": args.max_new_tokens, "rounds": args.rounds,
                     "decoding": "greedy"},
        "rounds": rounds,
        "batched": {"median_s": med_b, "records_per_s": round(len(recs) / med_b, 2),
                    "new_tokens": new_tokens(ab)},
        "unbatched": {"median_s": med_1, "records_per_s": round(len(recs) / med_1, 2),
                      "new_tokens": new_tokens(a1)},
        "ratio_batched_over_unbatched": statistics.median(r["ratio"] for r in rounds),
        "ratio_of_medians": round(med_1 / med_b, 3),
        "identical_answers": round(sum(x == y for x, y in zip(ab, a1)) / len(recs), 3),
        "env": {"torch": torch.__version__, "transformers": transformers.__version__, "threads": args.threads,
                "python": platform.python_version(), "machine": platform.machine()},
    }
    write_json(args.out, report)
    print(f"{len(recs)} records, batch {args.batch}: batched {report['batched']['records_per_s']} rec/s, "
          f"unbatched {report['unbatched']['records_per_s']} rec/s -> ratio "
          f"{report['ratio_batched_over_unbatched']}x (identical answers {report['identical_answers']:.0%})")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()

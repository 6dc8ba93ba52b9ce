"""Instruction-stage step time: padded batches vs packed ones (:mod:`medmllm.model.packing`), per attention kernel.

The model is the quickstart's ``small`` (random weights, encoders frozen as in the instruction stage, the
tokenizer trained on the build's texts); the data: shuffled batches of ``--batch-size`` instruction records
(reports left out, as the quickstart does) of a MedPhantom build of ``--n-cases`` cases, collated by
:class:`~medmllm.data.collate.MultimodalCollator`. One step = forward + backward under bf16 autocast on CPU
(what the quickstart's SFT runs), optimizer excluded (the same for every variant).

Variants: ``sdpa`` / ``eager`` attention x ``padded`` / ``packed`` batches. The baseline is ``sdpa padded``
(the model as built, the batch as collated). Rounds run the four variants in turn over the same batches;
each variant's figure is its median over rounds of the mean step time (first batch of a round untimed);
``ratio`` = that over the baseline's (both from the same run). ``loss_equal``: the fp32 loss of the first
batch padded vs packed (the packed loss is the same token mean). ``tokens``: mean padded tokens per batch
(B x L) and mean rows x L once packed.

    python bench/packing.py [--n-cases 600] [--batch-size 32] [--batches 8] [--rounds 3] [--threads 2]

Results -> bench/results/packing.json.
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path

KEYS = ("input_ids", "attention_mask", "labels", "modality_inputs", "modality_batch_index")


def make_batches(build: Path, model, tok, batch_size: int, n: int, seed: int = 0) -> list[dict]:
    from medmllm.data.collate import MultimodalCollator
    from medmllm.data.dataset import PartLoader, RecordDataset
    from medmllm.data.records import read_records
    from medmllm.model.inspect import modality_shapes_for

    base = build / "records"
    recs = [r for r in read_records(base / "train.jsonl")[0] if r["meta"].get("task") != "report"]
    ds = RecordDataset(recs, PartLoader(modality_shapes_for(model)), base_dir=base)
    collate = MultimodalCollator(tok, max_length=256, num_tokens_fn=model.num_tokens)
    rng = random.Random(seed)
    return [collate([ds[i] for i in rng.sample(range(len(ds)), batch_size)]) for _ in range(n)]


def step_time(model, batches: list[dict], pack: bool) -> float:
    import torch

    times = []
    for b in batches:
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**{k: b[k] for k in KEYS if k in b}, **({"pack": True} if pack else {})).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    return statistics.fmean(times[1:])


def token_counts(batches: list[dict]) -> dict:
    """Mean tokens per batch: padded (B x L), packed (rows x L, as ``pack_batch`` plans them) and real."""
    from medmllm.model.packing import plan_rows

    padded, packed = [], []
    for b in batches:
        mask = b["attention_mask"]
        length = mask.shape[1]
        padded.append(mask.numel())
        packed.append(len(plan_rows(mask.sum(1).tolist(), length)) * length)
    return {"padded_per_batch": statistics.fmean(padded), "packed_per_batch": statistics.fmean(packed),
            "real_per_batch": statistics.fmean(float(b["attention_mask"].sum()) for b in batches)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-cases", type=int, default=600)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--batches", type=int, default=8, help="batches per variant and round (the first untimed)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (the quickstart uses every core)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "packing.json"))
    args = ap.parse_args()

    import torch

    from medmllm.data.phantoms.build import build_phantoms
    from medmllm.data.records import read_records
    from medmllm.data.tokenizers import build_tokenizer
    from medmllm.io import write_json
    from medmllm.model.builders import small

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        build = Path(tmp) / "medphantom"
        build_phantoms(build, args.n_cases, seed=0, progress=False)
        texts = [p["text"] for r in read_records(build / "records" / "train.jsonl")[0] for m in r["messages"]
                 for p in m["content"] if p["type"] == "text"]
        tok = build_tokenizer("llama3", corpus=texts, vocab_size=1024)
        model, tok = small(tokenizer=tok)
        model.train()
        model.set_trainable("*", False)
        model.set_trainable("projector.*", True)
        model.set_trainable("llm", True)
        batches = make_batches(build, model, tok, args.batch_size, args.batches)
    b = batches[0]
    with torch.no_grad():
        loss_padded = model(**{k: b[k] for k in KEYS if k in b}).loss.item()
        loss_packed = model(**{k: b[k] for k in KEYS if k in b}, pack=True).loss.item()
    variants = [(attn, pack) for attn in ("sdpa", "eager") for pack in (False, True)]
    runs: dict[str, list[float]] = {}
    for r in range(args.rounds):
        for attn, pack in variants:
            model.llm.set_attn_implementation(attn)
            name = f"{attn} {'packed' if pack else 'padded'}"
            runs.setdefault(name, []).append(step_time(model, batches, pack))
            print(f"round {r} {name}: {runs[name][-1]:.3f} s/step", flush=True)
    base = statistics.median(runs["sdpa padded"])
    result = {
        "config": vars(args), "torch": torch.__version__, "machine": platform.machine(),
        "loss_equal": {"padded": loss_padded, "packed": loss_packed, "abs_diff": abs(loss_padded - loss_packed)},
        "tokens": token_counts(batches),
        "variants": {name: {"s_per_step": statistics.median(v), "ratio": statistics.median(v) / base,
                            "rounds": v} for name, v in runs.items()},
    }
    write_json(Path(args.out), result)
    for name, v in result["variants"].items():
        print(f"{name:14s} {v['s_per_step']:.3f} s/step  ratio {v['ratio']:.2f}")
    print(f"tokens per batch: {result['tokens']}; loss padded {loss_padded:.6f} packed {loss_packed:.6f}")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()

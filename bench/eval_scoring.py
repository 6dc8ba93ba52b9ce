"""Scoring throughput: 100k predictions under all five protocols (llava-med, multimedeval, exact,
f1, mcq) with ``medmllm.eval.protocols.score_all``, against a naive implementation of the same
rules as the baseline.

Data: seeded synthetic VQA items (40% closed yes/no, 35% open short answers, 25% 4-option
choice) with predictions in the forms models produce ("Yes.", "No, there is no effusion.",
"<answer>B</answer>", "The answer is (c)", free text with sizes in mm ...). The fraction of
distinct prediction strings is reported (the caches help in proportion to repeats).

Timings:
* ``cold``: ``score_all`` after every normaliser cache is emptied (the figure that counts);
* ``warm``: the same call again, caches filled;
* ``naive``: the same rules without caches, with the literal LLaVA-Med ``normalize_word``
  (21 regex searches per string), re-normalising per protocol — what a straightforward port
  does. Its per-item results are checked equal to ``score_all``'s before timing is reported.

    python bench/eval_scoring.py [--n 100000] [--seed 0] [--out bench/results/eval_scoring.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import time
from collections import Counter
from pathlib import Path

from medmllm.eval import normalize as N
from medmllm.eval import protocols as P
from medmllm.io import write_json

PROTOCOLS = ["llava-med", "multimedeval", "exact", "f1", "mcq"]
FINDINGS = ["nodule", "effusion", "pneumothorax", "cardiomegaly", "mass", "fracture", "consolidation", "edema"]
SIDES = ["left", "right"]
ORGANS = ["lung", "kidney", "liver", "spleen", "brain", "heart", "colon", "pancreas"]
PLANES = ["axial", "coronal", "sagittal", "oblique"]


def make_items(n: int, seed: int) -> tuple[list[str], list[dict]]:
    rng = random.Random(seed)
    preds, metas = [], []
    for _ in range(n):
        u = rng.random()
        f, side, organ = rng.choice(FINDINGS), rng.choice(SIDES), rng.choice(ORGANS)
        if u < 0.40:
            gold = rng.choice(["yes", "no"])
            pred = rng.choice(["yes", "no", "Yes.", "No.", f"No, there is no {f}.",
                               f"Yes, there is a {f} in the {side} {organ}.",
                               f"There is a {f} measuring {rng.randint(2, 60)} mm.", "not seen",
                               f"<think>looking at the {organ}</think><answer>{gold}</answer>", "normal"])
            metas.append({"dataset": "bench", "answer_type": "closed", "answer": gold})
        elif u < 0.75:
            gold = rng.choice([f"{side} {organ}", organ, f"{f}", f"{side} {organ} {f}", str(rng.randint(1, 5))])
            pred = rng.choice([gold, f"The {gold}.", f"a {f} in the {side} {organ}", organ,
                               f"{rng.choice(['one', 'two', 'three'])} lesions", f"{gold} ({rng.randint(1, 99)} mm)"])
            metas.append({"dataset": "bench", "answer_type": "open", "answer": gold})
        else:
            letter = rng.choice("ABCD")
            k = "ABCD".index(letter)
            pred = rng.choice([letter, f"({letter})", f"Answer: {letter}", f"The answer is ({letter.lower()}).",
                               f"{letter}) {PLANES[k].title()}", PLANES[k], f"I think it is {PLANES[(k + 1) % 4]}.",
                               "A, B", f"<answer>{letter}</answer>"])
            metas.append({"dataset": "bench", "answer_type": "choice", "answer": letter, "choices": list(PLANES)})
        preds.append(pred)
    return preds, metas


# ----------------------------------------------------------------------------- naive baseline

def naive_score(name: str, pred: str, meta: dict) -> dict:
    """The protocols' rules written plainly: no caches, literal LLaVA-Med normaliser."""
    gold = str(meta["answer"])
    lit = N.vqa_normalize_literal
    if name == "llava-med":
        if meta["answer_type"] == "closed":
            hit = int(lit(gold) in lit(pred))
            return {"score": hit, "correct": hit}
        cand, ref = Counter(lit(lit(pred)).split()), Counter(lit(lit(gold)).split())
        if not cand or not ref:
            return {"score": 0.0, "recall": 0.0, "precision": 0.0, "f1": 0.0}
        tp = sum(c for w, c in cand.items() if w in ref)
        if tp == 0:
            return {"score": 0.0, "recall": 0.0, "precision": 0.0, "f1": 0.0}
        fp = sum(c for w, c in cand.items() if w not in ref)
        fn = sum(c for w, c in ref.items() if w not in cand)
        p, r = tp / (tp + fp), tp / (tp + fn)
        return {"score": r, "recall": r, "precision": p, "f1": 2 * p * r / (p + r)}
    if name == "multimedeval":
        ps, gs = set(lit(pred).split()), set(lit(gold).split())
        recall = len(ps & gs) / len(gs) if gs else 0.0
        if lit(gold) in ("yes", "no"):
            if gs == {"no"}:
                gs = {"no", "not"}
            hit = int(len(ps & gs) / len(gs) >= 0.4)
            return {"score": hit, "correct": hit, "recall": recall, "closed": 1}
        hit = int(recall >= 0.75)
        return {"score": hit, "correct": hit, "recall": recall, "closed": 0}
    if name == "exact":
        norm = N._exact_normalize.__wrapped__
        hit = int(norm(pred) == norm(gold))
        return {"score": hit, "correct": hit}
    if name == "f1":
        sq = N._squad_normalize.__wrapped__
        pt, gt = sq(pred).split(), sq(gold).split()
        same = sum((Counter(pt) & Counter(gt)).values())
        em = int(pt == gt)
        if same == 0:
            return {"score": 0.0, "f1": 0.0, "precision": 0.0, "recall": 0.0, "em": em}
        p, r = same / len(pt), same / len(gt)
        f1 = 2 * p * r / (p + r)
        return {"score": f1, "f1": f1, "precision": p, "recall": r, "em": em}
    got = P.extract_choice(pred, meta["choices"], len(meta["choices"]))
    want = P.gold_letters(gold)
    hit = int(got == want)
    return {"score": hit, "correct": hit, "parsed": int(bool(got)), "multi": int(len(got) > 1)}


def naive_all(preds: list[str], metas: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for name in PROTOCOLS:
        types = P.PROTOCOLS.get(name).answer_types
        items = []
        for pred, meta in zip(preds, metas):
            if meta["answer_type"] in types:
                items.append(naive_score(name, N.extract_answer_tag(pred), meta))
        out[name] = items
    return out


def clear_all_caches() -> None:
    N.clear_caches()
    for f in (P._llava_counts, P._token_set, P._squad_tokens, P._squad_counts):
        f.cache_clear()


def run(preds: list[str], metas: list[dict]) -> tuple[float, float, float]:
    """(cold, warm, naive) seconds; raises if naive and score_all disagree."""
    clear_all_caches()
    t0 = time.perf_counter()
    res = P.score_all(preds, metas, PROTOCOLS, extract_answer_tag=True)
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    P.score_all(preds, metas, PROTOCOLS, extract_answer_tag=True)
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    naive = naive_all(preds, metas)
    naive_s = time.perf_counter() - t0
    for name in PROTOCOLS:  # same rules -> same overall numbers
        agg = P.PROTOCOLS.get(name).aggregate(naive[name])
        if agg != res[name]["overall"]:
            raise SystemExit(f"naive and score_all disagree for {name}: {agg} vs {res[name]['overall']}")
    return cold, warm, naive_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "eval_scoring.json")
    args = ap.parse_args()

    preds, metas = make_items(args.n, args.seed)
    cold, warm, naive_s = run(preds, metas)
    # worst case for the caches: every prediction string distinct (a unique suffix per item)
    distinct = [f"{p} (ref {i})" for i, p in enumerate(preds)]
    cold_d, warm_d, naive_d = run(distinct, metas)
    res = P.score_all(preds, metas, PROTOCOLS, extract_answer_tag=True)

    out = {
        "what": "score_all over N predictions x 5 protocols (llava-med, multimedeval, exact, f1, mcq), "
                "extract_answer_tag=True; baseline = same rules without caches, literal LLaVA-Med normaliser",
        "n_predictions": args.n, "seed": args.seed, "protocols": PROTOCOLS,
        "distinct_prediction_fraction": round(len(set(preds)) / len(preds), 4),
        "answer_types": dict(Counter(m["answer_type"] for m in metas)),
        "cold_seconds": round(cold, 3), "warm_seconds": round(warm, 3), "naive_seconds": round(naive_s, 3),
        "cold_items_per_second": round(args.n / cold), "speedup_cold_vs_naive": round(naive_s / cold, 2),
        "speedup_warm_vs_naive": round(naive_s / warm, 2), "target_seconds": 10.0, "meets_target": cold < 10.0,
        "all_distinct": {"cold_seconds": round(cold_d, 3), "warm_seconds": round(warm_d, 3),
                         "naive_seconds": round(naive_d, 3), "speedup_cold_vs_naive": round(naive_d / cold_d, 2),
                         "meets_target": cold_d < 10.0},
        "overall_scores": {k: round(v["overall"]["score"], 4) for k, v in res.items()},
        "machine": {"python": platform.python_version(), "cpu_count": os.cpu_count(), "platform": platform.platform()},
    }
    write_json(args.out, out)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

"""How much room GRPO has: greedy accuracy, accuracy per sample, pass@k and mixed groups, per question template.

GRPO learns only from groups whose samples score differently (a group that is all right or all wrong has
advantage 0). Run this on a model before spending CPU time on RL:

    python scripts/grpo_headroom.py --model runs/reasoning_sft/model \\
        --records runs/quickstart/data/medphantom/records/reasoning_validation.jsonl

Each record (its assistant turn removed, the think/answer instruction kept or appended, as the GRPO recipe
builds its prompts) is answered once greedily and ``--samples`` times at ``--temperature`` (seeded), each
answer scored with the ``accuracy`` reward. Per template (``meta.extra.template``, else ``meta.task``) and in
all: ``greedy``, ``per_sample`` (mean over samples), ``pass_at_k`` (share of prompts with a right sample) and
``mixed`` (share of prompts whose samples are neither all right nor all wrong: the groups GRPO learns from).
Prints a table; ``--out`` writes the same as JSON.
"""

from __future__ import annotations

import argparse
import collections
from pathlib import Path

COLUMNS = ("greedy", "per_sample", "pass_at_k", "mixed")


def summarise(rows: list[dict]) -> dict:
    """``rows``: ``{"template", "greedy": 0/1, "samples": [0/1, ...]}`` per prompt -> the four shares per
    template and under ``"all"`` (each with its count ``n``)."""
    groups: dict[str, list[dict]] = collections.defaultdict(list)
    for r in rows:
        groups[r["template"]].append(r)
    groups["all"] = list(rows)

    def shares(rs: list[dict]) -> dict:
        n = len(rs)
        right = [sum(r["samples"]) for r in rs]
        return {"n": n,
                "greedy": sum(r["greedy"] for r in rs) / n,
                "per_sample": sum(k / len(r["samples"]) for k, r in zip(right, rs)) / n,
                "pass_at_k": sum(k > 0 for k in right) / n,
                "mixed": sum(0 < k < len(r["samples"]) for k, r in zip(right, rs)) / n}

    return {name: shares(rs) for name, rs in sorted(groups.items()) if rs}


def score_prompts(model, tokenizer, records: list[dict], base: Path, *, samples: int, temperature: float,
                  max_new_tokens: int = 128, batch: int = 8, seed: int = 0) -> list[dict]:
    """One row per record kept by the collator: its template, greedy score and the scores of its samples."""
    from medmllm.data.collate import MultimodalCollator
    from medmllm.data.dataset import PartLoader
    from medmllm.model.inspect import modality_shapes_for
    from medmllm.train.dpo import MultiBaseRecords
    from medmllm.train.grpo import GRPOSettings, banned_ids, completion_text, rl_prompt, sample_completions
    from medmllm.train.rewards import accuracy

    settings = GRPOSettings()                                     # the recipe's prompt format and stop string
    prompts = [rl_prompt(r, settings.prompt_format) for r in records]
    dataset = MultiBaseRecords(prompts, [base] * len(prompts), PartLoader(modality_shapes_for(model), cache_items=0))
    collator = MultimodalCollator(tokenizer, max_length=1024, num_tokens_fn=model.num_tokens, train=False)
    kw = dict(max_new_tokens=max_new_tokens, stop_strings=settings.stop_strings, banned_ids=banned_ids(tokenizer))

    def text(ids: list[int]) -> str:
        return completion_text(tokenizer, ids, settings.stop_strings)

    rows = []
    for start in range(0, len(prompts), batch):
        items = [it for it in (dataset[i] for i in range(start, min(len(prompts), start + batch))) if it is not None]
        if not items:
            continue
        greedy = sample_completions(model, collator(items), tokenizer, temperature=1e-5, seed=0, **kw)
        drawn = sample_completions(model, collator([it for it in items for _ in range(samples)]), tokenizer,
                                   temperature=temperature, seed=seed + start, **kw)
        for j, it in enumerate(items):
            rec = it["record"]
            extra = rec["meta"].get("extra") or {}
            rows.append({"id": rec["id"], "template": extra.get("template") or rec["meta"].get("task", "?"),
                         "greedy": accuracy(text(greedy[j]), rec),
                         "samples": [accuracy(text(drawn[j * samples + m]), rec) for m in range(samples)]})
    return rows


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="saved MedMLLM folder")
    ap.add_argument("--records", required=True, type=Path, help="JSONL of records with a verifiable meta.answer")
    ap.add_argument("--limit", type=int, default=None, help="only the first N records")
    ap.add_argument("--samples", type=int, default=6, help="samples per prompt (GRPO's group size)")
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="write the summary as JSON here")
    args = ap.parse_args(argv)
    if args.samples < 2 or not args.temperature > 0:
        ap.error(f"--samples must be >= 2 and --temperature > 0, got {args.samples} and {args.temperature}")

    from medmllm.data.records import read_records
    from medmllm.data.tokenizers import load_tokenizer
    from medmllm.model.mllm import MedMLLM

    records, _ = read_records(args.records)          # a malformed record fails here, naming file and line
    records = records[: args.limit] if args.limit else records
    model = MedMLLM.from_pretrained(args.model).eval()
    rows = score_prompts(model, load_tokenizer(args.model), records, args.records.parent, samples=args.samples,
                         temperature=args.temperature, seed=args.seed)
    summary = summarise(rows)
    print(f"{'template':30s} {'n':>5s} " + " ".join(f"{c:>10s}" for c in COLUMNS))
    for name, s in summary.items():
        print(f"{name:30s} {s['n']:5d} " + " ".join(f"{s[c]:10.3f}" for c in COLUMNS))
    result = {"model": str(args.model), "records": str(args.records), "samples": args.samples,
              "temperature": args.temperature, "seed": args.seed, "summary": summary}
    if args.out:
        from medmllm.io import write_json

        write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()

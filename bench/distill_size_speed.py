"""Distilled student vs its teacher: parameters, weight-file size, answer throughput and phantom accuracy.

Both models are saved MedMLLM folders (the teacher from `medmllm quickstart`, the student from
`medmllm train recipes/distill.yaml`). In one run:

* size: parameter counts and the bytes of their ``*.safetensors`` files, student / teacher;
* speed: answers per second of the in-process eval backend (greedy, ``--max-new-tokens``, batch
  ``--batch-size``) on the same ``--speed-records`` MedPhantom test questions (a mix of every
  modality); rounds alternate which model goes first; the ratio is the median over rounds of the
  per-round throughput ratio (both runs of a round see the same machine load);
* accuracy: ``medmllm eval``'s runner on the MedPhantom test tasks (``exact`` protocol, no blind
  baseline), per task and pooled over all questions; ``kept`` = student pooled / teacher pooled.

Results -> bench/results/distill.json.

    python bench/distill_size_speed.py --teacher runs/quickstart/instruct/model --student runs/distill/model \
        --data-root runs/quickstart/data
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

TASKS = ["medphantom_xray", "medphantom_ct", "medphantom_ct3d", "medphantom_ecg", "medphantom_ehr"]


def weight_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def speed_records(data_root: Path, n: int) -> tuple[list[dict], Path]:
    """``n`` test VQA prompts, modalities interleaved (the same list for both models)."""
    from medmllm.data.records import read_records

    path = data_root / "medphantom" / "records" / "test.jsonl"
    recs = [r for r in read_records(path)[0] if r["meta"]["task"] == "vqa"]
    by_mod: dict[str, list[dict]] = {}
    for r in recs:
        by_mod.setdefault(r["meta"]["modality"], []).append(r)
    out, i = [], 0
    while len(out) < n and any(i < len(v) for v in by_mod.values()):
        out += [v[i] for v in by_mod.values() if i < len(v)]
        i += 1
    prompts = [{**r, "messages": r["messages"][:1]} for r in out[:n]]
    return prompts, path.parent


def accuracy(backend, data_root: Path, tasks: list[str], out: Path) -> dict:
    from medmllm.eval.runner import run_eval

    res = run_eval(backend, tasks, out, protocols=["exact"], data_root=data_root, progress=False, blind=False)
    per_task, right, n = {}, 0.0, 0
    for name, r in res["tasks"].items():
        block = r["protocols"]["exact"]
        per_task[name] = {"exact": block["overall"]["score"], "n": block["n"]}
        right += block["overall"]["score"] * block["n"]
        n += block["n"]
    return {"per_task": per_task, "pooled_exact": right / n, "n": n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--teacher", type=Path, required=True)
    ap.add_argument("--student", type=Path, required=True)
    ap.add_argument("--data-root", type=Path, required=True)
    ap.add_argument("--tasks", nargs="*", default=TASKS)
    ap.add_argument("--speed-records", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "distill.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from medmllm.eval.backends import InProcessBackend

    models = {"teacher": args.teacher, "student": args.student}
    backends = {k: InProcessBackend(p, batch_size=args.batch_size, device="cpu") for k, p in models.items()}
    size = {k: {"parameters": int(sum(p.numel() for p in b.model.parameters())), "weight_bytes": weight_bytes(models[k])}
            for k, b in backends.items()}

    prompts, base = speed_records(args.data_root, args.speed_records)
    gen = {"max_new_tokens": args.max_new_tokens, "temperature": 0.0}
    for b in backends.values():                                   # warm-up (first calls of a shape are slow)
        b.answer(prompts[: args.batch_size], base, gen)
    secs: dict[str, list[float]] = {"teacher": [], "student": []}
    for i in range(args.rounds):
        for k in (("teacher", "student") if i % 2 == 0 else ("student", "teacher")):
            t0 = time.perf_counter()
            backends[k].answer(prompts, base, gen)
            secs[k].append(time.perf_counter() - t0)
    paired = statistics.median(t / s for t, s in zip(secs["teacher"], secs["student"]))

    with tempfile.TemporaryDirectory() as tmp:
        acc = {k: accuracy(b, args.data_root, args.tasks, Path(tmp) / k) for k, b in backends.items()}

    result = {
        "teacher": str(args.teacher), "student": str(args.student),
        "size": size,
        "parameter_ratio_student_over_teacher": round(size["student"]["parameters"] / size["teacher"]["parameters"], 4),
        "bytes_ratio_student_over_teacher": round(size["student"]["weight_bytes"] / size["teacher"]["weight_bytes"], 4),
        "speed": {"records": len(prompts), "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
                  "seconds": {k: [round(x, 3) for x in v] for k, v in secs.items()},
                  "answers_per_s": {k: round(len(prompts) / statistics.median(v), 2) for k, v in secs.items()},
                  "speedup_student_over_teacher": round(paired, 3)},
        "accuracy": acc,
        "accuracy_kept_student_over_teacher": round(acc["student"]["pooled_exact"] / acc["teacher"]["pooled_exact"], 4),
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": args.threads},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("parameter_ratio_student_over_teacher", "bytes_ratio_student_over_teacher",
                                             "accuracy_kept_student_over_teacher")}, indent=2))
    print(json.dumps(result["speed"]["answers_per_s"]), "speedup", result["speed"]["speedup_student_over_teacher"])
    for k in ("teacher", "student"):
        print(k, round(acc[k]["pooled_exact"], 4), {t: round(v["exact"], 3) for t, v in acc[k]["per_task"].items()})
    print("->", args.out)


if __name__ == "__main__":
    main()

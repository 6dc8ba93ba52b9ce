"""What every dataset converter shares: the converter contract, source-file checks,
per-item error capture and the ``run`` driver that writes records + a split manifest.

Converter contract
------------------
``convert_<name>(src: Path, *, splits=None, **options) -> Iterator[dict | Skip]``

* ``src`` is the dataset's folder exactly as the user downloaded it (official layout).
* It yields validated instruction records (see :mod:`medmllm.data.records`) whose
  modality parts carry **absolute** file paths, or :class:`Skip` entries naming an
  item that could not be converted and why (missing image, malformed item).
* It raises :class:`~medmllm.errors.InputError` only for whole-source problems
  (missing source folder or annotation file, unreadable annotation file) and
  :class:`~medmllm.errors.ConfigError` for a bad ``splits`` / option value.

:func:`run` turns absolute image paths into paths relative to the output file's
folder, drops duplicate ids, writes the JSONL and ``<out stem>.manifest.json``
atomically and returns a :class:`ConvertReport`.
"""

from __future__ import annotations

import csv
import gzip
import inspect
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence, Union

from medmllm.errors import ConfigError, InputError, RecordError
from medmllm.data.records import MODALITY_PARTS, write_manifest, write_records

# Annotation files (JSON, CSV, pickle) above this size are refused before parsing; official ones are far smaller.
MAX_ANNOTATION_BYTES = 2 << 30


# ----------------------------------------------------------------------------- item outcomes

@dataclass(frozen=True)
class Skip:
    """An item that was not converted: ``where`` names it (id and/or file[index]), ``reason`` says why."""

    where: str
    reason: str


class SkipItem(Exception):
    """Raised inside a per-item builder: the item is skipped with ``reason`` (never a crash)."""

    def __init__(self, reason: str, item_id: str | None = None):
        super().__init__(reason)
        self.reason = reason
        self.item_id = item_id


Item = Union[dict, Skip]  # what a converter yields
Converter = Callable[..., Iterator[Any]]


def iter_items(items: Iterable[Any], label: str, build: Callable[[int, Any], dict | None]) -> Iterator[dict | Skip]:
    """Apply ``build(index, item)`` to each item; yield its record, nothing for ``None``
    (item filtered out on purpose: other split or language), or a :class:`Skip`
    when it raises :class:`SkipItem` or fails on a malformed item.

    ``label`` names the source file; skips are located as ``label[index]``.
    """
    for i, item in enumerate(items):
        where = f"{label}[{i}]"
        try:
            rec = build(i, item)
        except SkipItem as exc:
            yield Skip(f"{exc.item_id} ({where})" if exc.item_id else where, exc.reason)
        except RecordError as exc:
            yield Skip(where, f"record invalid: {exc.reason}")
        except (InputError, ConfigError):  # whole-source / option problems are not per-item
            raise
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
            yield Skip(where, f"malformed item: {type(exc).__name__}: {exc}")
        except OSError as exc:
            yield Skip(where, f"unreadable file: {type(exc).__name__}: {exc}")
        else:
            if rec is not None:
                yield rec


# ----------------------------------------------------------------------------- source files

def check_src(src: str | os.PathLike) -> Path:
    """The source folder as an absolute Path; InputError if it is not an existing folder."""
    p = Path(os.path.abspath(src))
    if not p.exists():
        raise InputError(p, "source folder does not exist")
    if not p.is_dir():
        raise InputError(p, "expected the dataset's source folder, got a file")
    return p


def find_file(candidates: Iterable[Path]) -> Path | None:
    """First candidate that is a non-empty regular file, else None."""
    for c in candidates:
        try:
            if c.is_file() and c.stat().st_size > 0:
                return c
        except OSError:
            continue
    return None


def require_file(src: Path, *names: str) -> Path:
    """``src / name`` for the first of ``names`` that exists; else InputError naming the expected file and ``src``."""
    found = find_file(src / n for n in names)
    if found is None:
        alts = " or ".join(repr(n) for n in names)
        raise InputError(src / names[0], f"expected source file {alts} in the source folder {src}; not found (or empty)")
    return found


def need_image(candidates: Sequence[Path], item_id: str | None = None) -> Path:
    """The first existing, non-empty image among ``candidates``; else SkipItem naming the first candidate."""
    found = find_file(candidates)
    if found is None:
        raise SkipItem(f"image file not found: {candidates[0]}", item_id)
    return found


def _check_size(path: Path) -> None:
    size = path.stat().st_size
    if size > MAX_ANNOTATION_BYTES:
        raise InputError(path, f"annotation file is {size} bytes, above the limit of {MAX_ANNOTATION_BYTES}")


def load_json(path: Path, expect: type | tuple[type, ...]) -> Any:
    """Parse a JSON annotation file; InputError on bad JSON or an unexpected top-level type."""
    _check_size(path)
    try:
        with open(path, encoding="utf-8-sig") as fh:
            obj = json.load(fh)
    except json.JSONDecodeError as exc:
        raise InputError(path, f"not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(path, f"cannot read: {type(exc).__name__}: {exc}") from None
    if not isinstance(obj, expect):
        names = expect.__name__ if isinstance(expect, type) else " or ".join(t.__name__ for t in expect)
        raise InputError(path, f"expected a JSON {names} at top level, got {type(obj).__name__}")
    return obj


def read_csv(path: Path, required: Sequence[str] = ()) -> list[dict[str, str]]:
    """Rows of a CSV (``.csv`` or ``.csv.gz``, UTF-8 with optional BOM) as dicts of strings.

    Raises InputError if a ``required`` column is missing from the header.
    """
    _check_size(path)
    try:
        raw = gzip.open(path, "rb").read() if path.name.endswith(".gz") else path.read_bytes()
        text_ = raw.decode("utf-8-sig")
        reader = csv.DictReader(io.StringIO(text_, newline=""))
        header = [h.strip() for h in (reader.fieldnames or [])]
        reader.fieldnames = header
        rows = [{k: (v if isinstance(v, str) else "") for k, v in row.items() if k is not None} for row in reader]
    except (OSError, UnicodeDecodeError, EOFError, csv.Error) as exc:
        raise InputError(path, f"cannot read CSV: {type(exc).__name__}: {exc}") from None
    missing = [c for c in required if c not in header]
    if missing:
        raise InputError(path, f"CSV header lacks column(s) {missing}; found {header}")
    return rows


# ----------------------------------------------------------------------------- field helpers

def req_text(item: Mapping, key: str, item_id: str | None = None) -> str:
    """``item[key]`` as stripped text (numbers accepted); SkipItem if absent, empty or not text."""
    if not isinstance(item, Mapping):
        raise SkipItem(f"malformed item: expected an object, got {type(item).__name__}", item_id)
    v = item.get(key)
    if isinstance(v, bool) or not isinstance(v, (str, int, float)):
        raise SkipItem(f"field {key!r}: expected non-empty text, got {v!r}"[:200], item_id)
    s = str(v).strip()
    if not s:
        raise SkipItem(f"field {key!r}: expected non-empty text, got an empty value", item_id)
    return s


def plain_extra(item: Mapping, keys: Iterable[str]) -> dict:
    """The JSON-plain values of ``keys`` present in ``item`` (for ``meta.extra``)."""
    out = {}
    for k in keys:
        if k in item and _is_plain(item[k]):
            out[k] = item[k]
    return out


def _is_plain(v: Any) -> bool:
    if v is None or isinstance(v, (str, int, float, bool)):
        return True
    if isinstance(v, (list, tuple)):
        return all(_is_plain(x) for x in v)
    if isinstance(v, dict):
        return all(isinstance(k, str) and _is_plain(x) for k, x in v.items())
    return False


def select_splits(splits: Sequence[str] | str | None, known: Mapping[str, str], default: Sequence[str] | None = None) -> list[str]:
    """Canonical split (or source) names chosen by ``splits``.

    ``known`` maps every accepted spelling (e.g. ``"val"``, ``"validate"``) to its canonical
    name; ``None`` selects ``default`` (or every canonical name). Unknown names -> ConfigError.
    """
    canon = list(dict.fromkeys(known.values()))
    if splits is None:
        return list(default) if default is not None else canon
    if isinstance(splits, str):
        splits = [s for s in splits.split(",") if s.strip()]
    out: list[str] = []
    for s in splits:
        key = str(s).strip()
        if key not in known:
            raise ConfigError(f"unknown split {key!r}; expected one of {sorted(known)}")
        if known[key] not in out:
            out.append(known[key])
    if not out:
        raise ConfigError(f"no split selected; expected some of {sorted(known)}")
    return out


# ----------------------------------------------------------------------------- report

@dataclass
class ConvertReport:
    """What a conversion wrote, kept (per split) and skipped (with reasons)."""

    dataset: str
    src: str
    out: str
    manifest: str
    kept: dict[str, int] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.kept.values())

    @property
    def n_skipped(self) -> int:
        return len(self.skipped)

    def __str__(self) -> str:
        per = ", ".join(f"{k} {v}" for k, v in self.kept.items()) or "none"
        lines = [f"{self.dataset}: kept {self.total} records ({per}), skipped {self.n_skipped}",
                 f"  records:  {self.out}", f"  manifest: {self.manifest}"]
        if self.skipped:
            reasons: dict[str, int] = {}
            for _, r in self.skipped:
                head = r.split(":")[0]
                reasons[head] = reasons.get(head, 0) + 1
            lines.append("  skip reasons: " + ", ".join(f"{k} x{v}" for k, v in sorted(reasons.items())))
            for where, reason in self.skipped[:5]:
                lines.append(f"    {where}: {reason}")
            if self.n_skipped > 5:
                lines.append(f"    ... and {self.n_skipped - 5} more")
        return "\n".join(lines)


# ----------------------------------------------------------------------------- driver

def manifest_path(out: str | os.PathLike) -> Path:
    """``<out folder>/<out stem>.manifest.json``."""
    out = Path(out)
    return out.with_name(out.stem + ".manifest.json")


def relative_to(path: str, base_dir: Path) -> str:
    """``path`` relative to ``base_dir`` (POSIX separators) when possible, else absolute."""
    try:
        return Path(os.path.relpath(path, base_dir)).as_posix()
    except ValueError:  # e.g. another drive on Windows
        return str(path)


def _relativize(rec: dict, base_dir: Path) -> dict:
    for key in ("messages", "chosen", "rejected"):
        for m in rec.get(key) or []:
            for p in m["content"] if isinstance(m.get("content"), list) else []:
                if p.get("type") in MODALITY_PARTS and isinstance(p.get("path"), str) and os.path.isabs(p["path"]):
                    p["path"] = relative_to(p["path"], base_dir)
    return rec


def _check_options(fn: Converter, name: str, options: Mapping[str, Any]) -> None:
    params = inspect.signature(fn).parameters
    allowed = [p for p, v in params.items() if v.kind is inspect.Parameter.KEYWORD_ONLY and p != "splits"]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ConfigError(f"converter {name!r}: unknown option(s) {unknown}; accepted: {allowed or 'none'}")


def run(fn: Converter, name: str, src: str | os.PathLike, out: str | os.PathLike, *,
        splits: Sequence[str] | str | None = None, limit: int | None = None, hash_files: bool = True,
        **options: Any) -> ConvertReport:
    """Run converter ``fn`` on ``src`` and write ``out`` (JSONL) + its manifest.

    ``limit`` stops after that many records are kept (in the converter's order:
    train, validation, test). ``hash_files`` includes every image's bytes in the
    manifest hashes (turn off for huge sets such as MIMIC-CXR to avoid reading them all).
    Duplicate ids are skipped after the first. Raises InputError when nothing is kept.
    """
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"limit: expected a positive integer or None, got {limit!r}")
    _check_options(fn, name, options)
    out = Path(os.path.abspath(out))
    if out.is_dir():
        raise InputError(out, "output must be a JSONL file path, got a folder")
    base_dir = out.parent
    report = ConvertReport(name, os.path.abspath(src), str(out), str(manifest_path(out)))
    records: list[dict] = []
    seen: set[str] = set()
    items = fn(Path(src), splits=splits, **options)
    try:
        for item in items:
            if isinstance(item, Skip):
                report.skipped.append((item.where, item.reason))
                continue
            if item["id"] in seen:
                report.skipped.append((item["id"], "duplicate id: an earlier item has the same id"))
                continue
            seen.add(item["id"])
            records.append(_relativize(item, base_dir))
            split = item["meta"]["split"]
            report.kept[split] = report.kept.get(split, 0) + 1
            if limit is not None and len(records) >= limit:
                break
    finally:
        close = getattr(items, "close", None)
        if close is not None:
            close()
    if not records:
        first = "; ".join(f"{w}: {r}" for w, r in report.skipped[:3]) or "no items in the selected splits"
        raise InputError(src, f"{name}: no record could be converted ({report.n_skipped} skipped; {first})")
    write_records(out, records)
    write_manifest(report.manifest, records, base_dir=base_dir if hash_files else None)
    return report

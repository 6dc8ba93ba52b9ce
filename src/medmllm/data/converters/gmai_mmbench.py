"""GMAI-MMBench (Chen et al. 2024) -> multiple-choice records.

Official layout under ``src`` (the TSV files of the release, VLMEvalKit format)::

    GMAI-MMBench_VAL.tsv                  validation (answers public); the OpenGVLab upload name
                                          ``GMAI_mm_bench_VAL.tsv`` is accepted too
    GMAI_mm_bench_TEST_part_<k>.tsv       test parts (no ``answer`` column: records carry no answer)

TSV columns (tab-separated, header row, pandas/VLMEvalKit quoting): ``index``, ``question``,
``A`` .. ``E`` (unused trailing options empty), ``answer`` (validation: the letter, several
letters allowed as "A,C"), ``image`` (base64 PNG/JPEG as VLMEvalKit stores it; a cell of at most
64 characters is, as in VLMEvalKit, the ``index`` of an earlier row holding the same image; a
"['b64', 'b64']" cell holds several images) or ``image_path`` (files relative to ``src``), and
the category columns kept in ``meta.extra`` when present: ``category``, ``clinical VQA task``,
``department``, ``perceptual granularity``, ``modality``, ``original task`` (header names are
matched case-insensitively). A TSV without ``index``, ``question``, ``A``, ``B`` or an image
column is an InputError naming the file and the missing column; a row that breaks the rules
(gap in the options, answer not among them, image not decodable) is skipped and listed.

Images are decoded once into ``image_dir`` (default ``src/images/<tsv stem>/``, where VLMEvalKit
puts them too) as ``<index>.png`` / ``<index>.jpg`` (by content), written atomically; an
existing file with the same bytes is left alone. The TSV is streamed row by row (the
validation file is several GB).

Records: image, then the question stem (task templates add the options); ``meta.choices`` the
option texts, ``meta.answer`` the letter(s) (validation only), ``meta.modality`` normalised as
for OmniMedVQA; ids ``gmai_mmbench-<split>-<index>``.
"""

from __future__ import annotations

import ast
import base64
import binascii
import csv
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

from medmllm.errors import InputError, RecordError
from medmllm.data.converters.base import Skip, SkipItem, check_src, iter_items, select_splits
from medmllm.data.converters.omnimedvqa import normalize_modality
from medmllm.data.records import make_record, media
from medmllm.io import write_bytes

DATASET = "gmai_mmbench"
SPLITS = {"validation": "validation", "val": "validation", "test": "test"}
VAL_FILES = ("GMAI-MMBench_VAL.tsv", "GMAI_mm_bench_VAL.tsv")
TEST_GLOBS = ("GMAI_mm_bench_TEST_part_*.tsv", "GMAI-MMBench_TEST*.tsv")
LETTERS = "ABCDE"
CATEGORY_COLUMNS = ("category", "clinical vqa task", "department", "perceptual granularity", "modality",
                    "original task")
_MAGIC = ((b"\x89PNG\r\n\x1a\n", ".png"), (b"\xff\xd8\xff", ".jpg"))


@contextmanager
def _big_fields():
    """csv's per-field limit raised for base64 image cells (restored afterwards: it is process-global)."""
    old = csv.field_size_limit()
    csv.field_size_limit(min(sys.maxsize, 2 ** 31 - 1))
    try:
        yield
    finally:
        csv.field_size_limit(old)


def _tsv_files(src: Path, split: str) -> list[Path]:
    """The split's TSV file(s); InputError naming the expected names when there is none."""
    if split == "validation":
        found = [src / n for n in VAL_FILES if (src / n).is_file()][:1]
    else:
        found = sorted({p for g in TEST_GLOBS for p in src.glob(g) if p.is_file()})
    if not found:
        want = " or ".join(VAL_FILES) if split == "validation" else " / ".join(TEST_GLOBS)
        raise InputError(src / (VAL_FILES[0] if split == "validation" else TEST_GLOBS[0]),
                         f"expected {want} in the source folder {src}; not found")
    return found


def _rows(path: Path) -> Iterator[dict[str, str]]:
    """The TSV's rows as {lower-cased header: cell}; InputError for a missing required column."""
    with _big_fields(), open(path, encoding="utf-8-sig", newline="") as fh:
        reader = csv.reader(fh, delimiter="\t")
        try:
            header = [h.strip().lower() for h in next(reader)]
        except StopIteration:
            raise InputError(path, "empty TSV: expected a header row") from None
        except csv.Error as exc:
            raise InputError(path, f"cannot read TSV header: {exc}") from None
        missing = [c for c in ("index", "question", "a", "b") if c not in header]
        if "image" not in header and "image_path" not in header:
            missing.append("image or image_path")
        if missing:
            raise InputError(path, f"TSV header lacks column(s) {missing}; found {header[:20]}")
        try:
            for row in reader:
                yield dict(zip(header, row))
        except csv.Error as exc:
            raise InputError(path, f"cannot read TSV line {reader.line_num}: {exc}") from None


def _decode(cell: str, rid: str) -> tuple[bytes, str]:
    try:
        data = base64.b64decode(cell.strip(), validate=False)
    except (binascii.Error, ValueError) as exc:
        raise SkipItem(f"image: not base64 ({exc})", rid) from None
    for magic, ext in _MAGIC:
        if data.startswith(magic):
            return data, ext
    raise SkipItem("image: base64 does not decode to a PNG or JPEG file", rid)


def _write_once(path: Path, data: bytes) -> Path:
    try:
        if path.stat().st_size == len(data) and path.read_bytes() == data:
            return path
    except OSError:
        pass
    write_bytes(path, data)
    return path


class _Images:
    """Decodes a row's image cell(s) into files; remembers each index's files for reference cells."""

    def __init__(self, src: Path, image_dir: Path):
        self.src, self.image_dir, self.seen = src, image_dir, {}

    def __call__(self, row: dict[str, str], index: str, rid: str) -> list[Path]:
        cell = (row.get("image") or "").strip()
        if not cell:
            return self._paths(row, rid)
        if len(cell) <= 64:  # VLMEvalKit: a short cell is the index of the row holding the image
            if cell not in self.seen:
                raise SkipItem(f"image: refers to index {cell!r}, which no earlier row holds", rid)
            out = self.seen[cell]
        else:
            cells = self._list(cell, rid)
            out = []
            for k, c in enumerate(cells):
                data, ext = _decode(c, rid)
                name = f"{index}{ext}" if len(cells) == 1 else f"{index}_{k}{ext}"
                out.append(_write_once(self.image_dir / name, data))
        self.seen[index] = out
        return out

    @staticmethod
    def _list(cell: str, rid: str) -> list[str]:
        if not cell.startswith("["):
            return [cell]
        try:
            items = ast.literal_eval(cell)
        except (ValueError, SyntaxError):
            raise SkipItem("image: a cell starting with '[' must be a list of base64 strings", rid) from None
        if not isinstance(items, list) or not items or not all(isinstance(x, str) for x in items):
            raise SkipItem("image: expected a non-empty list of base64 strings", rid)
        return items

    def _paths(self, row: dict[str, str], rid: str) -> list[Path]:
        cell = (row.get("image_path") or "").strip()
        if not cell:
            raise SkipItem("image: both 'image' and 'image_path' are empty", rid)
        names = self._list(cell, rid) if cell.startswith("[") else [cell]
        out = []
        for n in names:
            p = Path(n) if os.path.isabs(n) else self.src / n
            if not p.is_file() or p.stat().st_size == 0:
                raise SkipItem(f"image file not found: {p}", rid)
            out.append(p)
        return out


def _choices(row: dict[str, str], rid: str) -> list[str]:
    texts = [(row.get(L.lower()) or "").strip() for L in LETTERS]
    texts = ["" if t.lower() == "nan" else t for t in texts]
    while texts and not texts[-1]:
        texts.pop()
    if len(texts) < 2 or not all(texts):
        raise SkipItem(f"options: expected 2+ non-empty options A.. without gaps, got {texts}"[:300], rid)
    return texts


def _answer(row: dict[str, str], n: int, rid: str) -> str | None:
    if "answer" not in row:
        return None
    raw = (row.get("answer") or "").strip()
    from medmllm.eval.protocols import gold_letters

    try:
        letters = sorted(gold_letters(raw)) if raw else []
    except RecordError:
        letters = []
    if not letters or any(L not in LETTERS[:n] for L in letters):
        raise SkipItem(f"field 'answer': expected letter(s) among {list(LETTERS[:n])}, got {raw!r}", rid)
    return ",".join(letters)


def convert_gmai_mmbench(src: Path, *, splits: Sequence[str] | str | None = None,
                         image_dir: str | os.PathLike | None = None) -> Iterator[dict | Skip]:
    """Yield one multiple-choice record per TSV row of the chosen splits (default: validation) (or a Skip)."""
    src = check_src(src)
    wanted = select_splits(splits, SPLITS, default=("validation",))
    for split in wanted:
        paths = _tsv_files(src, split)
        for path in paths:
            images = _Images(src, Path(image_dir) if image_dir is not None else src / "images" / path.stem)

            def build(_i: int, row: dict[str, str], split: str = split, fname: str = path.name) -> dict:
                index = (row.get("index") or "").strip()
                if not index:
                    raise SkipItem("field 'index': empty")
                rid = f"{DATASET}-{split}-{index}"
                question = (row.get("question") or "").strip()
                if not question:
                    raise SkipItem("field 'question': empty", rid)
                choices = _choices(row, rid)
                answer = _answer(row, len(choices), rid)
                files = images(row, index, rid)
                extra: dict[str, Any] = {"source_file": fname, "index": index}
                extra.update({c: row[c].strip() for c in CATEGORY_COLUMNS if (row.get(c) or "").strip()})
                meta = {"dataset": DATASET, "split": split, "task": "mcq", "answer_type": "choice",
                        "choices": choices, "extra": extra}
                if answer is not None:
                    meta["answer"] = answer
                if (row.get("modality") or "").strip():
                    meta["modality"] = normalize_modality(row["modality"])
                parts = [media("image", str(p)) for p in files] + [question]
                return make_record(rid, parts, answer, meta)

            yield from iter_items(_rows(path), path.name, build)

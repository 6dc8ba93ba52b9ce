"""PMC-VQA (Zhang et al. 2023) -> multiple-choice instruction records.

Official layout under ``src``::

    train.csv, test.csv, test_clean.csv   columns Figure_path, Caption, Question, Choice A,
                                          Choice B, Choice C, Choice D, Answer[, Answer_label][, split]
    images/<Figure_path>                  (``figures/<Figure_path>`` is accepted too)

Choice cells look like "A:Axial view" (the "A:" prefix is stripped); ``Answer`` is the
answer text, "B" or "B:Axial view" (``Answer_label``, when present, wins).

Each CSV is a *source*: ``splits`` picks source files by stem ("train", "test",
"test_clean"; default "train" + "test"). test.csv and test_clean.csv both become split
"test", so at most one of them may be chosen per output; the source file is kept in
``meta.extra.source_file`` and in the id (``pmc_vqa-test_clean-000012``), so the manifest
(ids + hashes) tells the two test sets apart.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterator, Sequence

from medmllm.errors import ConfigError
from medmllm.data.converters.base import (Skip, SkipItem, check_src, iter_items, need_image, read_csv,
                                          req_text, require_file, select_splits)
from medmllm.data.records import make_record, media

DATASET = "pmc_vqa"
SOURCES = {"train": "train", "test": "test", "test_clean": "test_clean"}
SOURCE_SPLIT = {"train": "train", "test": "test", "test_clean": "test"}
DEFAULT_SOURCES = ("train", "test")
IMAGE_DIRS = ("images", "figures", "")
LETTERS = "ABCD"
CHOICE_COLUMNS = tuple(f"Choice {c}" for c in LETTERS)
REQUIRED_COLUMNS = ("Figure_path", "Question", "Answer") + CHOICE_COLUMNS
PROMPT = "{question}\n{options}\nAnswer with the option's letter from the given choices directly."

_PREFIX = re.compile(r"^\s*([A-Da-d])\s*[:：]\s*")  # "A:Axial view", " A: CT"; "C. difficile" is not a prefix
_WS = re.compile(r"\s+")


def _norm(s: str) -> str:
    return _WS.sub(" ", s).strip().casefold()


def strip_choice(cell: str, letter: str) -> str:
    """``"A:Axial view"`` / ``" A: CT"`` -> the option text (prefix removed only if it names ``letter``)."""
    m = _PREFIX.match(cell)
    if m and m.group(1).upper() == letter:
        return cell[m.end():].strip()
    return cell.strip()


def answer_letter(answer: str, label: str, choices: list[str]) -> str:
    """The correct letter from ``Answer_label`` or ``Answer``: a letter, an option's text
    (case/whitespace-insensitive) or "B:text"; SkipItem when it is none of these."""
    if label.strip().upper() in tuple(LETTERS):
        return label.strip().upper()
    a = answer.strip()
    if a.upper() in tuple(LETTERS):
        return a.upper()
    hits = [LETTERS[i] for i, c in enumerate(choices) if _norm(c) == _norm(a)]
    if len(hits) == 1:
        return hits[0]
    m = _PREFIX.match(a)
    if m:
        return m.group(1).upper()
    raise SkipItem(f"answer matches {'several' if hits else 'none'} of the choices: {a!r} vs {choices}"[:300])


def _sources(splits: Sequence[str] | str | None, src: Path) -> list[tuple[str, Path]]:
    chosen = select_splits(splits, SOURCES, default=DEFAULT_SOURCES)
    if "test" in chosen and "test_clean" in chosen:
        raise ConfigError("pmc_vqa: choose one of the sources 'test' and 'test_clean' (both become split 'test'); "
                          "convert them into separate output files")
    if splits is None:
        present = [s for s in chosen if (src / f"{s}.csv").is_file()]
        chosen = present or chosen
    return [(s, require_file(src, f"{s}.csv")) for s in chosen]


def convert_pmc_vqa(src: Path, *, splits: Sequence[str] | str | None = None) -> Iterator[dict | Skip]:
    """Yield one multiple-choice record per CSV row of the chosen source files (or a Skip)."""
    src = check_src(src)
    for source, path in _sources(splits, src):
        rows = read_csv(path, REQUIRED_COLUMNS)

        def build(i: int, row: dict, source: str = source, fname: str = path.name) -> dict:
            rid = f"{DATASET}-{source}-{i:06d}"
            question = req_text(row, "Question", rid)
            choices = [strip_choice(req_text(row, col, rid), L) for col, L in zip(CHOICE_COLUMNS, LETTERS)]
            if not all(choices):
                raise SkipItem(f"empty choice text: {choices}", rid)
            try:
                letter = answer_letter(row.get("Answer") or "", row.get("Answer_label") or "", choices)
            except SkipItem as exc:
                raise SkipItem(exc.reason, rid) from None
            fig = req_text(row, "Figure_path", rid)
            image = need_image([src / d / fig for d in IMAGE_DIRS], rid)
            options = "\n".join(f"{L}: {c}" for L, c in zip(LETTERS, choices))
            extra: dict[str, Any] = {"source_file": fname, "row": i, "figure_path": fig,
                                     "answer_text": (row.get("Answer") or "").strip()}
            for col, key in (("Caption", "caption"), ("split", "split_column"), ("Answer_label", "answer_label")):
                if (row.get(col) or "").strip():
                    extra[key] = row[col].strip()
            meta = {"dataset": DATASET, "split": SOURCE_SPLIT[source], "task": "mcq", "answer_type": "choice",
                    "answer": letter, "choices": choices, "extra": extra}
            prompt = PROMPT.format(question=question, options=options)
            return make_record(rid, [media("image", str(image)), prompt], letter, meta)

        yield from iter_items(rows, path.name, build)

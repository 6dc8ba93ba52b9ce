"""Self-consistency (Wang et al., 2023) as an eval option: ``k`` sampled answers per question, majority vote.

:class:`SelfConsistency` wraps any backend. For each batch of records it asks the inner backend ``k``
times at ``temperature`` (seeds ``seed``, ``seed + 1``, ... so a rerun gives the same votes), reduces
every answer to a **vote key** — the text inside the last ``<answer>…</answer>`` (the whole text when
there is none), lower-cased, spaces collapsed, end punctuation dropped, and a lone number written in
one canonical form (``"41"``, ``"41.0"`` and ``"41 bpm"`` all vote ``41``) — and returns, per record, the
first sample whose key won most votes (ties go to the key seen first). ``None`` answers (unreadable
files) do not vote; a record with no answer at all stays ``None``. The chosen answer keeps its full
text, so protocols score it exactly as they score a single answer.

A question scored with a tolerance (``meta.extra.tolerance``: the ``numeric`` protocol) is answered by
the **median** instead (:func:`median_answer`): the sample whose number (the first in its answer) lies
closest to the median of the samples' numbers. Sampled readings of a measured quantity scatter around
it; a vote over exact strings rarely finds two alike, while their median is steadier than any one.

    medmllm eval --model M --task medphantom_reasoning --self-consistency 5 --sc-temperature 0.7 --out DIR
"""

from __future__ import annotations

import os
import re
from collections import Counter
from typing import Sequence

from medmllm.errors import ConfigError

_NUMBER = re.compile(r"^[-+]?\d+(?:\.\d+)?")


def vote_key(answer: str) -> str:
    """The normalised answer a sample votes for (see the module doc)."""
    from medmllm.eval.normalize import extract_answer_tag

    text = " ".join(extract_answer_tag(answer).lower().split()).strip(" .,;:!")
    m = _NUMBER.match(text)
    if m and (len(m.group()) == len(text) or text[len(m.group())] == " "):
        return format(float(m.group()), "g")
    return text


def majority(samples: Sequence[str | None]) -> str | None:
    """The first sample whose vote key has the most votes (ties: the key seen first); None if none."""
    answers = [s for s in samples if s is not None]
    if not answers:
        return None
    keys = [vote_key(a) for a in answers]
    counts = Counter(keys)
    best = max(counts.values())
    winner = next(k for k in keys if counts[k] == best)
    return answers[keys.index(winner)]


def median_answer(samples: Sequence[str | None]) -> str | None:
    """The first sample whose number is closest to the median of the samples' numbers (the first number in
    each answer tag; for an even count the mean of the two middle ones); samples without a number do not
    vote. With no number at all, :func:`majority` decides."""
    from statistics import median

    from medmllm.eval.normalize import extract_answer_tag
    from medmllm.eval.protocols import first_number

    answers = [s for s in samples if s is not None]
    numbers = [first_number(extract_answer_tag(a)) for a in answers]
    voting = [(x, a) for x, a in zip(numbers, answers) if x is not None]
    if not voting:
        return majority(answers)
    mid = median(x for x, _ in voting)
    return min(voting, key=lambda xa: abs(xa[0] - mid))[1]          # min keeps the first of equals


def _numeric(record: dict) -> bool:
    return (record.get("meta", {}).get("extra") or {}).get("tolerance") is not None


class SelfConsistency:
    """A backend that answers by majority over ``k`` samples of ``inner`` (see the module doc)."""

    def __init__(self, inner, k: int, temperature: float = 0.7, top_p: float = 1.0):
        if isinstance(k, bool) or not isinstance(k, int) or k < 2:
            raise ConfigError(f"self_consistency: expected an int >= 2 samples per question, got {k!r}")
        if not temperature > 0:
            raise ConfigError(f"sc_temperature: expected > 0 (samples must differ), got {temperature!r}")
        if not 0 < top_p <= 1:
            raise ConfigError(f"sc_top_p: expected 0 < top_p <= 1, got {top_p!r}")
        self.inner, self.k, self.temperature, self.top_p = inner, k, float(temperature), float(top_p)
        self.name = inner.name
        self.decoding = "self-consistency"
        self.batch_size = getattr(inner, "batch_size", None) or 32   # records per round of k samples
        self.supports_ablation = getattr(inner, "supports_ablation", False)

    @property
    def settings(self) -> dict:
        return {"k": self.k, "temperature": self.temperature, "top_p": self.top_p}

    def describe(self) -> dict:
        return {**self.inner.describe(), "decoding": "self-consistency", "self_consistency": self.settings}

    def answer(self, records: Sequence[dict], base_dir: str | os.PathLike, gen: dict, *, on_batch=None,
               ablation: str | None = None, seed: int = 0) -> list[str | None]:
        records = list(records)
        step = self.batch_size or len(records) or 1
        sample_gen = {**gen, "temperature": self.temperature, "top_p": self.top_p}
        kw = {"ablation": ablation} if ablation is not None else {}
        out: list[str | None] = []
        for start in range(0, len(records), step):
            chunk = records[start:start + step]
            samples = [self.inner.answer(chunk, base_dir, sample_gen, seed=seed + i, **kw) for i in range(self.k)]
            voted = [(median_answer if _numeric(r) else majority)([s[j] for s in samples]) for j, r in enumerate(chunk)]
            out.extend(voted)
            if on_batch is not None:
                on_batch([r["id"] for r in chunk], voted)
        return out


__all__ = ["SelfConsistency", "majority", "median_answer", "vote_key"]

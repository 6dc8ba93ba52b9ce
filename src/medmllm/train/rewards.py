"""Verifiable rewards for RL (GRPO): a registry of ``(completion, record) -> float`` functions.

A reward takes the model's completion text and the record it answers (its ``meta`` holds the gold
answer) and returns a float. Rewards are looked up by exact name in :data:`REWARDS` (unknown names
raise ConfigError listing the known ones; registering a name twice raises). Built in:

* ``accuracy`` (0 or 1) — the answer is the text inside the last ``<answer>…</answer>`` (the whole
  completion when there is no tag, :func:`medmllm.eval.normalize.extract_answer_tag`), scored
  against ``meta.answer`` per protocol:

  - ``meta.extra["tolerance"]`` set (a number >= 0, absolute, in the answer's unit; e.g. heart rate
    ``5`` = ±5 bpm, a size in mm ``3`` = ±3 mm): **numeric** — the first number in the answer
    must lie within ``tolerance`` of the gold number (``|pred - gold| <= tolerance``); an answer
    without a number scores 0;
  - ``answer_type == "choice"``: the ``mcq`` protocol (choice letters extracted from free text);
  - ``answer_type`` ``closed`` or ``open`` (or absent): the ``exact`` protocol (normalised exact match);
  - ``report`` / ``caption``: not verifiable -> RecordError.
* ``format`` (0 or 1) — 1 iff the completion is ``<think>…</think>`` then ``<answer>…</answer>``:
  each of the four tags exactly once (lower case, as prompted), in that order, only whitespace
  before ``<think>``, between ``</think>`` and ``<answer>`` and after ``</answer>``, and a
  non-empty answer (the thinking may be empty).
* ``length_penalty`` (in [-1, 0]) — 0 up to :data:`LENGTH_SOFT_CHARS` characters of completion,
  then falling linearly to -1 at :data:`LENGTH_HARD_CHARS` and beyond
  (:func:`make_length_penalty` builds one with other limits). Characters, not tokens, so the
  penalty does not depend on the tokenizer.

Any callable ``(completion: str, record: dict) -> float`` can be registered with
:func:`register_reward` (also as a decorator). :func:`combined` weights several rewards into one
(:class:`CombinedReward`), keeping each component for logging.
"""

from __future__ import annotations

import math
import re
from typing import Callable, Mapping, Sequence, Union

from medmllm.errors import ConfigError, RecordError
from medmllm.eval.protocols import first_number, numeric_correct, tolerance_of  # noqa: F401  (re-exported)
from medmllm.registry import Registry

RewardFn = Callable[[str, dict], float]
REWARDS: Registry[RewardFn] = Registry("reward")

LENGTH_SOFT_CHARS = 400
LENGTH_HARD_CHARS = 800
_FORMAT = re.compile(r"\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*", re.DOTALL)
_TAGS = ("<think>", "</think>", "<answer>", "</answer>")


def register_reward(name: str, fn: RewardFn | None = None):
    """Register ``fn(completion, record) -> float`` under exactly ``name`` (or use as a decorator).

    ConfigError when ``name`` is taken or ``fn`` is not callable.
    """
    if fn is None:
        def deco(f: RewardFn) -> RewardFn:
            return register_reward(name, f)
        return deco
    if not callable(fn):
        raise ConfigError(f"reward {name!r}: expected a callable (completion, record) -> float, got "
                          f"{type(fn).__name__}")
    REWARDS.register(name, fn)
    return fn


def get_reward(name: str) -> RewardFn:
    """The reward registered under exactly ``name`` (ConfigError listing the known ones otherwise)."""
    return REWARDS.get(name)


# ----------------------------------------------------------------------------- accuracy

def _meta(record: dict) -> dict:
    meta = record.get("meta") if isinstance(record, dict) else None
    if not isinstance(meta, dict):
        raise RecordError("record.meta", f"expected a record with a meta object, got {type(meta).__name__}")
    if meta.get("answer") in (None, ""):
        raise RecordError("meta.answer", f"expected a gold answer to reward against, got {meta.get('answer')!r}")
    return meta


@register_reward("accuracy")
def accuracy(completion: str, record: dict) -> float:
    """1.0 if the completion's answer is right for ``record`` (see the module doc), else 0.0."""
    from medmllm.eval.normalize import extract_answer_tag
    from medmllm.eval.protocols import get_protocol

    meta = _meta(record)
    answer = extract_answer_tag(completion or "")
    tol = tolerance_of(meta)
    if tol is not None:
        return float(numeric_correct(answer, str(meta["answer"]), tol))
    at = meta.get("answer_type", "open")
    if at == "choice":
        return float(get_protocol("mcq").score(answer, meta)["correct"])
    if at in ("closed", "open"):
        return float(get_protocol("exact").score(answer, {**meta, "answer_type": at})["correct"])
    raise RecordError("meta.answer_type", f"accuracy rewards closed, open, choice or numeric (meta.extra.tolerance) "
                                          f"answers, got {at!r}")


# ----------------------------------------------------------------------------- format

def format_ok(completion: str) -> bool:
    """Whether ``completion`` is ``<think>…</think><answer>…</answer>`` (see the module doc)."""
    text = completion or ""
    if any(text.count(tag) != 1 for tag in _TAGS):
        return False
    m = _FORMAT.fullmatch(text)
    return bool(m) and bool(m.group(2).strip())


@register_reward("format")
def format_reward(completion: str, record: dict) -> float:
    """1.0 when the completion follows the think/answer format, else 0.0."""
    return float(format_ok(completion))


# ----------------------------------------------------------------------------- length

def make_length_penalty(soft_chars: int = LENGTH_SOFT_CHARS, hard_chars: int = LENGTH_HARD_CHARS) -> RewardFn:
    """A reward that is 0 for completions of at most ``soft_chars`` characters, -1 from ``hard_chars``
    on, and linear in between: ``-min(1, max(0, n - soft) / (hard - soft))``."""
    if not (isinstance(soft_chars, int) and isinstance(hard_chars, int) and 0 <= soft_chars < hard_chars):
        raise ConfigError(f"length penalty: expected integers 0 <= soft_chars < hard_chars, got "
                          f"{soft_chars!r}, {hard_chars!r}")

    def length_penalty(completion: str, record: dict) -> float:
        n = len(completion or "")
        return -min(1.0, max(0, n - soft_chars) / (hard_chars - soft_chars))

    length_penalty.soft_chars, length_penalty.hard_chars = soft_chars, hard_chars  # type: ignore[attr-defined]
    return length_penalty


register_reward("length_penalty", make_length_penalty())


# ----------------------------------------------------------------------------- combination

class CombinedReward:
    """``sum_k weights[k] * reward_k(completion, record)``; :meth:`components` gives each term unweighted."""

    def __init__(self, fns: Mapping[str, RewardFn], weights: Mapping[str, float]):
        self.fns, self.weights = dict(fns), dict(weights)

    @property
    def names(self) -> list[str]:
        return list(self.fns)

    def components(self, completion: str, record: dict) -> dict[str, float]:
        """Each reward's (unweighted) value; ConfigError if one returns something that is not a finite number."""
        out = {}
        for name, fn in self.fns.items():
            value = fn(completion, record)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"reward {name!r}: expected a finite float, got {value!r}")
            out[name] = float(value)
        return out

    def total(self, components: Mapping[str, float]) -> float:
        return float(sum(self.weights[k] * v for k, v in components.items()))

    def __call__(self, completion: str, record: dict) -> float:
        return self.total(self.components(completion, record))

    def __repr__(self) -> str:
        return "CombinedReward(" + " + ".join(f"{w:g}*{k}" for k, w in self.weights.items()) + ")"


def combined(names: Sequence[Union[str, RewardFn]], weights: Sequence[float] | None = None) -> CombinedReward:
    """Weighted sum of rewards given by registry name or as callables (named by ``__name__``).

    ``weights`` defaults to 1 each; ConfigError on an unknown name, a length mismatch, a duplicate
    name or a non-finite weight.
    """
    names = list(names)
    weights = [1.0] * len(names) if weights is None else list(weights)
    if not names or len(weights) != len(names):
        raise ConfigError(f"combined rewards: expected one weight per reward (at least one), got {len(names)} "
                          f"rewards and {len(weights)} weights")
    fns: dict[str, RewardFn] = {}
    ws: dict[str, float] = {}
    for item, w in zip(names, weights):
        name, fn = (item, get_reward(item)) if isinstance(item, str) else (getattr(item, "__name__", repr(item)), item)
        if not callable(fn):
            raise ConfigError(f"combined rewards: expected a reward name or callable, got {item!r}")
        if name in fns:
            raise ConfigError(f"combined rewards: {name!r} given twice")
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise ConfigError(f"combined rewards: weight of {name!r}: expected a finite number, got {w!r}")
        fns[name], ws[name] = fn, float(w)
    return CombinedReward(fns, ws)


__all__ = ["REWARDS", "CombinedReward", "RewardFn", "accuracy", "combined", "first_number", "format_ok",
           "format_reward", "get_reward", "make_length_penalty", "numeric_correct", "register_reward"]

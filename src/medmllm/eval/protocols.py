"""Named, versioned scoring protocols: the same predictions scored the way each source scores them.

Medical VQA numbers differ between papers mostly because kits score differently (substring vs
token recall vs exact match, each with its own normaliser). A medmllm result always names the
protocol and its version, and :func:`score_all` scores one set of predictions under several
protocols at once so the numbers can be shown side by side.

A protocol is looked up by exact name in :data:`PROTOCOLS` (unknown names raise ConfigError
listing the known ones). Each has ``name``, ``version`` (int), ``description`` (what it
reproduces, citing the source file), ``answer_types`` (the ``meta.answer_type`` values it
scores) and

* ``score(prediction, record_meta, *, extract_answer_tag=False) -> dict``: per-item numbers,
  always with ``"score"`` (the item's primary number in [0, 1]) plus protocol-specific keys
  (``correct``, ``recall``, ``f1`` ...);
* ``aggregate(items) -> dict``: the mean of every numeric key over the items holding it, plus
  ``"n"``.

``record_meta`` is a record's ``meta`` (see :mod:`medmllm.data.records`): ``answer`` (gold text;
for choice questions the letter(s), e.g. ``"B"`` or ``"A,C"``), ``answer_type``
(closed/open/choice/report/caption) and, for choice questions, ``choices`` (option texts in
letter order). A missing or blank gold answer raises :class:`~medmllm.errors.RecordError`; a
``None`` prediction (a record whose files could not be read) scores as an empty answer.

Protocols (one line each; details in each class's docstring):

* ``llava-med`` v1 — LLaVA-Med normaliser; closed: gold is a *character substring* of the
  prediction; open: LLaVA-Med's token recall (``calculate_f1score``).
* ``multimedeval`` v1 — same normaliser; gold yes/no: token-set recall with ``no`` also matching
  ``not``, correct at >= 0.4; otherwise correct at token-set recall >= 0.75.
* ``exact`` v1 — exact match after :func:`~medmllm.eval.normalize.exact_normalize` (explicit
  yes/no synonym lists).
* ``mcq`` v1 — choice letter(s) extracted from free text, compared with the gold letter set.
* ``f1`` v1 — SQuAD v1.1 token F1 per item, macro-averaged.
"""

from __future__ import annotations

import gc
import math
import re
from collections import Counter
from functools import lru_cache
from typing import Any, Iterable, Sequence

from medmllm.errors import ConfigError, RecordError
from medmllm.eval import normalize as N
from medmllm.registry import Registry

PROTOCOLS: Registry["Protocol"] = Registry("protocol")
_NUMBER = (int, float)


class Protocol:
    """Base class: subclasses set the attributes and implement :meth:`_score`."""

    name: str = ""
    version: int = 1
    description: str = ""
    answer_types: tuple[str, ...] = ("closed", "open")

    def supports(self, meta: dict) -> bool:
        """Whether this protocol scores a record with this meta (by ``meta.answer_type``)."""
        return meta.get("answer_type") in self.answer_types

    def score(self, prediction: str | None, record_meta: dict, *, extract_answer_tag: bool = False) -> dict:
        """Per-item scores (``{"score": x, ...}``) of ``prediction`` against ``record_meta["answer"]``."""
        if not isinstance(record_meta, dict):
            raise RecordError("meta", f"expected a record meta dict, got {type(record_meta).__name__}")
        at = record_meta.get("answer_type")
        if at not in self.answer_types:
            raise RecordError("meta.answer_type",
                              f"protocol {self.name!r} scores answer types {self.answer_types}, got {at!r}")
        pred = N._text(prediction)
        if extract_answer_tag:
            pred = N.extract_answer_tag(pred)
        return self._score(pred, _gold(record_meta), record_meta)

    def _score(self, pred: str, gold: str, meta: dict) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def aggregate(self, items: Iterable[dict]) -> dict:
        """Mean of each numeric key over the items that hold it, plus ``n`` (item count)."""
        items = items if isinstance(items, list) else list(items)
        keys: set[str] = set()
        for it in items:
            keys.update(it)
        out: dict[str, Any] = {}
        for k in sorted(keys):
            vals = [v for it in items if type(v := it.get(k)) in _NUMBER]  # bools excluded on purpose
            if vals:
                out[k] = sum(vals) / len(vals)
        out["n"] = len(items)
        return out

    def __repr__(self) -> str:
        return f"<protocol {self.name} v{self.version}>"


def _gold(meta: dict) -> str:
    ans = meta.get("answer")
    if isinstance(ans, (list, tuple)):
        ans = ",".join(str(a) for a in ans)
    if ans is None or not str(ans).strip():
        raise RecordError("meta.answer", f"expected a non-empty gold answer to score against, got {ans!r}")
    return str(ans)


def register(cls: type[Protocol]) -> type[Protocol]:
    PROTOCOLS.register(cls.name, cls())
    return cls


# ----------------------------------------------------------------------------- llava-med

@lru_cache(maxsize=N.CACHE_SIZE)
def _llava_counts(text: str) -> Counter:
    """LLaVA-Med ``split_sentence(normalize_word(normalize_word(x.lower())), 1)``: the eval script
    normalises once, then ``calculate_f1score`` normalises again before counting unigrams."""
    return Counter(N.vqa_normalize(N.vqa_normalize(text)).split())


def llava_recall(pred: str, gold: str) -> tuple[float, float, float]:
    """LLaVA-Med ``calculate_f1score(pred, gold)`` -> (f1, precision, recall), quirks included:
    true positives are counted with the *prediction's* multiplicity (gold ``left lung``,
    prediction ``left left`` -> tp 2, fn 1, recall 2/3) and any empty side or tp == 0 gives 0."""
    cand, ref = _llava_counts(pred), _llava_counts(gold)
    if not cand or not ref:
        return 0.0, 0.0, 0.0
    tp = sum(c for w, c in cand.items() if w in ref)
    if tp == 0:
        return 0.0, 0.0, 0.0
    fp = sum(c for w, c in cand.items() if w not in ref)
    fn = sum(c for w, c in ref.items() if w not in cand)
    p, r = tp / (tp + fp), tp / (tp + fn)
    return 2 * p * r / (p + r), p, r


@register
class LlavaMed(Protocol):
    """LLaVA-Med v1 (microsoft/LLaVA-Med ``llava/eval/run_eval_batch.py`` + ``eval_metrics/``).

    Both texts are lower-cased and put through ``normalize_word``
    (:func:`~medmllm.eval.normalize.vqa_normalize`).

    * closed: correct iff the normalised gold is a **character substring** of the normalised
      prediction (``gt_value in pred_value``), exactly as the script does. Consequences kept on
      purpose: gold ``no`` matches ``"nodule"``, ``"normal"`` and ``"not"``; gold ``yes`` matches
      ``"eyes"``; a prediction saying both ``yes`` and ``no`` is right for either gold. This is the
      batch script, which counts a miss as 0; the older ``run_eval.py`` skipped misses among
      predictions mentioning yes/no, inflating accuracy — not reproduced.
    * open: ``recall`` from ``calculate_f1score`` (:func:`llava_recall`, the number the LLaVA-Med
      paper reports for open questions); ``precision`` and ``f1`` are kept too.
    """

    name = "llava-med"
    version = 1
    description = ("LLaVA-Med eval (microsoft/LLaVA-Med llava/eval/run_eval_batch.py, eval_metrics/glossary.py "
                   "normalize_word): closed = normalised gold is a character substring of the normalised "
                   "prediction; open = LLaVA-Med token recall (calculate_f1score, prediction-count tp).")

    def _score(self, pred: str, gold: str, meta: dict) -> dict:
        if meta.get("answer_type") == "closed":
            hit = int(N.vqa_normalize(gold) in N.vqa_normalize(pred))
            return {"score": hit, "correct": hit}
        f1, p, r = llava_recall(pred, gold)
        return {"score": r, "recall": r, "precision": p, "f1": f1}


# ----------------------------------------------------------------------------- multimedeval

@lru_cache(maxsize=N.CACHE_SIZE)
def _token_set(text: str) -> frozenset:
    return frozenset(N.vqa_normalize(text).split())


@register
class MultiMedEval(Protocol):
    """MultiMedEval v1 (corentin-ryr/MultiMedEval ``multimedeval/task_families.py: VQA.evaluate``).

    Texts go through ``clean_str`` (= :func:`~medmllm.eval.normalize.vqa_normalize`) and become
    token *sets*; ``recall = |pred ∩ gold| / |gold|``.

    * A question is closed when the cleaned gold is ``yes`` or ``no`` — MultiMedEval decides this
      from the gold answer, **not** from the record's answer_type, so a closed "left or right?"
      question is scored as open here. Gold ``no`` also accepts ``not`` (the gold set becomes
      ``{no, not}``); correct at set recall >= 0.4. So ``"no"``, ``"not"`` and even
      ``"yes or no"`` are right for gold ``no``; ``"normal"`` and ``"nodule"`` are not.
    * Otherwise correct at recall >= 0.75 (``openQuestionsAccuracy``).

    Items carry ``correct``, ``recall`` (plain set recall, as MultiMedEval logs it) and
    ``closed`` (1 when the yes/no rule applied). Its BLEU-1 column is not reproduced.
    """

    name = "multimedeval"
    version = 1
    description = ("MultiMedEval VQA scoring (corentin-ryr/MultiMedEval multimedeval/task_families.py VQA.evaluate, "
                   "utils.clean_str): gold yes/no -> token-set recall with no~not >= 0.4; else token-set recall "
                   ">= 0.75.")
    OPEN_THRESHOLD = 0.75
    CLOSED_THRESHOLD = 0.4

    def _score(self, pred: str, gold: str, meta: dict) -> dict:
        p, g = _token_set(pred), _token_set(gold)
        recall = len(p & g) / len(g) if g else 0.0
        if N.vqa_normalize(gold) in ("yes", "no"):
            if g == {"no"}:
                g = frozenset(("no", "not"))
            hit = int(len(p & g) / len(g) >= self.CLOSED_THRESHOLD)
            return {"score": hit, "correct": hit, "recall": recall, "closed": 1}
        hit = int(recall >= self.OPEN_THRESHOLD)
        return {"score": hit, "correct": hit, "recall": recall, "closed": 0}


# ----------------------------------------------------------------------------- exact

@register
class Exact(Protocol):
    """Exact v1: normalised exact match (lmms-eval ``tasks/slake/utils.py`` style), medmllm's rules.

    Both sides go through :func:`~medmllm.eval.normalize.exact_normalize`: NFKC, lower case,
    parentheticals dropped, ASCII and CJK punctuation -> space, articles dropped, ``zero..ten`` ->
    digits, and a whole answer found in ``YES_WORDS`` / ``NO_WORDS`` becomes ``yes`` / ``no``.
    Correct iff the two results are equal. ``"Yes."`` is right for gold ``yes``; ``"Yes, there
    is a nodule"`` is not (the whole answer must match).
    """

    name = "exact"
    version = 1
    description = ("Normalised exact match in the style of lmms-eval's SLAKE scorer (lmms_eval/tasks/slake/utils.py "
                   "normalize_answer), with medmllm's explicit yes/no synonym lists, articles dropped and number "
                   "words as digits (medmllm.eval.normalize.exact_normalize).")

    def _score(self, pred: str, gold: str, meta: dict) -> dict:
        hit = int(N.exact_normalize(pred) == N.exact_normalize(gold))
        return {"score": hit, "correct": hit}


# ----------------------------------------------------------------------------- f1

@lru_cache(maxsize=N.CACHE_SIZE)
def _squad_tokens(text: str) -> tuple[str, ...]:
    return tuple(N.squad_normalize(text).split())


@lru_cache(maxsize=N.CACHE_SIZE)
def _squad_counts(text: str) -> Counter:
    return Counter(_squad_tokens(text))  # callers never mutate it


def squad_f1(pred: str, gold: str) -> tuple[float, float, float]:
    """SQuAD v1.1 ``f1_score`` -> (f1, precision, recall) over multiset token overlap."""
    pc, gc = _squad_counts(pred), _squad_counts(gold)
    same = sum((pc & gc).values())
    if same == 0:
        return 0.0, 0.0, 0.0
    p, r = same / pc.total(), same / gc.total()
    return 2 * p * r / (p + r), p, r


@register
class F1(Protocol):
    """F1 v1: SQuAD v1.1 token F1 (``evaluate-v1.1.py`` ``normalize_answer`` + ``f1_score``), the
    "tokenized F1" MedGemma reports for open VQA; macro-averaged (mean of per-item F1).

    Tokens are whitespace-split after SQuAD normalisation (punctuation *deleted*, so
    ``left-sided`` is one token ``leftsided``; Chinese answers without spaces are one token each,
    making F1 an exact match for them). Items carry ``f1``, ``precision``, ``recall`` and ``em``
    (normalised exact match).
    """

    name = "f1"
    version = 1
    description = ("SQuAD v1.1 token F1 (evaluate-v1.1.py normalize_answer/f1_score), as MedGemma's tokenized F1; "
                   "per item, macro-averaged.")

    def _score(self, pred: str, gold: str, meta: dict) -> dict:
        f1, p, r = squad_f1(pred, gold)
        em = int(_squad_tokens(pred) == _squad_tokens(gold))
        return {"score": f1, "f1": f1, "precision": p, "recall": r, "em": em}


# ----------------------------------------------------------------------------- mcq

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_SEP = r"(?:\s*(?:,|;|/|&|\band\b|\bor\b)\s*|\s+)"
# "Answer: B", "the answer is (b)", "correct option is B and D", "Final answer - C".
_MARKER = re.compile(
    r"(?:answer|option|choice)s?\s*(?:is|are|would\s+be|should\s+be|:|-|=)?\s*[:\-]?\s*"
    r"(\(?[A-Za-z]\)?(?:" + _SEP + r"\(?[A-Za-z]\)?(?![A-Za-z]))*)(?![A-Za-z])",
    re.IGNORECASE)
_WHOLE = re.compile(r"^\s*\(?([A-Za-z])\)?(?:" + _SEP + r"\(?[A-Za-z]\)?)*\s*[.!]?\s*$")
_LEADING = re.compile(r"^\s*(?:\(([A-Za-z])\)|([A-Z])[).:]|([a-z])\))(?:\s|$)")
_PAREN_LETTER = re.compile(r"\(([A-Z])\)")
_BARE_LETTER = re.compile(r"(?<![A-Za-z'])([A-Z])(?=[).:](?:\s|$)|\s*$)")
_AND_OR = re.compile(r"\b(?:and|or)\b", re.IGNORECASE)
_LETTER_IN = re.compile(r"[A-Za-z]")
_GOLD_LETTERS = re.compile(r"^\s*(?:[A-Z]+|[A-Za-z](?:\s*(?:,|;|/|&|\band\b|\s)\s*[A-Za-z])*)\s*$")


def _letters(span: str) -> list[str]:
    """Letters of a matched span such as ``"(B) and d"`` -> ``["B", "D"]`` (the words and/or skipped)."""
    span = _AND_OR.sub(" ", span)
    return [c.upper() for c in _LETTER_IN.findall(span)]


def gold_letters(answer: str) -> frozenset:
    """Gold choice letters from ``meta.answer`` (``"B"``, ``"A,C"``, ``"A and C"``, ``"AC"``) as a set."""
    if not _GOLD_LETTERS.match(answer):
        raise RecordError("meta.answer", f"expected choice letter(s) such as 'B' or 'A,C', got {answer!r}")
    return frozenset(_letters(answer))


def _option_match(pred: str, choices: Sequence[str], valid: str) -> set[str]:
    """Letters whose option text appears as whole words in the prediction (exact-normalised);
    an option contained in a longer matched option (``effusion`` in ``pleural effusion``) is dropped."""
    text = f" {N.exact_normalize(pred)} "
    hits = {}
    for letter, choice in zip(valid, choices):
        c = N.exact_normalize(choice)
        if c and f" {c} " in text:
            hits[letter] = c
    return {L for L, c in hits.items()
            if not any(c != o and f" {c} " in f" {o} " for o in hits.values())}


def extract_choice(pred: str, choices: Sequence[str] | None, n_letters: int | None = None) -> frozenset:
    """Choice letters a free-text answer picks, by the first rule that yields a valid letter:

    1. an answer marker: ``Answer: B``, ``the answer is b``, ``option (C)`` (the last marker wins);
    2. the whole answer is letters: ``B``, ``(b).``, ``A, C``;
    3. a leading letter with a delimiter: ``B) Axial``, ``(B) Axial``, ``B. Axial``, ``b) axial``
       (a capital ``A`` followed by a space, as in ``A left lung nodule``, is *not* a letter);
    4. parenthesised capitals anywhere: ``I pick (B)``;
    5. option text: the choices whose text appears in the answer (``choices`` needed);
    6. a bare capital followed by ``)``, ``.`` or ``:``, or ending the answer: ``It is B.``,
       ``The answer, I believe, is B``.

    Valid letters are the first ``n_letters`` (default ``len(choices)``, else 26). Returns the set
    of letters found (empty when none).
    """
    n = n_letters if n_letters is not None else (len(choices) if choices else len(LETTERS))
    valid = LETTERS[:n]

    def ok(letters: Iterable[str]) -> frozenset:
        return frozenset(L for L in letters if L in valid)

    markers = list(_MARKER.finditer(pred))
    for m in reversed(markers):
        span = m.group(1)
        # a lowercase single letter after a marker must end the clause ("the answer is a lung" is no letter)
        rest = pred[m.end():]
        letter = span.strip("() ")
        if len(letter) == 1 and letter.islower() and rest.strip() and rest.lstrip()[0].isalpha():
            continue
        got = ok(_letters(span))
        if got:
            return got
    m = _WHOLE.match(pred)
    if m:
        got = ok(_letters(pred))
        if got:
            return got
    m = _LEADING.match(pred)
    if m:
        got = ok([(m.group(1) or m.group(2) or m.group(3)).upper()])
        if got:
            return got
    got = ok(_PAREN_LETTER.findall(pred))
    if got:
        return got
    if choices:
        got = ok(_option_match(pred, choices, valid))
        if got:
            return got
    return ok(_BARE_LETTER.findall(pred))


@register
class MCQ(Protocol):
    """MCQ v1: medmllm's choice-letter extraction (:func:`extract_choice`) against the gold letters.

    Correct iff the set of extracted letters equals the gold set: an answer naming several
    letters is wrong for a single-letter gold (no credit for hedging) and right for a multi-letter
    gold only when it names exactly those letters. Items carry ``correct``, ``parsed`` (1 when any
    letter was found) and ``multi`` (1 when several were).
    """

    name = "mcq"
    version = 1
    description = ("medmllm multiple-choice scoring: choice letter(s) extracted from free text (answer markers, bare "
                   "or parenthesised letters, leading 'B)', option-text match) must equal the gold letter set; "
                   "several letters for a single-letter gold count as wrong.")
    answer_types = ("choice",)

    def _score(self, pred: str, gold: str, meta: dict) -> dict:
        want = gold_letters(gold)
        choices = meta.get("choices")
        if choices is not None and (not isinstance(choices, list) or not all(isinstance(c, str) for c in choices)):
            raise RecordError("meta.choices", f"expected a list of option texts, got {choices!r}")
        n_letters = None if choices is None else max(len(choices), _max_letter(want))
        got = extract_choice(pred, choices, n_letters)
        hit = int(got == want)
        return {"score": hit, "correct": hit, "parsed": int(bool(got)), "multi": int(len(got) > 1)}


def _max_letter(letters: frozenset) -> int:
    return max((LETTERS.index(L) + 1 for L in letters), default=0)


# ----------------------------------------------------------------------------- scoring many

# ----------------------------------------------------------------------------- numeric

_NUMBER_RE = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")


def first_number(text: str) -> float | None:
    """The first number in ``text`` (``"about 72 bpm"`` -> 72.0; commas are dropped first, as thousands
    separators: ``"1,000"`` -> 1000.0), or None."""
    m = _NUMBER_RE.search(text.replace(",", ""))
    return float(m.group(0)) if m else None


def tolerance_of(meta: dict) -> float | None:
    """``meta.extra.tolerance`` (absolute, in the answer's unit), None when absent; RecordError if bad."""
    tol = (meta.get("extra") or {}).get("tolerance")
    if tol is None:
        return None
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not math.isfinite(tol) or tol < 0:
        raise RecordError("meta.extra.tolerance", f"expected a finite number >= 0, got {tol!r}")
    return float(tol)


def numeric_correct(answer: str, gold: str, tolerance: float) -> bool:
    """``|first number of answer - first number of gold| <= tolerance`` (False without a number)."""
    g = first_number(str(gold))
    if g is None:
        raise RecordError("meta.answer", f"expected a number for a numeric answer (tolerance set), got {gold!r}")
    p = first_number(answer)
    return p is not None and math.isfinite(p) and abs(p - g) <= tolerance + 1e-9


@register
class Numeric(Protocol):
    """Numeric v1: answers with ``meta.extra.tolerance`` are right when their first number lies within
    the tolerance of the gold number (``|pred - gold| <= tolerance``; no number = wrong); every other
    answer is scored as :class:`Exact` v1. ``abs_error`` is reported for the numeric items. The
    ``accuracy`` reward of the RL stages (:mod:`medmllm.train.rewards`) uses the same rule.
    """

    name = "numeric"
    version = 1
    description = ("medmllm numeric scoring: the first number of the answer within meta.extra.tolerance of the gold "
                   "number (absolute, in the answer's unit); answers without a tolerance scored as exact v1.")

    def _score(self, pred: str, gold: str, meta: dict) -> dict:
        tol = tolerance_of(meta)
        if tol is None:
            return Exact._score(self, pred, gold, meta)
        hit = int(numeric_correct(pred, gold, tol))
        p, g = first_number(pred), first_number(gold)
        out = {"score": hit, "correct": hit}
        if p is not None and g is not None and math.isfinite(p):
            out["abs_error"] = abs(p - g)
        return out


def get_protocol(name: str) -> Protocol:
    """The protocol registered under exactly ``name`` (ConfigError listing known names otherwise)."""
    return PROTOCOLS.get(name)


def score_all(predictions: Sequence[str | None], metas: Sequence[dict], protocols: Sequence[str], *,
              extract_answer_tag: bool = False) -> dict[str, dict]:
    """Score ``predictions[i]`` against ``metas[i]`` under every protocol in ``protocols``.

    Returns ``{protocol: {"name", "version", "description", "overall": {...}, "by_answer_type":
    {type: {...}}, "n": scored items, "n_skipped": items of answer types the protocol does not
    score, "n_missing": None predictions}}`` where ``overall`` and each ``by_answer_type`` entry
    are the protocol's :meth:`~Protocol.aggregate` (``score`` = mean primary number).
    """
    if len(predictions) != len(metas):
        raise ConfigError(f"score_all: {len(predictions)} predictions but {len(metas)} record metas")
    if isinstance(protocols, str):
        protocols = [protocols]
    chosen = [PROTOCOLS.get(p) for p in protocols]  # unknown names fail before any work
    preds = [N._text(p) for p in predictions]
    if extract_answer_tag:
        preds = [N.extract_answer_tag(p) for p in preds]
    golds = [_gold_or_error(m) for m in metas]
    n_missing = sum(p is None for p in predictions)
    out: dict[str, dict] = {}
    gc_was_on = gc.isenabled()
    gc.disable()  # millions of small acyclic dicts: the cyclic collector would rescan them over and over
    try:
        for proto in chosen:
            out[proto.name] = _score_one(proto, preds, golds, metas, n_missing)
    finally:
        if gc_was_on:
            gc.enable()
    return out


def _gold_or_error(meta: dict) -> str | RecordError:
    try:
        return _gold(meta)
    except RecordError as exc:
        return exc


def _score_one(proto: Protocol, preds: list[str], golds: list, metas: Sequence[dict], n_missing: int) -> dict:
    by_type: dict[str, list[dict]] = {}
    items: list[dict] = []
    skipped = 0
    score = proto._score
    types = proto.answer_types
    for i, (pred, gold, meta) in enumerate(zip(preds, golds, metas)):
        at = meta.get("answer_type")
        if at not in types:
            skipped += 1
            continue
        try:
            if isinstance(gold, RecordError):
                raise gold
            item = score(pred, gold, meta)
        except RecordError as exc:
            raise RecordError(f"item {i} ({meta.get('dataset', '?')})", f"{exc.path}: {exc.reason}") from None
        items.append(item)
        by_type.setdefault(at, []).append(item)
    return {"name": proto.name, "version": proto.version, "description": proto.description,
            "overall": proto.aggregate(items),
            "by_answer_type": {t: proto.aggregate(v) for t, v in sorted(by_type.items())},
            "n": len(items), "n_skipped": skipped, "n_missing": n_missing}

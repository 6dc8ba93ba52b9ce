"""Answer normalisers used by the scoring protocols, each a faithful copy of one source's rules.

* :func:`vqa_normalize` — the normaliser of LLaVA-Med (``llava/eval/eval_metrics/glossary.py:
  normalize_word``) and MultiMedEval (``multimedeval/utils.py:clean_str``, same code, which
  lower-cases first). Both descend from the VQAv2 answer processing. Its quirks are kept on
  purpose (they change scores):

  - each punctuation mark in ``PUNCT`` is *deleted* when the original text has it next to a space
    (``"p "`` or ``" p"``) or when the text contains a digit-comma-digit anywhere; otherwise it is
    replaced by a space — so ``"left-sided"`` -> ``"left sided"`` but ``"left - sided"`` ->
    ``"left  sided"`` and ``"1,000 x-ray"`` -> ``"1000 xray"``;
  - periods not followed by a digit are deleted, **at most 32 of them**: the source calls
    ``period_strip.sub("", text, re.UNICODE)`` whose third positional argument is ``count``
    (``re.UNICODE == 32``);
  - words are mapped ``none -> 0``, ``zero..ten -> 0..10``; articles ``a an the`` are dropped;
    contraction spellings without apostrophe are restored (``dont -> don't``); commas removed;
  - apostrophes, colons, ``*``, ``%``, ``#``, ``&``, ``|`` and non-ASCII punctuation are kept.

  :func:`vqa_normalize_literal` is the line-by-line transcription (slow; the reference the tests
  and the scoring benchmark compare the cached, precompiled version against).
* :func:`squad_normalize` — SQuAD v1.1's ``normalize_answer`` (lower, delete ASCII punctuation,
  drop articles, collapse whitespace), used by the ``f1`` protocol.
* :func:`exact_normalize` — medmllm's exact-match normaliser (lmms-eval SLAKE style, plus
  articles, number words and the explicit yes/no synonym lists :data:`YES_WORDS`/:data:`NO_WORDS`).
* :func:`extract_answer_tag` — the text inside the last ``<answer>…</answer>``.

Every function takes any object (``None`` -> ``""``) and returns ``str``; the cached ones are pure.
"""

from __future__ import annotations

import re
import string
import unicodedata
from functools import lru_cache

CACHE_SIZE = 1 << 18  # distinct strings kept per normaliser (~a few tens of MB at most)

# ----------------------------------------------------------------------------- LLaVA-Med / MultiMedEval

CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
# The source's pattern, kept verbatim: "(?!<=\d)" is a (no-op) negative *lookahead* for "<=digit",
# not the lookbehind it was meant to be, so "3.5" keeps its period but "v3." and "a.b" lose theirs.
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
PERIOD_STRIP_COUNT = re.UNICODE  # == 32: the source passes re.UNICODE as sub()'s ``count``

_ARTICLE_SET = frozenset(ARTICLES)


def _text(x) -> str:
    return "" if x is None else x if isinstance(x, str) else str(x)


def vqa_normalize_literal(text) -> str:
    """Line-by-line transcription of LLaVA-Med ``normalize_word`` applied to ``text.lower()``
    (= MultiMedEval ``clean_str``). Unoptimised on purpose: the reference for tests and benchmarks."""
    token = _text(text).lower()
    _token = token
    for p in PUNCT:
        if (p + " " in token or " " + p in token) or (re.search(COMMA_STRIP, token) is not None):
            _token = _token.replace(p, "")
        else:
            _token = _token.replace(p, " ")
    token = PERIOD_STRIP.sub("", _token, PERIOD_STRIP_COUNT)
    _tok = []
    for word in token.lower().split():
        word = NUMBER_WORDS.get(word, word)
        if word not in ARTICLES:
            _tok.append(word)
    for i, word in enumerate(_tok):
        if word in CONTRACTIONS:
            _tok[i] = CONTRACTIONS[word]
    return " ".join(_tok).replace(",", "")


@lru_cache(maxsize=CACHE_SIZE)
def _vqa_normalize(token: str) -> str:
    token = token.lower()
    out = token
    has_comma_number = COMMA_STRIP.search(token) is not None  # the source re-checks the same text 21 times
    for p in PUNCT:
        if p in out:
            delete = has_comma_number or (p + " " in token) or (" " + p in token)
            out = out.replace(p, "" if delete else " ")
    if "." in out:
        out = PERIOD_STRIP.sub("", out, PERIOD_STRIP_COUNT)
    words = []
    for w in out.split():
        w = NUMBER_WORDS.get(w, w)
        if w not in _ARTICLE_SET:
            words.append(CONTRACTIONS.get(w, w))
    return " ".join(words).replace(",", "")


def vqa_normalize(text) -> str:
    """LLaVA-Med / MultiMedEval normaliser (see module doc); cached; equal to :func:`vqa_normalize_literal`."""
    return _vqa_normalize(_text(text))


# ----------------------------------------------------------------------------- SQuAD

_SQUAD_PUNCT = str.maketrans("", "", string.punctuation)
_SQUAD_ARTICLES = re.compile(r"\b(a|an|the)\b")


@lru_cache(maxsize=CACHE_SIZE)
def _squad_normalize(s: str) -> str:
    s = s.lower().translate(_SQUAD_PUNCT)
    return " ".join(_SQUAD_ARTICLES.sub(" ", s).split())


def squad_normalize(text) -> str:
    """SQuAD v1.1 ``normalize_answer``: lower, delete ``string.punctuation``, drop a/an/the, collapse spaces."""
    return _squad_normalize(_text(text))


# ----------------------------------------------------------------------------- exact match

# Whole normalised answers that count as "yes" / "no" (after exact_normalize's punctuation and
# article handling). Explicit lists: a protocol's synonyms are part of its definition.
YES_WORDS = ("yes", "y", "yeah", "yep", "yup", "true", "correct", "present", "positive", "affirmative",
             "是", "是的", "对", "有")
NO_WORDS = ("no", "n", "nope", "not", "none", "absent", "false", "incorrect", "negative",
            "not present", "no evidence",
            "否", "不", "不是", "没有", "无")
ALIASES = {"x ray": "xray"}
ZH_PUNCT = "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～、《》【】「」『』…·"
_EXACT_PUNCT = str.maketrans({c: " " for c in string.punctuation + ZH_PUNCT})
_PAREN = re.compile(r"\([^)]*\)|（[^）]*）")
_EXACT_NUMBERS = {k: v for k, v in NUMBER_WORDS.items() if k != "none"}  # "none" is a NO word here
_YES = frozenset(YES_WORDS)
_NO = frozenset(NO_WORDS)


@lru_cache(maxsize=CACHE_SIZE)
def _exact_normalize(s: str) -> str:
    s = unicodedata.normalize("NFKC", s).strip().lower()
    s = _PAREN.sub(" ", s).translate(_EXACT_PUNCT)
    words = [_EXACT_NUMBERS.get(w, w) for w in s.split() if w not in _ARTICLE_SET]
    s = " ".join(words)
    s = ALIASES.get(s, s)
    if s in _YES:
        return "yes"
    if s in _NO:
        return "no"
    return s


def exact_normalize(text) -> str:
    """The ``exact`` protocol's normaliser: NFKC, lower, drop parentheticals (lmms-eval SLAKE),
    ASCII + CJK punctuation -> space, drop a/an/the, ``zero..ten`` -> digits, then a whole answer
    in :data:`YES_WORDS` -> ``"yes"`` and in :data:`NO_WORDS` -> ``"no"``."""
    return _exact_normalize(_text(text))


# ----------------------------------------------------------------------------- <answer> tags

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.IGNORECASE | re.DOTALL)
_ANSWER_OPEN = re.compile(r"<answer>", re.IGNORECASE)


def extract_answer_tag(text) -> str:
    """Text inside the last complete ``<answer>…</answer>`` (case-insensitive tags), stripped.

    An opened but never closed tag (a truncated generation) gives the text after the last
    ``<answer>``; without any tag the whole text is returned unchanged.
    """
    text = _text(text)
    if "<" not in text:
        return text
    found = _ANSWER_TAG.findall(text)
    if found:
        return found[-1].strip()
    opened = list(_ANSWER_OPEN.finditer(text))
    if opened:
        return text[opened[-1].end():].strip()
    return text


def clear_caches() -> None:
    """Empty every normaliser cache (benchmarks use it to time cold runs)."""
    for f in (_vqa_normalize, _squad_normalize, _exact_normalize):
        f.cache_clear()

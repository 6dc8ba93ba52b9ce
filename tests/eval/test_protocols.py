"""Scoring protocols: each expected value below is worked out by hand from the protocol's
definition (the source's rules, quoted in the comments), not copied from an implementation run."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medmllm.errors import ConfigError, RecordError
from medmllm.eval import normalize as N
from medmllm.eval.protocols import PROTOCOLS, Protocol, extract_choice, get_protocol, score_all
from medmllm.registry import Registry

CHOICES = ["Axial", "Coronal", "Sagittal", "Oblique"]


def closed(gold):
    return {"answer": gold, "answer_type": "closed", "dataset": "t"}


def open_(gold):
    return {"answer": gold, "answer_type": "open", "dataset": "t"}


def choice(gold, choices=CHOICES):
    return {"answer": gold, "answer_type": "choice", "choices": choices, "dataset": "t"}


def s(name, pred, meta, **kw):
    return PROTOCOLS.get(name).score(pred, meta, **kw)


# ----------------------------------------------------------------------------- registry

def test_registry_holds_the_six_versioned_protocols():
    assert PROTOCOLS.names() == ["exact", "f1", "llava-med", "mcq", "multimedeval", "numeric"]
    for name in PROTOCOLS:
        p = PROTOCOLS.get(name)
        assert p.name == name and p.version == 1 and isinstance(p, Protocol)
        assert len(p.description) > 40
    assert "LLaVA-Med" in PROTOCOLS.get("llava-med").description
    assert "MultiMedEval" in PROTOCOLS.get("multimedeval").description
    assert "SQuAD" in PROTOCOLS.get("f1").description


def test_unknown_protocol_lists_known_ones():
    with pytest.raises(ConfigError, match=r"unknown protocol 'llava'; known: exact, f1, llava-med, mcq, multimedeval"):
        PROTOCOLS.get("llava")
    with pytest.raises(ConfigError, match="known: exact, f1, llava-med, mcq, multimedeval"):
        score_all(["yes"], [closed("yes")], ["exact", "LLaVA-Med"])


def test_duplicate_protocol_name_fails():
    with pytest.raises(ConfigError, match="duplicate protocol name 'exact'"):
        PROTOCOLS.register("exact", PROTOCOLS.get("exact"))


# ----------------------------------------------------------------------------- LLaVA-Med normaliser

@pytest.mark.parametrize("text, expected", [
    ("Left-sided.", "left sided"),            # '-' not next to a space -> ' '; final '.' stripped
    ("left - sided", "left sided"),          # ' -' present -> '-' deleted; double space collapses on split
    ("1,000 x-ray", "1000 xray"),             # digit,digit anywhere -> every punct mark deleted
    ("Two nodules, none calcified.", "2 nodules 0 calcified"),  # ', ' -> deleted; none->0, two->2
    ("A left lung nodule", "left lung nodule"),  # article dropped
    ("dont know", "don't know"),               # contraction restored
    ("3.5 cm", "3.5 cm"),                      # period before a digit kept
    ("(yes)", "yes"),
])
def test_llava_normaliser_hand_cases(text, expected):
    assert N.vqa_normalize(text) == expected
    assert N.vqa_normalize_literal(text) == expected


def test_llava_normaliser_strips_at_most_32_periods():
    # The source passes re.UNICODE (== 32) as sub()'s count: 33 "x." units lose only 32 periods.
    text = "x." * 33
    assert N.vqa_normalize(text) == "x" * 33 + "."
    assert N.vqa_normalize_literal(text) == "x" * 33 + "."


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(list("ab xyz.,-;/()!?'\"_12\n") + ["none", " two ", " the ", "dont", " a "]),
                max_size=30).map("".join))
def test_cached_normaliser_equals_literal_transcription(text):
    assert N.vqa_normalize(text) == N.vqa_normalize_literal(text)


# ----------------------------------------------------------------------------- llava-med

@pytest.mark.parametrize("gold, pred, hit", [
    ("no", "There is a nodule.", 1),   # substring trap: "no" is inside "nodule" (LLaVA-Med's real behaviour)
    ("no", "normal", 1),               # ... and inside "normal"
    ("no", "not", 1),
    ("yes", "the eyes are clear", 1),  # "yes" inside "eyes"
    ("yes", "Yes, there is.", 1),
    ("yes", "No.", 0),
    ("no", "", 0),
    ("2", "two", 1),                   # number words -> digits on both sides
    ("left lung", "A left lung.", 1),
])
def test_llava_med_closed_is_character_substring(gold, pred, hit):
    assert s("llava-med", pred, closed(gold)) == {"score": hit, "correct": hit}


def test_llava_med_open_recall_hand_computed():
    # gold "left lung nodule" -> {left, lung, nodule}; pred "A nodule in the left lung" -> {nodule, in, left, lung}
    # tp = 3, fp = 1 ("in"), fn = 0 -> recall 1, precision 3/4
    r = s("llava-med", "A nodule in the left lung", open_("left lung nodule"))
    assert r["recall"] == 1.0 and r["score"] == 1.0
    assert r["precision"] == pytest.approx(0.75)
    assert r["f1"] == pytest.approx(2 * 0.75 / 1.75)
    # quirk: tp counts the prediction's multiplicity: gold {left, lung}, pred "left left" -> tp 2, fn 1 -> 2/3
    r = s("llava-med", "left left", open_("left lung"))
    assert r["recall"] == pytest.approx(2 / 3) and r["precision"] == 1.0 and r["f1"] == pytest.approx(0.8)
    assert s("llava-med", "two", open_("2"))["recall"] == 1.0
    assert s("llava-med", "", open_("pleural effusion"))["recall"] == 0.0
    assert s("llava-med", "heart", open_("pleural effusion"))["recall"] == 0.0


# ----------------------------------------------------------------------------- multimedeval

@pytest.mark.parametrize("gold, pred, hit", [
    ("no", "no", 1),
    ("no", "Not.", 1),                  # gold set {no, not}: |{not}| / 2 = 0.5 >= 0.4
    ("no", "yes no", 1),                # quirk: both words -> 0.5 >= 0.4
    ("no", "normal", 0),                # token sets, no substring: "normal" is not "no"
    ("no", "There is a nodule.", 0),
    ("yes", "Yes.", 1),
    ("yes", "not", 0),
    ("yes", "", 0),
])
def test_multimedeval_yes_no(gold, pred, hit):
    r = s("multimedeval", pred, closed(gold))
    assert r["correct"] == hit and r["closed"] == 1


def test_multimedeval_recall_boundary_is_inclusive():
    gold = "right upper lobe mass"                      # 4 tokens
    assert s("multimedeval", "right upper lobe", open_(gold))["correct"] == 1   # 3/4 = 0.75 >= 0.75
    assert s("multimedeval", "right upper lobe", open_(gold))["recall"] == 0.75
    assert s("multimedeval", "right upper", open_(gold))["correct"] == 0        # 2/4
    gold7 = "one two three four five six seven"           # -> 1 2 3 4 5 6 7
    assert s("multimedeval", "1 2 3 4 5", open_(gold7))["correct"] == 0          # 5/7 < 0.75
    assert s("multimedeval", "1 2 3 4 5 6", open_(gold7))["correct"] == 1        # 6/7


def test_multimedeval_decides_closed_from_the_gold_not_the_answer_type():
    r = s("multimedeval", "the left side", closed("left"))   # a closed question with a non yes/no gold
    assert r == {"score": 1, "correct": 1, "recall": 1.0, "closed": 0}
    assert s("multimedeval", "two", open_("2"))["correct"] == 1


# ----------------------------------------------------------------------------- exact

@pytest.mark.parametrize("pred", ["Yes.", "yeah", "TRUE", "correct", "present", "Positive"])
def test_exact_yes_synonyms(pred):
    assert s("exact", pred, closed("yes"))["correct"] == 1


@pytest.mark.parametrize("pred", ["no", "Not", "none", "absent", "False", "Not present."])
def test_exact_no_synonyms(pred):
    assert s("exact", pred, closed("no"))["correct"] == 1


@pytest.mark.parametrize("gold, pred, hit", [
    ("no", "normal", 0),
    ("no", "nodule", 0),
    ("yes", "Yes, there is a nodule.", 0),   # the whole answer must match
    ("left lung nodule", "A left lung nodule.", 1),
    ("2", "two", 1),
    ("left sided", "left-sided", 1),
    ("xray", "X-ray", 1),
    ("是", "是的", 1),
    ("否", "没有。", 1),
    ("yes", "", 0),
])
def test_exact_cases(gold, pred, hit):
    assert s("exact", pred, closed(gold))["correct"] == hit


# ----------------------------------------------------------------------------- f1

def test_f1_hand_computations():
    # pred "the left lobe" -> [left, lobe]; gold [left, lower, lobe]: common 2, P 1, R 2/3, F1 0.8
    r = s("f1", "the left lobe", open_("left lower lobe"))
    assert (r["precision"], r["recall"]) == (1.0, pytest.approx(2 / 3)) and r["f1"] == pytest.approx(0.8)
    # pred [large, pleural, effusion, on, right], gold [pleural, effusion]: P 2/5, R 1, F1 = 0.8/1.4 = 4/7
    r = s("f1", "Large pleural effusion on the right.", open_("pleural effusion"))
    assert r["f1"] == pytest.approx(4 / 7) and r["em"] == 0
    # multiset overlap: gold [left, left], pred [left] -> common 1, P 1, R 1/2 -> 2/3
    assert s("f1", "left", open_("left left"))["f1"] == pytest.approx(2 / 3)
    # SQuAD deletes punctuation: "left-sided" is the single token "leftsided"
    assert s("f1", "left-sided", open_("left sided"))["f1"] == 0.0
    assert s("f1", "two", open_("2"))["f1"] == 0.0          # no number mapping in SQuAD
    assert s("f1", "Yes.", closed("yes")) == {"score": 1.0, "f1": 1.0, "precision": 1.0, "recall": 1.0, "em": 1}
    assert s("f1", "no", closed("not"))["f1"] == 0.0
    assert s("f1", "", open_("liver"))["f1"] == 0.0


def test_f1_is_macro_averaged():
    metas = [open_("left lower lobe"), open_("pleural effusion"), closed("yes")]
    res = score_all(["the left lobe", "Large pleural effusion on the right.", "no"], metas, ["f1"])["f1"]
    assert res["overall"]["f1"] == pytest.approx((0.8 + 4 / 7 + 0.0) / 3)
    assert res["overall"]["score"] == res["overall"]["f1"]
    assert res["by_answer_type"]["open"]["f1"] == pytest.approx((0.8 + 4 / 7) / 2)


# ----------------------------------------------------------------------------- mcq

@pytest.mark.parametrize("pred", ["(B)", "B", "b", "B.", "Answer: B", "the answer is b", "The answer is (b).",
                                  "B) Coronal", "(B) Coronal", "b) coronal", "Coronal", "It is B.",
                                  "I think the answer is (B) Coronal.", "Option B", "Final answer: B because ...",
                                  "The answer, I believe, is B"])
def test_mcq_extracts_the_letter(pred):
    r = s("mcq", pred, choice("B"))
    assert r == {"score": 1, "correct": 1, "parsed": 1, "multi": 0}


@pytest.mark.parametrize("pred, parsed, multi", [
    ("A, B", 1, 1),                 # hedging over two letters is wrong for a single-letter gold
    ("(A) or (B)", 1, 1),
    ("A and B", 1, 1),
    ("", 0, 0),
    ("I am not sure", 0, 0),
    ("E", 0, 0),                    # only A-D exist
    ("A", 1, 0),
])
def test_mcq_wrong_answers(pred, parsed, multi):
    assert s("mcq", pred, choice("B")) == {"score": 0, "correct": 0, "parsed": parsed, "multi": multi}


def test_mcq_traps_and_option_text():
    # a sentence starting with the article "A" is not the letter A
    options = ["left lung nodule", "liver cyst", "rib fracture"]
    assert s("mcq", "A left lung nodule", choice("A", options))["correct"] == 1   # by option text, not letter
    assert extract_choice("A left lung nodule", ["x", "y", "z"]) == frozenset()
    # "the answer is a ..." followed by words: not a letter; the option text decides
    assert s("mcq", "The answer is a coronal plane", choice("B"))["correct"] == 1
    # option text contained in a longer matching option: the longer one wins
    opts = ["Effusion", "Pleural effusion", "Pneumothorax", "Normal"]
    assert extract_choice("There is a pleural effusion", opts) == frozenset("B")


@pytest.mark.parametrize("gold, pred, hit", [
    ("A,C", "A and C", 1), ("A,C", "(C), (A)", 1), ("AC", "A, C", 1), ("A, C", "Answer: A, C", 1),
    ("A,C", "A", 0), ("A,C", "A, B, C", 0),
])
def test_mcq_multi_letter_gold(gold, pred, hit):
    assert s("mcq", pred, choice(gold))["correct"] == hit


def test_mcq_gold_must_be_letters():
    with pytest.raises(RecordError, match="choice letter"):
        s("mcq", "B", choice("Coronal"))


# ----------------------------------------------------------------------------- answer tags, empty answers, types

def test_answer_tag_extraction():
    out = "<think>The lesion is not no-where; yes it is there.</think>\n<answer> No </answer>"
    assert N.extract_answer_tag(out) == "No"
    assert s("exact", out, closed("no"), extract_answer_tag=True)["correct"] == 1
    assert s("exact", out, closed("no"))["correct"] == 0
    assert N.extract_answer_tag("<answer>A</answer> then <ANSWER>B</ANSWER>") == "B"   # last, any case
    assert N.extract_answer_tag("reasoning... <answer> left lung") == "left lung"      # truncated
    assert N.extract_answer_tag("plain text") == "plain text"
    res = score_all([out], [closed("no")], ["exact", "multimedeval"], extract_answer_tag=True)
    assert res["exact"]["overall"]["score"] == 1.0 and res["multimedeval"]["overall"]["score"] == 1.0


def test_empty_and_missing_answers():
    for name in ("llava-med", "multimedeval", "exact", "f1"):
        assert s(name, None, closed("yes"))["score"] == 0
        assert s(name, "", open_("liver"))["score"] == 0
        with pytest.raises(RecordError, match="meta.answer"):
            s(name, "yes", closed("  "))
        with pytest.raises(RecordError, match="meta.answer"):
            s(name, "yes", {"answer_type": "closed"})


def test_unsupported_answer_type_raises_on_score_and_is_skipped_by_score_all():
    with pytest.raises(RecordError, match="answer_type"):
        s("llava-med", "B", choice("B"))
    with pytest.raises(RecordError, match="answer_type"):
        s("mcq", "yes", closed("yes"))
    res = score_all(["B", "yes"], [choice("B"), closed("yes")], ["mcq", "exact"])
    assert (res["mcq"]["n"], res["mcq"]["n_skipped"]) == (1, 1)
    assert (res["exact"]["n"], res["exact"]["n_skipped"]) == (1, 1)


# ----------------------------------------------------------------------------- side by side

def test_score_all_side_by_side():
    preds = ["There is a nodule.", "Yes.", "left lung nodule", "(B)", None]
    metas = [closed("no"), closed("yes"), open_("left lung"), choice("B"), closed("yes")]
    res = score_all(preds, metas, ["llava-med", "multimedeval", "exact", "f1", "mcq"])
    assert list(res) == ["llava-med", "multimedeval", "exact", "f1", "mcq"]
    # per item (closed no / closed yes / open / choice / missing):
    #   llava-med: 1 (substring trap), 1, recall 1 (tp 2, fn 0), skip, 0
    #   multimedeval: 0, 1, recall 2/2 >= .75 -> 1, skip, 0
    #   exact: 0, 1, 0, skip, 0        f1: 0, 1, P 2/3 R 1 -> 0.8, skip, 0        mcq: only the choice, 1
    lm = res["llava-med"]
    assert (lm["name"], lm["version"], lm["n"], lm["n_skipped"], lm["n_missing"]) == ("llava-med", 1, 4, 1, 1)
    assert lm["overall"]["score"] == pytest.approx(3 / 4)
    assert lm["by_answer_type"]["closed"]["correct"] == pytest.approx(2 / 3)
    assert lm["by_answer_type"]["closed"]["n"] == 3
    assert lm["by_answer_type"]["open"]["recall"] == 1.0
    mm = res["multimedeval"]
    assert mm["overall"]["score"] == pytest.approx(2 / 4)
    assert mm["by_answer_type"]["closed"]["correct"] == pytest.approx(1 / 3)
    assert mm["by_answer_type"]["open"]["correct"] == 1.0
    assert res["exact"]["overall"]["score"] == pytest.approx(1 / 4)
    assert res["f1"]["overall"]["score"] == pytest.approx((0 + 1 + 0.8 + 0) / 4)
    mcq = res["mcq"]
    assert (mcq["n"], mcq["n_skipped"], mcq["overall"]["score"]) == (1, 4, 1.0)
    assert set(mcq["by_answer_type"]) == {"choice"}


def test_score_all_checks_inputs():
    with pytest.raises(ConfigError, match="2 predictions but 1"):
        score_all(["a", "b"], [closed("yes")], ["exact"])
    with pytest.raises(RecordError, match="item 1"):
        score_all(["yes", "yes"], [closed("yes"), {"answer_type": "closed", "dataset": "vqa_rad"}], ["exact"])


def test_aggregate_is_the_mean_of_numeric_keys():
    agg = PROTOCOLS.get("f1").aggregate([{"score": 1.0, "f1": 1.0}, {"score": 0.5, "f1": 0.5, "em": 0}])
    assert agg == {"em": 0.0, "f1": 0.75, "score": 0.75, "n": 2}
    assert PROTOCOLS.get("exact").aggregate([]) == {"n": 0}
    assert not math.isnan(PROTOCOLS.get("exact").aggregate([{"score": 0}])["score"])


def test_a_protocol_registry_is_a_plain_registry():
    reg = Registry("protocol")
    reg.register("x", PROTOCOLS.get("exact"))
    with pytest.raises(ConfigError, match="duplicate"):
        reg.register("x", PROTOCOLS.get("f1"))


# ----------------------------------------------------------------------------- numeric

@pytest.mark.parametrize("pred, gold, tol, want", [
    ("about 76 bpm", "72", 5, 1),          # |76 - 72| = 4 <= 5
    ("77", "72", 5, 1),                    # exactly on the boundary: 5 <= 5
    ("78", "72", 5, 0),                    # 6 > 5
    ("<answer>15</answer>", "15", 5, 1),   # the tag is not a number; 15 is the first number
    ("1,000 ml", "1000", 0, 1),            # commas are thousands separators
    ("-3", "3", 1, 0),                     # the sign counts: |-3 - 3| = 6
    ("no idea", "72", 5, 0),               # no number: wrong
    ("12.5 mm", "12", 0.5, 1),             # 0.5 <= 0.5
])
def test_numeric_within_tolerance_by_hand(pred, gold, tol, want):
    meta = {"answer": gold, "answer_type": "open", "extra": {"tolerance": tol}}
    assert get_protocol("numeric").score(pred, meta)["correct"] == want


def test_numeric_without_tolerance_is_exact_and_bad_tolerance_fails():
    numeric = get_protocol("numeric")
    assert numeric.score("Yes.", {"answer": "yes", "answer_type": "closed"})["correct"] == 1
    assert numeric.score("3", {"answer": "three", "answer_type": "open"})["correct"] == 1   # number words -> digits
    assert numeric.score("4", {"answer": "3", "answer_type": "open"})["correct"] == 0
    with pytest.raises(RecordError, match="tolerance"):
        numeric.score("3", {"answer": "3", "answer_type": "open", "extra": {"tolerance": -1}})
    assert numeric.score("80", {"answer": "72", "answer_type": "open", "extra": {"tolerance": 5}})["abs_error"] == 8

"""Reward functions on hand-worked cases, the registry's exact names, and combinations."""

import pytest

from medmllm.errors import ConfigError, RecordError
from medmllm.train import rewards as R


def rec(answer, answer_type="closed", **extra):
    meta = {"dataset": "t", "split": "train", "answer": answer, "answer_type": answer_type}
    if extra.get("choices"):
        meta["choices"] = extra.pop("choices")
    if extra:
        meta["extra"] = extra
    return {"id": "x", "messages": [], "meta": meta}


def wrap(answer, think="reasoning"):
    return f"<think>{think}</think><answer>{answer}</answer>"


# ----------------------------------------------------------------------------- accuracy
def test_accuracy_closed_uses_exact_match_inside_the_answer_tag():
    r = rec("yes")
    assert R.accuracy(wrap("Yes."), r) == 1.0           # case and punctuation normalised
    assert R.accuracy(wrap("no"), r) == 0.0
    assert R.accuracy("yes", r) == 1.0                  # no tag: the whole completion is the answer
    assert R.accuracy(wrap("Yes, there is a nodule"), r) == 0.0   # the whole answer must match
    # the last complete <answer> wins: a model that changes its mind is scored on its final answer
    assert R.accuracy("<answer>no</answer> wait <answer>yes</answer>", r) == 1.0


def test_accuracy_choice_uses_the_mcq_protocol():
    r = rec("B", "choice", choices=["left lung", "pleural effusion", "liver", "spleen"])
    assert R.accuracy(wrap("B"), r) == 1.0
    assert R.accuracy(wrap("The answer is (b)"), r) == 1.0
    assert R.accuracy(wrap("pleural effusion"), r) == 1.0          # option text
    assert R.accuracy(wrap("A"), r) == 0.0
    assert R.accuracy(wrap("B or C"), r) == 0.0                    # hedging is wrong


def test_accuracy_numeric_with_tolerance_heart_rate_plus_minus_5():
    r = rec("72", "open", tolerance=5)
    assert R.accuracy(wrap("76 bpm"), r) == 1.0        # |76 - 72| = 4 <= 5
    assert R.accuracy(wrap("67"), r) == 1.0            # |67 - 72| = 5, the boundary is inside
    assert R.accuracy(wrap("77.5"), r) == 0.0          # 5.5 > 5
    assert R.accuracy(wrap("about seventy"), r) == 0.0  # no number, no credit
    assert R.accuracy(wrap("HR 1,000"), rec("1000", "open", tolerance=0)) == 1.0  # thousands separator
    assert R.accuracy(wrap("2.0"), rec("2", "open", tolerance=0)) == 1.0           # numeric, not textual


def test_accuracy_rejects_unverifiable_records():
    with pytest.raises(RecordError, match="answer_type"):
        R.accuracy("x", rec("FINDINGS: ...", "report"))
    with pytest.raises(RecordError, match="tolerance"):
        R.accuracy("1", rec("1", "open", tolerance=-1))
    with pytest.raises(RecordError, match="meta.answer"):
        R.accuracy("1", rec("", "open"))


# ----------------------------------------------------------------------------- format
@pytest.mark.parametrize("text,ok", [
    ("<think>a</think><answer>b</answer>", True),
    ("  <think>\nstep 1\nstep 2\n</think>\n<answer> yes </answer>\n", True),   # whitespace around is fine
    ("<think></think><answer>b</answer>", True),                                # empty thinking allowed
    ("<think>a</think><answer> </answer>", False),                              # empty answer
    ("<answer>b</answer><think>a</think>", False),                              # wrong order
    ("<think>a</think><answer>b</answer><answer>c</answer>", False),            # answer twice
    ("<think>a <think> b</think><answer>c</answer>", False),                    # think opened twice
    ("Sure! <think>a</think><answer>b</answer>", False),                        # text before
    ("<think>a</think> so <answer>b</answer>", False),                          # text in between
    ("<think>a</think><answer>b</answer> done", False),                         # text after
    ("<think>a</think><answer>b", False),                                       # unclosed
    ("<THINK>a</THINK><ANSWER>b</ANSWER>", False),                              # tags as prompted only
    ("yes", False),
])
def test_format_reward(text, ok):
    assert R.format_reward(text, rec("yes")) == float(ok)


# ----------------------------------------------------------------------------- length
def test_length_penalty_is_zero_then_linear_then_minus_one():
    r = rec("yes")
    assert R.LENGTH_SOFT_CHARS == 400 and R.LENGTH_HARD_CHARS == 800
    pen = R.get_reward("length_penalty")
    assert pen("x" * 400, r) == 0.0
    assert pen("x" * 600, r) == pytest.approx(-0.5)    # (600 - 400) / (800 - 400)
    assert pen("x" * 5000, r) == -1.0
    short = R.make_length_penalty(10, 20)
    assert short("x" * 15, r) == pytest.approx(-0.5)   # (15 - 10) / (20 - 10)
    assert short("x" * 13, r) == pytest.approx(-0.3)
    with pytest.raises(ConfigError):
        R.make_length_penalty(20, 10)


# ----------------------------------------------------------------------------- registry and combination
@pytest.fixture
def custom_reward():
    name = "test_rewards_mentions_lung"

    def mentions_lung(completion, record):
        return 1.0 if "lung" in completion else 0.0

    R.register_reward(name, mentions_lung)
    yield name, mentions_lung
    R.REWARDS._items.pop(name, None)  # keep the global registry as it was


def test_registry_is_exact_and_refuses_duplicates(custom_reward):
    name, fn = custom_reward
    assert R.get_reward(name) is fn
    assert {"accuracy", "format", "length_penalty"} <= set(R.REWARDS.names())
    with pytest.raises(ConfigError, match="unknown reward 'Accuracy'"):
        R.get_reward("Accuracy")
    with pytest.raises(ConfigError, match="duplicate"):
        R.register_reward("accuracy", lambda c, r: 0.0)
    with pytest.raises(ConfigError, match="callable"):
        R.register_reward("test_rewards_not_callable", 3.0)


def test_combined_weights_named_and_callable_rewards(custom_reward):
    name, _ = custom_reward

    def half(completion, record):
        return 0.5

    reward = R.combined(["accuracy", "format", name, half], [1.0, 0.5, 2.0, -1.0])
    text = wrap("yes", think="the left lung is clear")
    parts = reward.components(text, rec("yes"))
    assert parts == {"accuracy": 1.0, "format": 1.0, name: 1.0, "half": 0.5}
    assert reward(text, rec("yes")) == pytest.approx(1.0 * 1 + 0.5 * 1 + 2.0 * 1 - 1.0 * 0.5)  # = 3.0
    # wrong answer, no format, no "lung": only the constant term is left
    assert reward("no", rec("yes")) == pytest.approx(-0.5)
    assert R.combined(["format"])("<think></think><answer>x</answer>", rec("yes")) == 1.0  # weights default to 1


def test_combined_fails_loudly():
    with pytest.raises(ConfigError, match="unknown reward"):
        R.combined(["acuracy"], [1.0])
    with pytest.raises(ConfigError, match="one weight per reward"):
        R.combined(["accuracy", "format"], [1.0])
    with pytest.raises(ConfigError, match="given twice"):
        R.combined(["format", "format"], [1.0, 1.0])
    with pytest.raises(ConfigError, match="finite float"):
        R.combined([lambda c, r: float("nan")])("x", rec("yes"))

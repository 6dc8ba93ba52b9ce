"""Self-consistency: vote keys and the majority on hand-made samples, the wrapper over a backend whose
samples depend on the seed, and in-process sampling that is seeded (same seed, same answers)."""

from __future__ import annotations

import pytest

from medmllm.errors import ConfigError
from medmllm.eval.self_consistency import SelfConsistency, majority, median_answer, vote_key


@pytest.mark.parametrize("answer, key", [
    ("<think>60 / 1.47 = 40.8</think><answer>41</answer>", "41"),
    ("<answer>41.0</answer>", "41"),
    ("41 bpm", "41"),
    ("  Yes. ", "yes"),
    ("<answer>Right  lower lobe</answer>", "right lower lobe"),
    ("41abc", "41abc"),                       # not a lone number
    ("<answer>2.50</answer>", "2.5"),
])
def test_vote_key(answer, key):
    assert vote_key(answer) == key


def test_majority_returns_the_first_sample_of_the_winning_key():
    samples = ["<answer>no</answer>", "<think>a</think><answer>Yes</answer>", "yes.", None, "<answer>no</answer>",
               "<answer>YES</answer>"]
    assert majority(samples) == "<think>a</think><answer>Yes</answer>"      # yes 3 votes, no 2, None ignored
    assert majority(["<answer>3</answer>", "<answer>2</answer>"]) == "<answer>3</answer>"   # tie: first key
    assert majority([None, None]) is None


def test_median_answer_picks_the_sample_nearest_the_median_number():
    samples = ["<think>t1</think><answer>60</answer>", "<answer>90 bpm</answer>", None, "<answer>72</answer>",
               "<answer>no idea</answer>", "<answer>70</answer>"]
    # numbers 60, 90, 72, 70 -> median (70 + 72) / 2 = 71: 72 and 70 are both 1 away, the first (72) wins
    assert median_answer(samples) == "<answer>72</answer>"
    assert median_answer(["<answer>5</answer>", "<answer>100</answer>", "<answer>7</answer>"]) == "<answer>7</answer>"
    # no number anywhere: the majority decides
    assert median_answer(["<answer>a</answer>", "<answer>b</answer>", "<answer>b</answer>"]) == "<answer>b</answer>"
    assert median_answer([None]) is None


class BySeed:
    """A backend whose answer for record j under seed s is table[s][j]; it records the seeds it got."""

    name = "by-seed"
    supports_ablation = False

    def __init__(self, table, batch_size=2):
        self.table, self.batch_size, self.seeds, self.gens = table, batch_size, [], []

    def describe(self):
        return {"backend": self.name}

    def answer(self, records, base_dir, gen, *, on_batch=None, seed=0, **kw):
        self.seeds.append(seed)
        self.gens.append(gen)
        return [self.table[seed][r["j"]] for r in records]


def test_wrapper_votes_over_k_seeded_samples_batch_by_batch():
    table = {0: ["yes", "1", "a"], 1: ["no", "2", "b"], 2: ["no", "1.0", "a"]}
    inner = BySeed(table, batch_size=2)
    sc = SelfConsistency(inner, 3, temperature=0.9)
    batches = []
    out = sc.answer([{"id": f"r{j}", "j": j} for j in range(3)], ".", {"max_new_tokens": 8, "temperature": 0.0},
                    on_batch=lambda ids, preds: batches.append((ids, preds)))
    assert out == ["no", "1", "a"]
    assert inner.seeds == [0, 1, 2, 0, 1, 2]                           # k seeds per batch of 2 records
    assert all(g["temperature"] == 0.9 and g["max_new_tokens"] == 8 for g in inner.gens)
    assert batches == [(["r0", "r1"], ["no", "1"]), (["r2"], ["a"])]
    assert sc.describe()["self_consistency"] == {"k": 3, "temperature": 0.9, "top_p": 1.0}


def test_wrapper_takes_the_median_for_questions_with_a_tolerance():
    # record 0 is numeric (tolerance): numbers 40, 80, 52, 80, 55 -> median 55, though 80 is the majority;
    # record 1 is not: the majority of the same kind of answers wins
    table = {s: [a, a] for s, a in enumerate(["40", "80", "52", "80", "55"])}
    records = [{"id": "hr", "j": 0, "meta": {"extra": {"tolerance": 5.0}}}, {"id": "n", "j": 1, "meta": {}}]
    out = SelfConsistency(BySeed(table), 5, temperature=0.9).answer(records, ".", {"max_new_tokens": 4})
    assert out == ["55", "80"]


def test_wrapper_rejects_bad_settings():
    with pytest.raises(ConfigError, match="self_consistency"):
        SelfConsistency(BySeed({}), 1)
    with pytest.raises(ConfigError, match="sc_temperature"):
        SelfConsistency(BySeed({}), 3, temperature=0.0)


def test_in_process_sampling_is_seeded(env):
    from medmllm.data.dataset import ModalityShapes
    from medmllm.data.records import read_records
    from medmllm.eval.backends import InProcessBackend

    data, model_dir, _ = env
    recs, _ = read_records(data / "medphantom" / "records" / "train.jsonl")
    recs = [r for r in recs if r["meta"]["modality"] == "xray"][:6]
    for r in recs:                                                      # prompt only
        r["messages"] = r["messages"][:1]
    be = InProcessBackend(model_dir, batch_size=6, device="cpu", shapes=ModalityShapes(image_size=32))
    base = data / "medphantom" / "records"
    gen = {"max_new_tokens": 6, "temperature": 5.0}
    a = be.answer(recs, base, gen, seed=1)
    assert be.answer(recs, base, gen, seed=1) == a
    assert be.answer(recs, base, gen, seed=2) != a                      # a hot random model: samples differ
    greedy = be.answer(recs, base, {"max_new_tokens": 6, "temperature": 0.0}, seed=1)
    assert be.answer(recs, base, {"max_new_tokens": 6, "temperature": 0.0}, seed=2) == greedy

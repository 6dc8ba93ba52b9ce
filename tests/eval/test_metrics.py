"""Report metrics: values worked out by hand on tiny examples, and the wrappers checked against
pycocoevalcap's scorers called directly."""

import importlib.util
import math
import shutil

import pytest

from medmllm.errors import ConfigError, InputError
from medmllm.eval import metrics as M

coco = pytest.mark.skipif(importlib.util.find_spec("pycocoevalcap") is None,
                          reason="pycocoevalcap not installed (pip install pycocoevalcap)")

CAT_HYP = "the cat sat on the mat"
CAT_REF = "the cat is on the mat"


def test_registry_names():
    assert M.METRICS.names() == ["bertscore", "bleu", "chexbert_f1", "cider", "green", "meteor", "radgraph_f1",
                                 "rouge_l"]
    with pytest.raises(ConfigError, match="unknown metric 'rouge'; known: bertscore, bleu"):
        M.compute("rouge", ["a"], ["a"])


def test_simple_tokenize():
    text = "The heart is normal. No effusion, left-sided 3.5 cm (stable)!"
    assert M.simple_tokenize(text) == "the heart is normal no effusion left-sided 3.5 cm stable"


# ----------------------------------------------------------------------------- BLEU

@coco
def test_bleu_identical_is_one():
    r = M.compute("bleu", ["no acute cardiopulmonary process seen"], ["No acute cardiopulmonary process seen."])
    for n in range(1, 5):
        assert r[f"bleu{n}"] == pytest.approx(1.0, abs=1e-6)


@coco
def test_bleu_hand_computed():
    # unigrams: the x2, cat, on, mat match (5 of 6); bigrams: "the cat", "on the", "the mat" (3 of 5);
    # trigrams: "on the mat" (1 of 4); 4-grams: none of 3. Equal lengths -> brevity penalty 1.
    r = M.compute("bleu", [CAT_HYP], [CAT_REF])
    assert r["bleu1"] == pytest.approx(5 / 6, abs=1e-6)
    assert r["bleu2"] == pytest.approx(math.sqrt(5 / 6 * 3 / 5), abs=1e-6)
    assert r["bleu3"] == pytest.approx((5 / 6 * 3 / 5 * 1 / 4) ** (1 / 3), abs=1e-6)  # = 0.5
    assert r["bleu4"] < 1e-3 and r["score"] == r["bleu4"]   # zero 4-gram matches (tiny smoothing only)


@coco
def test_bleu_brevity_penalty_hand_computed():
    # hyp 2 words, ref 6: p1 = 1, BP = exp(1 - 6/2) = e^-2
    r = M.compute("bleu", ["the cat"], ["the cat sat on the mat"])
    assert r["bleu1"] == pytest.approx(math.exp(-2), abs=1e-6)


# ----------------------------------------------------------------------------- ROUGE-L

@coco
def test_rouge_l_hand_computed():
    assert M.compute("rouge_l", ["left pleural effusion"], ["Left pleural effusion."])["score"] == pytest.approx(1.0)
    # LCS("the cat on the mat", "the cat is on the mat") = 5: P = 5/5, R = 5/6, beta = 1.2
    p, r, b2 = 1.0, 5 / 6, 1.2 ** 2
    expected = (1 + b2) * p * r / (r + b2 * p)
    out = M.compute("rouge_l", ["the cat on the mat", "heart"], ["the cat is on the mat", "lungs"])
    assert out["per_item"][0] == pytest.approx(expected)
    assert out["per_item"][1] == 0.0
    assert out["score"] == pytest.approx(expected / 2)


# ----------------------------------------------------------------------------- CIDEr

@coco
def test_cider_hand_computed():
    # N = 2 images, refs share no n-gram, so every ref n-gram has df 1 -> weight log(2) - log(1) = log 2;
    # "nodule" is in no ref (df 0 -> weight log 2 too).
    # image 1: hyp "left nodule" vs ref "left effusion": unigram cosine = log2^2 / (sqrt2 log2)^2 = 1/2,
    #   bigram 0, no 3/4-grams -> mean(0.5, 0, 0, 0) * 10 = 1.25
    # image 2: identical 2-word texts: unigram 1, bigram 1 -> mean(1, 1, 0, 0) * 10 = 5
    out = M.compute("cider", ["left nodule", "normal heart"], ["left effusion", "normal heart"])
    assert out["per_item"] == pytest.approx([1.25, 5.0])
    assert out["score"] == pytest.approx(3.125)


@coco
def test_cider_identical_four_gram_texts_score_ten():
    # each text has 1..4-grams and none is shared between images: every cosine is 1 -> 10
    hyps = ["small left pleural effusion", "enlarged cardiac silhouette noted today"]
    out = M.compute("cider", hyps, hyps)
    assert out["per_item"] == pytest.approx([10.0, 10.0])


# ----------------------------------------------------------------------------- against pycocoevalcap directly

@coco
def test_wrappers_equal_pycocoevalcap_called_directly():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    preds = ["the heart is normal in size", "small left effusion", "no pneumothorax"]
    refs = [["heart size is normal", "the heart is normal"], ["small left pleural effusion"], ["no pneumothorax seen"]]
    gts = {i: r for i, r in enumerate(refs)}
    res = {i: [p] for i, p in enumerate(preds)}
    bleu, bleu_per = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, _ = Rouge().compute_score(gts, res)
    cider, cider_per = Cider().compute_score(gts, res)
    ours = M.compute_all(["bleu", "rouge_l", "cider"], preds, refs, tokenize="none")
    assert [ours["bleu"][f"bleu{n}"] for n in range(1, 5)] == pytest.approx(bleu)
    assert ours["bleu"]["per_item"] == pytest.approx(bleu_per[3])
    assert ours["rouge_l"]["score"] == pytest.approx(rouge)
    assert ours["cider"]["score"] == pytest.approx(cider)
    assert ours["cider"]["per_item"] == pytest.approx(list(cider_per))


# ----------------------------------------------------------------------------- METEOR (Java)

def test_without_pycocoevalcap_the_metrics_say_how_to_get_it(monkeypatch):
    monkeypatch.setattr(M.importlib.util, "find_spec", lambda name: None)
    for name in ("bleu", "rouge_l", "cider", "meteor"):
        with pytest.raises(M.MetricUnavailable, match="pycocoevalcap package is not installed.*pip install"):
            M.compute(name, ["a"], ["a"])


@coco
def test_meteor_without_java_is_unavailable(monkeypatch):
    monkeypatch.setattr(M.shutil, "which", lambda name: None)
    with pytest.raises(M.MetricUnavailable, match="no 'java' is on PATH.*install a Java runtime"):
        M.compute("meteor", ["a"], ["a"])
    ok, why = M.METRICS.get("meteor").available()
    assert not ok and "java" in why


@pytest.mark.slow
@coco
@pytest.mark.skipif(shutil.which("java") is None, reason="METEOR needs java on PATH")
def test_meteor_runs_with_java():
    # an exact match of one chunk has no fragmentation penalty -> 1.0; no shared word -> 0.0
    out = M.compute("meteor", ["no acute findings", "heart"], ["No acute findings.", "pleural effusion"])
    assert out["per_item"] == pytest.approx([1.0, 0.0])


# ----------------------------------------------------------------------------- optional metrics

@pytest.mark.parametrize("name", ["bertscore", "radgraph_f1", "chexbert_f1", "green"])
def test_optional_metric_unconfigured_says_how_to_get_it(name, monkeypatch):
    spec = M.OPTIONAL_MODELS[name]
    monkeypatch.delenv(spec.env, raising=False)
    with pytest.raises(M.MetricUnavailable) as info:
        M.compute(name, ["x"], ["y"])
    msg = str(info.value)
    assert spec.env in msg and "is not set" in msg and f"pip install {spec.pip}" in msg


def test_optional_metric_path_checks(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDMLLM_BERTSCORE_MODEL", str(tmp_path / "missing"))
    with pytest.raises(M.MetricUnavailable, match="does not exist"):
        M.compute("bertscore", ["x"], ["y"])
    monkeypatch.setenv("MEDMLLM_BERTSCORE_MODEL", str(tmp_path))
    with pytest.raises(M.MetricUnavailable, match="has no config.json"):
        M.compute("bertscore", ["x"], ["y"])
    monkeypatch.setenv("MEDMLLM_CHEXBERT_DIR", str(tmp_path))
    with pytest.raises(M.MetricUnavailable, match="no chexbert.pth found"):
        M.compute("chexbert_f1", ["x"], ["y"])


def test_optional_metric_with_model_but_without_package(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setenv("MEDMLLM_GREEN_MODEL", str(tmp_path))
    monkeypatch.setattr(M.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(M.MetricUnavailable, match="green_score package is not installed.*pip install green-score"):
        M.compute("green", ["x"], ["y"])


@coco
def test_compute_all_can_skip_unavailable(monkeypatch):
    monkeypatch.delenv("MEDMLLM_GREEN_MODEL", raising=False)
    out = M.compute_all(["rouge_l", "green"], ["a b"], ["a b"], skip_unavailable=True)
    assert out["rouge_l"]["score"] == pytest.approx(1.0)
    assert "MEDMLLM_GREEN_MODEL" in out["green"]["unavailable"]
    with pytest.raises(M.MetricUnavailable):
        M.compute_all(["rouge_l", "green"], ["a b"], ["a b"])


# ----------------------------------------------------------------------------- inputs

@coco
def test_input_checks():
    with pytest.raises(InputError, match="one reference entry per prediction"):
        M.compute("bleu", ["a", "b"], ["a"])
    with pytest.raises(InputError, match=r"references\[0\]"):
        M.compute("bleu", ["a"], [[]])
    with pytest.raises(InputError, match="at least one prediction"):
        M.compute("rouge_l", [], [])
    with pytest.raises(ConfigError, match="tokenize"):
        M.compute("rouge_l", ["a"], ["a"], tokenize="spacy")
    assert M.compute("rouge_l", [None], ["heart"])["score"] == 0.0

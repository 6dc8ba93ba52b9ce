"""Report-generation metrics through their reference libraries, in one registry :data:`METRICS`.

* ``bleu`` (BLEU-1..4), ``rouge_l``, ``cider``: pycocoevalcap's scorers (the COCO caption code
  every report-generation paper cites). BLEU is corpus-level with the ``closest`` reference
  length; ROUGE-L (beta 1.2) and CIDEr-D (sigma 6, x10, idf from the evaluated references) are
  means of per-item scores — so a CIDEr value depends on the whole evaluated set.
* ``meteor``: pycocoevalcap's METEOR 1.5 jar; needs ``java`` on PATH.
* ``bertscore``, ``radgraph_f1``, ``chexbert_f1``, ``green``: model-based, optional. Each checks
  that its package is installed and its model is on disk (path from an environment variable,
  see :data:`OPTIONAL_MODELS`) and otherwise raises :class:`MetricUnavailable` saying how to get
  it. medmllm never downloads them.

``compute(name, predictions, references, *, tokenize="simple") -> dict`` returns at least
``{"score": corpus value, "per_item": [one float per prediction]}``; ``bleu`` adds
``bleu1``..``bleu4``. ``references[i]`` is a string or a non-empty list of strings.

Tokenisation before the pycocoevalcap scorers (``tokenize=``):

* ``"simple"`` (default): lower case, words/numbers kept (``left-sided``, ``3.5`` stay one
  token), all other punctuation dropped — an approximation of pycocoevalcap's Java
  PTBTokenizer + punctuation removal that needs no Java;
* ``"ptb"``: the real ``PTBTokenizer`` (Java);
* ``"none"``: the texts as given, split on spaces.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from medmllm.errors import ConfigError, InputError, MedmllmError
from medmllm.registry import Registry

TOKENIZERS = ("simple", "ptb", "none")


class MetricUnavailable(MedmllmError):
    """A metric cannot run here: ``reason`` says what is missing and ``how`` how to get it."""

    def __init__(self, metric: str, reason: str, how: str = ""):
        self.metric, self.reason, self.how = metric, reason, how
        super().__init__(f"metric {metric!r} unavailable: {reason}" + (f". To enable it: {how}" if how else ""))

    def __reduce__(self):
        return (type(self), (self.metric, self.reason, self.how))


@dataclass(frozen=True)
class Metric:
    """A named metric: ``fn(predictions, references) -> {"score", "per_item", ...}`` on clean inputs."""

    name: str
    description: str
    fn: Callable[[list[str], list[list[str]]], dict]
    tokenized: bool = True          # pycocoevalcap metrics take pre-tokenised text
    check: Callable[[], None] | None = None  # raises MetricUnavailable when it cannot run here

    def available(self) -> tuple[bool, str]:
        """``(True, "")`` or ``(False, why + how to enable)``."""
        if self.check is None:
            return True, ""
        try:
            self.check()
        except MetricUnavailable as exc:
            return False, str(exc)
        return True, ""


METRICS: Registry[Metric] = Registry("metric")


# ----------------------------------------------------------------------------- inputs

def _as_refs(ref, i: int) -> list[str]:
    if isinstance(ref, str):
        return [ref]
    if isinstance(ref, (list, tuple)) and ref and all(isinstance(r, str) for r in ref):
        return list(ref)
    raise InputError(f"references[{i}]", f"expected a string or a non-empty list of strings, got {ref!r:.80}")


_WORD = re.compile(r"\w+(?:[-'./]\w+)*")


def simple_tokenize(text: str) -> str:
    """Lower-cased words joined by single spaces; punctuation dropped except inside words/numbers."""
    return " ".join(_WORD.findall(text.lower()))


def _ptb(preds: list[str], refs: list[list[str]]) -> tuple[list[str], list[list[str]]]:
    _need_java("ptb tokenizer")
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    gts = {i: [{"caption": r} for r in rs] for i, rs in enumerate(refs)}
    res = {i: [{"caption": p}] for i, p in enumerate(preds)}
    tok = PTBTokenizer()
    g, r = tok.tokenize(gts), tok.tokenize(res)
    return [r[i][0] for i in range(len(preds))], [g[i] for i in range(len(refs))]


def prepare(predictions: Sequence[str | None], references: Sequence, tokenize: str = "simple"
            ) -> tuple[list[str], list[list[str]]]:
    """Check lengths/types and tokenise: (predictions, references as lists of strings)."""
    if tokenize not in TOKENIZERS:
        raise ConfigError(f"tokenize: expected one of {TOKENIZERS}, got {tokenize!r}")
    if len(predictions) != len(references):
        raise InputError("references", f"expected one reference entry per prediction ({len(predictions)}), "
                                       f"got {len(references)}")
    if not predictions:
        raise InputError("predictions", "expected at least one prediction, got none")
    preds = ["" if p is None else str(p) for p in predictions]
    refs = [_as_refs(r, i) for i, r in enumerate(references)]
    if tokenize == "simple":
        return [simple_tokenize(p) for p in preds], [[simple_tokenize(r) for r in rs] for rs in refs]
    if tokenize == "ptb":
        return _ptb(preds, refs)
    return preds, refs


def compute(name: str, predictions: Sequence[str | None], references: Sequence, *, tokenize: str = "simple") -> dict:
    """Run metric ``name`` (see module doc). MetricUnavailable when it cannot run here."""
    metric = METRICS.get(name)
    if metric.check is not None:
        metric.check()
    if metric.tokenized:
        preds, refs = prepare(predictions, references, tokenize)
    else:
        preds, refs = prepare(predictions, references, "none")
    return metric.fn(preds, refs)


def compute_all(names: Sequence[str], predictions: Sequence[str | None], references: Sequence, *,
                tokenize: str = "simple", skip_unavailable: bool = False) -> dict[str, dict]:
    """Several metrics at once; with ``skip_unavailable`` an unavailable one gives ``{"unavailable": why}``."""
    metrics = [METRICS.get(n) for n in names]  # unknown names fail before any work
    out: dict[str, dict] = {}
    for m in metrics:
        try:
            out[m.name] = compute(m.name, predictions, references, tokenize=tokenize)
        except MetricUnavailable as exc:
            if not skip_unavailable:
                raise
            out[m.name] = {"unavailable": str(exc)}
    return out


def _dicts(preds: list[str], refs: list[list[str]]) -> tuple[dict, dict]:
    return {i: list(r) for i, r in enumerate(refs)}, {i: [p] for i, p in enumerate(preds)}


# ----------------------------------------------------------------------------- pycocoevalcap

def _need_pycocoevalcap() -> None:
    if importlib.util.find_spec("pycocoevalcap") is None:
        raise MetricUnavailable("pycocoevalcap", "the pycocoevalcap package is not installed",
                                "pip install pycocoevalcap")


def _bleu(preds, refs) -> dict:
    from pycocoevalcap.bleu.bleu import Bleu

    gts, res = _dicts(preds, refs)
    with _quiet():
        scores, per = Bleu(4).compute_score(gts, res, verbose=0)
    out = {f"bleu{n + 1}": float(scores[n]) for n in range(4)}
    out["score"] = out["bleu4"]
    out["per_item"] = [float(x) for x in per[3]]
    out["per_item_bleu"] = {f"bleu{n + 1}": [float(x) for x in per[n]] for n in range(4)}
    return out


def _rouge(preds, refs) -> dict:
    from pycocoevalcap.rouge.rouge import Rouge

    gts, res = _dicts(preds, refs)
    score, per = Rouge().compute_score(gts, res)
    return {"score": float(score), "per_item": [float(x) for x in per]}


def _cider(preds, refs) -> dict:
    from pycocoevalcap.cider.cider import Cider

    gts, res = _dicts(preds, refs)
    score, per = Cider().compute_score(gts, res)
    return {"score": float(score), "per_item": [float(x) for x in per]}


def _need_java(what: str = "meteor") -> None:
    _need_pycocoevalcap()
    if shutil.which("java") is None:
        raise MetricUnavailable(what, "it runs a Java program and no 'java' is on PATH",
                                "install a Java runtime (e.g. apt-get install default-jre-headless) "
                                "and put java on PATH")


def _meteor(preds, refs) -> dict:
    from pycocoevalcap.meteor.meteor import Meteor

    # METEOR's stdio protocol uses '|||' as a separator and one line per segment.
    clean = [p.replace("|||", " ").replace("\n", " ") for p in preds]
    crefs = [[r.replace("|||", " ").replace("\n", " ") for r in rs] for rs in refs]
    gts, res = _dicts(clean, crefs)
    scorer = Meteor()
    try:
        score, per = scorer.compute_score(gts, res)
    finally:
        _close_meteor(scorer)
    return {"score": float(score), "per_item": [float(x) for x in per]}


def _close_meteor(scorer) -> None:
    with scorer.lock:
        proc = scorer.meteor_p
        with contextlib.suppress(Exception):
            proc.stdin.close()
        proc.kill()
        proc.wait()
        for stream in (proc.stdout, proc.stderr):
            with contextlib.suppress(Exception):
                stream.close()


@contextlib.contextmanager
def _quiet():
    """pycocoevalcap's BLEU prints its n-gram counts; keep stdout clean."""
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        yield


METRICS.register("bleu", Metric("bleu", "BLEU-1..4 (pycocoevalcap Bleu(4), corpus-level, closest ref length); "
                                        "score = BLEU-4", _bleu, check=_need_pycocoevalcap))
METRICS.register("rouge_l", Metric("rouge_l", "ROUGE-L F (beta 1.2, pycocoevalcap Rouge), mean over items",
                                   _rouge, check=_need_pycocoevalcap))
METRICS.register("cider", Metric("cider", "CIDEr-D (pycocoevalcap Cider, sigma 6, x10, idf from the evaluated "
                                          "references), mean over items", _cider, check=_need_pycocoevalcap))
METRICS.register("meteor", Metric("meteor", "METEOR 1.5 (pycocoevalcap Meteor jar, -l en -norm); needs Java",
                                  _meteor, check=_need_java))


# ----------------------------------------------------------------------------- optional model-based metrics

@dataclass(frozen=True)
class OptionalModel:
    """Where an optional metric's model must be (``env`` names a path) and how to get it."""

    env: str
    package: str           # importable module name
    pip: str               # pip requirement that provides it
    marker: str            # file that must exist inside the path ("" = the path itself, "*name" = anywhere below)
    how: str


OPTIONAL_MODELS = {
    "bertscore": OptionalModel(
        "MEDMLLM_BERTSCORE_MODEL", "bert_score", "bert-score", "config.json",
        "pip install bert-score; download a Hugging Face encoder (e.g. `huggingface-cli download "
        "distilbert/distilroberta-base --local-dir DIR`) and set MEDMLLM_BERTSCORE_MODEL=DIR "
        "(optionally MEDMLLM_BERTSCORE_LAYERS=N)"),
    "radgraph_f1": OptionalModel(
        "MEDMLLM_RADGRAPH_DIR", "radgraph", "radgraph", "radgraph/weights.th",
        "pip install radgraph; download radgraph.tar.gz from the Hugging Face repo StanfordAIMI/RRG_scorers, "
        "extract it into DIR/radgraph/ (config.json, vocabulary/, weights.th) and set MEDMLLM_RADGRAPH_DIR=DIR"),
    "chexbert_f1": OptionalModel(
        "MEDMLLM_CHEXBERT_DIR", "f1chexbert", "f1chexbert", "*chexbert.pth",
        "pip install f1chexbert; put a Hugging Face cache holding StanfordAIMI/RRG_scorers chexbert.pth and "
        "bert-base-uncased in DIR (e.g. `HF_HOME=DIR huggingface-cli download StanfordAIMI/RRG_scorers "
        "chexbert.pth` and `... download google-bert/bert-base-uncased`) and set MEDMLLM_CHEXBERT_DIR=DIR"),
    "green": OptionalModel(
        "MEDMLLM_GREEN_MODEL", "green_score", "green-score", "config.json",
        "pip install green-score; download StanfordAIMI/GREEN-radllama2-7b (`huggingface-cli download "
        "StanfordAIMI/GREEN-radllama2-7b --local-dir DIR`, ~14 GB, a GPU advised) and set MEDMLLM_GREEN_MODEL=DIR"),
}


def model_path(metric: str) -> Path:
    """The metric's model path from its environment variable, checked; MetricUnavailable otherwise."""
    spec = OPTIONAL_MODELS[metric]
    raw = os.environ.get(spec.env, "").strip()
    if not raw:
        raise MetricUnavailable(metric, f"its model is not configured (environment variable {spec.env} is not set)",
                                spec.how)
    path = Path(raw).expanduser()
    if not path.exists():
        raise MetricUnavailable(metric, f"{spec.env}={raw} does not exist", spec.how)
    if spec.marker.startswith("*"):
        if next(path.rglob(spec.marker[1:]), None) is None:
            raise MetricUnavailable(metric, f"no {spec.marker[1:]} found under {spec.env}={raw}", spec.how)
    elif spec.marker and not (path / spec.marker).exists():
        raise MetricUnavailable(metric, f"{spec.env}={raw} has no {spec.marker}", spec.how)
    if importlib.util.find_spec(spec.package) is None:
        raise MetricUnavailable(metric, f"the {spec.package} package is not installed", f"pip install {spec.pip}")
    return path


def _check(metric: str) -> Callable[[], None]:
    def check() -> None:
        model_path(metric)
    return check


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@contextlib.contextmanager
def _offline_env(**extra: str):
    """Hugging Face libraries offline (and e.g. HF_HOME pointed at a local cache) for one call."""
    keys = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **extra}
    old = {k: os.environ.get(k) for k in keys}
    os.environ.update(keys)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _bertscore(preds, refs) -> dict:
    import bert_score

    path = model_path("bertscore")
    layers = os.environ.get("MEDMLLM_BERTSCORE_LAYERS")
    if layers is None:
        cfg = json.loads((path / "config.json").read_text())
        layers = cfg.get("num_hidden_layers") or cfg.get("n_layers")
    with _offline_env():
        p, r, f = bert_score.score(preds, refs, model_type=str(path), num_layers=int(layers),
                                   device=_device(), verbose=False)
    per = [float(x) for x in f]
    return {"score": sum(per) / len(per), "per_item": per,
            "precision": float(p.mean()), "recall": float(r.mean())}


def _radgraph(preds, refs) -> dict:
    from radgraph import F1RadGraph

    path = model_path("radgraph_f1")
    with _offline_env():
        scorer = F1RadGraph(reward_level="partial", model_type="radgraph", model_cache_dir=str(path))
        mean, per, _, _ = scorer(hyps=preds, refs=[r[0] for r in refs])
    return {"score": float(mean), "per_item": [float(x) for x in per], "reward_level": "partial"}


def _chexbert(preds, refs) -> dict:
    from f1chexbert import F1CheXbert

    path = model_path("chexbert_f1")
    with _offline_env(HF_HOME=str(path)):
        scorer = F1CheXbert(device=_device())
        accuracy, per, report, report5 = scorer(hyps=preds, refs=[r[0] for r in refs])
    return {"score": float(report5["micro avg"]["f1-score"]), "per_item": [float(x) for x in per],
            "accuracy": float(accuracy), "micro_f1_14": float(report["micro avg"]["f1-score"]),
            "macro_f1_14": float(report["macro avg"]["f1-score"]),
            "micro_f1_5": float(report5["micro avg"]["f1-score"])}


def _green(preds, refs) -> dict:
    import inspect

    from green_score import GREEN

    path = model_path("green")
    params = inspect.signature(GREEN).parameters
    with _offline_env():
        if "model_id_or_path" in params:
            scorer = GREEN(model_id_or_path=str(path), do_sample=False, return_0_if_no_green_score=True,
                           cuda=_device() == "cuda")
        else:  # older releases: GREEN(model_name, output_dir)
            scorer = GREEN(str(path), output_dir=".")
        mean, _std, per, _summary, _df = scorer([r[0] for r in refs], preds)
    return {"score": float(mean), "per_item": [float(x) for x in per]}


METRICS.register("bertscore", Metric("bertscore", "BERTScore F1 (bert-score, local encoder, no baseline rescaling)",
                                     _bertscore, tokenized=False, check=_check("bertscore")))
METRICS.register("radgraph_f1", Metric("radgraph_f1", "RadGraph F1, partial reward (radgraph F1RadGraph, first "
                                                      "reference)", _radgraph, tokenized=False,
                                       check=_check("radgraph_f1")))
METRICS.register("chexbert_f1", Metric("chexbert_f1", "CheXbert micro-F1 over the 5 main findings (f1chexbert); "
                                                      "14-label micro/macro F1 too", _chexbert, tokenized=False,
                                       check=_check("chexbert_f1")))
METRICS.register("green", Metric("green", "GREEN score (green-score, GREEN-radllama2-7b)", _green, tokenized=False,
                                 check=_check("green")))

"""The evaluation runner end to end: a tiny model on a tiny MedPhantom build (provenance, resume after
a kill or a cut line), scores of a scripted backend worked out by hand, manifest checks, trust suites."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import sys
from collections import Counter
from pathlib import Path

import pytest

import medmllm
from medmllm.data.records import make_record, media, modality_parts, read_records, resolve_path
from medmllm.errors import ConfigError, InputError
from medmllm.eval.runner import prompt_record, read_predictions, run_eval

LIMIT = 8


def task_records(data: Path, limit: int = LIMIT) -> list[dict]:
    """The fixture task's records, selected by hand (train split, x-ray, VQA answer types)."""
    recs, _ = read_records(data / "medphantom" / "records" / "train.jsonl")
    keep = [r for r in recs if r["meta"]["modality"] == "xray" and r["meta"]["answer_type"] in ("closed", "open",
                                                                                                 "choice")]
    return keep[:limit]


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


class Scripted:
    """A backend answering by rule: gold for closed, the gold letter for choice, 'zzz' for open;
    blank input -> empty answers, noise -> the real answers; trust probes -> 'yes' when their file exists."""

    name = "scripted"
    supports_ablation = True

    def __init__(self, batch_size: int = 4):
        self.batch_size = batch_size
        self.calls: list[tuple[int, str | None]] = []

    def describe(self) -> dict:
        return {"backend": self.name, "model_id": "oracle"}

    def _one(self, rec: dict, base_dir, ablation) -> str:
        if rec["meta"].get("extra", {}).get("probe"):
            parts = modality_parts(rec)
            return "yes" if parts and resolve_path(parts[0], base_dir).is_file() else "missing"
        if ablation == "blank":
            return ""
        at = rec["meta"]["answer_type"]
        return rec["meta"]["answer"] if at in ("closed", "choice") else "zzz"

    def answer(self, records, base_dir, gen, *, on_batch=None, ablation=None, seed=0):
        self.calls.append((len(records), ablation))
        out = []
        for s in range(0, len(records), self.batch_size):
            chunk = records[s:s + self.batch_size]
            preds = [self._one(r, base_dir, ablation) for r in chunk]
            out += preds
            if on_batch:
                on_batch([r["id"] for r in chunk], preds)
        return out


class Killed(Exception):
    pass


class KillAfter:
    """Wraps a backend and raises after ``batches`` batches were handed to the runner (a kill)."""

    def __init__(self, inner, batches: int):
        self.inner, self.batches = inner, batches
        self.name, self.batch_size, self.supports_ablation = inner.name, inner.batch_size, inner.supports_ablation

    def describe(self):
        return self.inner.describe()

    def answer(self, records, base_dir, gen, *, on_batch=None, **kw):
        count = 0

        def cb(ids, preds):
            nonlocal count
            on_batch(ids, preds)
            count += 1
            if count >= self.batches:
                raise Killed()

        return self.inner.answer(records, base_dir, gen, on_batch=cb, **kw)


# ----------------------------------------------------------------------------- in process, end to end

@pytest.fixture(scope="module")
def backend(env):
    from medmllm.data.dataset import ModalityShapes
    from medmllm.eval.backends import InProcessBackend

    return InProcessBackend(env[1], batch_size=4, device="cpu", shapes=ModalityShapes(image_size=32))


@pytest.fixture(scope="module")
def full_run(env, backend, tmp_path_factory):
    data, _, task = env
    out = tmp_path_factory.mktemp("full")
    res = run_eval(backend, [str(task)], out, data_root=data, limit=LIMIT, progress=False)
    return out, res["tasks"]["phantom_xray_train"]


PRED_FILES = ("predictions.jsonl", "predictions.blank.jsonl", "predictions.noise.jsonl")


def test_results_carry_provenance(env, full_run):
    data, model_dir, _ = env
    out, res = full_run
    saved = json.loads((out / "phantom_xray_train" / "results.json").read_text())
    assert saved["protocols"] == res["protocols"]
    assert res["task"]["name"] == "phantom_xray_train" and res["task"]["version"] == 1
    for name in ("exact", "llava-med", "mcq"):
        assert res["protocols"][name]["name"] == name and res["protocols"][name]["version"] == 1
    manifest = json.loads((data / "medphantom" / "records" / "manifest.json").read_text())
    assert res["data"]["manifest"]["status"] == "ok"
    assert res["data"]["manifest"]["hash"] == manifest["splits"]["train"]["hash"]
    assert res["model"]["config_sha256"] == hashlib.sha256((model_dir / "config.json").read_bytes()).hexdigest()
    assert res["model"]["model_id"] == str(model_dir.resolve())
    assert res["generation"]["max_new_tokens"] == 4 and res["generation"]["temperature"] == 0
    assert res["generation"]["decoding"] == "greedy"
    assert res["provenance"]["medmllm_version"] == medmllm.__version__
    want = task_records(data)
    assert res["counts"]["n"] == len(want) == LIMIT
    assert res["counts"]["by_answer_type"] == dict(Counter(r["meta"]["answer_type"] for r in want))
    assert list(res["by_modality"]) == ["xray"] and res["by_modality"]["xray"]["n"] == LIMIT
    assert res["blind"]["status"] == "done" and res["blind"]["n"] == LIMIT
    for row in res["blind"]["protocols"].values():
        assert row["drop_blank"] == pytest.approx(row["real"] - row["blank"])
    preds = lines(out / "phantom_xray_train" / "predictions.jsonl")
    assert [p["id"] for p in preds] == [r["id"] for r in want]
    assert [p["answer"] for p in preds] == [r["meta"]["answer"] for r in want]


def _all_predictions(task_dir: Path) -> dict[str, dict]:
    return {f: read_predictions(task_dir / f) for f in PRED_FILES}


def _no_duplicates(task_dir: Path) -> None:
    for f in PRED_FILES:
        ids = [p["id"] for p in lines(task_dir / f)]
        assert len(ids) == len(set(ids)) == LIMIT, f


def test_resume_after_a_kill_gives_the_uninterrupted_results(env, backend, full_run, tmp_path):
    data, _, task = env
    ref_dir = full_run[0] / "phantom_xray_train"
    with pytest.raises(Killed):
        run_eval(KillAfter(backend, 1), [str(task)], tmp_path, data_root=data, limit=LIMIT, progress=False)
    task_dir = tmp_path / "phantom_xray_train"
    assert len(lines(task_dir / "predictions.jsonl")) == 4 and not (task_dir / "results.json").exists()
    res = run_eval(backend, [str(task)], tmp_path, data_root=data, limit=LIMIT, progress=False)
    res = res["tasks"]["phantom_xray_train"]
    assert res["timing"]["predictions"] == {**res["timing"]["predictions"], "new": LIMIT - 4, "reused": 4}
    assert _all_predictions(task_dir) == _all_predictions(ref_dir)
    _no_duplicates(task_dir)
    assert res["protocols"] == full_run[1]["protocols"] and res["blind"] == full_run[1]["blind"]


def test_resume_after_a_line_cut_mid_write(env, backend, full_run, tmp_path):
    data, _, task = env
    ref_dir = full_run[0] / "phantom_xray_train"
    task_dir = tmp_path / "phantom_xray_train"
    shutil.copytree(ref_dir, task_dir)
    (task_dir / "results.json").unlink()
    pred = task_dir / "predictions.jsonl"
    raw = pred.read_bytes()
    pred.write_bytes(raw[:-7])  # the last line loses its end: a kill during the write
    assert len(read_predictions(pred)) == LIMIT - 1
    res = run_eval(backend, [str(task)], tmp_path, data_root=data, limit=LIMIT, progress=False)
    timing = res["tasks"]["phantom_xray_train"]["timing"]
    assert (timing["predictions"]["new"], timing["predictions"]["reused"]) == (1, LIMIT - 1)
    assert (timing["blank"]["new"], timing["noise"]["new"]) == (0, 0)
    assert _all_predictions(task_dir) == _all_predictions(ref_dir)
    assert pred.read_bytes() == raw  # the cut line was dropped and written again, identically
    _no_duplicates(task_dir)


def test_rerun_with_other_settings_is_refused(env, backend, full_run, tmp_path):
    data, _, task = env
    shutil.copytree(full_run[0] / "phantom_xray_train", tmp_path / "phantom_xray_train")
    with pytest.raises(ConfigError, match="differs in: seed"):
        run_eval(backend, [str(task)], tmp_path, data_root=data, limit=LIMIT, seed=1, progress=False)


# ----------------------------------------------------------------------------- scores by hand

def test_scores_of_a_scripted_backend(env, tmp_path):
    data, _, task = env
    recs = task_records(data, limit=100)
    n_closed = sum(r["meta"]["answer_type"] == "closed" for r in recs)
    n_open = sum(r["meta"]["answer_type"] == "open" for r in recs)
    n_choice = sum(r["meta"]["answer_type"] == "choice" for r in recs)
    assert n_closed and n_open and n_choice
    res = run_eval(Scripted(), [str(task)], tmp_path, data_root=data, progress=False)["tasks"]["phantom_xray_train"]
    exact = res["protocols"]["exact"]
    # closed answered with the gold (right), open with "zzz" (wrong); choice not scored by exact
    assert exact["overall"]["score"] == pytest.approx(n_closed / (n_closed + n_open))
    assert exact["n"] == n_closed + n_open and exact["n_skipped"] == n_choice
    assert exact["by_answer_type"]["closed"]["score"] == 1.0 and exact["by_answer_type"]["open"]["score"] == 0.0
    assert res["protocols"]["llava-med"]["overall"]["score"] == pytest.approx(n_closed / (n_closed + n_open))
    assert res["protocols"]["mcq"]["overall"]["score"] == 1.0 and res["protocols"]["mcq"]["n"] == n_choice
    assert res["by_modality"]["xray"]["scores"]["mcq"] == 1.0
    blind = res["blind"]["protocols"]["exact"]
    assert blind["blank"] == 0.0 and blind["drop_blank"] == pytest.approx(n_closed / (n_closed + n_open))
    assert blind["noise"] == blind["real"] and blind["drop_noise"] == 0.0
    conf = res["confusion"]["closed"]
    golds = Counter(r["meta"]["answer"] for r in recs if r["meta"]["answer_type"] == "closed")
    assert conf["labels_gold"] == sorted(golds) and conf["labels_pred"] == sorted(golds) + ["other"]
    for i, g in enumerate(conf["labels_gold"]):  # every closed answer right: all counts on the diagonal
        assert conf["matrix"][i] == [golds[g] if j == i else 0 for j in range(len(golds) + 1)]


def test_report_task_metrics_and_protocol_override(env, tmp_path, task_yaml):
    data, _, _ = env
    yaml = task_yaml.replace("phantom_xray_train", "phantom_reports").replace(
        "protocols: [exact, llava-med, mcq]", "metrics: [bleu, rouge_l]").replace(
        "answer_types: [closed, open, choice]", "answer_types: [report]")
    path = tmp_path / "phantom_reports.yaml"
    path.write_text(yaml)

    class Parrot(Scripted):
        def _one(self, rec, base_dir, ablation):
            return rec["meta"]["answer"]

    res = run_eval(Parrot(), [path], tmp_path / "out", data_root=data, progress=False)["tasks"]["phantom_reports"]
    # every report repeated word for word: BLEU-4 and ROUGE-L are 1
    assert res["metrics"]["bleu"]["score"] == pytest.approx(1.0) and res["metrics"]["rouge_l"]["score"] == 1.0
    assert "per_item" not in res["metrics"]["bleu"] and res["protocols"] == {}
    assert res["blind"]["status"] == "not applicable" and res["confusion"]["closed"] is None
    over = run_eval(Scripted(), [str(env[2])], tmp_path / "o2", data_root=data, protocols=["f1"], limit=3,
                    progress=False)["tasks"]["phantom_xray_train"]
    assert list(over["protocols"]) == ["f1"]


# ----------------------------------------------------------------------------- data checks and errors

def _copy_records(data: Path, root: Path, edit=None, manifest: bool = True) -> Path:
    rec_dir = root / "medphantom" / "records"
    rec_dir.mkdir(parents=True)
    text = (data / "medphantom" / "records" / "train.jsonl").read_text()
    (rec_dir / "train.jsonl").write_text(edit(text) if edit else text)
    if manifest:
        shutil.copy(data / "medphantom" / "records" / "manifest.json", rec_dir / "manifest.json")
    return root


def test_manifest_mismatches_fail_and_an_absent_manifest_is_recorded(env, tmp_path):
    data, _, task = env
    changed = _copy_records(data, tmp_path / "a", lambda t: t.replace("Is there", "Is there really", 1))
    with pytest.raises(InputError, match="hash mismatch"):
        run_eval(Scripted(), [str(task)], tmp_path / "o1", data_root=changed, progress=False)
    dropped = _copy_records(data, tmp_path / "b", lambda t: "".join(t.splitlines(keepends=True)[1:]))
    with pytest.raises(InputError, match="does not match the manifest.*1 manifest ids missing"):
        run_eval(Scripted(), [str(task)], tmp_path / "o2", data_root=dropped, progress=False)
    bare = _copy_records(data, tmp_path / "c", manifest=False)
    res = run_eval(Scripted(), [str(task)], tmp_path / "o3", data_root=bare, limit=2, progress=False)
    assert res["tasks"]["phantom_xray_train"]["data"]["manifest"]["status"] == "absent"


def test_missing_data_names_the_command_that_makes_it(tmp_path):
    with pytest.raises(InputError, match=r"medmllm phantoms --out .*medphantom"):
        run_eval(Scripted(), ["medphantom_xray"], tmp_path / "o", data_root=tmp_path, progress=False)
    with pytest.raises(InputError, match=r"medmllm convert vqa_rad .*--split test --out .*vqa_rad/test.jsonl"):
        run_eval(Scripted(), ["vqa_rad"], tmp_path / "o", data_root=tmp_path, progress=False)


def test_unknown_names_fail_before_any_work(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="unknown task 'nope'; known: .*vqa_rad"):
        run_eval(Scripted(), ["nope"], tmp_path, progress=False)
    with pytest.raises(ConfigError, match="unknown protocol 'strict'; known: .*exact"):
        run_eval(Scripted(), ["vqa_rad"], tmp_path, protocols=["strict"], progress=False)
    monkeypatch.setitem(sys.modules, "medmllm.eval.trust", None)  # the trust module missing
    monkeypatch.delattr(medmllm.eval, "trust", raising=False)
    with pytest.raises(ConfigError, match="trust suites .* not available"):
        run_eval(Scripted(), ["vqa_rad"], tmp_path, trust=["pope"], progress=False)
    assert not any(tmp_path.iterdir())


def test_a_cut_line_is_dropped_but_a_corrupt_one_fails(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text('{"id": "a", "prediction": "x"}\n{"id": "b", "prediction": null}\n{"id": "c", "pred')
    assert read_predictions(p) == {"a": "x", "b": None}
    read_predictions(p, repair=True)
    assert p.read_text() == '{"id": "a", "prediction": "x"}\n{"id": "b", "prediction": null}\n'
    p.write_text('{"id": "a", "prediction": "x"}\nnot json\n{"id": "c", "prediction": "z"}\n')
    with pytest.raises(InputError, match=r"p.jsonl:2"):
        read_predictions(p)


def test_prompt_template_options_and_system_prompt():
    from medmllm.eval.tasks import PromptSpec, load_task

    spec = load_task("gmai_mmbench")
    rec = make_record("q1", [media("image", "x.png"), "Which organ?"], "B",
                      {"dataset": "d", "split": "validation", "answer_type": "choice", "choices": ["liver", "lung"]})
    out = prompt_record(spec, rec)
    assert out["messages"] == [{"role": "user", "content": [
        {"type": "image", "path": "x.png"},
        {"type": "text", "text": "Which organ?\nA. liver\nB. lung\nAnswer with the option's letter from the given "
                                 "choices directly."}]}]
    assert out["meta"] == rec["meta"] and rec["messages"][-1]["role"] == "assistant"  # the input is untouched
    spec2 = dataclasses.replace(spec, prompt=PromptSpec(template="Q: {question}", system="You are a radiologist."))
    out2 = prompt_record(spec2, rec)
    assert out2["messages"][0] == {"role": "system", "content": [{"type": "text", "text": "You are a radiologist."}]}
    assert out2["messages"][1]["content"][1]["text"] == "Q: Which organ?"


# ----------------------------------------------------------------------------- trust suites

class FakeSuite:
    """Follows medmllm.eval.trust's interface: one existence probe per record, its image copied to work_dir."""

    name = "fake"
    version = 3

    def __init__(self):
        self.seen: list[int] = []

    def build(self, records, base_dir, work_dir, seed):
        self.seen.append(len(records))
        probes = []
        for r in records:
            part = modality_parts(r)[0]
            src = resolve_path(part, base_dir)
            shutil.copy(src, Path(work_dir) / src.name)
            probes.append(make_record(f"probe-{r['id']}", [media("image", src.name), "Is there a dog?"], "no",
                                      {"dataset": "probe", "split": "test", "answer_type": "closed",
                                       "extra": {"probe": True, "seed": seed}}))
        return probes

    def score(self, probes, predictions):
        yes = sum(p == "yes" for p in predictions)
        return {"figures": {"yes_ratio": yes / len(predictions)}, "n": len(predictions)}


def test_trust_suites_run_through_their_interface(env, tmp_path, monkeypatch):
    from types import SimpleNamespace

    from medmllm.registry import Registry

    data, _, task = env
    suites = Registry("trust suite")
    suite = FakeSuite()
    suites.register("fake", suite)
    fake_module = SimpleNamespace(SUITES=suites)
    monkeypatch.setitem(sys.modules, "medmllm.eval.trust", fake_module)
    monkeypatch.setattr(medmllm.eval, "trust", fake_module, raising=False)
    res = run_eval(Scripted(), [str(task)], tmp_path, data_root=data, limit=5, trust=["fake"], seed=7,
                   progress=False)["tasks"]["phantom_xray_train"]
    got = res["trust"]["fake"]
    # every probe image was found relative to the suite's work folder, so every answer is "yes"
    assert got["figures"] == {"yes_ratio": 1.0} and got["n"] == 5 and got["n_probes"] == 5 and got["version"] == 3
    assert suite.seen == [5]
    work = tmp_path / "phantom_xray_train" / "trust" / "fake"
    probes, _ = read_records(work / "probes.jsonl")
    assert [p["meta"]["extra"]["seed"] for p in probes] == [7] * 5
    assert sorted(read_predictions(work / "predictions.jsonl")) == sorted(p["id"] for p in probes)
    with pytest.raises(ConfigError, match="unknown trust suite 'pope'; known: fake"):
        run_eval(Scripted(), [str(task)], tmp_path, data_root=data, trust=["pope"], progress=False)


def test_real_trust_suites_on_the_tiny_model_reach_the_report(env, backend, tmp_path):
    trust = pytest.importorskip("medmllm.eval.trust")
    if not {"blind", "pope"} <= set(trust.SUITES.names()):
        pytest.skip("medmllm.eval.trust has no blind/pope suites yet")
    from medmllm.eval.report import write_report

    data, _, task = env
    res = run_eval(backend, [str(task)], tmp_path, data_root=data, limit=2, trust=["blind", "pope"],
                   progress=False)["tasks"]["phantom_xray_train"]
    for name in ("blind", "pope"):
        got = res["trust"][name]
        assert got["n_probes"] > 0 and got["figures"], name
        assert len(read_predictions(tmp_path / "phantom_xray_train" / "trust" / name / "predictions.jsonl")) == \
            got["n_probes"]
    md = write_report(tmp_path).read_text()
    assert "| blind |" in md and "| pope |" in md and (tmp_path / "plots" / "trust_phantom_xray_train.png").exists()

"""Reports: report.md + self-contained report.html with every plot embedded, and runs side by side."""

from __future__ import annotations

import base64
import json
import re
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

import medmllm
from medmllm.data.records import make_record, media, modality_parts, read_records, resolve_path
from medmllm.errors import InputError
from medmllm.eval.report import compare, load_results, write_report
from medmllm.eval.runner import run_eval

PNG = b"\x89PNG\r\n\x1a\n"


class Scripted:
    """Gold for closed and choice questions, 'zzz' for open ones (``oracle``: gold everywhere);
    blank input -> empty answers, noise -> the real answers; trust probes -> 'yes'."""

    name = "scripted"
    supports_ablation = True
    batch_size = 4

    def __init__(self, oracle: bool = False):
        self.oracle = oracle

    def describe(self):
        return {"backend": self.name, "model_id": "oracle" if self.oracle else "half-oracle"}

    def _one(self, rec, ablation):
        if rec["meta"].get("dataset") == "probe":
            return "yes"
        if ablation == "blank":
            return ""
        return rec["meta"]["answer"] if self.oracle or rec["meta"]["answer_type"] != "open" else "zzz"

    def answer(self, records, base_dir, gen, *, on_batch=None, ablation=None, seed=0):
        out = [self._one(r, ablation) for r in records]
        for s in range(0, len(records), self.batch_size):
            on_batch([r["id"] for r in records[s:s + 4]], out[s:s + 4])
        return out


class ProbeSuite:
    """A trust suite following medmllm.eval.trust's interface: one probe per record, its image copied."""

    name, version = "probe", 1

    def build(self, records, base_dir, work_dir, seed):
        probes = []
        for r in records:
            src = resolve_path(modality_parts(r)[0], base_dir)
            shutil.copy(src, Path(work_dir) / src.name)
            probes.append(make_record(f"p-{r['id']}", [media("image", src.name), "Is there a dog?"], "no",
                                      {"dataset": "probe", "split": "test", "answer_type": "closed"}))
        return probes

    def score(self, probes, predictions):
        yes = sum(p == "yes" for p in predictions) / len(predictions)
        return {"figures": {"yes_ratio": yes, "accuracy": 1 - yes}, "n": len(predictions)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shared_env):
    from medmllm.registry import Registry

    data, _, task = shared_env(model=False)
    suites = Registry("trust suite")
    suites.register("probe", ProbeSuite())
    mp = pytest.MonkeyPatch()
    fake = SimpleNamespace(SUITES=suites)
    mp.setitem(sys.modules, "medmllm.eval.trust", fake)
    mp.setattr(medmllm.eval, "trust", fake, raising=False)
    a, b = tmp_path_factory.mktemp("run_a"), tmp_path_factory.mktemp("run_b")
    try:
        run_eval(Scripted(), [str(task)], a, data_root=data, trust=["probe"], limit=12, progress=False)
        run_eval(Scripted(oracle=True), [str(task)], b, data_root=data, limit=12, progress=False)
    finally:
        mp.undo()
    recs = [r for r in read_records(data / "medphantom" / "records" / "train.jsonl")[0]
            if r["meta"]["modality"] == "xray" and r["meta"]["answer_type"] in ("closed", "open", "choice")][:12]
    return a, b, recs


def test_report_files_hold_every_plot(runs):
    a, _, recs = runs
    md_path = write_report(a)
    assert md_path == a / "report.md"
    md = md_path.read_text()
    html = (a / "report.html").read_text()
    pngs = sorted(p.name for p in (a / "plots").glob("*.png"))
    assert pngs == sorted(["scores.png", "blind.png", "modality.png", "confusion_phantom_xray_train.png",
                           "trust_phantom_xray_train.png"])
    # markdown links every plot file; the HTML embeds each one as a base64 PNG and links nothing
    assert sorted(re.findall(r"\]\(plots/([^)]+)\)", md)) == pngs
    embedded = re.findall(r'<img alt="[^"]*" src="data:image/png;base64,([A-Za-z0-9+/=]+)">', html)
    assert len(embedded) == len(pngs) and "plots/" not in html
    assert all(base64.b64decode(e).startswith(PNG) for e in embedded)
    assert sorted(base64.b64decode(e) for e in embedded) == sorted((a / "plots" / p).read_bytes() for p in pngs)
    # the scores worked out by hand: closed right, open wrong (exact); choice right (mcq); blank: all wrong
    n_closed = sum(r["meta"]["answer_type"] == "closed" for r in recs)
    n_open = sum(r["meta"]["answer_type"] == "open" for r in recs)
    exact = f"{100 * n_closed / (n_closed + n_open):.1f}"
    assert f"| exact v1 | {exact} | {n_closed + n_open} | 0.0 | +{exact} | {exact} | +0.0 |" in md
    assert "| mcq v1 | 100.0 |" in md
    assert "yes_ratio=1" in md and "accuracy=0" in md  # trust-suite figures
    assert "<table>" in html and "exact v1" in html


def test_compare_puts_runs_side_by_side(runs, tmp_path):
    a, b, _ = runs
    md_path = compare([a, b], tmp_path / "cmp")
    md = md_path.read_text()
    assert f"| task / protocol or metric | {a.name} | {b.name} |" in md
    assert f"| phantom_xray_train / mcq | 100.0 | 100.0 |" in md
    row = next(line for line in md.splitlines() if line.startswith("| phantom_xray_train / exact |"))
    assert row.endswith("| 100.0 |")  # the oracle run is right everywhere
    assert (tmp_path / "cmp" / "compare.png").read_bytes().startswith(PNG)
    table = json.loads((tmp_path / "cmp" / "compare.json").read_text())["rows"]
    assert table["phantom_xray_train / exact"][1] == 1.0
    assert table["phantom_xray_train / exact drop (blank)"][1] == 1.0  # oracle 1.0 real, 0.0 blank


def test_folders_without_results_fail_clearly(runs, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="empty: holds no results"):
        compare([runs[0], empty], tmp_path / "cmp")
    with pytest.raises(InputError, match="no folder"):
        load_results(tmp_path / "absent")
    with pytest.raises(InputError, match="holds no results"):
        write_report(empty)

"""build_phantoms: determinism, caching/resume, failures, splits, balance, datasheet, manifest."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest

from medmllm.data.phantoms import build as build_mod
from medmllm.data.phantoms.build import build_phantoms
from medmllm.data.phantoms.questions import LETTERS, TEMPLATES
from medmllm.data.records import read_records, resolve_path

HAS_IMAGING = all(importlib.util.find_spec(f"medmllm.data.phantoms.{m}") for m in ("radiograph", "volume", "writers"))
MODS = None if HAS_IMAGING else ["ecg", "ehr"]
needs_imaging = pytest.mark.skipif(not HAS_IMAGING, reason="radiograph.py / volume.py / writers.py not there yet")
N = 60


def tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("mp") / "a"
    summary = build_phantoms(out, N, seed=3, workers=1, modalities=MODS, progress=False)
    return out, summary, tree_hashes(out)


def _records(out: Path) -> dict[str, list[dict]]:
    return {s: read_records(out / "records" / f"{s}.jsonl")[0] for s in ("train", "validation", "test", "alignment")}


def _cases(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "cases.jsonl").read_text().splitlines()]


def test_layout_and_summary(built):
    out, summary, hashes = built
    assert summary["failed"] == [] and summary["n"] == N
    assert sum(summary["modalities"].values()) == N
    for name in ("cases.jsonl", "DATASHEET.md", "summary.json", "records/manifest.json", "records/train.jsonl",
                 "records/validation.jsonl", "records/test.jsonl", "records/alignment.jsonl"):
        assert name in hashes, name
    assert not [k for k in hashes if k.endswith(".tmp")]
    cases = _cases(out)
    assert [c["index"] for c in cases if not c["counterfactual_of"]] == list(range(N))
    for c in cases:
        for rel in c["files"].values():
            assert (out / rel).exists(), rel


def test_two_builds_are_byte_identical_whatever_the_workers(built, tmp_path):
    out, _, hashes = built
    other = tmp_path / "b"
    build_phantoms(other, N, seed=3, workers=2, modalities=MODS, progress=False)
    assert tree_hashes(other) == hashes


def test_rebuild_reuses_cache_and_changes_nothing(built, tmp_path):
    out, _, hashes = built
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    summary = build_phantoms(copy, N, seed=3, workers=1, modalities=MODS, progress=False)
    assert summary["cached"] == N
    assert tree_hashes(copy) == hashes


def test_interrupted_build_resumes_to_the_same_tree(built, tmp_path):
    """A killed build leaves some cases without a done marker and files of others missing."""
    out, _, hashes = built
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    markers = sorted((copy / ".medphantom" / "cases").glob("*.json"))
    for m in markers[10:25]:
        m.unlink()
    victim = _cases(copy)[40]
    first = next(iter(victim["files"].values()))
    target = copy / first
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    for name in ("records", "DATASHEET.md", "cases.jsonl"):
        p = copy / name
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    mod_dir = (copy / first).parent
    (mod_dir / ".case000099.dcm.abc123.tmp").write_bytes(b"half a file")  # killed mid-write
    (mod_dir / ".case000099_dicom.tmp").mkdir()
    (copy / ".medphantom" / "cases" / ".case000099.json.x.tmp").write_text("{")
    summary = build_phantoms(copy, N, seed=3, workers=2, modalities=MODS, progress=False)
    assert summary["cached"] == N - 15 - (victim["index"] not in range(10, 25))
    assert tree_hashes(copy) == hashes


def test_failing_case_is_reported_and_the_build_goes_on(tmp_path, monkeypatch):
    real = build_mod.build_case

    def flaky(out, seed, index, patient_id, modalities):
        if index == 5:
            raise RuntimeError("simulated generator crash")
        return real(out, seed, index, patient_id, modalities)

    monkeypatch.setattr(build_mod, "build_case", flaky)
    summary = build_phantoms(tmp_path / "f", 12, seed=0, workers=1, modalities=["ecg", "ehr"], progress=False)
    assert summary["failed"] == [{"index": 5, "case_id": "case000005",
                                  "error": "RuntimeError: simulated generator crash"}]
    ids = {c["case_id"] for c in _cases(tmp_path / "f")}
    assert "case000005" not in ids and len(ids) == 11
    assert not (tmp_path / "f" / ".medphantom" / "cases" / "case000005.json").exists()
    monkeypatch.setattr(build_mod, "build_case", real)  # the next build fills the gap
    again = build_phantoms(tmp_path / "f", 12, seed=0, workers=1, modalities=["ecg", "ehr"], progress=False)
    assert again["failed"] == [] and again["cached"] == 11


def test_splits_by_patient(tmp_path):
    out = tmp_path / "s"
    build_phantoms(out, 400, seed=1, workers=1, modalities=["ehr"], progress=False)
    cases = _cases(out)
    split_of_patient = defaultdict(set)
    for c in cases:
        split_of_patient[c["patient_id"]].add(c["split"])
    assert all(len(s) == 1 for s in split_of_patient.values())
    assert any(v > 1 for v in Counter(c["patient_id"] for c in cases).values())  # patients with several cases
    share = Counter(next(iter(s)) for s in split_of_patient.values())
    n_pat = len(split_of_patient)
    assert 0.7 < share["train"] / n_pat < 0.9 and share["validation"] > 0 and share["test"] > 0
    case_split = {c["case_id"]: c["split"] for c in cases}
    recs = _records(out)
    for split in ("train", "validation", "test"):
        for r in recs[split]:
            assert r["meta"]["split"] == split == case_split[r["meta"]["extra"]["case_id"]]
    assert {r["meta"]["split"] for r in recs["alignment"]} == {"train"}


def test_record_media_exist_and_read_back(built):
    import wfdb

    out, _, _ = built
    recs = _records(out)
    cases = {c["case_id"]: c for c in _cases(out)}
    for split, rs in recs.items():
        for r in rs:
            assert r["meta"]["dataset"] == "medphantom"
            part = r["messages"][0]["content"][0]
            path = resolve_path(part, out / "records")
            assert path.exists(), path
            truth = cases[r["meta"]["extra"]["case_id"]]["truth"]
            if r["meta"].get("answer_type") == "choice":  # options shown in the prompt, answer points at the truth
                m = r["meta"]
                assert m["choices"][LETTERS.index(m["answer"])] == m["extra"]["answer_text"]
                prompt = r["messages"][0]["content"][-1]["text"]
                assert [ln[3:] for ln in prompt.splitlines()[1:5]] == m["choices"]
                assert r["messages"][-1]["content"][0]["text"] == m["answer"]
            if r["meta"]["modality"] == "ecg" and r["meta"]["extra"]["template"] == "ecg_rhythm":
                rec = wfdb.rdrecord(str(path.with_suffix("")))
                assert rec.fs == truth["fs"] and rec.p_signal.shape == (5000, 12)
            if r["meta"]["modality"] == "ehr" and r["meta"]["extra"]["template"] == "ehr_qsofa":
                ehr = json.loads(path.read_text())
                v = {k: x["value"] for k, x in ehr["vitals"].items()}
                assert (v["sbp"] < 90) == truth["flags"]["hypotension"]


def test_exact_templates_are_balanced_in_every_split(built):
    out, _, _ = built
    recs = _records(out)
    observed = defaultdict(set)
    for rs in recs.values():
        for r in rs:
            observed[r["meta"]["extra"]["template"]].add(r["meta"]["answer"])
    checked = 0
    for split in ("train", "validation", "test"):
        per = defaultdict(Counter)
        for r in recs[split]:
            per[r["meta"]["extra"]["template"]][r["meta"]["answer"]] += 1
        for tpl, counts in per.items():
            rule = TEMPLATES[tpl].balance
            if rule == "letters":  # choice: letters take turns, counts differ by at most one
                assert set(counts) <= set(LETTERS) and max(counts.values()) - min(counts.values()) <= 1
                assert len(counts) == min(4, sum(counts.values())), (split, tpl, counts)
                checked += 1
            if rule != "exact":
                continue
            expected = {"closed": {"yes", "no"}}.get(TEMPLATES[tpl].answer_type, observed[tpl])
            if tpl == "ecg_rhythm":
                expected = {"normal sinus rhythm", "atrial fibrillation", "sinus bradycardia", "sinus tachycardia",
                            "st elevation"}
            # every answer kept in a split is one of the template's answers, at least two of them
            # are present (yes/no: both), and all present answers have the same count
            assert set(counts) <= expected and len(counts) >= 2, (split, tpl, counts)
            if TEMPLATES[tpl].answer_type == "closed":
                assert set(counts) == {"yes", "no"}, (split, tpl, counts)
            assert len(set(counts.values())) == 1, (split, tpl, counts)
            checked += 1
    assert checked >= 5


def _md_table(text: str, heading: str) -> list[dict]:
    block = text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    lines = [ln for ln in block.splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in ln.strip("|").split("|")))) for ln in lines[2:]]


def test_datasheet_counts_equal_counts_from_jsonl(built):
    out, summary, _ = built
    text = (out / "DATASHEET.md").read_text()
    recs = _records(out)
    cases = _cases(out)
    assert "- seed: 3" in text and f"- n (requested cases): {N}" in text
    mods = Counter(c["modality"] for c in cases if not c["counterfactual_of"])
    for row in _md_table(text, "Cases per modality"):
        assert int(row["cases"]) == mods[row["modality"]]
    for row in _md_table(text, "Records per split"):
        assert int(row["records"]) == len(recs[row["split"]])
        assert int(row["patients"]) == len({r["meta"]["patient_id"] for r in recs[row["split"]]})
    per_tpl = defaultdict(Counter)
    answers = defaultdict(Counter)
    for split, rs in recs.items():
        for r in rs:
            per_tpl[r["meta"]["extra"]["template"]][split] += 1
            answers[r["meta"]["extra"]["template"]][r["meta"]["answer"]] += 1
    rows = _md_table(text, "Records per template")
    assert {row["template"] for row in rows} == set(per_tpl)
    for row in rows:
        for split in ("train", "validation", "test", "alignment"):
            assert int(row[split]) == per_tpl[row["template"]][split], (row, split)
        assert int(row["total"]) == sum(per_tpl[row["template"]].values())
    for row in _md_table(text, "Answer balance"):
        counts = answers[row["template"]]
        assert int(row["records"]) == sum(counts.values())
        assert float(row["max share"]) == pytest.approx(max(counts.values()) / sum(counts.values()), abs=5e-4)
        if "distinct" not in row["answers"]:
            listed = dict(item.rsplit(": ", 1) for item in row["answers"].split("; "))
            assert {k: int(v) for k, v in listed.items()} == dict(counts)


def test_manifest_matches_split_files(built):
    out, _, _ = built
    man = json.loads((out / "records" / "manifest.json").read_text())
    recs = _records(out)
    for split in ("train", "validation", "test"):
        if recs[split]:
            assert man["splits"][split]["ids"] == sorted(r["id"] for r in recs[split])
    assert man["datasets"] == ["medphantom"]


def test_new_seed_wipes_and_smaller_n_prunes(tmp_path):
    out = tmp_path / "w"
    build_phantoms(out, 20, seed=0, workers=1, modalities=["ecg", "ehr"], progress=False)
    build_phantoms(out, 8, seed=0, workers=1, modalities=["ecg", "ehr"], progress=False)
    names = {p.stem for p in (out / "ecg").iterdir()} | {p.stem for p in (out / "ehr").iterdir()}
    assert names and all(int(n[4:10]) < 8 for n in names)
    fresh = tmp_path / "fresh"
    build_phantoms(fresh, 8, seed=1, workers=1, modalities=["ecg", "ehr"], progress=False)
    build_phantoms(out, 8, seed=1, workers=1, modalities=["ecg", "ehr"], progress=False)
    assert tree_hashes(out) == tree_hashes(fresh)


def test_bad_arguments():
    with pytest.raises(ValueError):
        build_phantoms("unused", 0)
    with pytest.raises(ValueError):
        build_phantoms("unused", 5, modalities=["mri"])


@needs_imaging
def test_counterfactual_twins_differ_only_in_the_finding(tmp_path):
    from PIL import Image

    out = tmp_path / "cf"
    summary = build_phantoms(out, 40, seed=0, workers=1, modalities=["xray", "ct"], progress=False)
    assert summary["failed"] == []
    cases = {c["case_id"]: c for c in _cases(out)}
    twins = [c for c in cases.values() if c["counterfactual_of"]]
    assert twins, "expected some counterfactual twins in 40 imaging cases (p=0.2)"
    recs = [r for rs in _records(out).values() for r in rs]
    for twin in twins:
        orig = cases[twin["counterfactual_of"]]
        f = twin["counterfactual_finding"]
        assert orig["truth"]["findings"][f]["present"] != twin["truth"]["findings"][f]["present"]
        a = np.asarray(Image.open(out / orig["files"]["png"]), dtype=np.int32)
        b = np.asarray(Image.open(out / twin["files"]["png"]), dtype=np.int32)
        diff = np.argwhere(a != b)
        assert diff.size and diff.shape[0] < 0.5 * a.size  # local change, not a new image
        pair = [r for r in recs if r["meta"]["extra"].get("counterfactual_pair") == f"{orig['case_id']}/{f}"]
        assert len(pair) == 2 and {r["meta"]["answer"] for r in pair} == {"yes", "no"}


@pytest.mark.slow
def test_n2000_under_two_minutes_on_two_workers(tmp_path):
    t0 = time.perf_counter()
    summary = build_phantoms(tmp_path / "big", 2000, seed=0, workers=2, progress=False)
    elapsed = time.perf_counter() - t0
    assert summary["failed"] == []
    assert elapsed < 120.0, elapsed


@needs_imaging
def test_files_read_back_with_medmllm_readers_equal_the_regenerated_case(built):
    """Case i = default_rng([seed, i]): one draw picks the modality, the generator gets the rest."""
    readers = pytest.importorskip("medmllm.data.readers")
    from medmllm.data.phantoms.ecg import generate_ecg
    from medmllm.data.phantoms.ehr import generate_ehr
    from medmllm.data.phantoms.radiograph import generate_ct_slice, generate_xray
    from medmllm.data.phantoms.volume import generate_ct_volume

    out, _, _ = built
    first = {}
    for c in _cases(out):
        if not c["counterfactual_of"]:
            first.setdefault(c["modality"], c)
    for mod, c in first.items():
        rng = np.random.default_rng([3, c["index"]])
        rng.random()
        if mod == "xray":
            img, truth = generate_xray(rng, size=128)
            arr, _ = readers.read(out / c["files"]["dicom"])
            assert np.array_equal(arr, img)
        elif mod == "ct":
            hu, truth = generate_ct_slice(rng, size=128)
            arr, _ = readers.read(out / c["files"]["dicom"])
            assert np.array_equal(arr, hu)
        elif mod == "ct3d":
            vol, truth = generate_ct_volume(rng, shape=(32, 64, 64))
            for key in ("nifti", "dicom_series"):
                arr, meta = readers.read(out / c["files"][key])
                assert np.array_equal(arr, vol), key
                np.testing.assert_allclose(meta["spacing"], truth["spacing_mm"], rtol=1e-5)
        elif mod == "ecg":
            sig, truth = generate_ecg(rng)
            arr, meta = readers.read(out / c["files"]["hea"])
            np.testing.assert_allclose(arr, sig, atol=0.0005 + 1e-6)
            assert meta["lead_names"] == truth["lead_names"] and meta["fs"] == truth["fs"]
        else:
            record, truth = generate_ehr(rng, patient_id=c["patient_id"])
            assert json.loads((out / c["files"]["json"]).read_text()) == record
            table, meta = readers.read(out / c["files"]["json"])
            assert meta["patient_id"] == c["patient_id"]
            col = meta["features"].index("sbp")
            assert table[0, col] == record["vitals"]["sbp"]["value"]
        assert truth == c["truth"], mod

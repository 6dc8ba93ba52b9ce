"""Build the MedPhantom dataset: cases -> files -> instruction records -> manifest + datasheet.

``build_phantoms(out_dir, n, seed=0)`` writes::

    out_dir/
      xray/<case>.dcm, <case>.png              radiograph (DICOM DX + 8-bit PNG)
      ct/<case>.dcm, <case>.png                CT slice (DICOM CT + PNG in the truth's window)
      ct3d/<case>.nii, <case>_dicom/           CT volume (NIfTI + DICOM series folder)
      ecg/<case>.hea, <case>.dat               12-lead ECG (WFDB)
      ehr/<case>.json                          EHR snapshot (medmllm EHR JSON)
      records/{train,validation,test}.jsonl    instruction records (one question each)
      records/alignment.jsonl                  captions (stage "alignment"), train patients only
      records/manifest.json                    split manifest (ids + hashes of records and files)
      cases.jsonl                              every case: ids, split, files, ground truth
      summary.json, DATASHEET.md
      .medphantom/stamp.json, .medphantom/cases/<case>.json   cache: params + per-case done markers

Determinism: case ``i`` draws everything from ``numpy.random.default_rng([seed, i])`` (its
modality first, then the generator) and its questions from ``default_rng([seed, i, 1])``;
patients and splits come from hashes. Outputs are byte-identical whatever ``workers`` is.
Caching: a stamp holds (generator version, source hash, seed, modalities, sizes); with the
same stamp a case whose done marker and files exist is not generated again, so a rebuild is
quick and a killed build resumes. A different stamp wipes the folders this builder owns.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import multiprocessing
import os
import shutil
import time
from collections import Counter
from pathlib import Path

import numpy as np

from medmllm.errors import ConfigError
from medmllm.io import write_json, write_jsonl
from medmllm.data.records import write_manifest, write_records

GENERATOR_VERSION = "1.0"
MODALITIES = ("xray", "ct", "ct3d", "ecg", "ehr")
MODALITY_WEIGHTS = {"xray": 0.30, "ct": 0.15, "ct3d": 0.15, "ecg": 0.20, "ehr": 0.20}
SPLIT_CUTS = (("train", 80), ("validation", 90), ("test", 100))  # hash % 100 below the cut
COUNTERFACTUAL_FRACTION = 0.2    # imaging cases that get a twin with one finding flipped
XRAY_SIZE, CT_SIZE, VOLUME_SHAPE = 128, 128, (32, 64, 64)
_OWNED = ("xray", "ct", "ct3d", "ecg", "ehr", "records", ".medphantom", "cases.jsonl", "summary.json",
          "DATASHEET.md")
_FALLBACK_WINDOWS = {"lung": (-600.0, 1500.0), "mediastinum": (50.0, 350.0), "abdomen": (40.0, 400.0),
                     "soft_tissue": (40.0, 350.0), "liver": (60.0, 160.0), "brain": (40.0, 80.0),
                     "bone": (400.0, 1800.0)}


# ----------------------------------------------------------------------------- plan

def _unit_hash(*parts: object) -> float:
    """A number in [0, 1) from sha256 of the parts (stable across runs, machines, Python versions)."""
    h = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "big") / 2.0 ** 64


def split_of(patient_id: str) -> str:
    """train / validation / test from a hash of the patient id (80/10/10)."""
    bucket = int(_unit_hash("medphantom-split", patient_id) * 100)
    return next(name for name, cut in SPLIT_CUTS if bucket < cut)


def plan_patients(n: int, seed: int) -> list[str]:
    """Patient id of each case: runs of 1-3 consecutive cases share a patient.

    Case ``i`` continues the previous case's patient with probability 0.4 (hash of
    (seed, i)) unless that patient already has 3 cases. The plan of the first ``k``
    cases does not depend on ``n``.
    """
    ids, current, run = [], -1, 0
    for i in range(n):
        if i == 0 or run >= 3 or _unit_hash("medphantom-patient", seed, i) >= 0.4:
            current, run = current + 1, 0
        run += 1
        ids.append(f"MP{seed}-{current:06d}")
    return ids


def _pick_modality(rng: np.random.Generator, modalities: tuple[str, ...]) -> str:
    """One uniform draw mapped onto the (renormalised) MODALITY_WEIGHTS of ``modalities``."""
    w = np.array([MODALITY_WEIGHTS[m] for m in modalities])
    k = int(np.searchsorted(np.cumsum(w / w.sum()), rng.random(), side="right"))
    return modalities[min(k, len(modalities) - 1)]


# ----------------------------------------------------------------------------- generation

def _window_values(name: str) -> tuple[float, float]:
    try:
        from medmllm.data.preprocess import CT_WINDOWS
        return tuple(CT_WINDOWS.get(name))  # type: ignore[return-value]
    except Exception:  # noqa: BLE001 - preprocess absent or name unknown there
        return _FALLBACK_WINDOWS.get(name, _FALLBACK_WINDOWS["soft_tissue"])


def _to_uint8(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return np.round(np.clip((x.astype(np.float64) - lo) / (hi - lo), 0.0, 1.0) * 255.0).astype(np.uint8)


def _generate(modality: str, rng: np.random.Generator, patient_id: str, overrides: dict | None = None):
    """-> (payload, truth) for one modality; ``overrides`` only for imaging."""
    kw = {"overrides": overrides} if overrides else {}
    if modality == "xray":
        from medmllm.data.phantoms.radiograph import generate_xray
        return generate_xray(rng, size=XRAY_SIZE, **kw)
    if modality == "ct":
        from medmllm.data.phantoms.radiograph import generate_ct_slice
        return generate_ct_slice(rng, size=CT_SIZE, **kw)
    if modality == "ct3d":
        from medmllm.data.phantoms.volume import generate_ct_volume
        return generate_ct_volume(rng, shape=VOLUME_SHAPE, **kw)
    if modality == "ecg":
        from medmllm.data.phantoms.ecg import generate_ecg
        return generate_ecg(rng)
    from medmllm.data.phantoms.ehr import generate_ehr
    return generate_ehr(rng, patient_id=patient_id)


def supports_overrides(modality: str) -> bool:
    """Whether the imaging generator of ``modality`` takes ``overrides`` (counterfactual twins)."""
    try:
        if modality in ("xray", "ct"):
            from medmllm.data.phantoms import radiograph as mod
            fn = mod.generate_xray if modality == "xray" else mod.generate_ct_slice
        elif modality == "ct3d":
            from medmllm.data.phantoms import volume as mod
            fn = mod.generate_ct_volume
        else:
            return False
    except ImportError:
        return False
    return "overrides" in inspect.signature(fn).parameters


def _write(modality: str, out: Path, name: str, payload, truth: dict, patient_id: str, uid_seed: str) -> dict:
    """Write one case's files (each atomically) -> {kind: path relative to out}."""
    folder = out / modality
    folder.mkdir(parents=True, exist_ok=True)
    if modality in ("xray", "ct"):
        from medmllm.data.phantoms.writers import write_dicom_image, write_png
        if modality == "xray":  # 12-bit radiograph -> 8-bit PNG
            write_dicom_image(folder / f"{name}.dcm", payload, modality="DX",
                              pixel_spacing_mm=truth["pixel_spacing_mm"], patient_id=patient_id, uid_seed=uid_seed)
            write_png(folder / f"{name}.png", _to_uint8(payload, 0.0, 4095.0))
        else:  # CT: DICOM in HU + PNG of the window that shows the lesion
            c, w = _window_values(truth.get("window", "soft_tissue"))
            write_dicom_image(folder / f"{name}.dcm", payload, modality="CT",
                              pixel_spacing_mm=truth["pixel_spacing_mm"], patient_id=patient_id, uid_seed=uid_seed,
                              window=(c, w), rescale=(1.0, -1024.0))
            write_png(folder / f"{name}.png", _to_uint8(payload, c - w / 2.0, c + w / 2.0))
        return {"dicom": f"{modality}/{name}.dcm", "png": f"{modality}/{name}.png"}
    if modality == "ct3d":
        from medmllm.data.phantoms.writers import write_dicom_series, write_nifti
        write_nifti(folder / f"{name}.nii", payload, truth["spacing_mm"])
        _write_series_atomic(folder / f"{name}_dicom", payload, truth["spacing_mm"], patient_id, uid_seed)
        return {"nifti": f"ct3d/{name}.nii", "dicom_series": f"ct3d/{name}_dicom"}
    if modality == "ecg":
        from medmllm.data.phantoms.ecg import write_wfdb
        write_wfdb(folder, name, payload, truth["fs"], truth["lead_names"],
                   comments=["MedPhantom synthetic ECG", f"case {name}"])
        return {"hea": f"ecg/{name}.hea", "dat": f"ecg/{name}.dat"}
    write_json(folder / f"{name}.json", payload)
    return {"json": f"ehr/{name}.json"}


def _write_series_atomic(target: Path, vol, spacing, patient_id: str, uid_seed: str) -> None:
    """Write a DICOM series into a temporary sibling folder, then rename it onto ``target``."""
    from medmllm.data.phantoms.writers import write_dicom_series
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write_dicom_series(tmp, vol, spacing, patient_id=patient_id, uid_seed=uid_seed)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)


def _case_dict(index: int, case_id: str, patient_id: str, modality: str, truth: dict, files: dict) -> dict:
    return {"case_id": case_id, "index": index, "patient_id": patient_id, "split": split_of(patient_id),
            "modality": modality, "truth": truth, "files": files, "counterfactual_of": None,
            "counterfactual_finding": None, "counterfactual_twin_finding": None}


def _flip(rng: np.random.Generator, modality: str, truth: dict) -> str | None:
    """The finding a twin flips (None: no twin). Draws twice from ``rng`` for every imaging case."""
    from medmllm.data.phantoms.questions import COUNTERFACTUAL_FINDINGS
    options = COUNTERFACTUAL_FINDINGS.get(modality)
    if not options:
        return None
    u, k = rng.random(), int(rng.integers(len(options)))
    if u >= COUNTERFACTUAL_FRACTION or not supports_overrides(modality):
        return None
    return options[k] if options[k] in truth.get("findings", {}) else None


def build_case(out: Path, seed: int, index: int, patient_id: str, modalities: tuple[str, ...]) -> dict:
    """Generate, write and question case ``index`` -> {"index", "cases", "records", "files"}."""
    from medmllm.data.phantoms.questions import case_records

    case_id = f"case{index:06d}"
    rng = np.random.default_rng([seed, index])
    modality = _pick_modality(rng, modalities)
    payload, truth = _generate(modality, rng, patient_id)
    uid_seed = f"medphantom/{seed}/{case_id}"
    files = _write(modality, out, case_id, payload, truth, patient_id, uid_seed)
    case = _case_dict(index, case_id, patient_id, modality, truth, files)
    cases = [case]
    qrng = np.random.default_rng([seed, index, 1])
    finding = _flip(qrng, modality, truth)
    if finding:
        twin_rng = np.random.default_rng([seed, index])
        _pick_modality(twin_rng, modalities)  # same stream position as the original
        present = bool(truth["findings"][finding]["present"])
        twin_payload, twin_truth = _generate(modality, twin_rng, patient_id, overrides={finding: not present})
        if bool(twin_truth["findings"][finding]["present"]) == present:
            raise RuntimeError(f"overrides={{{finding!r}: {not present}}} was not honoured by the {modality} generator")
        twin_id = f"{case_id}-cf"
        twin_files = _write(modality, out, twin_id, twin_payload, twin_truth, patient_id, f"{uid_seed}/cf")
        twin = _case_dict(index, twin_id, patient_id, modality, twin_truth, twin_files)
        twin.update(counterfactual_of=case_id, counterfactual_finding=finding)
        case["counterfactual_twin_finding"] = finding
        cases.append(twin)
    records = [r for c in cases for r in case_records(c, qrng)]
    all_files = sorted(p for c in cases for p in c["files"].values())
    return {"index": index, "case_id": case_id, "cases": cases, "records": records, "files": all_files}


# ----------------------------------------------------------------------------- cache

def _source_hash() -> str:
    """sha256 over the phantom package's source files (a code change invalidates the cache)."""
    h = hashlib.sha256()
    for p in sorted(Path(__file__).parent.glob("*.py")):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def _marker(out: Path, case_id: str) -> Path:
    return out / ".medphantom" / "cases" / f"{case_id}.json"


def _load_done(out: Path, case_id: str) -> dict | None:
    """The saved result of a finished case, or None if its marker or any of its files is missing."""
    path = _marker(out, case_id)
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return result if all((out / f).exists() for f in result.get("files", [])) else None


def _remove_files(out: Path, files: list[str]) -> None:
    for f in files:
        p = out / f
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        elif p.exists():
            p.unlink()


def _remove_temporaries(out: Path) -> None:
    """Delete ``.*.tmp`` files/folders a killed build left in the folders this builder owns."""
    roots = [out / name for name in _OWNED if (out / name).is_dir()]
    for p in [q for q in out.glob(".*.tmp")] + [q for r in roots for q in r.rglob(".*.tmp")]:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def _prepare(out: Path, stamp: dict, n: int) -> None:
    """Match the output folder to ``stamp``: wipe on a different stamp, drop cases >= n."""
    stamp_path = out / ".medphantom" / "stamp.json"
    old = None
    if stamp_path.exists():
        try:
            old = json.loads(stamp_path.read_text(encoding="utf-8"))
        except ValueError:
            old = {}
    if old is not None and old != stamp:
        for name in _OWNED:
            p = out / name
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else (p.unlink() if p.exists() else None)
    _remove_temporaries(out)
    markers = out / ".medphantom" / "cases"
    if markers.is_dir():
        for m in sorted(markers.glob("case*.json")):
            if int(m.stem[4:]) >= n:
                try:
                    _remove_files(out, json.loads(m.read_text(encoding="utf-8")).get("files", []))
                except ValueError:
                    pass
                m.unlink()
    write_json(stamp_path, stamp)


# ----------------------------------------------------------------------------- workers

def _run_chunk(args: tuple) -> list[dict]:
    """Worker: build (or load from cache) each case of a chunk; a failing case becomes an error entry."""
    out, seed, chunk, modalities = args
    results = []
    for index, patient_id in chunk:
        case_id = f"case{index:06d}"
        done = _load_done(out, case_id)
        if done is not None:
            done["cached"] = True
            results.append(done)
            continue
        try:
            result = build_case(out, seed, index, patient_id, modalities)
        except Exception as exc:  # noqa: BLE001 - one bad case must not stop the build
            results.append({"index": index, "case_id": case_id, "error": f"{type(exc).__name__}: {exc}"})
            continue
        write_json(_marker(out, case_id), result, indent=None)
        results.append(result)
    return results


def _chunks(items: list, size: int) -> list[list]:
    return [items[k:k + size] for k in range(0, len(items), size)]


def _run_all(out: Path, seed: int, plan: list[tuple[int, str]], modalities: tuple[str, ...], workers: int,
             progress: bool) -> list[dict]:
    size = max(1, min(32, math.ceil(len(plan) / max(1, workers * 8))))
    tasks = [(out, seed, c, modalities) for c in _chunks(plan, size)]
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(plan), desc="medphantom", unit="case")
    results: list[dict] = []
    try:
        if workers <= 1 or len(tasks) <= 1:
            for t in tasks:
                results.extend(_run_chunk(t))
                bar is not None and bar.update(len(t[2]))
        else:
            with multiprocessing.get_context().Pool(processes=workers) as pool:
                for t, res in zip(tasks, pool.imap(_run_chunk, tasks)):
                    results.extend(res)
                    bar is not None and bar.update(len(t[2]))
    finally:
        if bar is not None:
            bar.close()
    return sorted(results, key=lambda r: r["index"])


# ----------------------------------------------------------------------------- balance

def _id_hash(rec: dict) -> str:
    return hashlib.sha256(rec["id"].encode()).hexdigest()


def balance_records(records: list[dict]) -> tuple[list[dict], dict[str, int]]:
    """Balance answers per (split, template); returns (records in their order, {template: dropped}).

    ``exact`` templates: each answer of the template's answer set (the observed set when it
    has none) is cut to the count of the rarest answer present in that split (at least two
    answers must be present, else the split keeps none of the template), keeping the records whose
    id hashes lowest; counterfactual-pair records (one "yes", one "no" per pair) always stay.
    ``letters`` templates (choice): nothing is dropped; in id-hash order the correct option
    is moved to A, B, C, D, A, ... so letter counts differ by at most one per split.
    """
    from medmllm.data.phantoms.questions import TEMPLATES, reposition_choice

    observed: dict[str, set] = {}
    groups: dict[tuple, list[dict]] = {}
    letters: dict[tuple, list[dict]] = {}
    for r in records:
        tpl = r["meta"]["extra"]["template"]
        rule = TEMPLATES[tpl].balance
        if rule == "letters":
            letters.setdefault((r["meta"]["split"], tpl), []).append(r)
        if rule != "exact" or "counterfactual_pair" in r["meta"]["extra"]:
            continue
        observed.setdefault(tpl, set()).add(r["meta"]["answer"])
        groups.setdefault((r["meta"]["split"], tpl, r["meta"]["answer"]), []).append(r)
    drop: set[str] = set()
    dropped: Counter = Counter()
    for split, tpl in sorted({(s, t) for s, t, _ in groups}):
        answers = TEMPLATES[tpl].answer_set or tuple(sorted(observed[tpl]))
        # Equalise the answers present in this split (an answer absent from a small split must
        # not wipe the template out); a split with a single answer present keeps none of it.
        present = [len(groups[(split, tpl, a)]) for a in answers if groups.get((split, tpl, a))]
        cap = min(present) if len(present) >= 2 else 0
        for a in sorted({a for s, t, a in groups if s == split and t == tpl}):
            for r in sorted(groups[(split, tpl, a)], key=_id_hash)[cap:]:
                drop.add(r["id"])
                dropped[tpl] += 1
    moved = {r["id"]: reposition_choice(r, k % 4)
             for group in letters.values() for k, r in enumerate(sorted(group, key=_id_hash))}
    return [moved.get(r["id"], r) for r in records if r["id"] not in drop], dict(sorted(dropped.items()))


# ----------------------------------------------------------------------------- main

def build_phantoms(out_dir: str | os.PathLike, n: int, seed: int = 0, *, workers: int | None = None,
                   modalities: list[str] | tuple[str, ...] | None = None, progress: bool = True) -> dict:
    """Build MedPhantom with ``n`` cases under ``out_dir`` -> summary dict.

    ``modalities`` restricts the modality mix (subset of MODALITIES, weights renormalised);
    ``workers`` defaults to ``min(2, os.cpu_count())``. Outputs depend only on (n, seed,
    modalities, code), never on ``workers``. The summary holds counts per modality, split and
    template, the answer balance, ``failed`` ([{"index", "case_id", "error"}]), ``cached``
    (cases reused from an earlier build) and ``seconds``.
    """
    from medmllm.data.phantoms.datasheet import answer_stats, write_datasheet

    t0 = time.perf_counter()
    if not isinstance(n, int) or n < 1:
        raise ConfigError(f"n: expected an integer >= 1, got {n!r}")
    mods = tuple(m for m in MODALITIES if m in set(modalities or MODALITIES))
    unknown = sorted(set(modalities or ()) - set(MODALITIES))
    if unknown or not mods:
        raise ConfigError(f"modalities: expected a non-empty subset of {MODALITIES}, got {modalities!r}")
    workers = int(workers or min(2, os.cpu_count() or 1))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stamp = {"generator_version": GENERATOR_VERSION, "source_sha256": _source_hash(), "seed": int(seed),
             "modalities": list(mods), "xray_size": XRAY_SIZE, "ct_size": CT_SIZE, "volume_shape": list(VOLUME_SHAPE),
             "counterfactual_fraction": COUNTERFACTUAL_FRACTION}
    _prepare(out, stamp, n)
    plan = list(enumerate(plan_patients(n, seed)))
    results = _run_all(out, int(seed), plan, mods, workers, progress)

    failed = [{"index": r["index"], "case_id": r["case_id"], "error": r["error"]} for r in results if "error" in r]
    good = [r for r in results if "error" not in r]
    cases = [c for r in good for c in r["cases"]]
    records, dropped = balance_records([rec for r in good for rec in r["records"]])
    by_split = {s: [r for r in records if r["stage"] == "instruction" and r["meta"]["split"] == s]
                for s in ("train", "validation", "test")}
    alignment = [r for r in records if r["stage"] == "alignment" and r["meta"]["split"] == "train"]
    rec_dir = out / "records"
    for split, recs in by_split.items():
        write_records(rec_dir / f"{split}.jsonl", recs)
    write_records(rec_dir / "alignment.jsonl", alignment)
    write_manifest(rec_dir / "manifest.json", [r for s in by_split.values() for r in s], base_dir=rec_dir)
    write_jsonl(out / "cases.jsonl", cases)
    from medmllm.data.phantoms.preference import build_preference
    from medmllm.data.phantoms.reasoning import build_reasoning

    preference, reasoning = build_preference(out, seed), build_reasoning(out, seed)   # read cases.jsonl

    written = [r for s in by_split.values() for r in s] + alignment
    summary = {
        "n": n, "seed": int(seed), "generator_version": GENERATOR_VERSION,
        "modalities": dict(Counter(c["modality"] for c in cases if not c["counterfactual_of"])),
        "cases": len(cases),
        "counterfactual_pairs": sum(1 for c in cases if c["counterfactual_of"]),
        "counterfactuals_supported": {m: supports_overrides(m) for m in ("xray", "ct", "ct3d") if m in mods},
        "patients": {s: len({c["patient_id"] for c in cases if c["split"] == s}) for s in by_split},
        "splits": {s: len(v) for s, v in by_split.items()},
        "alignment": len(alignment),
        "preference": preference,
        "reasoning": reasoning,
        "templates": answer_stats(written),
        "balance_dropped": dropped,
        "failed": failed,
    }
    write_json(out / "summary.json", summary)
    write_datasheet(out / "DATASHEET.md", summary, cases, written)
    summary["out_dir"] = str(out)  # not in summary.json: the files stay independent of where they are
    summary["cached"] = sum(1 for r in good if r.get("cached"))
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    return summary

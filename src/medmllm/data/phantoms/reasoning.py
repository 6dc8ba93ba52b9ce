"""A reasoning split of MedPhantom: questions a single lookup does not answer.

``build_reasoning(build_dir, seed)`` reads ``build_dir/cases.jsonl`` and writes
``build_dir/records/reasoning_{train,validation,test}.jsonl`` by the build's existing patient
splits (train / validation / test patients never mix). Counterfactual twins are left out.
Each record is an ``instruction`` record whose user turn is the case's file + a question +
:data:`COT_INSTRUCTION`, and whose assistant turn is a gold chain of thought and answer::

    <think>Lung nodule: present. Pleural effusion: absent. Both are needed, so no.</think><answer>no</answer>

``meta.answer`` is the final answer alone; ``meta.extra`` holds ``template``, ``case_id``, ``cot``
(the gold trace) and, for numeric answers, ``tolerance`` (absolute, in ``unit``) — the key the
``accuracy`` reward (:mod:`medmllm.train.rewards`) reads. Templates:

========================== ========= ==================================================================
template                   modality  question (answer; tolerance)
========================== ========= ==================================================================
reason_xray_two_findings   xray      both / either of two of {nodule, effusion, cardiomegaly}? (yes/no)
reason_xray_finding_count  xray      how many of the three findings are present? (0-3; exact)
reason_xray_nodule_mm      xray      nodule diameter in mm from its size in pixels x the pixel
                                     spacing stated in the question (mm; ± one pixel)
reason_ct_lesion_mm        ct        lesion diameter in mm, pixel spacing stated (mm; ± one pixel, >= 1 mm)
reason_ct3d_lesion_extent  ct3d      cranio-caudal extent = slices showing the lesion x slice spacing
                                     stated in the question (mm; ± one slice)
reason_ecg_heart_rate      ecg       heart rate from the R-R intervals, 60 / mean RR (bpm; ± 5 bpm)
reason_ehr_qsofa           ehr       qSOFA from respiratory rate, systolic BP and mentation (0-3; exact)
reason_ehr_sepsis_screen   ehr       both / either of qSOFA >= 2 and fever? (yes/no)
========================== ========= ==================================================================

"Both" and "either" questions are drawn with probability 1/2 each, so with findings present
independently at p = 1/2 the yes/no answers are balanced in expectation (1/4 and 3/4 yes).
Case ``i`` draws from ``numpy.random.default_rng([seed, i, 13, 0])``: the output is a pure
function of the build and ``seed``.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np

from medmllm.data.phantoms.preference import case_rng, read_cases
from medmllm.data.phantoms.questions import media_part, organ_of
from medmllm.data.records import make_record, write_manifest, write_records

COT_INSTRUCTION = ("Think step by step inside <think></think>, then give the final answer inside "
                   "<answer></answer>.")
SEED_TAG = 13
SPLITS = ("train", "validation", "test")
HEART_RATE_TOLERANCE_BPM = 5.0
_XRAY_FINDINGS = {"nodule": "a lung nodule", "effusion": "a pleural effusion", "cardiomegaly": "cardiomegaly"}
_XRAY_NAMES = {"nodule": "Lung nodule", "effusion": "Pleural effusion", "cardiomegaly": "Cardiomegaly"}


def _yn(flag: bool) -> str:
    return "yes" if flag else "no"


def _present(flag: bool) -> str:
    return "present" if flag else "absent"


def _item(template: str, question: str, answer: str, cot: str, answer_type: str = "closed",
          tolerance: float | None = None, unit: str | None = None) -> dict:
    extra = {"template": template, "cot": cot}
    if tolerance is not None:
        extra["tolerance"] = round(float(tolerance), 3)
    if unit:
        extra["unit"] = unit
    return {"question": question, "answer": answer, "answer_type": answer_type, "extra": extra}


def _both_or_either(rng: np.random.Generator, a: tuple[str, bool], b: tuple[str, bool]) -> tuple[str, str, str]:
    """(connective question part, answer, reasoning sentence) for 'both A and B' or 'either A or B'."""
    (na, pa), (nb, pb) = a, b
    if rng.random() < 0.5:
        ans = pa and pb
        return f"both {na} and {nb}", _yn(ans), f"Both are needed, so the answer is {_yn(ans)}."
    ans = pa or pb
    return f"either {na} or {nb}", _yn(ans), f"One of them is enough, so the answer is {_yn(ans)}."


# ----------------------------------------------------------------------------- per modality

def _xray(case: dict, rng: np.random.Generator, build_dir: Path) -> list[dict]:
    truth = case["truth"]
    f = truth["findings"]
    present = {k: bool(f[k]["present"]) for k in _XRAY_FINDINGS}
    keys = list(_XRAY_FINDINGS)
    i, j = sorted(int(k) for k in rng.permutation(3)[:2])
    a, b = keys[i], keys[j]
    what, ans, why = _both_or_either(rng, (_XRAY_FINDINGS[a], present[a]), (_XRAY_FINDINGS[b], present[b]))
    items = [_item("reason_xray_two_findings", f"Does this chest radiograph show {what}?", ans,
                   f"{_XRAY_NAMES[a]}: {_present(present[a])}. {_XRAY_NAMES[b]}: {_present(present[b])}. {why}")]
    n = sum(present.values())
    items.append(_item("reason_xray_finding_count", "How many of these findings are present: lung nodule, pleural "
                       "effusion, cardiomegaly? Answer with a number.", str(n),
                       " ".join(f"{_XRAY_NAMES[k]}: {_present(present[k])}." for k in keys) + f" Count: {n}.",
                       answer_type="open", tolerance=0.0))
    if present["nodule"]:
        s, px = float(truth["pixel_spacing_mm"]), float(f["nodule"]["diameter_px"])
        mm = px * s
        items.append(_item(
            "reason_xray_nodule_mm", f"The pixel spacing of this radiograph is {s:g} mm. Measure the lung nodule in "
            "pixels and give its diameter in millimetres.", str(int(round(mm))),
            f"The nodule spans about {px:.1f} pixels. {px:.1f} px x {s:g} mm/px = {mm:.1f} mm.",
            answer_type="open", tolerance=max(1.0, s), unit="mm"))
    return items


def _ct(case: dict, rng: np.random.Generator, build_dir: Path) -> list[dict]:
    truth = case["truth"]
    les = truth["findings"]["lesion"]
    if not les["present"]:
        return []
    s, mm = float(truth["pixel_spacing_mm"]), float(les["diameter_mm"])
    px = mm / s
    return [_item("reason_ct_lesion_mm", f"The pixel spacing of this CT slice is {s:.2f} mm. Measure the lesion in "
                  "pixels and give its diameter in millimetres.", str(int(round(mm))),
                  f"The lesion spans about {px:.1f} pixels. {px:.1f} px x {s:.2f} mm/px = {mm:.1f} mm.",
                  answer_type="open", tolerance=max(1.0, s), unit="mm")]


def _ct3d(case: dict, rng: np.random.Generator, build_dir: Path) -> list[dict]:
    truth = case["truth"]
    les = truth["findings"]["lesion"]
    if not les["present"]:
        return []
    dz = float(truth["spacing_mm"][0])
    first, last = les["slice_range"]
    n = int(last) - int(first) + 1
    length = n * dz
    return [_item("reason_ct3d_lesion_extent", f"Axial slices are {dz:g} mm apart. How long is the lesion along the "
                  "body axis, in millimetres (slices showing it times the slice spacing)?", str(int(round(length))),
                  f"The lesion is visible on slices {first}-{last}, that is {n} slices. {n} x {dz:g} mm = "
                  f"{length:g} mm.", answer_type="open", tolerance=dz, unit="mm")]


def _ecg(case: dict, rng: np.random.Generator, build_dir: Path) -> list[dict]:
    truth = case["truth"]
    rr = [float(x) for x in truth["rr_intervals_s"]]
    if not rr:
        return []
    mean = sum(rr) / len(rr)
    hr = float(truth["heart_rate_bpm"])
    return [_item("reason_ecg_heart_rate", "Compute the heart rate in beats per minute from the R-R intervals "
                  "(60 divided by the mean R-R interval in seconds). Answer with an integer.", str(int(round(hr))),
                  f"There are {len(rr)} R-R intervals with a mean of {mean:.3f} s. 60 / {mean:.3f} s = {hr:.1f} bpm.",
                  answer_type="open", tolerance=HEART_RATE_TOLERANCE_BPM, unit="bpm")]


def _ehr_values(case: dict, build_dir: Path) -> tuple[float, float]:
    with open(build_dir / case["files"]["json"], encoding="utf-8") as fh:
        rec = json.load(fh)
    v = rec["vitals"]
    return float(v["resp_rate"]["value"]), float(v["sbp"]["value"])


def _ehr(case: dict, rng: np.random.Generator, build_dir: Path) -> list[dict]:
    fl = case["truth"]["flags"]
    rr, sbp = _ehr_values(case, build_dir)
    p_rr, p_sbp, p_ment = int(rr >= 22), int(sbp <= 100), int(bool(fl["altered_mentation"]))
    q = int(fl["qsofa"])
    pts = lambda p: "1 point" if p else "0 points"  # noqa: E731
    qsofa_cot = (f"Respiratory rate {rr:g}/min ({'>=' if p_rr else '<'} 22): {pts(p_rr)}. Systolic blood pressure "
                 f"{sbp:g} mmHg ({'<=' if p_sbp else '>'} 100): {pts(p_sbp)}. Mentation "
                 f"{'altered' if p_ment else 'normal'} per the note: {pts(p_ment)}. qSOFA = {q}.")
    items = [_item("reason_ehr_qsofa", "Compute the qSOFA score (0-3): one point each for a respiratory rate of "
                   "22/min or more, a systolic blood pressure of 100 mmHg or less, and altered mentation.", str(q),
                   qsofa_cot, answer_type="open", tolerance=0.0)]
    what, ans, why = _both_or_either(rng, ("a qSOFA score of 2 or more", q >= 2),
                                     ("a fever (temperature 38.0 C or more)", bool(fl["fever"])))
    items.append(_item("reason_ehr_sepsis_screen", f"Does the patient have {what}?", ans,
                       f"qSOFA = {q}, so qSOFA >= 2 is {_yn(q >= 2)}. Fever: {_yn(bool(fl['fever']))}. {why}"))
    return items


_BUILDERS = {"xray": _xray, "ct": _ct, "ct3d": _ct3d, "ecg": _ecg, "ehr": _ehr}


# ----------------------------------------------------------------------------- records

def case_reasoning_records(case: dict, rng: np.random.Generator, build_dir: str | os.PathLike) -> list[dict]:
    """The reasoning records of one case (none for a counterfactual twin)."""
    if case.get("counterfactual_of"):
        return []
    out = []
    for it in _BUILDERS[case["modality"]](case, rng, Path(build_dir)):
        template = it["extra"]["template"]
        meta = {"dataset": "medphantom", "split": case["split"], "task": "vqa", "answer_type": it["answer_type"],
                "modality": case["modality"], "organ": organ_of(case), "answer": it["answer"],
                "patient_id": case["patient_id"], "extra": {**it["extra"], "case_id": case["case_id"]}}
        target = f"<think>{it['extra']['cot']}</think><answer>{it['answer']}</answer>"
        out.append(make_record(f"medphantom-{case['case_id']}-{template}",
                               [media_part(case), f"{it['question']}\n{COT_INSTRUCTION}"], target, meta))
    return out


def build_reasoning(build_dir: str | os.PathLike, seed: int = 0) -> dict:
    """Write ``records/reasoning_{train,validation,test}.jsonl`` and their split manifest
    ``records/reasoning.manifest.json`` -> summary ``{"paths" (relative to build_dir), "manifest",
    "splits", "templates"}`` (JSON-ready)."""
    build_dir = Path(build_dir)
    by_split: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for case in read_cases(build_dir):
        if case["split"] in by_split:
            by_split[case["split"]] += case_reasoning_records(case, case_rng(seed, case, SEED_TAG), build_dir)
    paths = {}
    for split, recs in by_split.items():
        paths[split] = f"records/reasoning_{split}.jsonl"
        write_records(build_dir / paths[split], recs)
    manifest = "records/reasoning.manifest.json"                        # what `medmllm eval` checks
    write_manifest(build_dir / manifest, [r for v in by_split.values() for r in v], base_dir=build_dir / "records")
    return {"paths": paths, "manifest": manifest, "splits": {s: len(v) for s, v in by_split.items()},
            "templates": dict(sorted(Counter(r["meta"]["extra"]["template"] for v in by_split.values()
                                             for r in v).items()))}


__all__ = ["COT_INSTRUCTION", "build_reasoning", "case_reasoning_records"]

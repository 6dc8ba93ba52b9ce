"""DPO preference pairs from a MedPhantom build: the true answer vs a hallucinated finding.

``build_preference(build_dir, seed)`` reads ``build_dir/cases.jsonl`` (the build's ground truth)
and writes ``build_dir/records/preference.jsonl``: ``stage="preference"`` records (see
:mod:`medmllm.data.records`) whose ``messages`` hold the prompt (the case's file + a question),
``chosen`` the true answer and ``rejected`` a wrong one. Only cases of **train** patients are used,
so validation and test patients (the trust suite's POPE questions) stay unseen. Counterfactual
twins are cases like any other.

Per case (when the case has the findings needed), with ``pair_kind`` in ``meta.extra``:

* ``hallucination`` — a yes/no question about a finding the case does NOT have: chosen ``no``,
  rejected ``yes``.
* ``omission`` — a yes/no question about a finding the case has: chosen ``yes``, rejected ``no``.
  Kept so that DPO cannot lower false positives by learning to always deny (POPE accuracy and
  F1 would drop); filter on ``meta.extra.pair_kind`` to leave them out.
* ``existence_present`` / ``existence_absent`` (imaging cases with a finding) — an open-wording
  existence question ("Is there a left-sided pleural effusion in the radiograph?", "Does this CT
  volume show ascites?") about one present and one absent object: the case's findings with their
  side / organ, the same finding elsewhere, or a finding MedPhantom never draws. Chosen the truth.
  The objects and wordings differ from the trust suite's POPE probes on purpose.
* ``open_answer`` (when ``records/train.jsonl`` exists) — one of the case's open questions ("Which
  side is the nodule on?"): chosen the gold answer, rejected a bare ``yes`` or ``no``, so that
  preference training on yes/no questions does not teach the model to answer everything yes/no.
* ``statement`` — the case's true report (imaging) or one-sentence description (ECG, EHR):
  chosen the true text, rejected the text of the same case with one absent finding made present
  (drawn plausibly: a side, a size, a zone), i.e. a hallucinated finding.

Findings per modality (questions worded as the build's own yes/no templates): radiograph lung
nodule / pleural effusion / cardiomegaly; CT slice focal lesion; CT volume lesion; ECG atrial
fibrillation / ST elevation; EHR fever / hypotension. Case ``i`` (twin ``t`` in {0, 1}) draws
from ``numpy.random.default_rng([seed, i, 11, t])``: the output is a pure function of the build
and ``seed``.
"""

from __future__ import annotations

import copy
import json
import os
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np

from medmllm.data.phantoms.questions import media_part, organ_of
from medmllm.data.records import message, validate_record, write_records
from medmllm.errors import InputError

PREFERENCE_FILE = "preference.jsonl"
SEED_TAG = 11
_REPORT_PROMPTS = {"xray": "Write the radiology report (findings and impression) for this chest radiograph.",
                   "ct": "Write the radiology report (findings and impression) for this CT slice.",
                   "ct3d": "Write the radiology report (findings and impression) for this CT volume."}
_DESCRIBE = "Describe this study in one sentence."


# ----------------------------------------------------------------------------- reading a build

def read_cases(build_dir: str | os.PathLike) -> list[dict]:
    """Every case of a build (``cases.jsonl``); InputError when the build has none."""
    path = Path(build_dir) / "cases.jsonl"
    if not path.is_file():
        raise InputError(path, "expected a MedPhantom build (cases.jsonl written by build_phantoms), found none")
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def case_rng(seed: int, case: dict, tag: int) -> np.random.Generator:
    """The generator of one case (twins get their own stream)."""
    return np.random.default_rng([int(seed), int(case["index"]), int(tag), int(bool(case.get("counterfactual_of")))])


# ----------------------------------------------------------------------------- findings

def findings(case: dict) -> list[tuple[str, bool, str]]:
    """``(finding, present, yes/no question)`` of every finding the pairs may ask about."""
    mod, truth = case["modality"], case["truth"]
    if mod == "xray":
        f = truth["findings"]
        return [("nodule", f["nodule"]["present"], "Is there a lung nodule?"),
                ("effusion", f["effusion"]["present"], "Is there a pleural effusion?"),
                ("cardiomegaly", f["cardiomegaly"]["present"], "Is the heart enlarged?")]
    if mod == "ct":
        return [("lesion", truth["findings"]["lesion"]["present"], f"Is there a focal lesion in the {truth['organ']}?")]
    if mod == "ct3d":
        return [("lesion", truth["findings"]["lesion"]["present"], "Is there a lesion in this CT volume?")]
    if mod == "ecg":
        return [("atrial fibrillation", truth["rhythm"] == "atrial fibrillation", "Is this atrial fibrillation?"),
                ("st elevation", float(truth["st_elevation_mm"]) > 0, "Is there ST elevation?")]
    if mod == "ehr":
        fl = truth["flags"]
        return [("fever", fl["fever"], "Does the patient have a fever?"),
                ("hypotension", fl["hypotension"], "Is the patient hypotensive?")]
    raise InputError("case.modality", f"expected one of xray, ct, ct3d, ecg, ehr, got {mod!r}")


# Existence questions in open wording (POPE-like "is there <object> ..."), per imaging modality: the noun
# of the study, question templates, and findings MedPhantom never draws (always absent). These lists are
# deliberately different from the trust suite's POPE objects, so POPE measures transfer, not recall.
_EXIST_NOUN = {"xray": "radiograph", "ct": "CT slice", "ct3d": "CT volume"}
_EXIST_TEMPLATES = ("Is there {x} in the {noun}?", "Does this {noun} show {x}?", "Can you see {x} in this {noun}?")
_EXIST_NEVER = {
    "xray": ("a hiatal hernia", "a tracheostomy tube", "a nasogastric tube", "subcutaneous emphysema",
             "a clavicle fracture", "a lobar collapse"),
    "ct": ("ascites", "a kidney stone", "an aortic aneurysm", "a drainage catheter", "free intraperitoneal air"),
    "ct3d": ("ascites", "a kidney stone", "an aortic aneurysm", "a drainage catheter", "free intraperitoneal air"),
}


def existence_objects(case: dict) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """``(present, absent)`` lists of ``(key, phrase)`` for existence questions about an imaging case:
    its findings with their side / organ, the same findings elsewhere, and never-drawn findings."""
    from medmllm.data.phantoms.questions import lesion_organ, volume_organs

    mod = case["modality"]
    if mod not in _EXIST_NOUN:
        return [], []
    f = case["truth"]["findings"]
    present, absent = [], []
    if mod == "xray":
        for name, word in (("nodule", "lung nodule"), ("effusion", "pleural effusion")):
            for side in ("left", "right"):
                item = (f"{name}_{side}", f"a {side}-sided {word}")
                (present if f[name]["present"] and f[name].get("side") == side else absent).append(item)
        (present if f["cardiomegaly"]["present"] else absent).append(("cardiomegaly", "an enlarged heart"))
    elif mod == "ct":
        for side in ("left", "right"):
            item = (f"lesion_{side}", f"a focal lesion on the {side} side")
            (present if f["lesion"]["present"] and f["lesion"].get("side") == side else absent).append(item)
    elif mod == "ct3d":
        organ = lesion_organ(f["lesion"]) if f["lesion"]["present"] else None
        for o in volume_organs():
            item = (f"lesion_{o.replace(' ', '_')}", f"a lesion in the {o}")
            (present if o == organ else absent).append(item)
    absent += [(x.replace(" ", "_"), x) for x in _EXIST_NEVER[mod]]
    return present, absent


def _pick(rng: np.random.Generator, items: tuple | list):
    return items[int(rng.integers(len(items)))]


def _hallucinate_xray(truth: dict, finding: str, rng: np.random.Generator) -> None:
    f = truth["findings"]
    if finding == "nodule":
        d_px = round(float(rng.uniform(3.0, 12.0)), 2)
        f["nodule"] = {"present": True, "side": _pick(rng, ("left", "right")), "zone": _pick(rng, ("upper", "lower")),
                       "diameter_px": d_px, "diameter_mm": round(d_px * float(truth["pixel_spacing_mm"]), 2),
                       "contrast": None, "center_rc": None}
    elif finding == "effusion":
        f["effusion"] = {"present": True, "side": _pick(rng, ("left", "right"))}
    else:
        f["cardiomegaly"] = {"present": True, "ctr": round(float(rng.uniform(0.52, 0.64)), 3)}


def _hallucinate_ct(truth: dict, finding: str, rng: np.random.Generator) -> None:
    sign = _pick(rng, (-1.0, 1.0))
    truth["findings"]["lesion"] = {"present": True, "side": _pick(rng, ("left", "right")),
                                   "diameter_mm": round(float(rng.uniform(6.0, 30.0)), 1),
                                   "hu_delta": round(sign * float(rng.uniform(25.0, 60.0)), 1), "center_rc": None}


def _hallucinate_ct3d(truth: dict, finding: str, rng: np.random.Generator) -> None:
    side = _pick(rng, ("left", "right"))
    organ = _pick(rng, ("liver", "kidney", "lung") if side == "right" else ("spleen", "kidney", "lung"))
    depth, dz = int(truth["shape"][0]), float(truth["spacing_mm"][0])
    n = int(rng.integers(2, max(3, depth // 4)))
    first = int(rng.integers(0, max(1, depth - n)))
    truth["findings"]["lesion"] = {"present": True, "organ": organ, "side": side,
                                   "slice_range": [first, first + n - 1], "diameter_mm": round(n * dz, 1),
                                   "hu_delta": None, "center_dhw": None}


def _hallucinate_ecg(truth: dict, finding: str, rng: np.random.Generator) -> None:
    truth["rhythm"] = finding
    if finding == "st elevation":
        truth["st_elevation_mm"] = round(float(rng.uniform(1.0, 3.0)), 1)
        truth["st_territory"] = _pick(rng, ("inferior", "anterior"))
    else:
        truth["st_elevation_mm"], truth["st_territory"] = 0.0, None


def _hallucinate_ehr(truth: dict, finding: str, rng: np.random.Generator) -> None:
    truth["flags"][finding] = True


_HALLUCINATE: dict[str, Callable] = {"xray": _hallucinate_xray, "ct": _hallucinate_ct, "ct3d": _hallucinate_ct3d,
                                     "ecg": _hallucinate_ecg, "ehr": _hallucinate_ehr}


def statement(case: dict) -> str:
    """The true report (imaging) or one-sentence description (ECG, EHR) of a case."""
    from medmllm.data.phantoms.questions import caption, ct3d_report, ct_report, xray_report

    mod, truth = case["modality"], case["truth"]
    if mod == "xray":
        return xray_report(truth)
    if mod == "ct":
        return ct_report(truth)
    if mod == "ct3d":
        return ct3d_report(truth)
    return caption(case)


def hallucinated_case(case: dict, finding: str, rng: np.random.Generator) -> dict:
    """A deep copy of ``case`` whose truth has ``finding`` present (parameters drawn from ``rng``)."""
    out = copy.deepcopy(case)
    _HALLUCINATE[case["modality"]](out["truth"], finding, rng)
    return out


# ----------------------------------------------------------------------------- records

def _pair(case: dict, kind: str, finding: str, prompt: str, chosen: str, rejected: str, task: str,
          answer_type: str) -> dict:
    template = "pref_statement" if kind == "statement" else f"pref_{kind}_yn"
    rec = {
        "id": f"medphantom-{case['case_id']}-{template}-{finding.replace(' ', '_')}",
        "stage": "preference",
        "messages": [message("user", media_part(case), prompt)],
        "chosen": [message("assistant", chosen)],
        "rejected": [message("assistant", rejected)],
        "meta": {"dataset": "medphantom", "split": case["split"], "task": task, "answer_type": answer_type,
                 "modality": case["modality"], "organ": organ_of(case), "answer": chosen,
                 "patient_id": case["patient_id"],
                 "extra": {"template": template, "case_id": case["case_id"], "pair_kind": kind, "finding": finding}},
    }
    return validate_record(rec)


def case_pairs(case: dict, rng: np.random.Generator) -> list[dict]:
    """The preference records of one case (see the module doc); draws only from ``rng``."""
    found = findings(case)
    absent = [(name, q) for name, present, q in found if not present]
    present = [(name, q) for name, present, q in found if present]
    out = []
    if absent:
        name, q = _pick(rng, absent)
        out.append(_pair(case, "hallucination", name, q, "no", "yes", "vqa", "closed"))
    if present:
        name, q = _pick(rng, present)
        out.append(_pair(case, "omission", name, q, "yes", "no", "vqa", "closed"))
    if absent:
        name, _ = _pick(rng, absent)
        fake = hallucinated_case(case, name, rng)
        imaging = case["modality"] in _REPORT_PROMPTS
        prompt = _REPORT_PROMPTS.get(case["modality"], _DESCRIBE)
        out.append(_pair(case, "statement", name, prompt, statement(case), statement(fake),
                         "report" if imaging else "caption", "report" if imaging else "caption"))
    yes, no = existence_objects(case)
    if yes and no:  # one present and one absent object: balanced, so "always no" cannot win
        noun = _EXIST_NOUN[case["modality"]]
        for (key, phrase), chosen, rejected, kind in ((_pick(rng, yes), "yes", "no", "existence_present"),
                                                      (_pick(rng, no), "no", "yes", "existence_absent")):
            q = _pick(rng, _EXIST_TEMPLATES).format(x=phrase, noun=noun)
            out.append(_pair(case, kind, key, q, chosen, rejected, "vqa", "closed"))
    return out


def open_answer_pair(case: dict, instruction: dict, rng: np.random.Generator) -> dict:
    """An ``open_answer`` pair from one of the case's open instruction records: chosen its gold answer,
    rejected a bare ``yes`` or ``no`` (a yes/no reply to a "which side / how large" question is wrong).
    These keep preference training on yes/no questions from turning every answer into yes/no."""
    rec = {
        "id": f"{instruction['id']}-pref_open_answer",
        "stage": "preference",
        "messages": copy.deepcopy(instruction["messages"][:1]),
        "chosen": copy.deepcopy(instruction["messages"][1:2]),
        "rejected": [message("assistant", _pick(rng, ("yes", "no")))],
        "meta": {**copy.deepcopy(instruction["meta"]),
                 "extra": {**instruction["meta"].get("extra", {}), "pair_kind": "open_answer",
                           "finding": instruction["meta"].get("extra", {}).get("template", "open")}},
    }
    return validate_record(rec)


def _open_records(build_dir: Path) -> dict[str, list[dict]]:
    """Open-answer VQA instruction records of train patients, by case id (from ``records/train.jsonl``)."""
    from medmllm.data.records import read_records

    path = build_dir / "records" / "train.jsonl"
    if not path.is_file():
        return {}
    out: dict[str, list[dict]] = {}
    for r in read_records(path)[0]:
        m = r["meta"]
        if (m.get("task") == "vqa" and m.get("answer_type") == "open" and len(r["messages"]) == 2
                and m.get("answer", "").strip().lower() not in ("yes", "no")):
            out.setdefault(m.get("extra", {}).get("case_id"), []).append(r)
    return out


def build_preference(build_dir: str | os.PathLike, seed: int = 0) -> dict:
    """Write ``build_dir/records/preference.jsonl`` from the build's train cases -> summary
    ``{"path" (relative to build_dir), "pairs", "cases", "by_kind", "by_modality"}`` (JSON-ready)."""
    build_dir = Path(build_dir)
    cases = [c for c in read_cases(build_dir) if c["split"] == "train"]
    open_recs = _open_records(build_dir)
    records = []
    for c in cases:
        rng = case_rng(seed, c, SEED_TAG)
        records += case_pairs(c, rng)
        if open_recs.get(c["case_id"]):
            records.append(open_answer_pair(c, _pick(rng, open_recs[c["case_id"]]), rng))
    path = build_dir / "records" / PREFERENCE_FILE
    write_records(path, records)
    return {"path": f"records/{PREFERENCE_FILE}", "pairs": len(records), "cases": len(cases),
            "by_kind": dict(sorted(Counter(r["meta"]["extra"]["pair_kind"] for r in records).items())),
            "by_modality": dict(sorted(Counter(r["meta"]["modality"] for r in records).items()))}


__all__ = ["PREFERENCE_FILE", "build_preference", "case_pairs", "existence_objects", "findings", "open_answer_pair", "hallucinated_case", "read_cases",
           "statement"]

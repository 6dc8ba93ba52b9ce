"""DATASHEET.md for a MedPhantom build: what is in it, how labels are made, how answers balance.

Every count in the datasheet is computed here from the cases and records that were
written (never copied from elsewhere), so a reader can recount them from the JSONL files.
"""

from __future__ import annotations

import os
from collections import Counter

from medmllm.io import write_text

SPLITS = ("train", "validation", "test")
MAX_LISTED_ANSWERS = 8  # more distinct answers than this: the table shows the count and the top one


def answer_stats(records: list[dict]) -> dict[str, dict]:
    """Per template: modality, task, answer type, balance rule, record counts per split and
    per answer, number of distinct answers and the largest answer share (0..1)."""
    from medmllm.data.phantoms.questions import TEMPLATES

    out: dict[str, dict] = {}
    for r in records:
        meta = r["meta"]
        tpl = meta["extra"]["template"]
        s = out.setdefault(tpl, {"modality": meta["modality"], "task": meta["task"],
                                 "answer_type": meta["answer_type"], "balance": TEMPLATES[tpl].balance,
                                 "records": 0, "per_split": Counter(), "answers": Counter()})
        s["records"] += 1
        key = "alignment" if r.get("stage") == "alignment" else meta["split"]
        s["per_split"][key] += 1
        if TEMPLATES[tpl].balance != "none":
            s["answers"][meta["answer"]] += 1
    for s in out.values():
        total = sum(s["answers"].values())
        s["distinct"] = len(s["answers"])
        s["max_share"] = round(max(s["answers"].values()) / total, 4) if total else None
        s["per_split"] = dict(sorted(s["per_split"].items()))
        s["answers"] = dict(sorted(s["answers"].items()))
    return dict(sorted(out.items()))


def _answers_cell(answers: dict[str, int]) -> str:
    if not answers:
        return "-"
    if len(answers) <= MAX_LISTED_ANSWERS:
        return "; ".join(f"{a}: {c}" for a, c in answers.items())
    top = max(answers.items(), key=lambda kv: (kv[1], kv[0]))
    return f"{len(answers)} distinct; most common {top[0]!r}: {top[1]}"


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines + [""]


_RULES = """\
## Ground-truth rules
- **Chest radiograph (xray)**: nodule, pleural effusion and cardiomegaly are each present with
  probability 0.5, independently (normal = none present). Side is the *patient's* side
  (radiological convention: the patient's left is on the image's right); nodule zone upper/lower
  uniform; nodule diameter a few pixels upward with varying contrast; cardiomegaly means a
  cardiothoracic ratio > 0.5, its absence a ratio <= 0.45 (never in between). Nodule size answers
  are the diameter in mm rounded to an integer.
- **CT slice (ct)**: body region chest / abdomen / head; a focal lesion is present with
  probability 0.5 whose HU differs modestly from its organ, so it shows best in the window named
  in the truth (the record's `options.window`, also the window of the PNG).
- **CT volume (ct3d)**: canonical orientation (axis 0 inferior->superior, 1 anterior->posterior,
  2 patient right->left); a lesion is present with probability 0.5 in one organ; `slice_range`
  lists the first and last axial slice (0-based, inclusive) that contain it.
- **ECG**: five classes drawn uniformly. Sinus rhythms are regular (RR variation < 4 %) with P waves:
  normal 65-95 bpm, bradycardia 40-54 bpm, tachycardia 106-140 bpm (margins keep every case clear
  of the 60/100 bpm cut-offs). Atrial fibrillation: irregular RR (coefficient of variation
  0.15-0.30), no P waves, 4-9 Hz fibrillatory baseline. ST elevation: sinus 65-95 bpm with a
  1.5-3.5 mm (0.15-0.35 mV) ST plateau in the inferior (II, III, aVF) or anterior (V1-V4) leads and
  reciprocal depression. Heart rate = 60 / mean RR over the R peaks at least 50 ms inside the record.
  Every record has baseline wander, mains hum, white noise and a per-case amplitude change.
- **EHR**: fever = temp_c >= 38.0; hypotension = sbp < 90; tachypnoea = resp_rate >= 22; altered
  mentation = stated in the note (confused / disoriented / GCS below 15); qSOFA = (resp_rate >= 22) +
  (sbp <= 100) + altered mentation; abnormal labs = present labs outside the reference ranges
  (wbc 4.0-11.0 10*9/L, lactate 0.5-2.0 mmol/L, creatinine 0.6-1.3 mg/dL, sodium 135-145 mmol/L,
  potassium 3.5-5.0 mmol/L, hemoglobin 12.0-17.5 g/dL). temp_c, sbp and resp_rate are always present;
  other values are missing (absent keys, never zero) with probability 0.15. The qSOFA score is drawn
  uniform over 0-3 (so "qSOFA >= 2" is 50/50), fever with probability 0.5, hypotension 0.425.
- **Counterfactual twins**: for a fifth of imaging cases (when the generator supports `overrides`)
  the same case is rendered again from the same random stream with one local finding flipped;
  the twin carries only that finding's yes/no question, with `meta.extra.counterfactual_of`.

## How answers are balanced
Templates marked `exact` have every answer (yes/no, each side, zone, region, rhythm) equally
often in each split: the more frequent answers are cut to the count of the rarest, keeping the
records whose id hashes lowest; counterfactual-pair records always stay (one "yes" and one "no"
per pair). Choice questions (`letters`) lose nothing: each case draws its distractors and a
letter, then, per split and in id-hash order, the correct option is moved to A, B, C, D, A, ...
so the letter counts differ by at most one.
`spread` templates (sizes, heart rate, slice ranges, lab lists) are open answers with
many values; their largest share is reported above. A question-only (blind) model therefore
scores at chance on `exact` and `letters` templates.

## Known limitations
- The images are geometric phantoms, not anatomy: they test pipelines and grounding, not clinical skill.
- One image per question; reports and captions are templated, so their wording is repetitive.
- CT region choices include "pelvis" as a fourth option that is never correct.
- ECG morphology is a sum of Gaussian waves; the ST-elevation class is treated as a fifth rhythm class.
- EHR snapshots are single time points; the notes only carry complaint and mentation.
- Captions (alignment records) are written for training patients only.
- Balancing drops records, so small builds may lack some templates in validation/test.
"""


def render(summary: dict, cases: list[dict], records: list[dict]) -> str:
    """The datasheet's Markdown, from the build summary's parameters and the written data."""
    originals = [c for c in cases if not c.get("counterfactual_of")]
    mod_n = Counter(c["modality"] for c in originals)
    twin_n = Counter(c["modality"] for c in cases if c.get("counterfactual_of"))
    stats = answer_stats(records)
    lines = ["# MedPhantom datasheet", "",
             "MedPhantom is medmllm's seeded synthetic medical dataset with exact ground truth.", "",
             f"- generator version: {summary['generator_version']}",
             f"- seed: {summary['seed']}",
             f"- n (requested cases): {summary['n']}",
             f"- cases written: {len(originals)} (+ {sum(twin_n.values())} counterfactual twins)",
             f"- failed cases: {len(summary.get('failed', []))}",
             f"- instruction records: {sum(1 for r in records if r['stage'] == 'instruction')}",
             f"- alignment records: {sum(1 for r in records if r['stage'] == 'alignment')}", "",
             "## Cases per modality", ""]
    lines += _table(["modality", "cases", "counterfactual twins"],
                    [[m, mod_n[m], twin_n[m]] for m in ("xray", "ct", "ct3d", "ecg", "ehr")])
    lines += ["## Records per split", ""]
    rows = []
    for s in SPLITS:
        recs = [r for r in records if r["stage"] == "instruction" and r["meta"]["split"] == s]
        rows.append([s, len(recs), len({r["meta"]["patient_id"] for r in recs}),
                     sum(1 for c in originals if c["split"] == s)])
    lines += _table(["split", "records", "patients", "cases"], rows)
    lines += ["## Records per template", ""]
    lines += _table(["template", "modality", "task", "answer type", "balance", *SPLITS, "alignment", "total"],
                    [[t, s["modality"], s["task"], s["answer_type"], s["balance"],
                      *(s["per_split"].get(k, 0) for k in (*SPLITS, "alignment")), s["records"]]
                     for t, s in stats.items()])
    lines += ["## Answer balance", "",
              "Counts over all splits; `max share` is the largest answer's share (what a blind guess of the",
              "most common answer would score).", ""]
    lines += _table(["template", "balance", "records", "answers", "max share"],
                    [[t, s["balance"], sum(s["answers"].values()), _answers_cell(s["answers"]),
                      "-" if s["max_share"] is None else f"{s['max_share']:.3f}"]
                     for t, s in stats.items() if s["balance"] != "none"])
    return "\n".join(lines) + "\n" + _RULES


def write_datasheet(path: str | os.PathLike, summary: dict, cases: list[dict], records: list[dict]) -> str:
    """Render and write DATASHEET.md atomically; returns the text."""
    text_ = render(summary, cases, records)
    write_text(path, text_)
    return text_

"""Turn a MedPhantom case (truth + file paths) into instruction records.

A *case* is a dict::

    {"case_id": "case000012", "index": 12, "patient_id": "MP-000007", "split": "train",
     "modality": "xray" | "ct" | "ct3d" | "ecg" | "ehr",
     "truth": {...generator truth...},
     "files": {"png": "xray/case000012.png", "dicom": "xray/case000012.dcm", ...},  # relative to out_dir
     "counterfactual_of": None | "case000012", "counterfactual_finding": None | "nodule"}

Every record holds one question (plus an optional multi-turn record for some radiographs),
with ``meta.dataset = "medphantom"``, ``meta.task`` in vqa/report/caption, ``meta.answer``
equal to the assistant's text and ``meta.extra = {"template", "case_id", ...}``.
Choice questions show four options ``A.``-``D.``; the answer is the letter and
``meta.extra["answer_text"]`` the option's text. Captions are ``stage="alignment"`` records.

TEMPLATES says, per template, how its answers are balanced by ``build``:
``"exact"`` (every answer in ``answer_set`` equally often per split), ``"letters"`` (choice
questions: the correct option is moved so the letters A-D take turns per split, see
:func:`reposition_choice`), ``"spread"`` (open answers with many values, only reported),
``"none"`` (reports, captions, multi-turn).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medmllm.data.records import make_record, media, message, validate_record

from medmllm.data.phantoms.ecg import RHYTHMS

DATASET = "medphantom"
LETTERS = ("A", "B", "C", "D")
YES_NO = ("no", "yes")
SIDES = ("left", "right")
CT_ORGANS = ("abdomen", "chest", "head")
# Organs a 3D lesion may sit in (paired organs named with the patient's side); the imaging
# generator's own list (``volume.LESION_ORGANS``, same naming) wins when it exports one.
DEFAULT_VOLUME_ORGANS = ("left kidney", "left lung", "liver", "right kidney", "right lung", "spleen")
PAIRED_ORGANS = ("kidney", "lung", "adrenal", "ovary", "breast")
MEDIA_PREFIX = "../"  # records live in out_dir/records/, media paths are relative to it


@dataclass(frozen=True)
class Template:
    modality: str
    task: str            # vqa | report | caption
    answer_type: str     # closed | open | choice | report | caption
    balance: str         # exact | letters | spread | none
    answer_set: tuple[str, ...] | None = None  # for "exact": every answer expected (None = observed)


def _t(mod, task, at, bal, answers=None):
    return Template(mod, task, at, bal, answers)


TEMPLATES: dict[str, Template] = {
    # radiograph
    "xray_nodule_yn": _t("xray", "vqa", "closed", "exact", YES_NO),
    "xray_effusion_yn": _t("xray", "vqa", "closed", "exact", YES_NO),
    "xray_cardiomegaly_yn": _t("xray", "vqa", "closed", "exact", YES_NO),
    "xray_nodule_side": _t("xray", "vqa", "open", "exact", SIDES),
    "xray_nodule_zone": _t("xray", "vqa", "open", "exact", ("lower", "upper")),
    "xray_effusion_side": _t("xray", "vqa", "open", "exact", SIDES),
    "xray_nodule_size": _t("xray", "vqa", "open", "spread"),
    "xray_nodule_location_choice": _t("xray", "vqa", "choice", "letters", LETTERS),
    "xray_multiturn": _t("xray", "vqa", "closed", "none"),
    "xray_report": _t("xray", "report", "report", "none"),
    "xray_caption": _t("xray", "caption", "caption", "none"),
    # CT slice
    "ct_lesion_yn": _t("ct", "vqa", "closed", "exact", YES_NO),
    "ct_organ": _t("ct", "vqa", "open", "exact", CT_ORGANS),
    "ct_lesion_side": _t("ct", "vqa", "open", "exact", SIDES),
    "ct_lesion_size": _t("ct", "vqa", "open", "spread"),
    "ct_organ_choice": _t("ct", "vqa", "choice", "letters", LETTERS),
    "ct_report": _t("ct", "report", "report", "none"),
    "ct_caption": _t("ct", "caption", "caption", "none"),
    # CT volume
    "ct3d_lesion_yn": _t("ct3d", "vqa", "closed", "exact", YES_NO),
    "ct3d_lesion_organ": _t("ct3d", "vqa", "open", "exact", None),  # answer set: observed organs
    "ct3d_lesion_slices": _t("ct3d", "vqa", "open", "spread"),
    "ct3d_organ_choice": _t("ct3d", "vqa", "choice", "letters", LETTERS),
    "ct3d_report": _t("ct3d", "report", "report", "none"),
    "ct3d_caption": _t("ct3d", "caption", "caption", "none"),
    # ECG
    "ecg_af_yn": _t("ecg", "vqa", "closed", "exact", YES_NO),
    "ecg_st_elevation_yn": _t("ecg", "vqa", "closed", "exact", YES_NO),
    "ecg_rhythm": _t("ecg", "vqa", "open", "exact", tuple(sorted(RHYTHMS))),
    "ecg_heart_rate": _t("ecg", "vqa", "open", "spread"),
    "ecg_rhythm_choice": _t("ecg", "vqa", "choice", "letters", LETTERS),
    "ecg_caption": _t("ecg", "caption", "caption", "none"),
    # EHR
    "ehr_fever_yn": _t("ehr", "vqa", "closed", "exact", YES_NO),
    "ehr_hypotension_yn": _t("ehr", "vqa", "closed", "exact", YES_NO),
    "ehr_qsofa_ge2_yn": _t("ehr", "vqa", "closed", "exact", YES_NO),
    "ehr_abnormal_labs": _t("ehr", "vqa", "open", "spread"),
    "ehr_qsofa": _t("ehr", "vqa", "open", "exact", ("0", "1", "2", "3")),
    "ehr_caption": _t("ehr", "caption", "caption", "none"),
}

# Finding -> the yes/no template a counterfactual pair is asked with.
COUNTERFACTUAL_TEMPLATES = {("xray", "nodule"): "xray_nodule_yn", ("xray", "effusion"): "xray_effusion_yn",
                            ("ct", "lesion"): "ct_lesion_yn", ("ct3d", "lesion"): "ct3d_lesion_yn"}
# Findings a counterfactual twin may flip (local ones: the twin differs only inside the finding).
COUNTERFACTUAL_FINDINGS = {"xray": ("nodule", "effusion"), "ct": ("lesion",), "ct3d": ("lesion",)}


def volume_organs() -> tuple[str, ...]:
    """Lesion organs of the 3D generator (``volume.LESION_ORGANS`` when it exists)."""
    try:
        from medmllm.data.phantoms import volume
    except ImportError:
        return DEFAULT_VOLUME_ORGANS
    organs = getattr(volume, "LESION_ORGANS", None)
    return tuple(organs) if organs else DEFAULT_VOLUME_ORGANS


# ----------------------------------------------------------------------------- helpers

def lesion_organ(lesion: dict) -> str | None:
    """Organ name of a 3D lesion; paired organs carry the side ("left kidney", "liver")."""
    organ = lesion.get("organ")
    if organ in PAIRED_ORGANS and lesion.get("side"):
        return f"{lesion['side']} {organ}"
    return organ


def _yn(flag: bool) -> str:
    return "yes" if flag else "no"


def _mm(x: float) -> int:
    return int(round(float(x)))


def choice(rng: np.random.Generator, correct: str, pool: tuple[str, ...] | list[str]) -> tuple[list[str], str]:
    """Four options: ``correct`` at a uniformly drawn letter, three distractors drawn from ``pool``
    (padded with "none of the above" style fillers if the pool is short) -> (options, letter)."""
    others = sorted(p for p in set(pool) if p != correct)
    fillers = ["none of these", "cannot be determined", "other"]
    while len(others) < 3:
        others.append(fillers.pop(0))
    pick = rng.permutation(len(others))[:3]
    distractors = [others[int(k)] for k in pick]
    pos = int(rng.integers(4))
    options = distractors[:pos] + [correct] + distractors[pos:]
    return options, LETTERS[pos]


def _choice_prompt(question: str, options: list[str]) -> str:
    lines = [question] + [f"{LETTERS[k]}. {o}" for k, o in enumerate(options)]
    return "\n".join(lines) + "\nAnswer with the letter of the correct option."


def _choice_record(case: dict, template: str, stem: str, options: list[str], letter: str) -> dict:
    return _record(case, template, _choice_prompt(stem, options), letter, choices=options, extra={"stem": stem})


def reposition_choice(rec: dict, pos: int) -> dict:
    """A copy of choice record ``rec`` with its correct option moved to letter ``LETTERS[pos]``
    (the distractors keep their order); prompt, answer and ``meta.choices`` are rewritten."""
    import copy

    out = copy.deepcopy(rec)
    meta = out["meta"]
    correct = meta["extra"]["answer_text"]
    others = [o for o in meta["choices"] if o != correct]
    options = others[:pos] + [correct] + others[pos:]
    letter = LETTERS[pos]
    user = out["messages"][-2] if out["messages"][-1]["role"] == "assistant" else out["messages"][-1]
    user["content"][-1] = {"type": "text", "text": _choice_prompt(meta["extra"]["stem"], options)}
    out["messages"][-1]["content"] = [{"type": "text", "text": letter}]
    meta.update(answer=letter, choices=options)
    return validate_record(out)


def media_part(case: dict) -> dict:
    """The record part pointing at the case's main file (what every record of the case shows)."""
    f, mod = case["files"], case["modality"]
    if mod == "xray":
        return media("image", MEDIA_PREFIX + f["png"])
    if mod == "ct":
        return media("image", MEDIA_PREFIX + f["dicom"], window=case["truth"].get("window", "soft_tissue"))
    if mod == "ct3d":
        return media("volume", MEDIA_PREFIX + f["nifti"])
    if mod == "ecg":
        return media("signal", MEDIA_PREFIX + f["hea"])
    if mod == "ehr":
        return media("ehr", MEDIA_PREFIX + f["json"])
    raise ValueError(f"modality: expected one of xray, ct, ct3d, ecg, ehr, got {mod!r}")


def organ_of(case: dict) -> str:
    """``meta.organ`` of a case's records."""
    mod, truth = case["modality"], case["truth"]
    if mod == "xray":
        return "chest"
    if mod == "ct":
        return truth["organ"]
    if mod == "ct3d":
        return lesion_organ(truth["findings"]["lesion"]) or truth.get("organ") or "chest-abdomen"
    return {"ecg": "heart", "ehr": "whole body"}[mod]


def _record(case: dict, template: str, question: str, answer: str, *, choices: list[str] | None = None,
            extra: dict | None = None) -> dict:
    tpl = TEMPLATES[template]
    meta = {"dataset": DATASET, "split": case["split"], "task": tpl.task, "answer_type": tpl.answer_type,
            "modality": case["modality"], "organ": organ_of(case), "answer": answer,
            "patient_id": case["patient_id"],
            "extra": {"template": template, "case_id": case["case_id"], **(extra or {})}}
    if case.get("counterfactual_of"):
        meta["extra"]["counterfactual_of"] = case["counterfactual_of"]
    if choices is not None:
        meta["choices"] = list(choices)
        meta["extra"]["answer_text"] = choices[LETTERS.index(answer)]
    stage = "alignment" if tpl.task == "caption" else "instruction"
    return make_record(f"{DATASET}-{case['case_id']}-{template}", [media_part(case), question], answer, meta,
                       stage=stage)


# ----------------------------------------------------------------------------- texts

def xray_report(truth: dict) -> str:
    """FINDINGS / IMPRESSION text of a radiograph truth."""
    f = truth["findings"]
    nod, eff, card = f["nodule"], f["effusion"], f["cardiomegaly"]
    findings, impression = [], []
    if nod["present"]:
        findings.append(f"A {_mm(nod['diameter_mm'])} mm nodule in the {nod['side']} {nod['zone']} lung zone.")
        impression.append(f"{nod['side'].capitalize()} {nod['zone']} zone pulmonary nodule "
                          f"({_mm(nod['diameter_mm'])} mm).")
    else:
        findings.append("No pulmonary nodule.")
    if eff["present"]:
        findings.append(f"Blunting of the {eff['side']} costophrenic angle with a {eff['side']} pleural effusion.")
        impression.append(f"{eff['side'].capitalize()} pleural effusion.")
    else:
        findings.append("No pleural effusion.")
    ctr = f"(cardiothoracic ratio {float(card['ctr']):.2f})"
    if card["present"]:
        findings.append(f"The heart is enlarged {ctr}.")
        impression.append("Cardiomegaly.")
    else:
        findings.append(f"Heart size is normal {ctr}.")
    if not impression:
        impression.append("No acute cardiopulmonary abnormality.")
    return "FINDINGS: " + " ".join(findings) + "\nIMPRESSION: " + " ".join(impression)


def ct_report(truth: dict) -> str:
    les = truth["findings"]["lesion"]
    head = f"Axial CT slice of the {truth['organ']}."
    if les["present"]:
        dense = "denser" if (les.get("hu_delta") or 0) > 0 else "less dense"
        delta = abs(float(les.get("hu_delta") or 0))
        find = (f"A {_mm(les['diameter_mm'])} mm focal lesion on the patient's {les['side']}, "
                f"{delta:.0f} HU {dense} than the surrounding tissue.")
        imp = f"Focal lesion in the {les['side']} {truth['organ']} ({_mm(les['diameter_mm'])} mm)."
    else:
        find, imp = "No focal lesion.", f"Normal CT slice of the {truth['organ']}."
    return f"FINDINGS: {head} {find}\nIMPRESSION: {imp}"


def ct3d_report(truth: dict) -> str:
    les = truth["findings"]["lesion"]
    head = f"CT volume of {truth['shape'][0]} axial slices ({float(truth['spacing_mm'][0]):g} mm apart)."
    if les["present"]:
        a, b = les["slice_range"]
        find = (f"A {_mm(les['diameter_mm'])} mm lesion in the {lesion_organ(les)}, visible on axial slices "
                f"{a}-{b}.")
        imp = f"Focal {lesion_organ(les)} lesion ({_mm(les['diameter_mm'])} mm)."
    else:
        find, imp = "No focal lesion.", "No focal lesion."
    return f"FINDINGS: {head} {find}\nIMPRESSION: {imp}"


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def caption(case: dict) -> str:
    """One-sentence description of the case (alignment target)."""
    mod, truth = case["modality"], case["truth"]
    if mod == "xray":
        f, parts = truth["findings"], []
        if f["nodule"]["present"]:
            n = f["nodule"]
            size = "small" if n["diameter_mm"] < 8 else f"{_mm(n['diameter_mm'])} mm"
            parts.append(f"a {size} {n['side']} {n['zone']} zone nodule")
        if f["effusion"]["present"]:
            parts.append(f"a {f['effusion']['side']} pleural effusion")
        if f["cardiomegaly"]["present"]:
            parts.append("cardiomegaly")
        return f"Chest radiograph, {truth.get('view', 'PA')} view, with {_join(parts) if parts else 'no abnormality'}."
    if mod == "ct":
        les = truth["findings"]["lesion"]
        what = f"a {_mm(les['diameter_mm'])} mm lesion on the patient's {les['side']}" if les["present"] \
            else "no focal lesion"
        return f"Axial CT slice of the {truth['organ']} with {what}."
    if mod == "ct3d":
        les = truth["findings"]["lesion"]
        what = f"a {_mm(les['diameter_mm'])} mm {lesion_organ(les)} lesion" if les["present"] else "no focal lesion"
        return f"CT volume of {truth['shape'][0]} axial slices with {what}."
    if mod == "ecg":
        hr = int(round(truth["heart_rate_bpm"]))
        lead = f"{len(truth['lead_names'])}-lead ECG, {truth['duration_s']:g} s"
        if truth["rhythm"] == "st elevation":
            return (f"{lead}: sinus rhythm at {hr} bpm with {truth['st_elevation_mm']:g} mm "
                    f"{truth['st_territory']} ST elevation.")
        return f"{lead}: {truth['rhythm']} at {hr} bpm."
    if mod == "ehr":
        fl = truth["flags"]
        labs = ", ".join(fl["abnormal_labs"]) or "none"
        state = _join([w for w, on in (("fever", fl["fever"]), ("hypotension", fl["hypotension"]),
                                       ("tachypnoea", fl["tachypnea"]),
                                       ("altered mentation", fl["altered_mentation"])) if on] or ["no red flags"])
        return f"EHR snapshot with {state}; qSOFA {fl['qsofa']}; abnormal labs: {labs}."
    raise ValueError(f"modality: expected one of xray, ct, ct3d, ecg, ehr, got {mod!r}")


# ----------------------------------------------------------------------------- per modality

def _xray(case: dict, rng: np.random.Generator) -> list[dict]:
    f = case["truth"]["findings"]
    nod, eff, card = f["nodule"], f["effusion"], f["cardiomegaly"]
    recs = [
        _record(case, "xray_nodule_yn", "Is there a lung nodule?", _yn(nod["present"])),
        _record(case, "xray_effusion_yn", "Is there a pleural effusion?", _yn(eff["present"])),
        _record(case, "xray_cardiomegaly_yn", "Is the heart enlarged?", _yn(card["present"])),
    ]
    if nod["present"]:
        recs += [
            _record(case, "xray_nodule_side", "On which side of the patient is the lung nodule, left or right?",
                    nod["side"]),
            _record(case, "xray_nodule_zone", "Is the lung nodule in the upper or the lower zone?", nod["zone"]),
            _record(case, "xray_nodule_size", "What is the diameter of the lung nodule in millimetres?",
                    str(_mm(nod["diameter_mm"]))),
        ]
        combos = [f"{s} {z} zone" for s in ("right", "left") for z in ("upper", "lower")]
        opts, letter = choice(rng, f"{nod['side']} {nod['zone']} zone", combos)
        recs.append(_choice_record(case, "xray_nodule_location_choice", "Where is the lung nodule?", opts, letter))
    if eff["present"]:
        recs.append(_record(case, "xray_effusion_side", "On which side of the patient is the pleural effusion?",
                            eff["side"]))
    recs.append(_record(case, "xray_report", "Write the radiology report (findings and impression) for this "
                        "chest radiograph.", xray_report(case["truth"])))
    if rng.random() < 0.25:
        recs.append(_multiturn(case, [("Is there a lung nodule?", _yn(nod["present"])),
                                      ("Is there a pleural effusion?", _yn(eff["present"])),
                                      ("Is the heart enlarged?", _yn(card["present"]))]))
    return recs


def _multiturn(case: dict, turns: list[tuple[str, str]]) -> dict:
    """One conversation asking several questions about the same image (image in the first turn)."""
    msgs = []
    for k, (q, a) in enumerate(turns):
        msgs.append(message("user", media_part(case), q) if k == 0 else message("user", q))
        msgs.append(message("assistant", a))
    tpl = TEMPLATES["xray_multiturn"]
    meta = {"dataset": DATASET, "split": case["split"], "task": tpl.task, "answer_type": tpl.answer_type,
            "modality": case["modality"], "organ": organ_of(case), "answer": turns[-1][1],
            "patient_id": case["patient_id"],
            "extra": {"template": "xray_multiturn", "case_id": case["case_id"], "answers": [a for _, a in turns]}}
    return validate_record({"id": f"{DATASET}-{case['case_id']}-xray_multiturn", "stage": "instruction",
                            "messages": msgs, "meta": meta})


def _ct(case: dict, rng: np.random.Generator) -> list[dict]:
    truth = case["truth"]
    les, organ = truth["findings"]["lesion"], truth["organ"]
    recs = [
        _record(case, "ct_lesion_yn", f"Is there a focal lesion in the {organ}?", _yn(les["present"])),
        _record(case, "ct_organ", "Which body region does this CT slice show: chest, abdomen or head?", organ),
    ]
    opts, letter = choice(rng, organ, CT_ORGANS + ("pelvis",))
    recs.append(_choice_record(case, "ct_organ_choice", "Which body region is shown?", opts, letter))
    if les["present"]:
        recs += [
            _record(case, "ct_lesion_side", "On which side of the patient is the lesion, left or right?", les["side"]),
            _record(case, "ct_lesion_size", "What is the diameter of the lesion in millimetres?",
                    str(_mm(les["diameter_mm"]))),
        ]
    recs.append(_record(case, "ct_report", "Write the radiology report (findings and impression) for this CT "
                        "slice.", ct_report(truth)))
    return recs


def _ct3d(case: dict, rng: np.random.Generator) -> list[dict]:
    truth = case["truth"]
    les = truth["findings"]["lesion"]
    recs = [_record(case, "ct3d_lesion_yn", "Is there a lesion in this CT volume?", _yn(les["present"]))]
    if les["present"]:
        a, b = les["slice_range"]
        recs += [
            _record(case, "ct3d_lesion_organ", "In which organ is the lesion? Name the side for paired organs.",
                    lesion_organ(les)),
            _record(case, "ct3d_lesion_slices", "On which axial slices is the lesion visible? Give the first and "
                    "last slice index (0-based, inferior to superior) as first-last.", f"{a}-{b}"),
        ]
        opts, letter = choice(rng, lesion_organ(les), volume_organs())
        recs.append(_choice_record(case, "ct3d_organ_choice", "In which organ is the lesion?", opts, letter))
    recs.append(_record(case, "ct3d_report", "Write the radiology report (findings and impression) for this CT "
                        "volume.", ct3d_report(truth)))
    return recs


def _ecg(case: dict, rng: np.random.Generator) -> list[dict]:
    truth = case["truth"]
    rhythm = truth["rhythm"]
    opts, letter = choice(rng, rhythm, RHYTHMS)
    return [
        _record(case, "ecg_af_yn", "Is this atrial fibrillation?", _yn(rhythm == "atrial fibrillation")),
        _record(case, "ecg_st_elevation_yn", "Is there ST elevation?", _yn(truth["st_elevation_mm"] > 0)),
        _record(case, "ecg_rhythm", "What is the rhythm (or main finding) of this ECG? Answer with one of: "
                + ", ".join(sorted(RHYTHMS)) + ".", rhythm),
        _record(case, "ecg_heart_rate", "What is the heart rate in beats per minute? Answer with an integer.",
                str(int(round(truth["heart_rate_bpm"])))),
        _choice_record(case, "ecg_rhythm_choice", "Which best describes this ECG?", opts, letter),
    ]


def _ehr(case: dict, rng: np.random.Generator) -> list[dict]:
    fl = case["truth"]["flags"]
    return [
        _record(case, "ehr_fever_yn", "Does the patient have a fever?", _yn(fl["fever"])),
        _record(case, "ehr_hypotension_yn", "Is the patient hypotensive?", _yn(fl["hypotension"])),
        _record(case, "ehr_qsofa_ge2_yn", "Is the qSOFA score 2 or more?", _yn(fl["qsofa_ge_2"])),
        _record(case, "ehr_abnormal_labs", "Which laboratory values are outside the reference range? List their "
                "names in alphabetical order separated by commas, or answer none.",
                ", ".join(fl["abnormal_labs"]) or "none"),
        _record(case, "ehr_qsofa", "What is the qSOFA score (0-3)?", str(fl["qsofa"])),
    ]


_BUILDERS = {"xray": _xray, "ct": _ct, "ct3d": _ct3d, "ecg": _ecg, "ehr": _ehr}


def _counterfactual(case: dict) -> list[dict]:
    """A twin asks only the yes/no question of the finding it flips."""
    finding = case["counterfactual_finding"]
    template = COUNTERFACTUAL_TEMPLATES[(case["modality"], finding)]
    present = case["truth"]["findings"][finding]["present"]
    if case["modality"] == "xray":
        question = {"nodule": "Is there a lung nodule?", "effusion": "Is there a pleural effusion?"}[finding]
    elif case["modality"] == "ct":
        question = f"Is there a focal lesion in the {case['truth']['organ']}?"
    else:
        question = "Is there a lesion in this CT volume?"
    return [_record(case, template, question, _yn(present),
                    extra={"counterfactual_pair": f"{case['counterfactual_of']}/{finding}"})]


def case_records(case: dict, rng: np.random.Generator) -> list[dict]:
    """All records of one case: questions, report (imaging), caption (stage alignment).

    ``rng`` draws only the choice-letter positions and the multi-turn pick, so a case's
    records are a pure function of (case, rng). A counterfactual twin (``counterfactual_of``
    set) yields only its pair question; the original's matching record gets
    ``extra["counterfactual_pair"]`` when ``case["counterfactual_twin_finding"]`` is set.
    """
    if case.get("counterfactual_of"):
        return _counterfactual(case)
    recs = _BUILDERS[case["modality"]](case, rng)
    finding = case.get("counterfactual_twin_finding")
    if finding:
        template = COUNTERFACTUAL_TEMPLATES[(case["modality"], finding)]
        for r in recs:
            if r["meta"]["extra"]["template"] == template:
                r["meta"]["extra"]["counterfactual_pair"] = f"{case['case_id']}/{finding}"
    recs.append(_record(case, f"{case['modality']}_caption", "Describe this study in one sentence.", caption(case)))
    return recs

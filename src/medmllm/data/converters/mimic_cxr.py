"""MIMIC-CXR (Johnson et al. 2019; reports + MIMIC-CXR-JPG images) -> report-generation records.

Official layout under ``src``::

    mimic-cxr-2.0.0-split.csv[.gz]      dicom_id, study_id, subject_id, split (train/validate/test)
    mimic-cxr-2.0.0-metadata.csv[.gz]   dicom_id, subject_id, study_id, ViewPosition, ... (optional:
                                        without it views are unknown and ordered by dicom_id)
    files/p10/p10000032/s50414267.txt   free-text report (``mimic-cxr-reports/files/...`` accepted)
    files/p10/p10000032/s50414267/<dicom_id>.jpg   (or ``.dcm`` from the DICOM release)

One record per study: up to ``max_images`` images, frontal views first (PA, then AP,
then others, ties by dicom_id); the answer is taken from the report's FINDINGS and/or
IMPRESSION sections (``section`` = "findings" | "impression" | "both"). Studies without
the chosen section(s), without a report or without any image are skipped with a reason.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterator, Sequence

from medmllm.errors import ConfigError
from medmllm.data.converters.base import (Skip, SkipItem, check_src, find_file, iter_items, read_csv, require_file,
                                          select_splits)
from medmllm.data.records import make_record, media

DATASET = "mimic_cxr"
SPLIT_FILES = ("mimic-cxr-2.0.0-split.csv", "mimic-cxr-2.0.0-split.csv.gz")
METADATA_FILES = ("mimic-cxr-2.0.0-metadata.csv", "mimic-cxr-2.0.0-metadata.csv.gz")
REPORT_ROOTS = ("files", "mimic-cxr-reports/files")
IMAGE_SUFFIXES = (".jpg", ".dcm")
SPLITS = {"train": "train", "validation": "validation", "validate": "validation", "val": "validation", "test": "test"}
VIEW_RANK = {"PA": 0, "AP": 1}
PROMPTS = {
    "both": "Write the findings and impression sections of the radiology report for this chest X-ray.",
    "findings": "Write the findings section of the radiology report for this chest X-ray.",
    "impression": "Write the impression section of the radiology report for this chest X-ray.",
}
SECTION_NAMES = {"FINDINGS": "findings", "FINDING": "findings", "FINDINGS AND IMPRESSION": "findings",
                 "IMPRESSION": "impression", "IMPRESSIONS": "impression"}

# A header starts a line: letters/spaces/&/()/- then a colon. Other headers must be ALL CAPS
# (MIMIC convention: INDICATION:, COMPARISON:, NOTIFICATION:); findings/impression match in any case.
_HEADER = re.compile(r"^[ \t]*([A-Za-z][A-Za-z /&()\-]{0,40}?)[ \t]*:", re.M)
_WS = re.compile(r"\s+")


def parse_sections(report: str) -> dict[str, str]:
    """``{"findings": ..., "impression": ...}`` (only the sections present, whitespace collapsed).

    A section runs from its header to the next header; repeated sections are joined.
    """
    heads = []
    for m in _HEADER.finditer(report):
        name = _WS.sub(" ", m.group(1)).strip()
        key = SECTION_NAMES.get(name.upper())
        if key or (name.isupper() and any(c.isalpha() for c in name)):
            heads.append((m.start(), m.end(), key))
    out: dict[str, str] = {}
    for j, (_, end, key) in enumerate(heads):
        if key is None:
            continue
        stop = heads[j + 1][0] if j + 1 < len(heads) else len(report)
        body = _WS.sub(" ", report[end:stop]).strip()
        if body:
            out[key] = f"{out[key]} {body}" if key in out else body
    return out


def report_answer(sections: dict[str, str], section: str) -> str | None:
    """The target text for ``section``; None when the needed section(s) are absent."""
    if section != "both":
        return sections.get(section)
    parts = [f"{k.upper()}: {sections[k]}" for k in ("findings", "impression") if k in sections]
    return " ".join(parts) or None


def _study_dir(subject: str, study: str) -> str:
    return f"p{subject[:2]}/p{subject}/s{study}"


def _views(src: Path) -> dict[str, str]:
    path = find_file(src / n for n in METADATA_FILES)
    if path is None:
        return {}
    return {r["dicom_id"].strip(): (r.get("ViewPosition") or "").strip().upper()
            for r in read_csv(path, ("dicom_id", "ViewPosition"))}


def _studies(rows: list[dict[str, str]], wanted: list[str]) -> list[dict[str, Any]]:
    """Rows grouped per study (first-appearance order) for the wanted splits; a row without
    a study_id or a known split becomes its own ``{"bad": row, "row": n}`` entry (reported as a skip)."""
    studies: dict[str, dict[str, Any]] = {}
    for n, r in enumerate(rows, 2):  # line 1 is the header
        split = SPLITS.get((r.get("split") or "").strip())
        study = (r.get("study_id") or "").strip()
        if split is None or not study:
            studies[f"?{n}"] = {"bad": r, "row": n}
            continue
        if split not in wanted:
            continue
        s = studies.setdefault(study, {"study": study, "subject": (r.get("subject_id") or "").strip(),
                                       "split": split, "dicoms": []})
        s["dicoms"].append((r.get("dicom_id") or "").strip())
    return list(studies.values())


def convert_mimic_cxr(src: Path, *, splits: Sequence[str] | str | None = None, section: str = "both",
                      max_images: int = 2) -> Iterator[dict | Skip]:
    """Yield one report-generation record per study (or a Skip)."""
    src = check_src(src)
    wanted = select_splits(splits, SPLITS)
    if section not in PROMPTS:
        raise ConfigError(f"mimic_cxr section: expected one of {sorted(PROMPTS)}, got {section!r}")
    if not isinstance(max_images, int) or max_images < 1:
        raise ConfigError(f"mimic_cxr max_images: expected a positive integer, got {max_images!r}")
    split_csv = require_file(src, *SPLIT_FILES)
    rows = read_csv(split_csv, ("dicom_id", "study_id", "subject_id", "split"))
    views = _views(src)

    def build(_i: int, s: dict[str, Any]) -> dict:
        if "bad" in s:
            raise SkipItem(f"malformed row: line {s['row']} of {split_csv.name} needs a study_id and a split "
                           f"train/validate/test, got {s['bad']}"[:300])
        study, subject = s["study"], s["subject"]
        rid = f"{DATASET}-s{study}"
        if not subject.isdigit() or not study.isdigit():
            raise SkipItem(f"subject_id {subject!r} / study_id {study!r}: expected digits", rid)
        sdir = _study_dir(subject, study)
        rep = find_file(src / root / f"{sdir}.txt" for root in REPORT_ROOTS)
        if rep is None:
            raise SkipItem(f"report file not found: {src / REPORT_ROOTS[0] / sdir}.txt", rid)
        answer = report_answer(parse_sections(rep.read_text(encoding="utf-8", errors="replace")), section)
        if answer is None:
            need = "FINDINGS or IMPRESSION" if section == "both" else section.upper()
            raise SkipItem(f"report has no {need} section: {rep}", rid)
        order = sorted(dict.fromkeys(d for d in s["dicoms"] if d),
                       key=lambda d: (VIEW_RANK.get(views.get(d, ""), 2 if views.get(d) else 3), d))
        images = []
        for d in order:
            found = find_file(src / "files" / sdir / (d + suf) for suf in IMAGE_SUFFIXES)
            if found is not None:
                images.append((d, found))
            if len(images) == max_images:
                break
        if not images:
            raise SkipItem(f"no image file found: none of the study's dicom_ids as .jpg/.dcm in {src / 'files' / sdir}",
                           rid)
        meta = {"dataset": DATASET, "split": s["split"], "task": "report", "answer_type": "report",
                "modality": "xray", "organ": "chest", "answer": answer, "patient_id": subject,
                "extra": {"study_id": study, "dicom_ids": [d for d, _ in images],
                          "view_positions": [views.get(d, "") for d, _ in images],
                          "report_file": rep.relative_to(src).as_posix(), "section": section}}
        user = [media("image", str(p)) for _, p in images] + [PROMPTS[section]]
        return make_record(rid, user, answer, meta)

    yield from iter_items(_studies(rows, wanted), "study", build)

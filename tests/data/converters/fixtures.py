"""Tiny fixtures in each dataset's official layout, plus shared checks for converter outputs.

Every builder writes into a fresh folder and returns it. Images are 8x8 PNG/JPEG files
made with Pillow from a seeded RNG. Each fixture holds good items, at least one item
whose image is missing and at least one malformed item.
"""

from __future__ import annotations

import csv
import json
import os
import pickle
from pathlib import Path

import numpy as np

from medmllm.data.converters import convert
from medmllm.data.records import read_records, resolve_path


def write_image(path: Path, seed: int) -> Path:
    """An 8x8 RGB image (format from the suffix) with seeded random pixels."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)
    return path


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, ensure_ascii=False, indent=1), encoding="utf-8")


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)


# ----------------------------------------------------------------------------- VQA-RAD

def _rad(qid, phrase, atype, answer, image, organ="CHEST", question="Is this normal?", **kw):
    item = {"qid": qid, "phrase_type": phrase, "qid_linked_id": f"link-{qid}",
            "image_case_url": f"https://medpix.nlm.nih.gov/case?id={qid}", "image_name": image,
            "image_organ": organ, "evaluation": "not evaluated", "question": question,
            "question_rephrase": "NULL", "question_relation": "NULL", "question_frame": "NULL",
            "question_type": "PRES", "answer": answer, "answer_type": atype}
    item.update(kw)
    return item


def make_vqa_rad(root: Path) -> Path:
    """4 good items (train: qid 0, 1; test: qid 2, 3), 1 missing image (qid 4), 2 malformed."""
    img = root / "VQA_RAD Image Folder"
    for i, name in enumerate(["synpic100.jpg", "synpic200.jpg", "synpic300.jpg"]):
        write_image(img / name, i)
    no_question = _rad(5, "freeform", "CLOSED", "Yes", "synpic100.jpg")
    del no_question["question"]
    items = [
        _rad(0, "freeform", "CLOSED", "Yes", "synpic100.jpg", "HEAD", "Are regions of the brain infarcted?"),
        _rad(1, "para", "OPEN", "Left lung", "synpic200.jpg", "CHEST", "Where is the mass?"),
        _rad(2, "test_freeform", "CLOSED", " NO", "synpic100.jpg", "HEAD", "Is there a midline shift?"),
        _rad(3, "test_para", "OPEN", 5, "synpic300.jpg", "ABD", "How many lesions are there?", question_type="COUNT"),
        _rad(4, "freeform", "CLOSED", "No", "synpic999.jpg"),
        no_question,
        "not an object",
    ]
    _write_json(root / "VQA_RAD Dataset Public.json", items)
    return root


# ----------------------------------------------------------------------------- SLAKE

def _slake(qid, img, q_lang, modality, atype, answer, location="Lung", question="Is the lung healthy?"):
    return {"img_id": int(img.split("/")[0][len("xmlab"):]), "img_name": img, "question": question, "answer": answer,
            "q_lang": q_lang, "location": location, "modality": modality, "answer_type": atype,
            "base_type": "vqa", "content_type": "Abnormality", "triple": ["vhead", "_", "_"], "qid": qid}


def make_slake(root: Path) -> Path:
    """train: qid 1 (en, X-Ray), 2 (zh, CT), 3 (missing image); validation: 10 (en, MRI);
    test: 20 (en, CT), 21 (malformed answer_type)."""
    for i, d in enumerate(["xmlab1", "xmlab2", "xmlab3", "xmlab4"]):
        write_image(root / "imgs" / d / "source.jpg", 10 + i)
    _write_json(root / "train.json", [
        _slake(1, "xmlab1/source.jpg", "en", "X-Ray", "CLOSED", "Yes"),
        _slake(2, "xmlab2/source.jpg", "zh", "CT", "OPEN", "肝脏", "腹部", "图中最大的器官是什么?"),
        _slake(3, "xmlab9/source.jpg", "en", "CT", "OPEN", "Liver"),
    ])
    _write_json(root / "validate.json", [_slake(10, "xmlab3/source.jpg", "en", "MRI", "OPEN", "Brain", "Brain")])
    _write_json(root / "test.json", [
        _slake(20, "xmlab4/source.jpg", "en", "CT", "OPEN", "Liver", "Abdomen", "Which organ is abnormal?"),
        _slake(21, "xmlab4/source.jpg", "en", "CT", "MAYBE", "Liver"),
    ])
    return root


# ----------------------------------------------------------------------------- PathVQA

def make_pathvqa(root: Path) -> Path:
    """split/qas/{train,val,test}_vqa.pkl; train: 2 good, 1 missing image, 1 malformed (no question);
    val: 1 good (protocol 2 pickle); test: 1 good (protocol 0 pickle)."""
    split = root / "split"
    write_image(split / "images" / "train" / "train_0001.jpg", 20)
    write_image(split / "images" / "train" / "train_0002.jpg", 21)
    write_image(split / "images" / "val" / "val_0001.jpg", 22)
    write_image(split / "images" / "test" / "test_0001.jpg", 23)
    qas = split / "qas"
    qas.mkdir(parents=True)
    train = [
        {"image": "train_0001", "question": "Is there fibrosis?", "answer": "yes"},
        {"image": "train_0002", "question": "What is present?", "answer": "adipose tissue"},
        {"image": "train_0404", "question": "Is this benign?", "answer": "no"},
        {"image": "train_0001", "answer": "yes"},
    ]
    (qas / "train_vqa.pkl").write_bytes(pickle.dumps(train, protocol=4))
    (qas / "val_vqa.pkl").write_bytes(pickle.dumps(
        [{"image": "val_0001", "question": "What stain is used?", "answer": "hematoxylin and eosin"}], protocol=2))
    (qas / "test_vqa.pkl").write_bytes(pickle.dumps(
        [{"image": "test_0001", "question": "Is necrosis seen?", "answer": "No"}], protocol=0))
    return root


def unsafe_pickle_bytes(marker: Path) -> bytes:
    """A protocol-0 pickle whose load would call ``os.system("touch <marker>")``.

    Assembled from opcodes by hand (GLOBAL os.system, MARK, STRING, TUPLE, REDUCE, STOP);
    nothing here builds or runs the call.
    """
    return b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR."


# ----------------------------------------------------------------------------- PMC-VQA

PMC_HEADER = ["Figure_path", "Caption", "Question", "Answer", "Choice A", "Choice B", "Choice C", "Choice D", "split"]


def make_pmc_vqa(root: Path) -> Path:
    """train.csv: rows 0 (answer text -> B), 1 (answer letter -> C), 2 (missing image), 3 (answer
    matches no choice); test.csv: row 0 ("D:Oblique" -> D); test_clean.csv: row 0 (Answer_label A)."""
    write_image(root / "images" / "PMC1_F1.jpg", 30)
    write_image(root / "images" / "PMC2_F2.jpg", 31)
    write_image(root / "figures" / "PMC3_F3.jpg", 32)
    _write_csv(root / "train.csv", PMC_HEADER, [
        ["PMC1_F1.jpg", "Axial CT, contrast.", "Which view is shown?", "Coronal view",
         "A:Axial view", "B:Coronal view", " C: Sagittal view", "D:Oblique view", "train"],
        ["PMC2_F2.jpg", "MRI of the knee.", "What modality, if any, is used?", "C",
         "A:CT", "B:PET", "C:MRI", "D:Ultrasound", "train"],
        ["PMC404_F1.jpg", "", "Which organ?", "Liver", "A:Liver", "B:Lung", "C:Heart", "D:Kidney", "train"],
        ["PMC1_F1.jpg", "", "Which side?", "Both", "A:Left", "B:Right", "C:Top", "D:Bottom", "train"],
    ])
    _write_csv(root / "test.csv", PMC_HEADER, [
        ["PMC3_F3.jpg", "", "Which plane?", "D:Oblique", "A:Axial", "B:Coronal", "C:Sagittal", "D:Oblique", "test"],
    ])
    _write_csv(root / "test_clean.csv", PMC_HEADER + ["Answer_label"], [
        ["PMC2_F2.jpg", "", "What is the finding?", "Effusion", "A:Effusion", "B:Mass", "C:Fracture", "D:None",
         "test", "A"],
    ])
    return root


# ----------------------------------------------------------------------------- MIMIC-CXR

REPORT_BOTH = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___F with new onset ascites  // eval for infection

 COMPARISON:  None.

 FINDINGS:

 There is no focal consolidation, pleural effusion or pneumothorax.
 The cardiomediastinal
 silhouette is normal.

 IMPRESSION:

 No acute cardiopulmonary process.
"""

REPORT_LOWER = """ INDICATION: Cough.
 Findings: Mild cardiomegaly.   Lungs are clear.
 NOTIFICATION: Discussed with Dr. ___ at 10:30.
"""

REPORT_IMPRESSION_ONLY = """ WET READ: ___ 10:00 AM
 impression:  Small left pleural effusion.
"""

REPORT_NO_SECTIONS = """ PORTABLE CHEST RADIOGRAPH
 Lines and tubes are unchanged in position.
"""


def make_mimic_cxr(root: Path) -> Path:
    """Studies: s50414267 (train, 3 views LATERAL/PA/AP, both sections), s53189527 (validate, .dcm image,
    report under mimic-cxr-reports/, findings only), s57375967 (test, impression only), s50000001
    (test, no sections), s50000002 (train, image missing) and one row with an unknown split."""
    files = root / "files"
    rows = [  # dicom_id, study_id, subject_id, split
        ("d1-lat", "50414267", "10000032", "train"), ("d2-pa", "50414267", "10000032", "train"),
        ("d3-ap", "50414267", "10000032", "train"),
        ("d4-ap", "53189527", "10000032", "validate"),
        ("d5-pa", "57375967", "10000764", "test"),
        ("d6-pa", "50000001", "10000764", "test"),
        ("d7-pa", "50000002", "10000898", "train"),
        ("d8-pa", "50000003", "10000898", "holdout"),
    ]
    _write_csv(root / "mimic-cxr-2.0.0-split.csv", ["dicom_id", "study_id", "subject_id", "split"], rows)
    views = {"d1-lat": "LATERAL", "d2-pa": "PA", "d3-ap": "AP", "d4-ap": "AP", "d5-pa": "PA", "d6-pa": "PA",
             "d7-pa": "PA", "d8-pa": "PA"}
    _write_csv(root / "mimic-cxr-2.0.0-metadata.csv",
               ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows"],
               [(d, sub, st, "CHEST (PA AND LAT)", views[d], 3056) for d, st, sub, _ in rows])
    reports = {("10000032", "50414267"): (files, REPORT_BOTH),
               ("10000032", "53189527"): (root / "mimic-cxr-reports" / "files", REPORT_LOWER),
               ("10000764", "57375967"): (files, REPORT_IMPRESSION_ONLY),
               ("10000764", "50000001"): (files, REPORT_NO_SECTIONS),
               ("10000898", "50000002"): (files, REPORT_BOTH),
               ("10000898", "50000003"): (files, REPORT_BOTH)}
    for (sub, st), (base, text_) in reports.items():
        p = base / f"p{sub[:2]}" / f"p{sub}" / f"s{st}.txt"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text_, encoding="utf-8")
    for seed, (d, st, sub, _) in enumerate(rows):
        if d == "d7-pa":
            continue  # the missing image
        sdir = files / f"p{sub[:2]}" / f"p{sub}" / f"s{st}"
        if d == "d4-ap":  # from the DICOM release: only existence is checked by the converter
            sdir.mkdir(parents=True, exist_ok=True)
            (sdir / f"{d}.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 16)
        else:
            write_image(sdir / f"{d}.jpg", 40 + seed)
    return root


# ----------------------------------------------------------------------------- IU-Xray

def make_iu_xray(root: Path) -> Path:
    """train: CXR1 (2 images), CXR2 (image 1 of 2 missing); val: CXR3; test: CXR4 (all images
    missing), CXR5 (malformed: no report)."""
    img = root / "images"
    for seed, p in enumerate(["CXR1_1_IM-0001/0.png", "CXR1_1_IM-0001/1.png", "CXR2_1_IM-0002/0.png",
                              "CXR3_1_IM-0003/0.png", "CXR5_1_IM-0005/0.png"]):
        write_image(img / p, 50 + seed)

    def item(i, report, split, n=2):
        d = {"id": f"CXR{i}_1_IM-000{i}", "image_path": [f"CXR{i}_1_IM-000{i}/{k}.png" for k in range(n)],
             "split": split}
        if report is not None:
            d["report"] = report
        return d

    _write_json(root / "annotation.json", {
        "train": [item(1, "The heart is normal in size. The lungs are clear.", "train"),
                  item(2, "No acute disease.", "train")],
        "val": [item(3, "Stable cardiomegaly.", "val", n=1)],
        "test": [item(4, "Normal chest.", "test"), item(5, None, "test", n=1)],
    })
    return root


# ----------------------------------------------------------------------------- shared checks

def convert_and_load(name: str, src: Path, out: Path, **kw):
    """Run ``convert`` and return (report, records read back strictly, manifest dict)."""
    report = convert(name, src, out, **kw)
    records, load = read_records(out, on_error="raise")
    assert load.kept == report.total == len(records)
    manifest = json.loads((out.parent / f"{out.stem}.manifest.json").read_text())
    return report, records, manifest


def by_id(records: list[dict]) -> dict[str, dict]:
    return {r["id"]: r for r in records}


def image_paths(rec: dict, base_dir: Path) -> list[Path]:
    """Resolved image paths of a record's user message."""
    return [resolve_path(p, base_dir) for p in rec["messages"][0]["content"] if p["type"] == "image"]


def user_text(rec: dict) -> str:
    return "".join(p["text"] for p in rec["messages"][0]["content"] if p["type"] == "text")


def assistant_text(rec: dict) -> str:
    return "".join(p["text"] for p in rec["messages"][-1]["content"] if p["type"] == "text")


def assert_stable(name: str, src: Path, tmp: Path, **kw) -> None:
    """Two conversions into the same path give byte-identical JSONL and manifest."""
    out = tmp / "stable" / f"{name}.jsonl"
    convert(name, src, out, **kw)
    first = (out.read_bytes(), (out.parent / f"{name}.manifest.json").read_bytes())
    convert(name, src, out, **kw)
    assert (out.read_bytes(), (out.parent / f"{name}.manifest.json").read_bytes()) == first


def assert_paths_resolve(records: list[dict], base_dir: Path) -> None:
    for r in records:
        for p in r["messages"][0]["content"]:
            if p["type"] == "image":
                assert not os.path.isabs(p["path"]), p["path"]
                assert resolve_path(p, base_dir).is_file(), p["path"]

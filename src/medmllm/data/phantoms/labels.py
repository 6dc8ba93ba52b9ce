"""Structured labels of MedPhantom cases, for supervised encoder training (the ``encoder`` stage).

Each case becomes ``(encoder kind, {task: label})``: classification labels are class indices into
:data:`LABEL_CLASSES`, regression labels are floats scaled by :data:`REGRESSION_SCALES`, and a task
that does not apply to the case (a CT task on a radiograph, the side of an absent nodule, a lab
that was not measured) is ``None`` (masked in the loss). Every task of the case's kind is present.

Kinds and tasks (``LABEL_TASKS[kind][task]`` = number of classes, 0 = regression):

* ``image`` (xray and ct share the image encoder, so its tasks are the union):
  xray ``nodule_present``, ``nodule_side``, ``nodule_zone``, ``effusion_present``,
  ``effusion_side``, ``cardiomegaly``; ct ``ct_lesion_present``, ``ct_lesion_side``, ``ct_organ``.
* ``volume`` (ct3d): ``lesion_present``, ``lesion_organ`` (the names the questions use, paired
  organs with their side), ``lesion_band`` (third of the volume, along axis 0 inferior -> superior,
  that holds the lesion centre).
* ``signal`` (ecg): ``rhythm`` (5 classes), ``heart_rate`` (regression, ``(bpm - 80) / 30``).
* ``ehr``: ``fever``, ``hypotension``, ``tachypnea``, ``low_sbp`` (sbp <= 100), ``qsofa_vitals``
  (0..2: the two qSOFA points the numbers show; altered mentation is only in the note, which the
  EHR encoder never sees, so the full 0..3 score is not a label of the tensor), and
  ``lab_<name>`` (abnormal, per lab of :data:`medmllm.data.phantoms.ehr.REFERENCE_RANGES`;
  None when the lab was not measured).

:func:`case_part` gives the record part (path relative to the build folder) that the instruction
records of the case use, so the encoders are trained on exactly the tensors they see later.

:func:`case_regions` gives where the focal findings lie, for dense (per-token) auxiliary tasks
(:data:`REGION_TASKS`): ``image`` ``nodule_where`` / ``ct_lesion_where`` as a box
``(r0, c0, r1, c1)`` in fractions of the image height/width (the phantoms are square, so the
letterboxed tensor keeps these fractions), ``volume`` ``lesion_where`` as ``(z0, r0, c0, z1, r1, c1)``,
fractions of depth (axis 0: the lesion's first slice to one past its last), height and width (the
lesion sphere's bounding box). ``()`` = the finding is absent, ``None`` = not applicable. A per-image
label such as "is there a nodule" is learnt from a few hundred images only after a long plateau;
telling the encoder *where* the finding is shortens it several-fold (measured in the encoder stage).
"""

from __future__ import annotations

from medmllm.data.phantoms.ecg import RHYTHMS
from medmllm.data.phantoms.ehr import REFERENCE_RANGES
from medmllm.data.phantoms.questions import (CT_ORGANS, MEDIA_PREFIX, SIDES, lesion_organ, media_part,
                                             volume_organs)
from medmllm.errors import InputError

KIND_OF_MODALITY = {"xray": "image", "ct": "image", "ct3d": "volume", "ecg": "signal", "ehr": "ehr"}
NO_YES = ("no", "yes")
ZONES = ("lower", "upper")
BANDS = ("lower", "middle", "upper")  # thirds of axis 0 (inferior -> superior)
LABS = tuple(REFERENCE_RANGES)
# Regression targets: label = (value - center) / scale; errors are reported in the value's units.
REGRESSION_SCALES = {("signal", "heart_rate"): (80.0, 30.0)}

# kind -> task -> class names (None = regression), in a fixed order.
LABEL_CLASSES: dict[str, dict[str, tuple[str, ...] | None]] = {
    "image": {"nodule_present": NO_YES, "nodule_side": SIDES, "nodule_zone": ZONES,
              "effusion_present": NO_YES, "effusion_side": SIDES, "cardiomegaly": NO_YES,
              "ct_lesion_present": NO_YES, "ct_lesion_side": SIDES, "ct_organ": CT_ORGANS},
    "volume": {"lesion_present": NO_YES, "lesion_organ": tuple(sorted(volume_organs())), "lesion_band": BANDS},
    "signal": {"rhythm": tuple(RHYTHMS), "heart_rate": None},
    "ehr": {"fever": NO_YES, "hypotension": NO_YES, "tachypnea": NO_YES, "low_sbp": NO_YES,
            "qsofa_vitals": ("0", "1", "2"), **{f"lab_{name}": NO_YES for name in LABS}},
}
REGION_TASKS: dict[str, tuple[str, ...]] = {"image": ("nodule_where", "ct_lesion_where"),
                                            "volume": ("lesion_where",)}
LABEL_TASKS: dict[str, dict[str, int]] = {
    kind: {task: len(names) if names else 0 for task, names in tasks.items()} for kind, tasks in LABEL_CLASSES.items()}

Label = int | float | None
Region = tuple[float, ...] | None


def _index(case: dict, task: str, kind: str, value) -> int | None:
    """Class index of ``value`` among LABEL_CLASSES[kind][task] (None stays None)."""
    if value is None:
        return None
    names = LABEL_CLASSES[kind][task]
    value = ("yes" if value else "no") if names is NO_YES else str(value)
    if value not in names:
        raise InputError(f"{case.get('case_id', '<case>')}.truth",
                         f"{task}: expected one of {list(names)}, got {value!r}")
    return names.index(value)


def _present(finding: dict, key: str) -> object:
    """``finding[key]`` when the finding is present, else None."""
    return finding.get(key) if finding.get("present") else None


def _xray(truth: dict) -> dict:
    f = truth["findings"]
    nod, eff = f["nodule"], f["effusion"]
    return {"nodule_present": nod["present"], "nodule_side": _present(nod, "side"),
            "nodule_zone": _present(nod, "zone"), "effusion_present": eff["present"],
            "effusion_side": _present(eff, "side"), "cardiomegaly": f["cardiomegaly"]["present"]}


def _ct(truth: dict) -> dict:
    les = truth["findings"]["lesion"]
    return {"ct_lesion_present": les["present"], "ct_lesion_side": _present(les, "side"), "ct_organ": truth["organ"]}


def _band(lesion: dict, depth: int) -> str:
    """Third of the volume holding the lesion centre slice (from ``center_dhw``, else ``slice_range``)."""
    centre = lesion["center_dhw"][0] if lesion.get("center_dhw") else sum(lesion["slice_range"]) / 2
    return BANDS[min(2, int(3 * (float(centre) + 0.5) / depth))]


def _ct3d(truth: dict) -> dict:
    les = truth["findings"]["lesion"]
    present = bool(les["present"])
    return {"lesion_present": present, "lesion_organ": lesion_organ(les) if present else None,
            "lesion_band": _band(les, int(truth["shape"][0])) if present else None}


def _ecg(truth: dict) -> dict:
    return {"rhythm": truth["rhythm"], "heart_rate": float(truth["heart_rate_bpm"])}


def _ehr(truth: dict) -> dict:
    fl = truth["flags"]
    missing = set(truth.get("missing") or ())
    low_sbp = int(fl["qsofa"]) - int(bool(fl["tachypnea"])) - int(bool(fl["altered_mentation"]))  # sbp <= 100
    out = {"fever": fl["fever"], "hypotension": fl["hypotension"], "tachypnea": fl["tachypnea"],
           "low_sbp": bool(low_sbp), "qsofa_vitals": int(bool(fl["tachypnea"])) + low_sbp}
    for lab in LABS:
        out[f"lab_{lab}"] = None if f"labs.{lab}" in missing else lab in fl["abnormal_labs"]
    return out


_RAW = {"xray": _xray, "ct": _ct, "ct3d": _ct3d, "ecg": _ecg, "ehr": _ehr}


def case_kind(case: dict) -> str:
    """Encoder kind of a case (InputError for an unknown modality)."""
    modality = case.get("modality")
    if modality not in KIND_OF_MODALITY:
        raise InputError(f"{case.get('case_id', '<case>')}.modality",
                         f"expected one of {sorted(KIND_OF_MODALITY)}, got {modality!r}")
    return KIND_OF_MODALITY[modality]


def case_labels(case: dict) -> tuple[str, dict[str, Label]]:
    """``(kind, {task: label})`` for every task of ``LABEL_TASKS[kind]`` (see module doc).

    Classification labels are ``int`` class indices, regression labels scaled ``float``, ``None``
    where the task does not apply. InputError when the truth lacks a needed key or holds an
    unexpected value.
    """
    kind = case_kind(case)
    try:
        raw = _RAW[case["modality"]](case["truth"])
    except (KeyError, TypeError, IndexError) as exc:
        raise InputError(f"{case.get('case_id', '<case>')}.truth",
                         f"expected the MedPhantom {case['modality']} truth layout, missing {exc!r}") from None
    labels: dict[str, Label] = {}
    for task, names in LABEL_CLASSES[kind].items():
        value = raw.get(task)
        if names is None:
            center, scale = REGRESSION_SCALES[(kind, task)]
            labels[task] = None if value is None else (float(value) - center) / scale
        else:
            labels[task] = _index(case, task, kind, value)
    return kind, labels


def _box(center_rc, radius_px: float, size: int) -> tuple[float, float, float, float]:
    """Box of a disk (centre row/col, radius in px) in fractions of a ``size`` x ``size`` image.

    Pixel ``i`` is centred on coordinate ``i`` and covers ``[i - 0.5, i + 0.5)``, i.e. the fraction
    ``[i / size, (i + 1) / size)``."""
    r, c = (float(v) + 0.5 for v in center_rc)
    return ((r - radius_px) / size, (c - radius_px) / size, (r + radius_px) / size, (c + radius_px) / size)


def _regions_image(modality: str, truth: dict) -> dict[str, Region]:
    from medmllm.data.phantoms.build import CT_SIZE, XRAY_SIZE

    if modality == "xray":
        nod = truth["findings"]["nodule"]
        box = _box(nod["center_rc"], float(nod["diameter_px"]) / 2, XRAY_SIZE) if nod["present"] else ()
        return {"nodule_where": box, "ct_lesion_where": None}
    les = truth["findings"]["lesion"]
    radius = float(les["diameter_mm"]) / float(truth["pixel_spacing_mm"]) / 2 if les["present"] else 0.0
    return {"nodule_where": None, "ct_lesion_where": _box(les["center_rc"], radius, CT_SIZE) if les["present"] else ()}


def _regions_volume(truth: dict) -> dict[str, Region]:
    les = truth["findings"]["lesion"]
    if not les["present"]:
        return {"lesion_where": ()}
    depth, rows, cols = (int(n) for n in truth["shape"])
    a, b = les["slice_range"]
    _, r, c = (float(v) + 0.5 for v in les["center_dhw"])                     # voxel index -> its centre
    radius_mm = float(les["diameter_mm"]) / 2
    ry, rx = radius_mm / float(truth["spacing_mm"][1]), radius_mm / float(truth["spacing_mm"][2])  # voxels
    return {"lesion_where": (int(a) / depth, (r - ry) / rows, (c - rx) / cols,
                             (int(b) + 1) / depth, (r + ry) / rows, (c + rx) / cols)}


def case_regions(case: dict) -> tuple[str, dict[str, Region]]:
    """``(kind, {task: region})`` for every task of ``REGION_TASKS[kind]`` (``{}`` for other kinds);
    see the module doc for the region formats."""
    kind = case_kind(case)
    try:
        if kind == "image":
            return kind, _regions_image(case["modality"], case["truth"])
        if kind == "volume":
            return kind, _regions_volume(case["truth"])
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"{case.get('case_id', '<case>')}.truth",
                         f"expected the MedPhantom {case['modality']} finding location, missing {exc!r}") from None
    return kind, {}


def case_part(case: dict) -> dict:
    """The record part of the case's main file, ``path`` relative to the build folder.

    Same file and options as the case's instruction records (xray: the PNG, ct: the DICOM with
    ``options.window`` from the truth, ct3d: the NIfTI, ecg: the .hea, ehr: the JSON); load it with
    ``PartLoader()(part, build_dir)``.
    """
    case_kind(case)
    try:
        part = dict(media_part(case))
    except KeyError as exc:
        raise InputError(f"{case.get('case_id', '<case>')}.files", f"expected the main file's key, missing {exc}") from None
    if part["path"].startswith(MEDIA_PREFIX):
        part["path"] = part["path"][len(MEDIA_PREFIX):]
    return part


__all__ = ["KIND_OF_MODALITY", "LABEL_CLASSES", "LABEL_TASKS", "REGION_TASKS", "REGRESSION_SCALES", "case_kind",
           "case_labels", "case_part", "case_regions"]

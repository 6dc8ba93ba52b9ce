"""MedPhantom: medmllm's seeded synthetic medical dataset with exact ground truth.

Generators are pure functions of a ``numpy.random.Generator`` returning ``(array, truth)``:
radiographs and CT slices (:mod:`.radiograph`), CT volumes (:mod:`.volume`), 12-lead ECGs
(:mod:`.ecg`) and EHR snapshots (:mod:`.ehr`). :mod:`.questions` turns a case into
instruction records, :func:`build_phantoms` writes a whole dataset (files, JSONL splits,
manifest, ``cases.jsonl``, ``DATASHEET.md``).

>>> summary = build_phantoms("phantoms", n=200, seed=0)   # doctest: +SKIP
"""

from __future__ import annotations

import importlib

_LAZY = {
    "build_phantoms": "medmllm.data.phantoms.build",
    "generate_ecg": "medmllm.data.phantoms.ecg",
    "write_wfdb": "medmllm.data.phantoms.ecg",
    "generate_ehr": "medmllm.data.phantoms.ehr",
    "case_records": "medmllm.data.phantoms.questions",
    "write_datasheet": "medmllm.data.phantoms.datasheet",
    "generate_xray": "medmllm.data.phantoms.radiograph",
    "generate_ct_slice": "medmllm.data.phantoms.radiograph",
    "generate_ct_volume": "medmllm.data.phantoms.volume",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    """Import the defining module on first use (keeps ``import medmllm`` light)."""
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""Record filters a task YAML may name (``filters.hook: medmllm.eval.tasks.hooks:NAME``).

Only this module is allowed (see ``medmllm.eval.tasks.HOOK_MODULES``): a YAML file can select
records with these small, reviewed functions but can never run arbitrary code. Each hook takes a
record (see :mod:`medmllm.data.records`) and returns ``True`` to keep it.
"""

from __future__ import annotations

__all__ = ["slake_en", "slake_zh", "yes_no_gold", "not_counterfactual"]


def _meta(record: dict) -> dict:
    return record.get("meta") or {}


def slake_en(record: dict) -> bool:
    """SLAKE questions asked in English (``meta.lang == "en"``), as LLaVA-Med/MultiMedEval evaluate."""
    m = _meta(record)
    return m.get("dataset") == "slake" and m.get("lang") == "en"


def slake_zh(record: dict) -> bool:
    """SLAKE questions asked in Chinese (``meta.lang == "zh"``)."""
    m = _meta(record)
    return m.get("dataset") == "slake" and m.get("lang") == "zh"


def yes_no_gold(record: dict) -> bool:
    """Questions whose gold answer is yes or no (the subset MultiMedEval calls closed)."""
    return str(_meta(record).get("answer", "")).strip().lower() in ("yes", "no")


def not_counterfactual(record: dict) -> bool:
    """MedPhantom records that are not counterfactual twins (``meta.extra.counterfactual_of`` unset)."""
    return not (_meta(record).get("extra") or {}).get("counterfactual_of")

"""Public-dataset converters: official local files -> instruction records + split manifest.

>>> report = convert("vqa_rad", "~/data/VQA_RAD", "out/vqa_rad.jsonl")   # doctest: +SKIP
>>> print(report)                                                         # doctest: +SKIP
vqa_rad: kept 2244 records (train 1793, test 451), skipped 4
...

``convert`` writes ``out`` (JSONL) and ``<out stem>.manifest.json`` next to it, with
image paths relative to the output file's folder. Converters never download anything:
they read the dataset exactly as the user downloaded it (see each module's docstring).
"""

from __future__ import annotations

import os
from typing import Any, Sequence

from medmllm.data.converters.base import ConvertReport, Converter, Skip, run
from medmllm.data.converters.gmai_mmbench import convert_gmai_mmbench
from medmllm.data.converters.iu_xray import convert_iu_xray
from medmllm.data.converters.mediconfusion import convert_mediconfusion
from medmllm.data.converters.medxpertqa import convert_medxpertqa
from medmllm.data.converters.mimic_cxr import convert_mimic_cxr
from medmllm.data.converters.omnimedvqa import convert_omnimedvqa
from medmllm.data.converters.pathvqa import convert_pathvqa
from medmllm.data.converters.pmc_vqa import convert_pmc_vqa
from medmllm.data.converters.slake import convert_slake
from medmllm.data.converters.vqa_rad import convert_vqa_rad
from medmllm.registry import Registry

CONVERTERS: Registry[Converter] = Registry("converter")
CONVERTERS.register("vqa_rad", convert_vqa_rad)
CONVERTERS.register("slake", convert_slake)
CONVERTERS.register("pathvqa", convert_pathvqa)
CONVERTERS.register("pmc_vqa", convert_pmc_vqa)
CONVERTERS.register("mimic_cxr", convert_mimic_cxr)
CONVERTERS.register("iu_xray", convert_iu_xray)
CONVERTERS.register("omnimedvqa", convert_omnimedvqa)
CONVERTERS.register("medxpertqa_mm", convert_medxpertqa)
CONVERTERS.register("gmai_mmbench", convert_gmai_mmbench)
CONVERTERS.register("mediconfusion", convert_mediconfusion)


def convert(name: str, src: str | os.PathLike, out: str | os.PathLike, *, splits: Sequence[str] | str | None = None,
            limit: int | None = None, hash_files: bool = True, **options: Any) -> ConvertReport:
    """Convert dataset ``name`` found in folder ``src`` into ``out`` (JSONL) + ``<out stem>.manifest.json``.

    ``splits``: names to keep (a list or a comma-separated string; "val"/"validate" mean
    "validation"); for pmc_vqa they choose source files ("train", "test", "test_clean").
    ``limit``: stop after that many records. ``hash_files``: include image bytes in the
    manifest hashes. ``options``: converter-specific (slake ``lang``; mimic_cxr ``section``,
    ``max_images``). Raises ConfigError (unknown name/split/option), InputError (missing
    source folder or annotation file, unreadable annotation, nothing convertible).
    Items with a missing image or malformed fields are skipped and listed in the report.
    """
    return run(CONVERTERS.get(name), name, src, out, splits=splits, limit=limit, hash_files=hash_files, **options)


__all__ = ["CONVERTERS", "ConvertReport", "Skip", "convert"]

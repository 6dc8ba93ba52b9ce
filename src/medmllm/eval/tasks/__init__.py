"""Benchmark tasks as data: one YAML file per task, validated into a :class:`TaskSpec`.

A task says which records to evaluate, how to prompt and generate, and how to score::

    name: vqa_rad                      # must equal the file name (vqa_rad.yaml)
    version: 1                         # bump when anything below changes the numbers
    description: VQA-RAD test set ...
    data:
      source: converter                # converter | medphantom | external
      converter: vqa_rad               # `medmllm convert vqa_rad --out DATA_ROOT/vqa_rad/test.jsonl`
      records: vqa_rad/test.jsonl      # relative to the data root (default "data")
      manifest: vqa_rad/test.manifest.json
      split: test
    prompt:
      template: "{question}\\nAnswer the question using a single word or phrase."
    generation: {max_new_tokens: 32, temperature: 0}
    protocols: [llava-med, multimedeval, exact, f1]     # names in medmllm.eval.protocols.PROTOCOLS
    metrics: []                                        # names in medmllm.eval.metrics.METRICS
    optional_metrics: []                               # model-based; skipped with a message when unavailable
    filters: {lang: en, answer_types: [closed, open], hook: "medmllm.eval.tasks.hooks:slake_en"}
    extract_answer_tag: false

Loading goes through :func:`medmllm.config.load_config` with the :class:`TaskSpec` schema, so
unknown keys, wrong types and missing keys fail with the file and the field named; the loader
adds checks of its own (name = file name, known protocols/metrics/answer types, prompt fields,
hooks only from :data:`HOOK_MODULES`). Every built-in YAML beside this file is registered in
:data:`TASKS` (exact names; a duplicate name fails). :func:`load_task` takes a registered name or
a path to a YAML file.

Prompt templates may use ``{question}`` (the record's user text, required) and ``{options}``
(``meta.choices`` as ``A. text`` lines); literal braces are written ``{{`` / ``}}``.
"""

from __future__ import annotations

import importlib
import os
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Literal, Optional

from medmllm.config import load_config
from medmllm.data.records import ANSWER_TYPES, SPLITS
from medmllm.errors import ConfigError
from medmllm.registry import Registry

TASKS_DIR = Path(__file__).resolve().parent
HOOK_MODULES = ("medmllm.eval.tasks.hooks",)  # the only modules a task YAML may name a hook from
PROMPT_FIELDS = ("question", "options")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass(frozen=True)
class DataSpec:
    """Where the task's records are: paths relative to the data root given at run time."""

    source: Literal["converter", "medphantom", "external"]
    records: str
    manifest: str
    split: str = "test"
    converter: Optional[str] = None
    notes: str = ""

    def __post_init__(self):
        if self.split not in SPLITS:
            raise ConfigError(f"split: expected one of {SPLITS}, got {self.split!r}")
        if self.source == "converter" and not self.converter:
            raise ConfigError("converter: source 'converter' needs the converter's name")
        for key in ("records", "manifest"):
            value = getattr(self, key)
            if not value.strip() or os.path.isabs(value):
                raise ConfigError(f"{key}: expected a non-empty path relative to the data root, got {value!r}")


@dataclass(frozen=True)
class PromptSpec:
    template: str = "{question}"
    system: Optional[str] = None

    def __post_init__(self):
        try:
            names = [f for _, f, _, _ in string.Formatter().parse(self.template) if f is not None]
        except ValueError as exc:
            raise ConfigError(f"template: not a valid format string ({exc}); write literal braces as {{{{ }}}}")
        unknown = sorted({n for n in names if n not in PROMPT_FIELDS})
        if unknown:
            raise ConfigError(f"template: unknown field(s) {unknown}; allowed: {list(PROMPT_FIELDS)}")
        if "question" not in names:
            raise ConfigError("template: must contain {question}")


@dataclass(frozen=True)
class GenerationSpec:
    max_new_tokens: int
    temperature: float = 0.0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens: expected >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ConfigError(f"temperature: expected >= 0, got {self.temperature}")


@dataclass(frozen=True)
class FilterSpec:
    """Record selection by ``meta`` fields (all given ones must hold) and an optional hook."""

    lang: Optional[str] = None
    answer_types: Optional[tuple[str, ...]] = None
    modality: Optional[tuple[str, ...]] = None
    task: Optional[tuple[str, ...]] = None
    dataset: Optional[str] = None
    hook: Optional[str] = None

    def __post_init__(self):
        bad = sorted(set(self.answer_types or ()) - set(ANSWER_TYPES))
        if bad:
            raise ConfigError(f"answer_types: unknown {bad}; known: {list(ANSWER_TYPES)}")
        if self.hook is not None:
            resolve_hook(self.hook)


@dataclass(frozen=True)
class TaskSpec:
    name: str
    version: int
    description: str
    data: DataSpec
    generation: GenerationSpec
    prompt: PromptSpec = field(default_factory=PromptSpec)
    protocols: tuple[str, ...] = ()
    metrics: tuple[str, ...] = ()
    optional_metrics: tuple[str, ...] = ()
    filters: FilterSpec = field(default_factory=FilterSpec)
    extract_answer_tag: bool = False
    source_file: Optional[str] = field(default=None, init=False, compare=False)

    def __post_init__(self):
        from medmllm.eval.metrics import METRICS
        from medmllm.eval.protocols import PROTOCOLS

        if self.version < 1:
            raise ConfigError(f"version: expected an integer >= 1, got {self.version}")
        for key, reg in (("protocols", PROTOCOLS), ("metrics", METRICS), ("optional_metrics", METRICS)):
            for i, n in enumerate(getattr(self, key)):
                if n not in reg:
                    raise ConfigError(f"{key}[{i}]: unknown {reg.kind} {n!r}; known: {', '.join(reg.names())}")
        if not self.protocols and not self.metrics and not self.optional_metrics:
            raise ConfigError("protocols/metrics: a task needs at least one protocol or metric to score with")

    # ------------------------------------------------------------------ use
    def paths(self, data_root: str | os.PathLike = "data") -> tuple[Path, Path]:
        """(records JSONL, split manifest) under ``data_root``."""
        root = Path(data_root)
        return root / self.data.records, root / self.data.manifest

    def keep(self, record: dict) -> bool:
        """Whether ``record`` belongs to this task (filters on ``meta``, then the hook)."""
        meta = record.get("meta", {})
        f = self.filters
        if f.lang is not None and meta.get("lang") != f.lang:
            return False
        if f.answer_types is not None and meta.get("answer_type") not in f.answer_types:
            return False
        if f.modality is not None and meta.get("modality") not in f.modality:
            return False
        if f.task is not None and meta.get("task") not in f.task:
            return False
        if f.dataset is not None and meta.get("dataset") != f.dataset:
            return False
        if f.hook is not None and not resolve_hook(f.hook)(record):
            return False
        return True

    def select(self, records: Iterable[dict]) -> list[dict]:
        """The records this task evaluates, in their order."""
        return [r for r in records if self.keep(r)]

    def build_prompt(self, record: dict) -> str:
        """The user text of ``record`` put through the template (``{question}``, ``{options}``)."""
        meta = record.get("meta", {})
        options = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(meta.get("choices") or []))
        return self.prompt.template.format(question=question_text(record), options=options)


def question_text(record: dict) -> str:
    """The text parts of the record's last user message, joined by newlines."""
    users = [m for m in record.get("messages", []) if m.get("role") == "user"]
    if not users:
        return ""
    content = users[-1]["content"]
    if isinstance(content, str):
        return content
    return "\n".join(p["text"] for p in content if p.get("type") == "text")


# ----------------------------------------------------------------------------- hooks

def resolve_hook(ref: str) -> Callable[[dict], bool]:
    """``"module:function"`` -> the function, only from :data:`HOOK_MODULES` (ConfigError otherwise)."""
    if not isinstance(ref, str) or ref.count(":") != 1:
        raise ConfigError(f"hook: expected 'module:function', got {ref!r}")
    module, attr = ref.split(":")
    if module not in HOOK_MODULES:
        raise ConfigError(f"hook: module {module!r} is not allowed; hooks come from {list(HOOK_MODULES)}")
    mod = importlib.import_module(module)
    known = sorted(getattr(mod, "__all__", ()))  # only the names a hook module exports are hooks
    fn = getattr(mod, attr, None)
    if attr not in known or not callable(fn):
        raise ConfigError(f"hook: {module} has no hook {attr!r}; known: {', '.join(known)}")
    return fn


# ----------------------------------------------------------------------------- loading

def load_task_file(path: str | os.PathLike) -> TaskSpec:
    """Validate one task YAML; ConfigError naming the file and the field on any problem."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: task file does not exist")
    spec = load_config(path, schema=TaskSpec)
    if spec.name != path.stem:
        raise ConfigError(f"{path}: name: expected {path.stem!r} (the file name), got {spec.name!r}")
    object.__setattr__(spec, "source_file", str(path))
    return spec


TASKS: Registry[TaskSpec] = Registry("task")


def _load_builtin() -> None:
    for path in sorted(TASKS_DIR.glob("*.yaml")):
        spec = load_task_file(path)
        TASKS.register(spec.name, spec)


def load_task(name: str | os.PathLike) -> TaskSpec:
    """A built-in task by exact name (ConfigError listing known ones), or a task YAML by path."""
    text = os.fspath(name)
    if text.endswith((".yaml", ".yml")) or os.sep in text:
        return load_task_file(text)
    return TASKS.get(text)


def task_names() -> list[str]:
    return TASKS.names()


_load_builtin()

__all__ = ["TASKS", "TaskSpec", "DataSpec", "PromptSpec", "GenerationSpec", "FilterSpec", "load_task",
           "load_task_file", "resolve_hook", "question_text", "task_names", "HOOK_MODULES"]

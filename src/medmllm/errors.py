"""Typed errors. Every error caused by user input names the file or field and the reason."""

from __future__ import annotations

import os


class MedmllmError(Exception):
    """Base class of every error medmllm raises on purpose."""


class InputError(MedmllmError, ValueError):
    """A file (or inline item) could not be read: it is missing, truncated, empty,
    of the wrong type, or declares something absurd.

    ``path`` names the file (or the record field), ``reason`` says what is wrong,
    ideally as expected vs actual.
    """

    def __init__(self, path: str | os.PathLike | None, reason: str):
        self.path = str(path) if path is not None else "<input>"
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self):  # keep picklable (multiprocessing workers)
        return (type(self), (self.path, self.reason))


class UnsupportedFormatError(InputError):
    """No reader recognises the file's content or suffix."""


class RecordError(InputError):
    """An instruction record (JSONL line) breaks the format; ``path`` is ``file:line`` or a field."""


class ConfigError(MedmllmError, ValueError):
    """A configuration key or value is wrong (unknown key, bad type, missing file)."""

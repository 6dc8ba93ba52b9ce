"""PathVQA (He et al. 2020, official pickled-QA release) -> instruction records.

Official layout under ``src`` (``src`` may also be the ``split`` folder itself)::

    split/qas/{train,val,test}_vqa.pkl      list of {image, question, answer, ...};
                                            image = image name without extension
    split/images/{train,val,test}/<image>.jpg

Pickles are read with :func:`safe_load_pickle`, which only rebuilds builtin
containers and scalars and refuses every other class (a pickle can run code).
Answer type: "closed" for yes/no answers, else "open". Ids: ``pathvqa-<split>-<index>``
(the official files carry no question id; the index is the position in the pickle).
"""

from __future__ import annotations

import builtins
import pickle
from pathlib import Path
from typing import Any, Iterator, Sequence

from medmllm.errors import InputError
from medmllm.data.converters.base import (MAX_ANNOTATION_BYTES, Skip, check_src, iter_items, need_image,
                                          plain_extra, req_text, require_file, select_splits)
from medmllm.data.records import make_record, media

DATASET = "pathvqa"
FILE_STEMS = {"train": "train", "validation": "val", "test": "test"}
SPLITS = {"train": "train", "validation": "validation", "val": "validation", "validate": "validation", "test": "test"}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_SAFE_BUILTINS = ("list", "dict", "str", "int", "float", "tuple", "set", "frozenset", "bool", "bytes", "bytearray", "complex")
_ALLOWED = {(mod, name) for mod in ("builtins", "__builtin__") for name in _SAFE_BUILTINS}


class _BuiltinsOnlyUnpickler(pickle.Unpickler):
    """An Unpickler whose ``find_class`` resolves only builtin containers/scalars."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return getattr(builtins, name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}: only builtin lists, dicts, "
                                     "strings and numbers are allowed")


def safe_load_pickle(path: str | Path) -> Any:
    """Load a pickle holding only builtin containers and scalars.

    Any other class or callable (e.g. an ``os.system`` reduce payload) is refused
    before it is resolved, with an InputError naming the file; so is a corrupt pickle.
    """
    path = Path(path)
    size = path.stat().st_size
    if size > MAX_ANNOTATION_BYTES:
        raise InputError(path, f"pickle is {size} bytes, above the limit of {MAX_ANNOTATION_BYTES}")
    try:
        with open(path, "rb") as fh:
            return _BuiltinsOnlyUnpickler(fh, encoding="utf-8").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            KeyError, UnicodeDecodeError, MemoryError, RecursionError) as exc:
        raise InputError(path, f"unsafe or corrupt pickle: {type(exc).__name__}: {exc}") from None


def _root(src: Path) -> Path:
    return src / "split" if (src / "split" / "qas").is_dir() or not (src / "qas").is_dir() else src


def _split_files(root: Path, wanted: list[str], explicit: bool) -> list[tuple[str, Path]]:
    rel = {s: f"qas/{FILE_STEMS[s]}_vqa.pkl" for s in wanted}
    present = [(s, root / rel[s]) for s in wanted if (root / rel[s]).is_file()]
    if explicit or not present:
        return [(s, require_file(root, rel[s])) for s in wanted]
    return present


def _image_candidates(img_dir: Path, name: str) -> list[Path]:
    if Path(name).suffix.lower() in IMAGE_SUFFIXES:
        return [img_dir / name]
    return [img_dir / (name + s) for s in IMAGE_SUFFIXES]


def convert_pathvqa(src: Path, *, splits: Sequence[str] | str | None = None) -> Iterator[dict | Skip]:
    """Yield one VQA record per question-answer pair (or a Skip)."""
    src = check_src(src)
    wanted = select_splits(splits, SPLITS)
    root = _root(src)
    for split, path in _split_files(root, wanted, explicit=splits is not None):
        items = safe_load_pickle(path)
        if not isinstance(items, list):
            raise InputError(path, f"expected a pickled list of question dicts, got {type(items).__name__}")
        img_dir = root / "images" / FILE_STEMS[split]

        def build(i: int, item: Any, split: str = split, img_dir: Path = img_dir) -> dict:
            rid = f"{DATASET}-{split}-{i:06d}"
            question = req_text(item, "question", rid)
            answer = req_text(item, "answer", rid)
            image = need_image(_image_candidates(img_dir, req_text(item, "image", rid)), rid)
            atype = "closed" if answer.lower() in ("yes", "no") else "open"
            extra = plain_extra(item, [k for k in item if isinstance(k, str) and k not in ("question", "answer")])
            meta = {"dataset": DATASET, "split": split, "task": "vqa", "answer_type": atype,
                    "modality": "pathology", "answer": answer, "extra": {**extra, "index": i}}
            return make_record(rid, [media("image", str(image)), question], answer, meta)

        yield from iter_items(items, path.name, build)

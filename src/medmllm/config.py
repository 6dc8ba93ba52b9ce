"""Configuration is data: YAML + ``key=value`` overrides -> a typed dataclass instance.

    cfg = load_config("recipes/sft.yaml", ["optim.lr=3e-4", "model.layers=4", "tags=[a,b]"], schema=SFTConfig)

* Values (in files and in overrides) are parsed by a safe YAML loader and never evaluated. The
  loader follows YAML 1.2 for the two classic surprises: only ``true``/``false`` are booleans
  (``no``, ``on``, ``yes`` stay strings) and ``3e-4`` is a float. Dates stay strings.
* The schema is a dataclass; fields may be nested dataclasses, ``int``, ``float``, ``bool``,
  ``str``, ``Path``, ``list[T]``, ``tuple[...]``, ``dict[K, V]``, ``Optional[T]``, unions,
  ``Literal[...]``, enums and ``Any``. An ``int`` is accepted where a ``float`` is expected and
  an integral float (``1e4``) where an ``int`` is; nothing else is converted (a ``str`` field given the override ``name=1.10`` gets the
  text ``"1.10"``; given ``1.10`` from a file it fails and asks for quotes).
* Every problem is collected and reported at once in a :class:`~medmllm.errors.ConfigError`:
  unknown keys (with the file, the known keys and a "did you mean"), wrong types (expected vs
  actual), missing required keys, paths that must exist (field metadata ``{"must_exist": True}``,
  see :func:`path_field`). An override of a key the schema lacks fails the same way.
* :func:`dump_config` gives back plain YAML-able data (the resolved config for the run directory);
  ``load_config(dump_config(cfg), schema=type(cfg)) == cfg``.
"""

from __future__ import annotations

import dataclasses
import decimal
import difflib
import enum
import os
import re
import types
import typing
from pathlib import Path, PurePath
from typing import Any, Literal, Mapping, Sequence, TypeVar, Union

import yaml

from medmllm.errors import ConfigError

__all__ = ["ConfigError", "load_config", "parse_override", "apply_overrides", "from_dict",
           "dump_config", "dump_config_yaml", "save_config", "read_yaml", "path_field"]

T = TypeVar("T")
_MISSING = dataclasses.MISSING
_BOOL_TAG = "tag:yaml.org,2002:bool"
_FLOAT_TAG = "tag:yaml.org,2002:float"
_TIMESTAMP_TAG = "tag:yaml.org,2002:timestamp"
_YAML12_BOOL = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
_EXP_FLOAT = re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")


# ----------------------------------------------------------------------------- YAML dialect
class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans, ``3e-4`` floats, dates as strings, duplicate keys refused."""


_Loader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in resolvers if tag not in (_BOOL_TAG, _TIMESTAMP_TAG)]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(_BOOL_TAG, _YAML12_BOOL, list("tTfF"))
_Loader.add_implicit_resolver(_FLOAT_TAG, _EXP_FLOAT, list("-+0123456789"))


def _construct_mapping(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)
    seen: set = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, typing.Hashable):
            continue  # PyYAML itself reports unhashable keys
        if key in seen:
            mark = key_node.start_mark
            raise ConfigError(f"{mark.name}: line {mark.line + 1}: duplicate key {key!r}")
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


class _Dumper(yaml.SafeDumper):
    """SafeDumper that also quotes strings our loader would read as floats (``"3e-4"``)."""


_Dumper.add_implicit_resolver(_FLOAT_TAG, _EXP_FLOAT, list("-+0123456789"))


def _yaml_load(stream: Any, source: str) -> Any:
    try:
        return yaml.load(stream, Loader=_Loader)  # noqa: S506 (_Loader derives from SafeLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from None


def read_yaml(path: str | os.PathLike) -> dict:
    """Read a YAML mapping (empty file -> ``{}``). ConfigError if missing, invalid or not a mapping."""
    p = Path(path)
    try:
        with open(p, encoding="utf-8") as fh:  # a file object: PyYAML's error marks name the file
            data = _yaml_load(fh, str(p))
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read config file: {exc.strerror or exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of keys at the top level, got {_kind(data)}")
    return data


# ----------------------------------------------------------------------------- overrides
@dataclasses.dataclass(frozen=True)
class _Override:
    """A value set on the command line: the parsed value plus its raw text (for ``str`` fields)."""

    raw: str
    value: Any
    text: str


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"a.b=3e-4"`` -> ``(["a", "b"], 0.0003)``. The value is parsed as YAML (never evaluated);
    text that is not valid YAML stays a string. ``"a="`` sets null."""
    if not isinstance(text, str) or "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value (e.g. optim.lr=3e-4)")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if any(not p.strip() for p in parts):
        raise ConfigError(f"override {text!r}: empty key segment in {key!r}")
    try:
        value = yaml.load(raw, Loader=_Loader)  # noqa: S506
    except (yaml.YAMLError, ConfigError):
        value = raw
    return [p.strip() for p in parts], value


def apply_overrides(data: Mapping, overrides: Sequence[str], schema: type | None = None,
                    source: str = "<dict>") -> dict:
    """Return a deep copy of ``data`` with each ``key=value`` applied in order.

    With a ``schema``, each key path is checked against it first (ConfigError naming the
    override, the key and the known keys). Values keep their raw text for ``str`` fields.
    """
    out = _deep_copy(data)
    for text in overrides or ():
        keys, value = parse_override(text)
        if schema is not None:
            _check_key_path(schema, keys, f"override {text!r} (config {source})")
        node = out
        for i, k in enumerate(keys[:-1]):
            nxt = node.get(k)
            if isinstance(nxt, _Override):
                nxt = nxt.value
            if nxt is None:
                nxt = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {text!r}: {'.'.join(keys[:i + 1])} is a {_kind(nxt)}, "
                                  f"not a mapping, so it has no key {keys[i + 1]!r}")
            node[k] = nxt
            node = nxt
        node[keys[-1]] = _Override(raw=text.split("=", 1)[1], value=value, text=text)
    return out


def _deep_copy(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {k: _deep_copy(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_deep_copy(v) for v in obj]
    return obj


def _strip_overrides(obj: Any) -> Any:
    if isinstance(obj, _Override):
        return _strip_overrides(obj.value)
    if isinstance(obj, dict):
        return {k: _strip_overrides(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_strip_overrides(v) for v in obj]
    return obj


def _check_key_path(schema: type, keys: list[str], source: str) -> None:
    tp: Any = schema
    for i, key in enumerate(keys):
        cls = _dataclass_in(tp)
        if cls is None:
            if _is_open_mapping(tp):
                return  # dict / Any: free-form below this point
            where = ".".join(keys[:i])
            raise ConfigError(f"{source}: {where} is {_type_name(tp)}, it has no key {key!r}")
        names = _field_types(cls)
        if key not in names:
            raise ConfigError(f"{source}: {_unknown_key_msg('.'.join(keys[:i + 1]), key, names)}")
        tp = names[key]


# ----------------------------------------------------------------------------- loading
def load_config(source: str | os.PathLike | Mapping, overrides: Sequence[str] = (),
                schema: type[T] | None = None) -> T | dict:
    """YAML file (or mapping) + overrides -> ``schema`` instance (or a plain dict without schema).

    ConfigError lists every problem found: unknown keys (with suggestions), wrong types
    (expected vs actual), missing required keys, missing must-exist paths.
    """
    if isinstance(source, Mapping):
        data, name = dict(source), "<dict>"
    elif isinstance(source, (str, os.PathLike)):
        data, name = read_yaml(source), str(source)
    else:
        raise ConfigError(f"config source: expected a YAML path or a mapping, got {_kind(source)}")
    data = apply_overrides(data, overrides, schema, source=name)
    if schema is None:
        return _strip_overrides(data)
    return from_dict(schema, data, source=name)


def from_dict(schema: type[T], data: Mapping, source: str = "<dict>") -> T:
    """Build and type-check a ``schema`` dataclass from nested plain data (see module doc)."""
    if _dataclass_in(schema) is not schema:
        raise TypeError(f"schema must be a dataclass type, got {schema!r}")
    errors: list[str] = []
    value = _convert(data, schema, "", errors)
    if errors:
        head = f"{len(errors)} problem{'s' if len(errors) > 1 else ''} in config {source}:"
        raise ConfigError("\n  - ".join([head, *errors]))
    return value


class _Invalid:
    """Marker for a value that failed conversion (the error is already recorded)."""


_INVALID = _Invalid()


def _convert(value: Any, tp: Any, path: str, errors: list[str]) -> Any:
    """Check/coerce ``value`` against type ``tp``; append messages to ``errors``; may return _INVALID."""
    label = path or "<root>"
    override = value if isinstance(value, _Override) else None
    if override is not None:
        label = f"{label} (from override {override.text!r})"
        value = override.value
    if tp is Any or tp is object:
        return _strip_overrides(value)
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return _convert_union(value, override, tp, path, label, errors)
    if origin is Literal:
        return _convert_literal(value, override, tp, label, errors)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(value, Mapping):
            return _fail(errors, label, tp, value)
        return _build_dataclass(tp, value, path, errors)
    if origin in (list, Sequence, typing.get_origin(Sequence[int])) or tp in (list, tuple):
        return _convert_sequence(value, tp, path, label, errors)
    if origin is tuple:
        return _convert_tuple(value, tp, path, label, errors)
    if origin in (dict, Mapping, typing.get_origin(Mapping[str, int])) or tp is dict:
        return _convert_mapping(value, tp, path, label, errors)
    return _convert_scalar(value, override, tp, label, errors)


def _fail(errors: list[str], label: str, tp: Any, value: Any, hint: str = "") -> _Invalid:
    errors.append(f"{label}: expected {_type_name(tp)}, got {_kind(value)}{hint}")
    return _INVALID


def _convert_union(value, override, tp, path, label, errors):
    args = typing.get_args(tp)
    if value is None and type(None) in args:
        return None
    for arg in (a for a in args if a is not type(None)):
        trial: list[str] = []
        out = _convert(override if override is not None else value, arg, path, trial)
        if not trial:
            return out
    non_none = [a for a in args if a is not type(None)]
    if len(non_none) == 1:  # Optional[X]: report X's own, more precise message
        return _convert(override if override is not None else value, non_none[0], path, errors)
    return _fail(errors, label, tp, value)


def _convert_literal(value, override, tp, label, errors):
    choices = typing.get_args(tp)
    for c in choices:
        if type(c) is type(value) and c == value:
            return c
    if override is not None and override.raw.strip() in choices:
        return override.raw.strip()
    return _fail(errors, label, tp, value)


def _convert_sequence(value, tp, path, label, errors):
    if not isinstance(value, (list, tuple)):
        return _fail(errors, label, tp, value)
    args = typing.get_args(tp)
    elem = args[0] if args else Any
    out = [_convert(v, elem, f"{path}[{i}]", errors) for i, v in enumerate(value)]
    return tuple(out) if tp is tuple else out


def _convert_tuple(value, tp, path, label, errors):
    if not isinstance(value, (list, tuple)):
        return _fail(errors, label, tp, value)
    args = typing.get_args(tp)
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(_convert(v, args[0], f"{path}[{i}]", errors) for i, v in enumerate(value))
    if len(value) != len(args):
        errors.append(f"{label}: expected {_type_name(tp)} ({len(args)} items), got {len(value)} items")
        return _INVALID
    return tuple(_convert(v, a, f"{path}[{i}]", errors) for i, (v, a) in enumerate(zip(value, args)))


def _convert_mapping(value, tp, path, label, errors):
    if not isinstance(value, Mapping):
        return _fail(errors, label, tp, value)
    args = typing.get_args(tp)
    kt, vt = args if len(args) == 2 else (Any, Any)
    return {_convert(k, kt, f"{path}.<key>", errors): _convert(v, vt, _join(path, str(k)), errors)
            for k, v in value.items()}


def _convert_scalar(value, override, tp, label, errors):
    if tp is bool:
        return value if isinstance(value, bool) else _fail(errors, label, tp, value)
    if tp is int:
        return _to_int(value, label, errors)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        return _fail(errors, label, tp, value)
    if tp is str:
        if override is not None and not isinstance(value, (list, dict)):
            return override.raw  # the text as typed: name=1.10 -> "1.10", name=yes -> "yes"
        if isinstance(value, str):
            return value
        hint = " (quote it in YAML to make it text)" if isinstance(value, (int, float, bool)) else ""
        return _fail(errors, label, tp, value, hint)
    if isinstance(tp, type) and issubclass(tp, PurePath):
        if override is not None and not isinstance(value, (list, dict)):
            value = override.raw.strip()
        if isinstance(value, (str, os.PathLike)) and str(value):
            return tp(os.path.expanduser(os.fspath(value)))
        return _fail(errors, label, tp, value)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return _to_enum(value, override, tp, label, errors)
    if tp is type(None):
        return None if value is None else _fail(errors, label, tp, value)
    if isinstance(tp, type):
        return value if isinstance(value, tp) else _fail(errors, label, tp, value)
    errors.append(f"{label}: unsupported type annotation {tp!r} in the schema")
    return _INVALID


def _to_int(value, label, errors):
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(decimal.Decimal(repr(value)))  # 1e4 -> 10000 (exact)
    return _fail(errors, label, int, value)


def _to_enum(value, override, tp, label, errors):
    for cand in ([value] + ([override.raw.strip()] if override is not None else [])):
        for member in tp:
            if cand == member.value or cand == member.name:
                return member
    return _fail(errors, label, tp, value)


def _build_dataclass(cls: type, data: Mapping, path: str, errors: list[str]) -> Any:
    types_ = _field_types(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    n_before = len(errors)
    for key in data:
        if key not in fields:
            errors.append(_unknown_key_msg(_join(path, str(key)), str(key), types_))
    kwargs = {}
    for name, f in fields.items():
        fpath = _join(path, name)
        if name not in data:
            if f.default is _MISSING and f.default_factory is _MISSING:
                errors.append(f"{fpath}: missing required key ({_type_name(types_[name])})")
            continue
        out = _convert(data[name], types_[name], fpath, errors)
        if out is not _INVALID:
            _check_exists(f, out, fpath, errors)
            kwargs[name] = out
    if len(errors) > n_before:
        return _INVALID
    try:
        return cls(**kwargs)
    except (ConfigError, ValueError, TypeError) as exc:
        errors.append(f"{path or '<root>'}: {exc}")
        return _INVALID


def _check_exists(f: dataclasses.Field, value: Any, path: str, errors: list[str]) -> None:
    if not f.metadata.get("must_exist") or value is None:
        return
    p = Path(value)
    kind = f.metadata.get("kind", "any")
    if not p.exists():
        errors.append(f"{path}: path does not exist: {p}")
    elif kind == "file" and not p.is_file():
        errors.append(f"{path}: expected a file, got a directory: {p}")
    elif kind == "dir" and not p.is_dir():
        errors.append(f"{path}: expected a directory, got a file: {p}")


def path_field(default: Any = _MISSING, *, must_exist: bool = True,
               kind: Literal["any", "file", "dir"] = "any") -> Any:
    """A dataclass field whose value (a path) must exist when the config is loaded.

    ``data: Path = path_field()`` (required) or ``path_field(None)`` with ``Optional[Path]``
    (checked only when set). ``kind`` narrows to a file or a directory.
    """
    meta = {"must_exist": must_exist, "kind": kind}
    if default is _MISSING:
        return dataclasses.field(metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


# ----------------------------------------------------------------------------- schema helpers
def _field_types(cls: type) -> dict[str, Any]:
    """Resolved annotations of the init fields of a dataclass (handles ``from __future__ import annotations``)."""
    try:
        hints = typing.get_type_hints(cls)
    except Exception as exc:  # an annotation that cannot be resolved is a bug in the schema
        raise TypeError(f"cannot resolve the type annotations of {cls.__name__}: {exc}") from exc
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls) if f.init}


def _dataclass_in(tp: Any) -> type | None:
    """The dataclass in ``tp`` (itself, or X in Optional[X]); None otherwise."""
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return tp
    if typing.get_origin(tp) in (Union, types.UnionType):
        found = [a for a in typing.get_args(tp) if isinstance(a, type) and dataclasses.is_dataclass(a)]
        return found[0] if len(found) == 1 else None
    return None


def _is_open_mapping(tp: Any) -> bool:
    if tp is Any or tp is dict or tp is object:
        return True
    origin = typing.get_origin(tp)
    if origin in (dict, Mapping, typing.get_origin(Mapping[str, int])):
        return True
    if origin in (Union, types.UnionType):
        return any(_is_open_mapping(a) for a in typing.get_args(tp))
    return False


def _unknown_key_msg(full: str, key: str, known: Mapping[str, Any] | Sequence[str]) -> str:
    names = sorted(known)
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown key {full!r}{hint} (known keys here: {', '.join(names) or '(none)'})"


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if tp is Any:
        return "any value"
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(c) for c in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        args = ", ".join("..." if a is Ellipsis else _type_name(a) for a in typing.get_args(tp))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return f"a mapping ({tp.__name__})"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in tp)
    return getattr(tp, "__name__", str(tp))


def _kind(value: Any) -> str:
    """``"str 'abc'"``, ``"null"``, ``"mapping"``: the actual value, shortened."""
    if value is None:
        return "null"
    if isinstance(value, Mapping):
        return f"mapping with keys {sorted(map(str, value))[:8]}"
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


# ----------------------------------------------------------------------------- dumping
def dump_config(cfg: Any) -> Any:
    """A config (dataclass, mapping, ...) as plain YAML-able data: dicts, lists, str, numbers, bool, None.

    Paths become strings, tuples lists, enums their values. Field order is kept.
    """
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: dump_config(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, _Override):
        return dump_config(cfg.value)
    if isinstance(cfg, Mapping):
        return {(k if isinstance(k, (str, int, float, bool)) else str(k)): dump_config(v) for k, v in cfg.items()}
    if isinstance(cfg, (list, tuple, set, frozenset)):
        return [dump_config(v) for v in cfg]
    if isinstance(cfg, PurePath):
        return str(cfg)
    if isinstance(cfg, enum.Enum):
        return dump_config(cfg.value)
    if cfg is None or isinstance(cfg, (str, bool, int, float)):
        return cfg
    raise ConfigError(f"cannot write a {type(cfg).__name__} into a YAML config: {cfg!r}")


def dump_config_yaml(cfg: Any) -> str:
    """:func:`dump_config` as YAML text that :func:`load_config` reads back to an equal config."""
    return yaml.dump(dump_config(cfg), Dumper=_Dumper, sort_keys=False, allow_unicode=True,
                     default_flow_style=False)


def save_config(cfg: Any, path: str | os.PathLike) -> Path:
    """Write the resolved config as YAML, atomically. Returns the path."""
    from medmllm.io import write_text

    write_text(path, dump_config_yaml(cfg))
    return Path(path)

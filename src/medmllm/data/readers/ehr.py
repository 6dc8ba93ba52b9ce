"""Structured EHR data: medmllm's EHR JSON, CSV (long or wide) and FHIR R4 Bundles.

Every reader returns ``(table, meta)``:

* ``table``: ``(T, F)`` float32; rows are time points (sorted), columns are measurement
  names (sorted); NaN = missing (never zero).
* ``meta``: ``format``, ``path``, ``kind="ehr"``, ``features`` (column names),
  ``units`` (per feature, None if unknown), ``codes`` (per feature: LOINC code or
  None), ``groups`` (per feature: "vitals", "labs", "demographics", ... or None),
  ``times`` (per row: the time as written, an ISO 8601 string or a number, or ``[None]``
  for a single snapshot without a time), ``notes`` (free-text strings) with
  ``note_times``, ``patient_id`` (None if absent), ``categorical`` (name -> non-numeric
  value, e.g. ``{"sex": "F"}``; the latest value when a name repeats over time),
  ``duplicates`` (``"name@time"`` where a later value replaced an earlier one),
  ``skipped`` (FHIR entries left out, with the reason) and ``ignored_fields``.

Times: numbers and ISO 8601 strings (``2024-03-01T08:00:00Z``, ``2024-03-01``; FHIR
partial dates ``2024`` / ``2024-03`` too) are accepted, not mixed in one file. Rows
are ordered by instant (times without a zone are taken as UTC for ordering); values
without a time form a row of their own, first; only measurements make rows (a time
that holds only a note or a categorical value adds none). Mixing units for one feature raises
InputError. All inputs are bounded by ``base.MAX_TEXT_BYTES``.

medmllm EHR JSON (``read_ehr_json``)
------------------------------------
::

    {
      "patient_id": "P0001",                        # optional
      "time": "2024-03-01T08:00:00",                # optional: ISO 8601 string or number
      "vitals": {"heart_rate": 88,                  # number,
                 "temp_c": "38.5",                  # numeric string,
                 "sbp": {"value": 92, "unit": "mmHg", "code": "8480-6"},  # or object
                 "spo2": null},                     # null = missing (NaN)
      "labs": {"lactate": {"value": 2.4, "unit": "mmol/L"}},
      "demographics": {"age": 67, "sex": "F"},      # numbers -> features in every row,
                                                    # anything else -> categorical
      "notes": ["Patient confused overnight."],     # or "note": "..."
      "encounters": [                               # optional time series: each item is a
        {"time": "2024-03-02T08:00:00",             # snapshot with the same keys
         "vitals": {...}, "labs": {...}, "notes": [...]}
      ]
    }

A measurement object may hold ``value``, ``unit`` and ``code`` (or ``loinc``). A value
that is not a number raises InputError naming the field, e.g.
``vitals.heart_rate: expected a number, got 'abc'`` (``encounters[1].labs.wbc: ...``).
Unknown keys are listed in ``meta["ignored_fields"]``.

EHR CSV (``read_ehr_csv``)
--------------------------
* long: a header with ``name`` and ``value`` columns, optionally ``unit``, ``time``,
  ``code`` (or ``loinc``), ``group``, ``patient_id``; a row named ``note``/``notes``
  is a note.
* wide: an optional time column (``time``, ``charttime``, ``timestamp``, ``datetime``,
  ``date``), optional ``patient_id``, ``note``/``notes`` columns (-> notes) and one column
  per measurement, optionally with its unit as ``sbp [mmHg]`` or ``sbp (mmHg)``. Several
  rows need a time column.

Empty cells (and ``NA``, ``N/A``, ``NaN``, ``null``) are missing. A measurement whose
present values are all non-numeric is categorical (e.g. ``sex``); a measurement
mixing numbers and text raises InputError naming the line and column.

FHIR R4 (``read_fhir_bundle``)
------------------------------
A ``Bundle`` of ``Observation`` (name: ``code.coding[0].display``, else ``code.text``,
else the code; LOINC from the ``http://loinc.org`` coding; ``valueQuantity`` /
``valueInteger`` -> numbers, ``valueString`` / ``valueCodeableConcept`` /
``valueBoolean`` -> categorical; ``effectiveDateTime`` (or ``effectiveInstant`` /
``effectivePeriod.start``) -> time; each ``component`` -> its own feature (a panel with
components but no value of its own adds no column); ``note[].text``
-> notes), ``Patient`` (``id`` -> patient_id, ``gender`` -> categorical ``sex``,
``birthDate`` -> categorical ``birth_date``) and ``DocumentReference`` (base64
``text/*`` attachments, else their titles, else ``description`` -> notes). A malformed
entry is skipped and listed in ``meta["skipped"]`` as ``{"entry": i, "reason": ...}``;
other resource types are counted in ``meta["ignored_resources"]``.
"""

from __future__ import annotations

import base64
import binascii
import csv
import datetime as dt
import io
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from medmllm.errors import InputError
from medmllm.data.readers import base

_MISSING = {"", "na", "n/a", "nan", "null"}
_TIME_COLUMNS = ("time", "charttime", "timestamp", "datetime", "date")
_NOTE_COLUMNS = ("note", "notes")
_NAME_UNIT = re.compile(r"^(.*?)\s*[\[(]([^\])]*)[\])]\s*$")
_PARTIAL_DATE = re.compile(r"^\d{4}(-\d{2})?$")
_DATE_LIKE = re.compile(r"^\d{4}-\d{2}")
_LOINC = "http://loinc.org"
_F32_MAX = float(np.finfo(np.float32).max)
_SNAPSHOT_KEYS = {"patient_id", "time", "vitals", "labs", "demographics", "notes", "note", "encounters"}


# ----------------------------------------------------------------------------- collector


class _Table:
    """Accumulates measurements, categorical values and notes, then builds the (T, F) table."""

    def __init__(self, path: Path, fmt: str):
        self.path, self.fmt = path, fmt
        self.values: dict[tuple[tuple, str], float] = {}   # (time key, feature) -> value
        self.features: dict[str, dict[str, Any]] = {}      # feature -> {"unit", "code", "group"}
        self.shown: dict[tuple, Any] = {}                   # time key -> time as written
        self.rows: set[tuple] = set()                       # time keys that hold a measurement
        self.static: dict[str, float] = {}                  # feature -> value for every row
        self.categorical: dict[str, tuple[tuple, Any]] = {}
        self.notes: list[tuple[str, Any]] = []
        self.patient_id: str | None = None
        self.duplicates: list[str] = []
        self.skipped: list[dict] = []
        self.ignored: list[str] = []
        self.extra: dict[str, Any] = {}
        self._time_kind: str | None = None

    # --- times
    def time_key(self, raw: Any, where: str, dates_only: bool = False) -> tuple:
        """Sort key of a time as written: ``(0,)`` when absent (sorted first), else ``(1, seconds)``.

        Numbers (and numeric strings, unless ``dates_only``) are plain numbers; other
        strings must be ISO 8601. One file may not mix the two.
        """
        if _is_missing(raw):
            return (0,)
        if isinstance(raw, bool) or not isinstance(raw, (int, float, str)):
            raise InputError(self.path, f"{where}: expected an ISO 8601 time or a number, got {raw!r}")
        text = raw.strip() if isinstance(raw, str) else None
        number = None if dates_only or (text is not None and _DATE_LIKE.match(text)) else _as_number(raw)
        if number is not None:
            if math.isinf(number):
                raise InputError(self.path, f"{where}: expected a finite time, got {raw!r}")
            key, kind, shown = (1, number), "number", raw if text is None else number
        else:
            key, kind, shown = (1, _parse_iso(self.path, str(raw), where)), "date", str(raw).strip()
        if self._time_kind not in (None, kind):
            raise InputError(self.path, f"{where}: times mix numbers and dates ({raw!r})")
        self._time_kind = kind
        self.shown.setdefault(key, shown)
        return key

    # --- content
    def feature(self, name: str, unit: str | None, code: str | None, group: str | None, where: str) -> None:
        info = self.features.setdefault(name, {"unit": None, "code": None, "group": group})
        if unit:
            if info["unit"] not in (None, unit):
                raise InputError(self.path, f"{where}: unit {unit!r} differs from {info['unit']!r} used earlier for {name!r}")
            info["unit"] = unit
        if code and info["code"] is None:
            info["code"] = code

    def add(self, name: str, value: float, tkey: tuple, unit=None, code=None, group=None, where: str = "") -> None:
        _check_f32(self.path, value, where or name)
        self.feature(name, unit, code, group, where or name)
        self.rows.add(tkey)
        if math.isnan(value):
            return
        old = self.values.get((tkey, name))
        if old is not None and old != value:
            self.duplicates.append(f"{name}@{self.shown.get(tkey)}")
        self.values[(tkey, name)] = value

    def add_static(self, name: str, value: float, unit=None, group=None, where: str = "") -> None:
        _check_f32(self.path, value, where or name)
        self.feature(name, unit, None, group, where or name)
        if not math.isnan(value):
            self.static[name] = value

    def add_categorical(self, name: str, value: Any, tkey: tuple = (0,)) -> None:
        old = self.categorical.get(name)
        if old is None or old[0] <= tkey:
            self.categorical[name] = (tkey, value)

    def add_note(self, text: str, tkey: tuple = (0,)) -> None:
        if text.strip():
            self.notes.append((text, tkey))

    def set_patient(self, pid: Any, where: str) -> None:
        if pid is None or str(pid).strip() == "":
            return
        pid = str(pid).strip()
        if self.patient_id not in (None, pid):
            raise InputError(self.path, f"{where}: a second patient {pid!r} (already read {self.patient_id!r}); "
                                        "one file must hold one patient")
        self.patient_id = pid

    # --- output
    def build(self) -> base.ReadResult:
        names = sorted(self.features)
        keys = sorted(self.rows) or [(0,)]
        row = {k: i for i, k in enumerate(keys)}
        col = {n: j for j, n in enumerate(names)}
        table = np.full((len(keys), len(names)), np.nan, dtype=np.float32)  # (T, F)
        for (k, n), v in self.values.items():
            table[row[k], col[n]] = v
        for n, v in self.static.items():
            column = table[:, col[n]]
            column[np.isnan(column)] = v
        notes = sorted(self.notes, key=lambda nk: nk[1])  # stable: file order within a time
        meta = base.base_meta(
            self.path, self.fmt, "ehr",
            features=names,
            units=[self.features[n]["unit"] for n in names],
            codes=[self.features[n]["code"] for n in names],
            groups=[self.features[n]["group"] for n in names],
            times=[self.shown.get(k) for k in keys],
            notes=[t for t, _ in notes],
            note_times=[self.shown.get(k) for _, k in notes],
            patient_id=self.patient_id,
            categorical={n: v for n, (_, v) in sorted(self.categorical.items())},
            duplicates=self.duplicates,
            skipped=self.skipped,
            ignored_fields=self.ignored,
        )
        meta.update(self.extra)
        return table, meta


# ----------------------------------------------------------------------------- helpers


def _as_number(value: Any) -> float | None:
    """A finite-or-NaN float from a number or numeric string, else None (bools are not numbers)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        try:
            return float(value)
        except OverflowError:  # an integer beyond float range
            return math.inf if value > 0 else -math.inf
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None


def _check_f32(path: Path, value: float, where: str) -> None:
    if abs(value) > _F32_MAX:
        raise InputError(path, f"{where}: {value!r} is outside the float32 range")


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.strip().lower() in _MISSING


def _number(path: Path, value: Any, where: str) -> float:
    """Number or numeric string -> float; missing -> NaN; anything else -> InputError naming ``where``."""
    if _is_missing(value):
        return math.nan
    number = _as_number(value)
    if number is None:
        raise InputError(path, f"{where}: expected a number, got {value!r}")
    if math.isinf(number):
        raise InputError(path, f"{where}: expected a finite number, got {value!r}")
    return number


def _parse_iso(path: Path, text: str, where: str) -> float:
    """ISO 8601 date/time -> POSIX seconds (naive times taken as UTC)."""
    s = text.strip()
    if _PARTIAL_DATE.match(s):
        s = (s + "-01-01")[:10] if len(s) == 4 else s + "-01"
    try:
        t = dt.datetime.fromisoformat(s.replace("Z", "+00:00") if s.endswith("Z") else s)
        if t.tzinfo is None:
            t = t.replace(tzinfo=dt.timezone.utc)
        return t.timestamp()
    except (ValueError, OverflowError):
        raise InputError(path, f"{where}: expected an ISO 8601 time (e.g. 2024-03-01T08:00:00), got {text!r}") from None


def _split_unit(header: str) -> tuple[str, str | None]:
    m = _NAME_UNIT.match(header)
    if m and m.group(1).strip():
        return m.group(1).strip(), (m.group(2).strip() or None)
    return header.strip(), None


def _load_json(path: str | os.PathLike) -> tuple[Path, Any]:
    p = base.check_file(path, max_bytes=base.MAX_TEXT_BYTES)
    text = base.guard(p, lambda: p.read_bytes().decode("utf-8-sig"), "cannot decode as UTF-8 text")
    try:
        return p, json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(p, f"invalid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except ValueError as exc:  # e.g. an integer literal beyond Python's digit limit
        raise InputError(p, f"invalid JSON: {exc}"[:300]) from None
    except RecursionError:
        raise InputError(p, "invalid JSON: nested too deeply") from None


# ----------------------------------------------------------------------------- EHR JSON


def read_ehr_json(path: str | os.PathLike) -> base.ReadResult:
    """Read medmllm's EHR JSON (see the module docstring) -> ``((T, F) float32, meta)``."""
    p, doc = _load_json(path)
    return parse_ehr_json(doc, p)


def parse_ehr_json(doc: Any, where: str | os.PathLike = "<inline ehr>") -> base.ReadResult:
    """Same as :func:`read_ehr_json` for an already-parsed object (e.g. a record's inline ``data``);
    ``where`` names it in errors."""
    p = Path(where)
    if not isinstance(doc, dict):
        raise InputError(p, f"expected a JSON object at the top level, got {type(doc).__name__}")
    tab = _Table(p, "ehr_json")
    tab.set_patient(doc.get("patient_id"), "patient_id")
    demographics = doc.get("demographics")
    _snapshot(tab, {k: v for k, v in doc.items() if k not in ("encounters", "demographics")}, "")
    if demographics is not None:
        _demographics(tab, demographics, "demographics", None)
    encounters = doc.get("encounters")
    if encounters is not None:
        if not isinstance(encounters, list):
            raise InputError(p, f"encounters: expected a list of snapshots, got {type(encounters).__name__}")
        for i, enc in enumerate(encounters):
            if not isinstance(enc, dict):
                raise InputError(p, f"encounters[{i}]: expected an object, got {type(enc).__name__}")
            _snapshot(tab, enc, f"encounters[{i}].")
    return tab.build()


def _snapshot(tab: _Table, snap: dict, prefix: str) -> None:
    """One time point: vitals, labs, notes (and demographics inside encounters)."""
    tab.set_patient(snap.get("patient_id"), f"{prefix}patient_id")
    tkey = tab.time_key(snap.get("time"), f"{prefix}time")
    for group in ("vitals", "labs"):
        block = snap.get(group)
        if block is None:
            continue
        if not isinstance(block, dict):
            raise InputError(tab.path, f"{prefix}{group}: expected an object of name -> value, got {type(block).__name__}")
        for name, item in block.items():
            _measurement(tab, str(name), item, tkey, group, f"{prefix}{group}.{name}")
    if prefix and snap.get("demographics") is not None:
        _demographics(tab, snap["demographics"], f"{prefix}demographics", tkey)
    for text in _json_notes(tab.path, snap, prefix):
        tab.add_note(text, tkey)
    tab.ignored.extend(f"{prefix}{k}" for k in snap if k not in _SNAPSHOT_KEYS)


def _unpack(tab: _Table, item: Any, where: str) -> tuple[Any, str | None, str | None]:
    """(value, unit, code) of a measurement written as a scalar or as {"value", "unit", "code"}."""
    if not isinstance(item, dict):
        return item, None, None
    unknown = sorted(set(item) - {"value", "unit", "code", "loinc"})
    tab.ignored.extend(f"{where}.{k}" for k in unknown)
    unit, code = item.get("unit"), item.get("code", item.get("loinc"))
    for key, v in (("unit", unit), ("code", code)):
        if v is not None and not isinstance(v, str):
            raise InputError(tab.path, f"{where}.{key}: expected a string, got {v!r}")
    return item.get("value"), unit or None, code or None


def _measurement(tab: _Table, name: str, item: Any, tkey: tuple, group: str, where: str) -> None:
    value, unit, code = _unpack(tab, item, where)
    if isinstance(value, (dict, list)):
        raise InputError(tab.path, f"{where}: expected a number, got {type(value).__name__}")
    tab.add(name, _number(tab.path, value, where), tkey, unit, code, group, where)


def _demographics(tab: _Table, demo: Any, where: str, tkey: tuple | None) -> None:
    """Numbers -> features (every row if patient-level, else that row); other values -> categorical."""
    if not isinstance(demo, dict):
        raise InputError(tab.path, f"{where}: expected an object, got {type(demo).__name__}")
    for name, item in demo.items():
        value, unit, _ = _unpack(tab, item, f"{where}.{name}")
        if _is_missing(value):
            continue
        number = _as_number(value)
        if number is not None:
            _check_f32(tab.path, number if math.isfinite(number) else math.inf, f"{where}.{name}")
            if tkey is None:
                tab.add_static(str(name), number, unit, "demographics", f"{where}.{name}")
            else:
                tab.add(str(name), number, tkey, unit, None, "demographics", f"{where}.{name}")
        elif isinstance(value, (str, bool, int, float)):
            tab.add_categorical(str(name), value, tkey or (0,))
        else:
            raise InputError(tab.path, f"{where}.{name}: expected a number or a string, got {type(value).__name__}")


def _json_notes(path: Path, snap: dict, prefix: str) -> list[str]:
    out: list[str] = []
    for key in ("note", "notes"):
        value = snap.get(key)
        if value is None:
            continue
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(t, str) for t in items):
            raise InputError(path, f"{prefix}{key}: expected a string or a list of strings")
        out.extend(items)
    return out


# ----------------------------------------------------------------------------- EHR CSV


def read_ehr_csv(path: str | os.PathLike) -> base.ReadResult:
    """Read an EHR CSV in long or wide format (see the module docstring) -> ``((T, F) float32, meta)``."""
    p = base.check_file(path, max_bytes=base.MAX_TEXT_BYTES)
    header, rows = _csv_rows(p)
    lower = [h.lower() for h in header]
    tab = _Table(p, "ehr_csv")
    if "name" in lower and "value" in lower:
        _long(tab, lower, header, rows)
    else:
        _wide(tab, header, rows)
    return tab.build()


def _csv_rows(p: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """(header cells, [(line number, cells padded to the header width)]); '#' lines are comments."""
    text = base.guard(p, lambda: p.read_bytes().decode("utf-8-sig"), "cannot decode as UTF-8 text")
    reader = csv.reader(io.StringIO(text), delimiter="\t" if p.suffix.lower() == ".tsv" else ",")
    header: list[str] | None = None
    rows: list[tuple[int, list[str]]] = []
    try:
        for cells in reader:
            if not cells or all(not c.strip() for c in cells) or cells[0].lstrip().startswith("#"):
                continue
            if header is None:
                header = [c.strip() for c in cells]
                continue
            if len(cells) > len(header):
                raise InputError(p, f"line {reader.line_num}: {len(cells)} cells, but the header has {len(header)}")
            rows.append((reader.line_num, [c.strip() for c in cells] + [""] * (len(header) - len(cells))))
    except csv.Error as exc:
        raise InputError(p, f"line {reader.line_num}: malformed CSV: {exc}") from None
    if header is None:
        raise InputError(p, "no header row")
    dupes = sorted({h for h in header if header.count(h) > 1})
    if dupes or any(not h for h in header):
        raise InputError(p, f"header has duplicate or empty column names: {header}")
    return header, rows


def _typed_cells(tab: _Table, cells: Iterable[tuple[int, str]], column: str) -> tuple[list, bool]:
    """([(line, float or str)] of the present cells, all_text); mixed numbers and text -> InputError.

    ``column`` names the cells in errors, e.g. ``column 'hr'``."""
    present = [(line, c) for line, c in cells if not _is_missing(c)]
    numbers = [(line, _as_number(c)) for line, c in present]
    texts = [(line, c) for (line, c), (_, n) in zip(present, numbers) if n is None]
    if texts and len(texts) < len(present):
        line, c = texts[0]
        raise InputError(tab.path, f"line {line}, {column}: expected a number, got {c!r}")
    if texts:
        return texts, True
    for line, n in numbers:
        if math.isinf(n):
            raise InputError(tab.path, f"line {line}, {column}: expected a finite number, got {n}")
    return numbers, False


def _long(tab: _Table, lower: list[str], header: list[str], rows: list[tuple[int, list[str]]]) -> None:
    idx = {h: i for i, h in enumerate(lower)}
    get = lambda cells, key: cells[idx[key]] if key in idx else ""  # noqa: E731
    code_key = "code" if "code" in idx else "loinc"
    known = {"name", "value", "unit", "time", "code", "loinc", "group", "patient_id"}
    tab.ignored.extend(h for h, lo in zip(header, lower) if lo not in known)
    by_name: dict[str, list[tuple[int, list[str]]]] = {}
    for line, cells in rows:
        name = get(cells, "name")
        if not name:
            raise InputError(tab.path, f"line {line}, column 'name': empty measurement name")
        tab.set_patient(get(cells, "patient_id"), f"line {line}, column 'patient_id'")
        by_name.setdefault(name, []).append((line, cells))
    for name, items in by_name.items():
        tkeys = {line: tab.time_key(get(c, "time") or None, f"line {line}, column 'time'") for line, c in items}
        if name.lower() in _NOTE_COLUMNS:
            for line, cells in items:
                tab.add_note(get(cells, "value"), tkeys[line])
            continue
        values, is_text = _typed_cells(tab, [(line, get(c, "value")) for line, c in items], f"column 'value' ({name})")
        if is_text:
            for line, text in values:
                tab.add_categorical(name, text, tkeys[line])
            continue
        present = dict(values)
        for line, cells in items:
            where = f"line {line}, column 'unit'"
            tab.add(name, present.get(line, math.nan), tkeys[line], get(cells, "unit") or None,
                    get(cells, code_key) or None, get(cells, "group") or None, where)


def _wide(tab: _Table, header: list[str], rows: list[tuple[int, list[str]]]) -> None:
    lower = [h.lower() for h in header]
    t_col = next((lower.index(c) for c in _TIME_COLUMNS if c in lower), None)
    if t_col is None and len(rows) > 1:
        raise InputError(tab.path, f"{len(rows)} rows but no time column ({'/'.join(_TIME_COLUMNS)}): rows cannot be ordered")
    tkeys = [(0,)] * len(rows)
    if t_col is not None:
        tkeys = [tab.time_key(cells[t_col], f"line {line}, column {header[t_col]!r}") for line, cells in rows]
    for j, column in enumerate(header):
        cells = [(line, c[j]) for line, c in rows]
        if j == t_col:
            continue
        if lower[j] == "patient_id":
            for line, c in cells:
                tab.set_patient(c, f"line {line}, column 'patient_id'")
        elif lower[j] in _NOTE_COLUMNS:
            for (line, c), k in zip(cells, tkeys):
                tab.add_note(c, k)
        else:
            _wide_column(tab, column, cells, tkeys)


def _wide_column(tab: _Table, column: str, cells: list[tuple[int, str]], tkeys: list[tuple]) -> None:
    name, unit = _split_unit(column)
    values, is_text = _typed_cells(tab, cells, f"column {column!r}")
    key_of = {line: k for (line, _), k in zip(cells, tkeys)}
    if is_text:
        for line, text in values:
            tab.add_categorical(name, text, key_of[line])
        return
    tab.feature(name, unit, None, None, f"column {column!r}")
    for line, v in values:
        tab.add(name, v, key_of[line], where=f"line {line}, column {column!r}")


# ----------------------------------------------------------------------------- FHIR


class _EntryError(Exception):
    """A malformed Bundle entry: ``field`` is the JSON path inside the entry."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")


def read_fhir_bundle(path: str | os.PathLike) -> base.ReadResult:
    """Read a FHIR R4 Bundle of Observations (see the module docstring) -> ``((T, F) float32, meta)``."""
    p, doc = _load_json(path)
    if not isinstance(doc, dict):
        raise InputError(p, f"expected a FHIR Bundle object, got a JSON {type(doc).__name__}")
    if doc.get("resourceType") != "Bundle":
        raise InputError(p, f"resourceType: expected 'Bundle', got {doc.get('resourceType')!r}")
    entries = doc.get("entry", [])
    if not isinstance(entries, list):
        raise InputError(p, f"entry: expected a list, got {type(entries).__name__}")
    if not entries:
        raise InputError(p, "Bundle has no entries")
    tab = _Table(p, "fhir")
    ignored: dict[str, int] = {}
    for i, entry in enumerate(entries):
        where = f"entry[{i}]"
        try:
            _fhir_entry(tab, entry, where, ignored)
        except (_EntryError, InputError) as exc:
            reason = exc.reason if isinstance(exc, InputError) else str(exc)
            tab.skipped.append({"entry": i, "reason": reason})
    if len(tab.skipped) == len(entries):
        first = "; ".join(s["reason"] for s in tab.skipped[:3])
        raise InputError(p, f"no usable entry in the Bundle ({len(entries)} skipped): {first}")
    tab.extra["ignored_resources"] = dict(sorted(ignored.items()))
    return tab.build()


def _fhir_entry(tab: _Table, entry: Any, where: str, ignored: dict[str, int]) -> None:
    if not isinstance(entry, dict) or not isinstance(entry.get("resource"), dict):
        raise _EntryError(f"{where}.resource", "missing or not an object")
    res = entry["resource"]
    rtype = res.get("resourceType")
    where = f"{where}.resource"
    if rtype == "Observation":
        ops = _fhir_observation(tab, res, where)
    elif rtype == "Patient":
        ops = _fhir_patient(res, where)
    elif rtype == "DocumentReference":
        ops = _fhir_document(tab, res, where)
    elif isinstance(rtype, str) and rtype:
        ignored[rtype] = ignored.get(rtype, 0) + 1
        return
    else:
        raise _EntryError(f"{where}.resourceType", f"expected a resource type string, got {rtype!r}")
    _apply(tab, ops, where)


def _apply(tab: _Table, ops: list[tuple], where: str) -> None:
    """Validate every unit first so an entry is applied whole or not at all."""
    for op in ops:
        if op[0] == "value":
            _, name, _, _, unit, _, field = op
            known = tab.features.get(name, {}).get("unit")
            if unit and known not in (None, unit):
                raise _EntryError(field, f"unit {unit!r} differs from {known!r} used earlier for {name!r}")
    for op in ops:
        kind = op[0]
        if kind == "value":
            _, name, value, tkey, unit, code, field = op
            tab.add(name, value, tkey, unit, code, None, field)
        elif kind == "cat":
            tab.add_categorical(op[1], op[2], op[3])
        elif kind == "note":
            tab.add_note(op[1], op[2])
        elif kind == "patient":
            tab.set_patient(op[1], f"{where}.id")


def _fhir_name(code: Any, field: str) -> tuple[str, str | None]:
    """(display name, LOINC code or None) of a CodeableConcept."""
    if not isinstance(code, dict):
        raise _EntryError(field, "missing or not a CodeableConcept object")
    codings = code.get("coding") or []
    if not isinstance(codings, list) or not all(isinstance(c, dict) for c in codings):
        raise _EntryError(f"{field}.coding", "expected a list of Coding objects")
    first = codings[0] if codings else {}
    name = first.get("display") or code.get("text") or first.get("code")
    if not isinstance(name, str) or not name.strip():
        raise _EntryError(field, "no coding[0].display, text or coding[0].code to name the measurement")
    loinc = next((c.get("code") for c in codings if c.get("system") == _LOINC and c.get("code")), None)
    return name.strip(), (str(loinc) if loinc is not None else None)


def _fhir_value(res: dict, field: str) -> tuple[str, Any, str | None] | None:
    """("num", value, unit) / ("cat", value, None) / None when the element holds no value."""
    if "valueQuantity" in res:
        q = res["valueQuantity"]
        if not isinstance(q, dict):
            raise _EntryError(f"{field}.valueQuantity", "expected an object")
        value = q.get("value")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not abs(value) <= _F32_MAX:
            raise _EntryError(f"{field}.valueQuantity.value", f"expected a finite float32 number, got {value!r}")
        unit = q.get("unit") or q.get("code")
        return "num", float(value), (str(unit) if unit is not None else None)
    if "valueInteger" in res:
        value = res["valueInteger"]
        if isinstance(value, bool) or not isinstance(value, int) or not abs(value) <= _F32_MAX:
            raise _EntryError(f"{field}.valueInteger", f"expected an integer, got {value!r}")
        return "num", float(value), None
    if "valueString" in res:
        return "cat", str(res["valueString"]), None
    if "valueBoolean" in res:
        return "cat", res["valueBoolean"], None
    if "valueCodeableConcept" in res:
        concept = res["valueCodeableConcept"]
        return "cat", _fhir_name(concept, f"{field}.valueCodeableConcept")[0], None
    return None


def _fhir_time(tab: _Table, res: dict, where: str) -> tuple:
    for key in ("effectiveDateTime", "effectiveInstant"):
        if res.get(key) is not None:
            return _entry_time(tab, res[key], f"{where}.{key}")
    period = res.get("effectivePeriod")
    if isinstance(period, dict) and period.get("start") is not None:
        return _entry_time(tab, period["start"], f"{where}.effectivePeriod.start")
    return (0,)


def _entry_time(tab: _Table, raw: Any, field: str) -> tuple:
    try:
        return tab.time_key(raw, field, dates_only=True)
    except InputError as exc:
        raise _EntryError(field, exc.reason.split(": ", 1)[-1]) from None


def _fhir_observation(tab: _Table, res: dict, where: str) -> list[tuple]:
    if res.get("status") == "entered-in-error":
        raise _EntryError(f"{where}.status", "Observation marked entered-in-error")
    name, loinc = _fhir_name(res.get("code"), f"{where}.code")
    tkey = _fhir_time(tab, res, where)
    ops: list[tuple] = []
    value = _fhir_value(res, where)
    components = res.get("component") or []
    if not isinstance(components, list):
        raise _EntryError(f"{where}.component", "expected a list")
    if value is not None:
        ops.append(_value_op(value, name, tkey, loinc, where))
    elif not components:
        ops.append(("value", name, math.nan, tkey, None, loinc, where))  # listed, but missing
    for j, comp in enumerate(components):
        field = f"{where}.component[{j}]"
        if not isinstance(comp, dict):
            raise _EntryError(field, "expected an object")
        c_name, c_loinc = _fhir_name(comp.get("code"), f"{field}.code")
        c_value = _fhir_value(comp, field)
        if c_value is None:
            ops.append(("value", c_name, math.nan, tkey, None, c_loinc, field))
        else:
            ops.append(_value_op(c_value, c_name, tkey, c_loinc, field))
    for j, note in enumerate(res.get("note") or []):
        if not isinstance(note, dict) or not isinstance(note.get("text"), str):
            raise _EntryError(f"{where}.note[{j}].text", "expected a string")
        ops.append(("note", note["text"], tkey))
    return ops


def _value_op(value: tuple, name: str, tkey: tuple, loinc: str | None, field: str) -> tuple:
    kind, v, unit = value
    if kind == "num":
        return ("value", name, v, tkey, unit, loinc, field)
    return ("cat", name, v, tkey)


def _fhir_patient(res: dict, where: str) -> list[tuple]:
    ops: list[tuple] = []
    pid = res.get("id")
    if pid is None:
        ids = res.get("identifier") or []
        pid = ids[0].get("value") if isinstance(ids, list) and ids and isinstance(ids[0], dict) else None
    if pid is not None:
        if not isinstance(pid, (str, int)) or isinstance(pid, bool):
            raise _EntryError(f"{where}.id", f"expected a string, got {pid!r}")
        ops.append(("patient", str(pid)))
    if isinstance(res.get("gender"), str):
        ops.append(("cat", "sex", res["gender"], (0,)))
    if isinstance(res.get("birthDate"), str):
        ops.append(("cat", "birth_date", res["birthDate"], (0,)))
    return ops


def _fhir_document(tab: _Table, res: dict, where: str) -> list[tuple]:
    tkey = _entry_time(tab, res["date"], f"{where}.date") if res.get("date") is not None else (0,)
    contents = res.get("content") or []
    if not isinstance(contents, list):
        raise _EntryError(f"{where}.content", "expected a list")
    texts = [t for j, c in enumerate(contents) if (t := _attachment_text(c, f"{where}.content[{j}]"))]
    if not texts and isinstance(res.get("description"), str):
        texts = [res["description"]]
    if not texts:
        raise _EntryError(f"{where}.content", "no text/plain attachment data, title or description")
    return [("note", t, tkey) for t in texts]


def _attachment_text(content: Any, field: str) -> str | None:
    att = content.get("attachment") if isinstance(content, dict) else None
    if not isinstance(att, dict):
        raise _EntryError(f"{field}.attachment", "missing or not an object")
    ctype = str(att.get("contentType") or "text/plain").lower()
    data = att.get("data")
    if data is not None and ctype.startswith("text/"):
        if not isinstance(data, str):
            raise _EntryError(f"{field}.attachment.data", "expected a base64 string")
        try:
            return base64.b64decode(data, validate=True).decode("utf-8")
        except (binascii.Error, ValueError) as exc:
            raise _EntryError(f"{field}.attachment.data", f"not base64-encoded UTF-8 text ({exc})") from None
    title = att.get("title")
    return title if isinstance(title, str) and title.strip() else None

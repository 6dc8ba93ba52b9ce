"""Physiological waveforms (ECG, EEG, ...): WFDB records and plain CSV.

Both readers return ``(signal, meta)`` with ``signal`` a ``(leads, samples)`` float32
array in physical units (e.g. mV) and ``meta`` holding ``format``, ``path``,
``kind="signal"``, ``fs`` (Hz), ``lead_names``, ``units`` (per lead, None if unknown),
``n_samples``, ``duration_s`` (``n_samples / fs``) and ``comments``.

``read_wfdb(path)``
    ``path`` is the record's ``.hea``, its ``.dat`` or the record name without suffix.
    The header is parsed first; ``n_sig * sig_len`` is checked against
    ``base.MAX_SIGNAL_SAMPLES`` and each data file's size against the bytes the header
    implies (format 8/80: 1 byte per sample, 16/61/160: 2, 212: 1.5, 310/311: 4/3,
    24: 3, 32: 4; signals sharing a file are interleaved), so a short file fails before
    any sample is read. Single-segment records only. Extra meta: ``record_name``,
    ``base_time``/``base_date`` (strings or None), ``storage_fmt`` (per lead). ``comments``
    are the header's comment lines (e.g. rhythm labels).

``read_signal_csv(path, *, fs=None)``
    A header row whose first column is ``time`` / ``t`` / ``time_s`` / ``seconds``
    (seconds) or ``sample`` (0, 1, 2, ... then ``fs`` comes from a ``# fs=500`` comment
    line or the ``fs`` option); every other column is a lead, optionally with its unit
    as ``II [mV]`` or ``II (mV)``. With a time column, ``fs = 1 / median step`` and
    every step must be within 1% of the median. Lines starting with ``#`` are
    comments (kept in ``meta["comments"]``); empty lead cells are NaN (missing);
    a non-numeric cell raises InputError naming its line and column. ``.tsv`` files
    are tab-separated. Extra meta: ``t0`` (seconds of the first sample).
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from medmllm.errors import InputError
from medmllm.data.readers import base

# bits per stored sample for each WFDB format (FLAC formats 508/516/524 are compressed)
_FMT_BITS = {"8": 8, "16": 16, "61": 16, "80": 8, "160": 16, "212": 12, "310": 32 / 3, "311": 32 / 3,
             "24": 24, "32": 32}
_FMT_COMPRESSED = {"508", "516", "524"}

_TIME_COLUMNS = {"time", "t", "time_s", "seconds"}
_SAMPLE_COLUMNS = {"sample"}
_FS_COMMENT = re.compile(r"^\s*fs\s*[=:]\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(?:hz)?\s*$", re.IGNORECASE)
_NAME_UNIT = re.compile(r"^(.*?)\s*[\[(]([^\])]*)[\])]\s*$")
_UNIFORM_TOL = 0.01  # relative tolerance on time steps


# ----------------------------------------------------------------------------- WFDB


def read_wfdb(path: str | os.PathLike) -> base.ReadResult:
    """Read a single-segment WFDB record -> ``((leads, samples) float32, meta)``."""
    import wfdb

    record_base, hea = _record_paths(path)
    header = base.guard(hea, lambda: wfdb.rdheader(str(record_base)), "cannot parse WFDB header")
    if not isinstance(header, wfdb.Record):
        raise InputError(hea, "multi-segment WFDB records are not supported; read each segment's .hea")
    n_sig = int(header.n_sig or 0)
    if n_sig <= 0:
        raise InputError(hea, "header declares no signals")
    fs = _check_fs(hea, header.fs)
    spf = [int(s or 1) for s in (header.samps_per_frame or [1] * n_sig)]
    sig_len = header.sig_len if header.sig_len else _infer_sig_len(hea, header, spf)
    base.check_elements(hea, (n_sig, int(sig_len) * max(spf)), base.MAX_SIGNAL_SAMPLES, "samples")
    _check_dat_sizes(hea, header, int(sig_len), spf)

    record = base.guard(hea, lambda: wfdb.rdrecord(str(record_base), physical=True), "cannot read WFDB samples")
    p_signal = record.p_signal  # (samples, leads) float64
    if p_signal is None or p_signal.ndim != 2 or p_signal.shape[1] != n_sig:
        raise InputError(hea, f"expected a (samples, {n_sig}) signal, got {getattr(p_signal, 'shape', None)}")
    signal = np.ascontiguousarray(p_signal.T, dtype=np.float32)  # (leads, samples)
    return signal, _wfdb_meta(hea, header, fs, signal.shape[1])


def _record_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """(record base without suffix, existing .hea path) for a .hea, .dat or bare record name."""
    p = Path(path)
    if p.suffix.lower() in (".hea", ".dat"):
        record_base = p.with_suffix("")
    else:
        record_base = p
    hea = record_base.with_name(record_base.name + ".hea")
    if not hea.exists():
        raise InputError(p, f"WFDB header {hea.name} not found next to {p.name}")
    return record_base, base.check_file(hea, max_bytes=base.MAX_TEXT_BYTES)


def _check_fs(hea: Path, fs: Any) -> float:
    try:
        fs = float(fs)
    except (TypeError, ValueError):
        raise InputError(hea, f"sampling frequency {fs!r} is not a number") from None
    if not (math.isfinite(fs) and fs > 0):
        raise InputError(hea, f"sampling frequency must be a positive number, got {fs}")
    return fs


def _data_files(hea: Path, header: Any) -> dict[str, list[int]]:
    """Data file name -> indices of the signals stored in it (names must be plain file names)."""
    files: dict[str, list[int]] = {}
    for i, name in enumerate(header.file_name or []):
        name = str(name)
        if not name or name in (".", "..", "~") or os.path.basename(name) != name:
            raise InputError(hea, f"signal {i}: data file name {name!r} must be a plain file name in the record's folder")
        files.setdefault(name, []).append(i)
    return files


def _bits(hea: Path, fmt: Any, i: int) -> float | None:
    fmt = str(fmt)
    if fmt in _FMT_COMPRESSED:
        return None
    if fmt not in _FMT_BITS:
        raise InputError(hea, f"signal {i}: unsupported WFDB storage format {fmt!r}")
    return _FMT_BITS[fmt]


def _file_layout(hea: Path, header: Any, spf: list[int], name: str, idx: list[int]) -> tuple[Path, int, float | None]:
    """(data path, byte offset, bits per frame or None if compressed) of one data file."""
    data = hea.parent / name
    if not data.exists():
        raise InputError(hea, f"data file {name} is missing (named in the header)")
    offsets = header.byte_offset or [None] * len(spf)
    offset = int(offsets[idx[0]] or 0)
    bits = [_bits(hea, header.fmt[i], i) for i in idx]
    if any(b is None for b in bits):
        return data, offset, None
    return data, offset, float(sum(b * spf[i] for b, i in zip(bits, idx)))


def _infer_sig_len(hea: Path, header: Any, spf: list[int]) -> int:
    """Signal length from the first data file's size when the header omits it."""
    files = _data_files(hea, header)
    if not files:
        raise InputError(hea, "header gives neither a signal length nor a data file")
    name, idx = next(iter(files.items()))
    data, offset, frame_bits = _file_layout(hea, header, spf, name, idx)
    if frame_bits is None:
        raise InputError(hea, "header omits the signal length and the data is compressed")
    n = int((data.stat().st_size - offset) * 8 // frame_bits)
    if n <= 0:
        raise InputError(hea, f"data file {name} holds no complete sample frame")
    return n


def _check_dat_sizes(hea: Path, header: Any, sig_len: int, spf: list[int]) -> None:
    for name, idx in _data_files(hea, header).items():
        data, offset, frame_bits = _file_layout(hea, header, spf, name, idx)
        if frame_bits is None:
            continue  # compressed: decoder errors are guarded
        expected = offset + math.ceil(sig_len * frame_bits / 8)
        actual = data.stat().st_size
        if actual < expected:
            raise InputError(
                data,
                f"truncated data: expected {expected} bytes for {sig_len} samples x {len(idx)} signal(s) "
                f"(format {header.fmt[idx[0]]}), found {actual}",
            )


def _wfdb_meta(hea: Path, header: Any, fs: float, n_samples: int) -> dict:
    n_sig = int(header.n_sig)
    names = [str(n) for n in (header.sig_name or [f"sig{i}" for i in range(n_sig)])]
    units = [str(u) if u else None for u in (header.units or [None] * n_sig)]
    return base.base_meta(
        hea,
        "wfdb",
        "signal",
        record_name=str(header.record_name),
        fs=fs,
        lead_names=names,
        units=units,
        storage_fmt=[str(f) for f in header.fmt],
        n_samples=int(n_samples),
        duration_s=n_samples / fs,
        comments=[str(c) for c in (header.comments or [])],
        base_time=str(header.base_time) if header.base_time is not None else None,
        base_date=str(header.base_date) if header.base_date is not None else None,
    )


# ----------------------------------------------------------------------------- CSV


def read_signal_csv(path: str | os.PathLike, *, fs: float | None = None) -> base.ReadResult:
    """Read a time/sample-indexed CSV -> ``((leads, samples) float32, meta)``."""
    p = base.check_file(path, max_bytes=base.MAX_TEXT_BYTES)
    comments, header, rows = _parse_csv(p)
    index_col, leads, units = _columns(p, header)
    base.check_elements(p, (len(leads), max(len(rows), 1)), base.MAX_SIGNAL_SAMPLES, "samples")
    if not rows:
        raise InputError(p, "no data rows after the header")
    table = _to_float(p, header, rows)  # (samples, 1 + leads) float64
    first = table[:, 0]
    if index_col in _TIME_COLUMNS:
        fs_out = _fs_from_time(p, first, rows, fs)
        t0 = float(first[0])
    else:
        fs_out = _fs_for_samples(p, first, rows, fs, comments)
        t0 = float(first[0]) / fs_out
    signal = np.ascontiguousarray(table[:, 1:].T, dtype=np.float32)  # (leads, samples)
    n = signal.shape[1]
    meta = base.base_meta(p, "signal_csv", "signal", fs=fs_out, lead_names=leads, units=units, n_samples=n,
                          duration_s=n / fs_out, comments=comments, t0=t0)
    return signal, meta


def _parse_csv(p: Path) -> tuple[list[str], list[str], list[tuple[int, list[str]]]]:
    """(comment texts, header cells, [(line number, cells)]) with blank lines skipped."""
    text = base.guard(p, lambda: p.read_bytes().decode("utf-8-sig"), "cannot decode as UTF-8 text")
    delimiter = "\t" if p.suffix.lower() == ".tsv" else ","
    comments: list[str] = []
    header: list[str] | None = None
    rows: list[tuple[int, list[str]]] = []
    reader = csv.reader(io.StringIO(text), delimiter=delimiter)
    try:
        for cells in reader:
            line = reader.line_num
            if not cells or all(not c.strip() for c in cells):
                continue
            if cells[0].lstrip().startswith("#"):
                comments.append(delimiter.join(cells).lstrip()[1:].strip())
            elif header is None:
                header = [c.strip() for c in cells]
            else:
                rows.append((line, [c.strip() for c in cells]))
    except csv.Error as exc:
        raise InputError(p, f"line {reader.line_num}: malformed CSV: {exc}") from exc
    if header is None:
        raise InputError(p, "no header row (expected e.g. 'time,I,II')")
    return comments, header, rows


def _columns(p: Path, header: list[str]) -> tuple[str, list[str], list[str | None]]:
    """(index column kind, lead names, lead units) from the header row."""
    first = header[0].lower()
    if first not in _TIME_COLUMNS | _SAMPLE_COLUMNS:
        raise InputError(p, f"first column must be 'time' (seconds) or 'sample', got {header[0]!r}")
    if len(header) < 2:
        raise InputError(p, "no lead columns after the time/sample column")
    names, units = [], []
    for cell in header[1:]:
        m = _NAME_UNIT.match(cell)
        name, unit = (m.group(1).strip(), m.group(2).strip() or None) if m else (cell, None)
        if not name:
            raise InputError(p, f"header has an empty lead name: {header}")
        names.append(name)
        units.append(unit)
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise InputError(p, f"duplicate lead names in header: {dupes}")
    return first, names, units


def _to_float(p: Path, header: list[str], rows: list[tuple[int, list[str]]]) -> np.ndarray:
    """Cells -> (rows, columns) float64; empty lead cells -> NaN; bad cells name line/column."""
    width = len(header)
    for line, cells in rows:
        if len(cells) != width:
            raise InputError(p, f"line {line}: expected {width} cells (as in the header), found {len(cells)}")
    try:
        table = np.array([cells for _, cells in rows], dtype=np.float64)
    except ValueError:
        table = _to_float_slow(p, header, rows)
    bad = ~np.isfinite(table)
    bad[:, 1:] &= ~np.isnan(table[:, 1:])  # NaN leads = missing samples; inf never allowed
    with np.errstate(invalid="ignore"):
        bad[:, 1:] |= np.abs(table[:, 1:]) > np.finfo(np.float32).max  # would become inf as float32
    if bad.any():
        r, c = (int(v) for v in np.argwhere(bad)[0])
        raise InputError(p, f"line {rows[r][0]}, column {header[c]!r}: expected a finite float32 number, got {rows[r][1][c]!r}")
    return table


def _to_float_slow(p: Path, header: list[str], rows: list[tuple[int, list[str]]]) -> np.ndarray:
    table = np.empty((len(rows), len(header)), dtype=np.float64)
    for r, (line, cells) in enumerate(rows):
        for c, cell in enumerate(cells):
            if cell == "" and c > 0:
                table[r, c] = np.nan
                continue
            try:
                table[r, c] = float(cell)
            except ValueError:
                raise InputError(p, f"line {line}, column {header[c]!r}: expected a number, got {cell!r}") from None
    return table


def _fs_from_time(p: Path, t: np.ndarray, rows: list[tuple[int, list[str]]], fs: float | None) -> float:
    """Sampling rate from a time column in seconds: steps uniform within 1% of the median."""
    if len(t) < 2:
        if fs is None:
            raise InputError(p, "a single row cannot give the sampling rate; pass fs=")
        return _positive_fs(p, fs)
    steps = np.diff(t)
    step = float(np.median(steps))
    if not step > 0:
        raise InputError(p, f"time column must increase; median step is {step} s")
    off = np.abs(steps - step) > _UNIFORM_TOL * step
    if off.any():
        i = int(np.argmax(off))
        raise InputError(
            p, f"time steps are not uniform: median {step:g} s, but {float(steps[i]):g} s before line {rows[i + 1][0]}"
        )
    fs_time = 1.0 / step
    if fs is not None and abs(_positive_fs(p, fs) - fs_time) > _UNIFORM_TOL * fs_time:
        raise InputError(p, f"fs={fs} disagrees with the time column ({fs_time:g} Hz)")
    return fs_time


def _fs_for_samples(p: Path, s: np.ndarray, rows, fs: float | None, comments: list[str]) -> float:
    """Sampling rate for a sample-index column: from the fs option or a '# fs=...' comment."""
    declared = [float(m.group(1)) for m in (_FS_COMMENT.match(c) for c in comments) if m]
    if fs is None and not declared:
        raise InputError(p, "a 'sample' column needs the sampling rate: add a '# fs=500' comment line or pass fs=")
    if fs is not None and declared and abs(float(fs) - declared[0]) > _UNIFORM_TOL * declared[0]:
        raise InputError(p, f"fs={fs} disagrees with the file's '# fs={declared[0]:g}' comment")
    fs_out = _positive_fs(p, fs if fs is not None else declared[0])
    steps = np.diff(s)
    if steps.size and not np.all(steps == 1):
        i = int(np.argmax(steps != 1))
        raise InputError(p, f"sample column must count up by 1; found a step of {float(steps[i]):g} before line {rows[i + 1][0]}")
    return fs_out


def _positive_fs(p: Path, fs: Any) -> float:
    try:
        value = float(fs)
    except (TypeError, ValueError):
        raise InputError(p, f"fs must be a number, got {fs!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise InputError(p, f"fs must be a positive number, got {fs!r}")
    return value

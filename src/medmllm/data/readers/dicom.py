"""DICOM readers: one file -> image / frames / ECG, one series folder -> canonical volume.

``read_dicom(path)`` returns

* grayscale: float32 ``(H, W)`` or ``(F, H, W)`` in modality units (Hounsfield for CT)
  after the Modality LUT / Rescale Slope+Intercept; with ``voi`` set, float32 in [0, 1];
* colour (RGB, YBR_*, PALETTE COLOR): ``(H, W, 3)`` or ``(F, H, W, 3)`` RGB, the
  decoder's unsigned integer dtype (uint8 / uint16);
* waveform (ECG) files without pixels: float32 ``(leads, samples)`` in physical units,
  ``meta["kind"] == "signal"``.

``read_dicom_series(folder)`` stacks one series into a ``(D, H, W)`` float32 volume in
the canonical ``("S", "P", "L")`` orientation of :mod:`.orientation`.

Decoding goes through pydicom's pixel handlers (pylibjpeg: JPEG baseline / extended /
lossless, JPEG-LS, JPEG 2000; RLE; deflate). Declared sizes are bounded before any
decoding and every failure is an :class:`~medmllm.errors.InputError` naming the file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from medmllm.data.readers import base
from medmllm.errors import InputError

_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# Elements of which at least one must exist for a preamble-less file to count as DICOM.
_IDENTIFYING_KEYWORDS = ("SOPClassUID", "SOPInstanceUID", "Modality", "StudyInstanceUID", "Rows", "PatientID")
_DUPLICATE_TOL_MM = 1e-3
_NONUNIFORM_REL_TOL = 0.01
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


# --------------------------------------------------------------------------- parsing
def _read_dataset(path: Path, stop_before_pixels: bool = False):
    """Parse ``path`` with pydicom; ``force=True`` only for files without the preamble.

    Ensures ``ds.file_meta.TransferSyntaxUID`` is set (inferred from the encoding for
    files without a File Meta header) so the pixel handlers can decode.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    def parse():
        try:
            return pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
        except InvalidDicomError:
            ds = pydicom.dcmread(path, force=True, stop_before_pixels=stop_before_pixels)
            if not any(kw in ds for kw in _IDENTIFYING_KEYWORDS):
                raise InputError(path, "not a DICOM file: no 'DICM' marker and no standard DICOM elements")
            return ds

    ds = base.guard(path, parse, "cannot parse DICOM")
    base.guard(path, lambda: _ensure_transfer_syntax(ds), "cannot determine the transfer syntax")
    return ds


def _ensure_transfer_syntax(ds) -> None:
    """Fill in a missing Transfer Syntax UID from the encoding the file was read with."""
    from pydicom.dataset import FileMetaDataset
    from pydicom import uid

    meta = getattr(ds, "file_meta", None)
    if meta is not None and meta.get("TransferSyntaxUID"):
        return
    implicit, little = ds.original_encoding
    if implicit:
        ts = uid.ImplicitVRLittleEndian
    else:
        ts = uid.ExplicitVRLittleEndian if little else uid.ExplicitVRBigEndian
    if meta is None:
        ds.file_meta = meta = FileMetaDataset()
    meta.TransferSyntaxUID = ts


def _transfer_syntax(ds):
    return ds.file_meta.TransferSyntaxUID


def _sop_class_name(ds) -> str:
    sop = ds.get("SOPClassUID")
    return str(getattr(sop, "name", sop)) if sop else "unknown"


# --------------------------------------------------------------------------- JSON-safe values
def _first_float(value: Any) -> float | None:
    """First value of a (multi-valued) numeric element as float, or None."""
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        if len(value) == 0:
            return None
        value = value[0]
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _float_list(value: Any) -> list[float] | None:
    if value is None or value == "":
        return None
    try:
        return [float(v) for v in value]
    except (TypeError, ValueError):
        return None


def _str_or_none(value: Any) -> str | None:
    return None if value is None or value == "" else str(value)


# --------------------------------------------------------------------------- functional groups
def _functional_item(ds, sequence: str, frame: int | None):
    """The ``sequence`` item for ``frame`` from the (enhanced) functional groups, or None.

    Per-frame groups win over shared groups; ``frame=None`` looks at shared groups only.
    """
    if frame is not None:
        per_frame = ds.get("PerFrameFunctionalGroupsSequence")
        if per_frame and frame < len(per_frame) and per_frame[frame].get(sequence):
            return per_frame[frame].get(sequence)[0]
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared and shared[0].get(sequence):
        return shared[0].get(sequence)[0]
    return None


def _pixel_spacing(ds) -> list[float] | None:
    """[row, col] spacing in mm from PixelSpacing, ImagerPixelSpacing or Pixel Measures."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        spacing = _float_list(ds.get(keyword))
        if spacing and len(spacing) == 2:
            return spacing
    item = _functional_item(ds, "PixelMeasuresSequence", None)
    spacing = _float_list(item.get("PixelSpacing")) if item is not None else None
    return spacing if spacing and len(spacing) == 2 else None


def _rescale(ds, n_frames: int, frame: int | None) -> tuple[np.ndarray, np.ndarray] | None:
    """Rescale (slope, intercept) per output frame, shape ``(F,)`` each, or None if absent.

    Top-level RescaleSlope/Intercept apply to every frame; otherwise the Pixel Value
    Transformation of the enhanced functional groups (per-frame, then shared).
    """
    if "RescaleSlope" in ds or "RescaleIntercept" in ds:
        slope = _first_float(ds.get("RescaleSlope"))
        intercept = _first_float(ds.get("RescaleIntercept"))
        pairs = [(1.0 if slope is None else slope, 0.0 if intercept is None else intercept)]
    else:
        indices = [frame] if frame is not None else list(range(n_frames))
        items = [_functional_item(ds, "PixelValueTransformationSequence", i) for i in indices]
        if all(item is None for item in items):
            return None
        pairs = []
        for item in items:
            slope = _first_float(item.get("RescaleSlope")) if item is not None else None
            intercept = _first_float(item.get("RescaleIntercept")) if item is not None else None
            pairs.append((1.0 if slope is None else slope, 0.0 if intercept is None else intercept))
    arr = np.asarray(pairs, dtype=np.float64)
    return arr[:, 0], arr[:, 1]


# --------------------------------------------------------------------------- header checks
def _require_int(path: Path, ds, keyword: str) -> int:
    value = ds.get(keyword)
    if value is None or value == "":
        raise InputError(path, f"missing required element {keyword} ({_sop_class_name(ds)})")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise InputError(path, f"element {keyword} is not an integer: {value!r}") from None


def _n_frames(path: Path, ds) -> int:
    value = ds.get("NumberOfFrames")
    if value is None or value == "":
        return 1
    try:
        frames = int(value)
    except (TypeError, ValueError):
        raise InputError(path, f"NumberOfFrames is not an integer: {value!r}") from None
    return frames if frames != 0 else 1  # 0 is a common encoder slip for "single frame"


def _check_pixel_header(path: Path, ds) -> tuple[int, int, int, int]:
    """Validate the Image Pixel module; return ``(frames, rows, cols, samples)``.

    Refuses (InputError) absurd declared sizes before anything is decoded and native
    (uncompressed) Pixel Data shorter than the header declares.
    """
    rows = _require_int(path, ds, "Rows")
    cols = _require_int(path, ds, "Columns")
    samples = int(ds.get("SamplesPerPixel") or 1)
    frames = _n_frames(path, ds)
    base.check_elements(path, (frames, rows, cols, samples), base.MAX_IMAGE_PIXELS, "pixel samples")
    _require_int(path, ds, "BitsAllocated")
    if not _transfer_syntax(ds).is_compressed:
        _check_native_length(path, ds)
    return frames, rows, cols, samples


def _check_native_length(path: Path, ds) -> None:
    from pydicom.pixels.utils import get_expected_length

    expected = base.guard(path, lambda: get_expected_length(ds, "bytes"), "invalid Image Pixel module")
    keyword = next(kw for kw in _PIXEL_KEYWORDS if kw in ds)
    found = len(ds[keyword].value or b"")
    if found < expected:
        raise InputError(path, f"truncated pixel data: expected {expected} bytes, found {found}")


def _check_frame(path: Path, frame: int | None, n_frames: int) -> int | None:
    if frame is None:
        return None
    if isinstance(frame, bool) or not isinstance(frame, (int, np.integer)):
        raise InputError(path, f"frame must be an integer in [0, {n_frames - 1}], got {frame!r}")
    if not 0 <= int(frame) < n_frames:
        raise InputError(path, f"frame {frame} out of range: expected 0 <= frame <= {n_frames - 1}")
    return int(frame)


def _check_voi(path: Path, voi: Any) -> tuple[float, float] | str | None:
    if voi is None or (isinstance(voi, str) and voi == "file"):
        return voi
    if isinstance(voi, str):
        raise InputError(path, f"voi must be None, 'file' or (center, width); got {voi!r}")
    try:
        center, width = (float(v) for v in voi)
    except (TypeError, ValueError):
        raise InputError(path, f"voi must be None, 'file' or (center, width); got {voi!r}") from None
    if not (np.isfinite(center) and np.isfinite(width)) or width < 1:
        raise InputError(path, f"voi window needs a finite center and width >= 1, got ({center}, {width})")
    return center, width


# --------------------------------------------------------------------------- grayscale pipeline
def _modality_values(path: Path, ds, arr: np.ndarray, n_frames: int, frame: int | None) -> np.ndarray:
    """Stored values -> modality values (float32, same shape) via Modality LUT or rescale."""
    if ds.get("ModalityLUTSequence"):
        from pydicom.pixels import apply_modality_lut

        out = base.guard(path, lambda: apply_modality_lut(arr, ds), "cannot apply the Modality LUT")
        return out.astype(np.float32, copy=False)
    out = arr.astype(np.float32)  # the one unavoidable copy: integers -> float32
    rescale = _rescale(ds, n_frames, frame)
    if rescale is None:
        return out
    slopes, intercepts = rescale
    if len(slopes) > 1 and out.ndim == 3:  # per-frame values; out: (F, H, W)
        out *= slopes.astype(np.float32)[:, None, None]
        out += intercepts.astype(np.float32)[:, None, None]
        return out
    if slopes[0] != 1.0:
        out *= np.float32(slopes[0])
    if intercepts[0] != 0.0:
        out += np.float32(intercepts[0])
    return out


def _minmax(x: np.ndarray) -> np.ndarray:
    """Rescale ``x`` in place to [0, 1]; a constant array becomes zeros."""
    lo, hi = float(x.min()), float(x.max())
    if hi > lo:
        x -= np.float32(lo)
        x /= np.float32(hi - lo)
    else:
        x.fill(0.0)
    return x


def _normalise(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """``(x - lo) / (hi - lo)`` as float32 in [0, 1]; ``x`` is a scratch array the caller owns."""
    out = x.astype(np.float32, copy=False)
    out -= np.float32(lo)
    if hi > lo:
        out /= np.float32(hi - lo)
    np.clip(out, 0.0, 1.0, out=out)
    return out


def _file_voi(path: Path, ds, values: np.ndarray) -> tuple[np.ndarray, str]:
    """Apply the file's first VOI LUT or window (pydicom), then rescale its output range to [0, 1]."""
    from pydicom.pixels import apply_voi, apply_voi_lut, apply_windowing

    lut = ds.get("VOILUTSequence")
    if lut and lut[0].get("LUTDescriptor") is not None and lut[0].get("LUTData") is not None:
        first, n_entries = int(lut[0].LUTDescriptor[1]), int(lut[0].LUTDescriptor[0] or 65536)
        entries = base.guard(path, lambda: apply_voi(np.arange(first, first + n_entries), ds), "bad VOI LUT")
        # The LUT indexes integer input values (PS3.3 C.11.2.1.1).
        mapped = base.guard(path, lambda: apply_voi(np.rint(values).astype(np.int64), ds), "bad VOI LUT")
        return _normalise(mapped, float(entries.min()), float(entries.max())), "lut"
    if ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        with np.errstate(over="ignore"):  # the output range is the window's value at -inf and +inf
            lo, hi = base.guard(path, lambda: apply_windowing(np.array([-np.inf, np.inf]), ds), "bad VOI window")
        windowed = base.guard(path, lambda: apply_voi_lut(values, ds, index=0), "bad VOI window")
        return _normalise(windowed, float(lo), float(hi)), "window"
    return _minmax(values), "minmax"


def _linear_window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2.1 LINEAR window onto [0, 1], in place on float32 ``values``.

    y = 0 for x <= c - 0.5 - (w-1)/2; y = 1 for x > c - 0.5 + (w-1)/2;
    else y = (x - (c - 0.5)) / (w - 1) + 0.5.
    """
    if width == 1.0:  # the window degenerates to a threshold at c - 0.5
        return (values > center - 0.5).astype(np.float32)
    values -= np.float32(center - 0.5)
    values /= np.float32(width - 1.0)
    values += np.float32(0.5)
    np.clip(values, 0.0, 1.0, out=values)
    return values


def _grayscale(path: Path, ds, arr: np.ndarray, voi, invert: bool, n_frames: int, frame: int | None):
    """Stored grayscale values -> float32 modality or VOI output; returns (array, voi_applied, inverted)."""
    values = _modality_values(path, ds, arr, n_frames, frame)
    applied = None
    if voi == "file":
        values, applied = _file_voi(path, ds, values)
    elif voi is not None:
        values, applied = _linear_window(values, *voi), "explicit"
    inverted = bool(invert and str(ds.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1")
    if inverted:
        # flip so that higher = brighter: [0, 1] -> 1 - x, modality values -> (min + max) - x
        pivot = np.float32(1.0) if applied else np.float32(float(values.min()) + float(values.max()))
        np.subtract(pivot, values, out=values)
    return values, applied, inverted


# --------------------------------------------------------------------------- meta
def _image_meta(path: Path, ds, frames: int, frame: int | None) -> dict:
    spacing = _pixel_spacing(ds)
    ts = _transfer_syntax(ds)
    return base.base_meta(
        path,
        "dicom",
        "image",
        modality=_str_or_none(ds.get("Modality")),
        photometric=_str_or_none(ds.get("PhotometricInterpretation")),
        rows=int(ds.Rows),
        columns=int(ds.Columns),
        frames=frames,
        frame=frame,
        samples_per_pixel=int(ds.get("SamplesPerPixel") or 1),
        bits_stored=int(ds.BitsStored) if ds.get("BitsStored") is not None else None,
        transfer_syntax=str(getattr(ts, "name", ts)),
        pixel_spacing_mm=spacing,
        spacing=spacing,
        window_center=_first_float(ds.get("WindowCenter")),
        window_width=_first_float(ds.get("WindowWidth")),
        rescale_slope=_first_float(ds.get("RescaleSlope")),
        rescale_intercept=_first_float(ds.get("RescaleIntercept")),
        **_identity_meta(ds),
    )


def _identity_meta(ds) -> dict:
    return {
        "patient_id": _str_or_none(ds.get("PatientID")),
        "study_uid": _str_or_none(ds.get("StudyInstanceUID")),
        "series_uid": _str_or_none(ds.get("SeriesInstanceUID")),
        "sop_uid": _str_or_none(ds.get("SOPInstanceUID")),
        "sop_class": _sop_class_name(ds),
        "body_part": _str_or_none(ds.get("BodyPartExamined")),
    }


# --------------------------------------------------------------------------- waveform
def _read_waveform(path: Path, ds) -> base.ReadResult:
    """First multiplex group of a DICOM waveform -> float32 ``(leads, samples)`` in physical units."""
    group = ds.WaveformSequence[0]
    n_leads = _require_int(path, group, "NumberOfWaveformChannels")
    n_samples = _require_int(path, group, "NumberOfWaveformSamples")
    base.check_elements(path, (n_leads, n_samples), base.MAX_SIGNAL_SAMPLES, "samples")
    bits = _require_int(path, group, "WaveformBitsAllocated")
    expected = n_leads * n_samples * (bits // 8)
    found = len(group.get("WaveformData") or b"")
    if found < expected:
        raise InputError(path, f"truncated waveform data: expected {expected} bytes, found {found}")
    samples = base.guard(path, lambda: ds.waveform_array(0), "cannot decode waveform")  # (samples, leads)
    signal = np.ascontiguousarray(samples.T, dtype=np.float32)  # (leads, samples)
    channels = list(group.get("ChannelDefinitionSequence") or [])
    meta = base.base_meta(
        path,
        "dicom",
        "signal",
        modality=_str_or_none(ds.get("Modality")),
        fs=_first_float(group.get("SamplingFrequency")),
        lead_names=[_code_meaning(ch, "ChannelSourceSequence") for ch in channels],
        units=[_code_value(ch, "ChannelSensitivityUnitsSequence") for ch in channels],
        n_samples=n_samples,
        multiplex_group=_str_or_none(group.get("MultiplexGroupLabel")),
        n_multiplex_groups=len(ds.WaveformSequence),
        **_identity_meta(ds),
    )
    return signal, meta


def _code_meaning(item, sequence: str) -> str | None:
    seq = item.get(sequence)
    return _str_or_none(seq[0].get("CodeMeaning")) if seq else None


def _code_value(item, sequence: str) -> str | None:
    seq = item.get(sequence)
    return _str_or_none(seq[0].get("CodeValue")) if seq else None


# --------------------------------------------------------------------------- public: one file
def read_dicom(
    path: str | os.PathLike,
    *,
    voi: str | tuple[float, float] | None = None,
    invert_monochrome1: bool = True,
    frame: int | None = None,
) -> base.ReadResult:
    """Read one DICOM file -> ``(array, meta)``.

    Grayscale images: float32 ``(H, W)`` / ``(F, H, W)``. ``voi=None`` gives modality
    values (Modality LUT or RescaleSlope/Intercept applied, e.g. HU); ``voi="file"``
    applies the file's first VOI LUT or window and rescales its output range to [0, 1]
    (min-max when the file has none: ``meta["voi_applied"] == "minmax"``);
    ``voi=(center, width)`` is the PS3.3 C.11.2.1.2.1 LINEAR window onto [0, 1].
    MONOCHROME1 is flipped so higher = brighter when ``invert_monochrome1``
    (``1 - x`` on [0, 1] output, ``(min + max) - x`` on modality values).

    Colour (RGB, YBR_* converted to RGB, PALETTE COLOR through its LUT): ``(H, W, 3)``
    / ``(F, H, W, 3)`` unsigned integers; ``voi`` does not apply.

    Waveform files (ECG, no pixels): float32 ``(leads, samples)``, ``meta["kind"] ==
    "signal"``, with ``fs`` (Hz), ``lead_names`` and ``units``.

    ``frame=i`` decodes only frame ``i`` of a multi-frame file. Every failure raises
    InputError naming ``path``.
    """
    p = base.check_file(path)
    voi = _check_voi(p, voi)
    return base.guard(p, lambda: _read_file(p, voi, invert_monochrome1, frame), "cannot read DICOM")


def _read_file(p: Path, voi, invert_monochrome1: bool, frame: int | None) -> base.ReadResult:
    ds = _read_dataset(p)
    if not any(kw in ds for kw in _PIXEL_KEYWORDS):
        if ds.get("WaveformSequence"):
            return _read_waveform(p, ds)
        raise InputError(p, f"no pixel data (SOP class {_sop_class_name(ds)})")
    n_frames, _, _, samples = _check_pixel_header(p, ds)
    index = _check_frame(p, frame, n_frames)
    arr = _decode(p, ds, index if n_frames > 1 else None)
    meta = _image_meta(p, ds, n_frames, index)
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        arr = base.guard(p, lambda: apply_color_lut(arr, ds), "cannot apply the palette colour LUT")
    if photometric == "PALETTE COLOR" or samples > 1:
        meta.update(color_space="RGB", voi_applied=None, inverted=False)
        return arr, meta
    frame_of = index if index is not None else (0 if n_frames == 1 else None)
    arr, applied, inverted = _grayscale(p, ds, arr, voi, invert_monochrome1, n_frames, frame_of)
    meta.update(voi_applied=applied, inverted=inverted)
    return arr, meta


def _decode(path: Path, ds, index: int | None) -> np.ndarray:
    """Decoded pixels: ``(H, W[, 3])`` for one frame (or a single-frame file), else ``(F, H, W[, 3])``.

    Raises InputError carrying every plugin's complaint on one line. Native decoders
    written in Rust (pylibjpeg-rle) raise ``pyo3_runtime.PanicException`` on corrupt
    streams, a BaseException: it is converted too; only interpreter exits pass through.
    """
    from pydicom.pixels import pixel_array

    try:
        return pixel_array(ds, index=index)
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as exc:  # noqa: BLE001 - re-raised typed, with the reason
        detail = " ".join(str(exc).split()) or type(exc).__name__
        ts = _transfer_syntax(ds)
        raise InputError(
            path, f"cannot decode pixel data ({getattr(ts, 'name', ts)}): {type(exc).__name__}: {detail[:500]}"
        ) from exc


# --------------------------------------------------------------------------- public: series
def read_dicom_series(
    path_or_dir: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    series_uid: str | None = None,
) -> base.ReadResult:
    """Read one DICOM series (a folder, or a list of files) -> float32 ``(D, H, W)`` volume.

    Files that are not DICOM images are skipped (``meta["skipped"]``). Slices are
    grouped by SeriesInstanceUID (default: the series with most slices; the others in
    ``meta["other_series"]``), sorted by ImagePositionPatient projected on the slice
    normal, and spaced by the median distance between consecutive positions
    (``meta["nonuniform_spacing"]`` when a gap deviates > 1 %). Values are modality
    values (HU for CT). The volume is reoriented to ``("S", "P", "L")``; ``meta``
    holds ``spacing`` (mm per output axis) and ``affine`` (index -> RAS mm).
    """
    label, files = _series_files(path_or_dir)
    return base.guard(label, lambda: _read_series(label, files, series_uid), "cannot read DICOM series")


def _read_series(label: Path, files: list[Path], series_uid: str | None) -> base.ReadResult:
    headers, skipped = _read_headers(files)
    if not headers:
        raise InputError(label, f"no DICOM image files found ({len(skipped)} other files skipped)")
    uid, chosen, others = _choose_series(label, headers, series_uid)
    geometry = _series_geometry(chosen)
    rows, cols = geometry["shape"]
    base.check_elements(label, (len(chosen), rows, cols), base.MAX_VOLUME_VOXELS, "voxels")
    volume = _load_slices(geometry["files"], rows, cols)  # (k, rows, cols)
    array_ijk = volume.transpose(2, 1, 0)  # (col i, row j, slice k): the axes the DICOM affine maps
    from medmllm.data.readers.orientation import CANONICAL_AXCODES, to_canonical

    canonical, affine, spacing = base.guard(
        label, lambda: to_canonical(array_ijk, _LPS_TO_RAS @ geometry["affine_lps"]), "cannot reorient"
    )
    first = chosen[0][1]
    meta = base.base_meta(
        label,
        "dicom_series",
        "volume",
        spacing=list(spacing),
        affine=affine.tolist(),
        orientation="".join(CANONICAL_AXCODES),
        axcodes=list(CANONICAL_AXCODES),
        n_slices=len(chosen),
        slice_spacing_mm=geometry["slice_spacing"],
        slice_thickness_mm=_first_float(first.get("SliceThickness")),
        nonuniform_spacing=geometry["nonuniform"],
        series_uid=uid,
        series_description=_str_or_none(first.get("SeriesDescription")),
        modality=_str_or_none(first.get("Modality")),
        patient_id=_str_or_none(first.get("PatientID")),
        study_uid=_str_or_none(first.get("StudyInstanceUID")),
        other_series=others,
        skipped=skipped,
    )
    return canonical, meta


def _series_files(path_or_dir) -> tuple[Path, list[Path]]:
    """(label for errors/meta, candidate files): a folder's regular files or the given list."""
    if isinstance(path_or_dir, (str, os.PathLike)):
        folder = Path(path_or_dir)
        if not folder.exists():
            raise InputError(folder, "series folder does not exist")
        if not folder.is_dir():
            raise InputError(folder, "expected a directory (or a list of files) holding one DICOM series")
        files = sorted(f for f in folder.iterdir() if f.is_file())
        if not files:
            raise InputError(folder, "series folder holds no files")
        return folder, files
    files = [Path(f) for f in path_or_dir]
    if not files:
        raise InputError(None, "empty list of DICOM series files")
    label = Path(os.path.commonpath([str(f.absolute()) for f in files]))
    return label, files


def _read_headers(files: list[Path]) -> tuple[list[tuple[Path, Any]], list[dict]]:
    """Headers (no pixels) of the image files; the rest as ``{"path", "reason"}`` records."""
    headers, skipped = [], []
    for f in files:
        try:
            base.check_file(f)
            ds = _read_dataset(f, stop_before_pixels=True)
        except InputError as exc:
            skipped.append({"path": str(f), "reason": exc.reason})
            continue
        if "Rows" not in ds or "Columns" not in ds:
            skipped.append({"path": str(f), "reason": f"not an image ({_sop_class_name(ds)})"})
            continue
        headers.append((f, ds))
    return headers, skipped


def _choose_series(label: Path, headers, series_uid: str | None):
    """Pick ``series_uid`` (or the largest series); return (uid, [(file, ds)], others summary)."""
    groups: dict[str, list] = {}
    for f, ds in headers:
        groups.setdefault(str(ds.get("SeriesInstanceUID") or ""), []).append((f, ds))
    if series_uid is None:
        uid = max(groups, key=lambda u: (len(groups[u]), u))
    elif str(series_uid) in groups:
        uid = str(series_uid)
    else:
        raise InputError(label, f"series {series_uid!r} not found; present: {sorted(groups)}")
    others = [
        {
            "series_uid": u,
            "n_slices": len(items),
            "modality": _str_or_none(items[0][1].get("Modality")),
            "description": _str_or_none(items[0][1].get("SeriesDescription")),
        }
        for u, items in sorted(groups.items())
        if u != uid
    ]
    return uid, groups[uid], others


def _slice_vectors(f: Path, ds) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, int]]:
    """(IOP (6,), IPP (3,), PixelSpacing [row, col] (2,), (rows, cols)) of one slice header."""
    iop = _float_list(ds.get("ImageOrientationPatient"))
    ipp = _float_list(ds.get("ImagePositionPatient"))
    spacing = _pixel_spacing(ds)
    if not iop or len(iop) != 6:
        raise InputError(f, f"missing or invalid ImageOrientationPatient (6 values expected, got {iop})")
    if not ipp or len(ipp) != 3:
        raise InputError(f, f"missing or invalid ImagePositionPatient (3 values expected, got {ipp})")
    if not spacing or min(spacing) <= 0:
        raise InputError(f, f"missing or non-positive PixelSpacing: {spacing}")
    if _n_frames(f, ds) != 1:
        raise InputError(f, "multi-frame file in a slice series: expected one frame per file")
    return np.array(iop), np.array(ipp), np.array(spacing), (int(ds.Rows), int(ds.Columns))


def _series_geometry(chosen) -> dict:
    """Sort slices along the normal; derive spacing and the LPS index->world affine.

    Returns ``files`` (sorted), ``shape`` (rows, cols), ``slice_spacing`` (mm),
    ``nonuniform`` (bool) and ``affine_lps`` (4x4 mapping (col i, row j, slice k, 1)).
    """
    vectors = [_slice_vectors(f, ds) for f, ds in chosen]
    f0 = chosen[0][0]
    iop, _, pixel_spacing, shape = vectors[0]
    for (f, _), (iop_k, _, spacing_k, shape_k) in zip(chosen, vectors):
        if shape_k != shape:
            raise InputError(f, f"slice size {shape_k} differs from {shape} of {f0.name}")
        if not np.allclose(iop_k, iop, atol=1e-4):
            raise InputError(f, f"ImageOrientationPatient {iop_k.tolist()} differs from {iop.tolist()} of {f0.name}")
        if not np.allclose(spacing_k, pixel_spacing, rtol=1e-4):
            raise InputError(f, f"PixelSpacing {spacing_k.tolist()} differs from {pixel_spacing.tolist()}")
    row_cos, col_cos = iop[:3], iop[3:]
    normal = np.cross(row_cos, col_cos)
    if np.linalg.norm(normal) < 1e-3:
        raise InputError(f0, f"degenerate ImageOrientationPatient {iop.tolist()}: parallel direction cosines")
    normal /= np.linalg.norm(normal)
    positions = np.stack([v[1] for v in vectors])  # (n, 3) LPS mm
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    files = [chosen[i][0] for i in order]
    along, positions = along[order], positions[order]
    slice_spacing, nonuniform, step = _slice_step(files, along, positions, normal, chosen[0][1])
    affine = np.eye(4)
    affine[:3, 0] = row_cos * pixel_spacing[1]  # i = column index: along a row
    affine[:3, 1] = col_cos * pixel_spacing[0]  # j = row index: down a column
    affine[:3, 2] = step
    affine[:3, 3] = positions[0]
    return {
        "files": files,
        "shape": shape,
        "slice_spacing": slice_spacing,
        "nonuniform": nonuniform,
        "affine_lps": affine,
    }


def _slice_step(files, along, positions, normal, first_ds) -> tuple[float, bool, np.ndarray]:
    """(median slice spacing mm, non-uniform flag, LPS step vector per slice index)."""
    if len(files) == 1:  # no second position: fall back to the declared spacing, else 1 mm
        declared = _first_float(first_ds.get("SpacingBetweenSlices")) or _first_float(first_ds.get("SliceThickness"))
        spacing = declared if declared and declared > 0 else 1.0
        return spacing, False, normal * spacing
    gaps = np.diff(along)
    dup = int(np.argmin(gaps))
    if gaps[dup] < _DUPLICATE_TOL_MM:
        where = f"{along[dup]:.4f} mm along the normal"
        raise InputError(files[dup + 1], f"duplicate slice position {where}, same as {files[dup].name}")
    spacing = float(np.median(gaps))
    nonuniform = bool(np.max(np.abs(gaps - spacing)) > _NONUNIFORM_REL_TOL * spacing)
    # direction from first to last position (keeps gantry tilt), scaled to the median gap along the normal
    step = (positions[-1] - positions[0]) * (spacing / (along[-1] - along[0]))
    return spacing, nonuniform, step


def _load_slices(files: list[Path], rows: int, cols: int) -> np.ndarray:
    """Modality values of each file, stacked float32 ``(k, rows, cols)`` in ``files`` order."""
    volume = np.empty((len(files), rows, cols), dtype=np.float32)
    for k, f in enumerate(files):
        arr, _ = read_dicom(f, invert_monochrome1=False)
        if arr.shape != (rows, cols):
            raise InputError(f, f"expected a grayscale slice of shape {(rows, cols)}, got {arr.shape}")
        volume[k] = arr
    return volume


__all__ = ["read_dicom", "read_dicom_series"]

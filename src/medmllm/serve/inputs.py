"""OpenAI chat messages -> medmllm record messages whose files sit in a per-request folder.

Images (``image_url`` parts)
----------------------------
``{"type": "image_url", "image_url": {"url": "data:<mime>;base64,<payload>"}}`` with ``<mime>`` in
:data:`IMAGE_MIMES` (``image/png``, ``image/jpeg``, ``application/dicom``). The payload is strict
base64 (standard alphabet, padding required, no whitespace). The real format is read from the bytes
(PNG signature, JPEG SOI marker, ``DICM`` at offset 128) and must match the declared MIME. The
declared pixel count (PNG IHDR, JPEG SOF through Pillow's lazy header parse, DICOM Rows x Columns x
frames through pydicom without the pixel data) is checked against :class:`InputLimits` before any
pixel is decoded: a decompression bomb is refused, never decoded. ``http(s)://`` URLs are refused
unless ``InputLimits.allow_remote_urls``; other schemes always are.

Other files (the ``input_file`` extension part)
-----------------------------------------------
``{"type": "input_file", "input_file": {"kind", "data", "filename", "window"}}`` — ``data`` is
base64 (or a ``data:`` URL; its MIME is not used), ``filename`` gives the format when the bytes do
not, ``window`` a CT window preset (``lung``, ``bone``...) for images and volumes:

========  ==================================================================================
kind      accepted content
========  ==================================================================================
image     PNG, JPEG or DICOM (as ``image_url``)
volume    NIfTI-1/2: ``.nii`` or ``.nii.gz`` (gzip magic or a NIfTI header); declared voxels
          checked from the header before loading
volume    a ZIP of one DICOM series (slices flat or in one folder, ``.dcm`` or with the ``DICM``
          preamble, at most ``max_series_slices``, sizes checked before extracting, Rows x
          Columns summed over the slice headers checked before any pixel is decoded)
signal    a ZIP holding one WFDB record (one ``.hea`` + its ``.dat`` files, flat, at most
          ``max_zip_members`` members, sizes checked before extracting); a signal CSV
          (``.csv``, see :func:`medmllm.data.readers.waveform.read_signal_csv`); a DICOM ECG
ehr       medmllm EHR JSON or a FHIR R4 Bundle (``.json``), EHR CSV (``.csv``)
========  ==================================================================================

Each file is written under the request's folder with a name medmllm chooses (the client's file
name only gives the suffix) and read later by medmllm's readers
(:class:`medmllm.data.dataset.PartLoader`); the caller removes the folder.
Every refusal is a :class:`~medmllm.serve.errors.ServeError` (422, or 413 for a file over the size
limit) naming the part, e.g. ``messages.0.content.1.image_url.url``.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from medmllm.data.readers import base as reader_limits
from medmllm.serve.errors import ServeError, invalid
from medmllm.serve.schema import ImagePart, Message, TextPart

IMAGE_MIMES = {"image/png": "png", "image/jpeg": "jpeg", "image/jpg": "jpeg", "application/dicom": "dicom"}
SUFFIX = {"png": ".png", "jpeg": ".jpg", "dicom": ".dcm"}
_DATA_URL = re.compile(r"data:([A-Za-z0-9.+-]+/[A-Za-z0-9.+-]+)((?:;[A-Za-z0-9_.+-]+=[A-Za-z0-9_.+\"-]*)*);base64,",
                       re.ASCII)
_DEFLATED = "1.2.840.10008.1.2.1.99"


@dataclass(frozen=True)
class InputLimits:
    """Per-request input limits (defaults suit one GPU server; all are checked before decoding).

    ``max_media``: image_url + input_file parts in one request. ``max_file_bytes``: decoded bytes of
    one file (and the uncompressed total of a ZIP). ``max_image_pixels``: declared rows x columns
    (x frames) of one image. ``max_volume_voxels``, ``max_signal_samples`` (leads x samples): volume
    and signal headers (for a DICOM series: summed over the slices). ``max_zip_members``: files in a
    WFDB ZIP; ``max_series_slices``: files in a DICOM series ZIP. The medmllm readers' own ceilings
    (:mod:`medmllm.data.readers.base`) apply as well; the smaller wins.
    """

    max_media: int = 8
    max_file_bytes: int = 32 << 20
    max_image_pixels: int = 1 << 26
    max_volume_voxels: int = 1 << 27
    max_signal_samples: int = 1 << 24
    max_zip_members: int = 8
    max_series_slices: int = 1024
    allow_remote_urls: bool = False
    remote_timeout_s: float = 10.0

    def pixels(self) -> int:
        return min(self.max_image_pixels, reader_limits.MAX_IMAGE_PIXELS)

    def voxels(self) -> int:
        return min(self.max_volume_voxels, reader_limits.MAX_VOLUME_VOXELS)

    def samples(self) -> int:
        return min(self.max_signal_samples, reader_limits.MAX_SIGNAL_SAMPLES)


@dataclass
class MediaFile:
    """One decoded file: its kind (``image``...), the format found, the bytes and a safe suffix."""

    kind: str
    fmt: str
    data: bytes
    suffix: str
    window: str | None = None


# ============================================================================= bytes

def sniff(data: bytes) -> str | None:
    """The format the bytes start with: ``png``, ``jpeg``, ``dicom``, ``gzip``, ``zip``, ``nifti`` or None."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "dicom"
    if data.startswith(b"\x1f\x8b"):
        return "gzip"
    if data.startswith(b"PK\x03\x04"):
        return "zip"
    if len(data) >= 348 and any(int.from_bytes(data[:4], o) in (348, 540) for o in ("little", "big")):
        return "nifti"
    return None


def b64decode_strict(payload: str, param: str, limits: InputLimits) -> bytes:
    """Standard base64 with padding, nothing else (no whitespace, no URL-safe alphabet)."""
    if len(payload) > 4 * (limits.max_file_bytes // 3 + 1):
        raise ServeError(413, f"{param}: the file is larger than the limit of {limits.max_file_bytes} bytes",
                         "file_too_large", param)
    if not payload or len(payload) % 4:
        raise invalid(f"{param}: expected standard base64 (length a multiple of 4), got {len(payload)} characters",
                      "invalid_base64", param)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise invalid(f"{param}: expected standard base64 (A-Z a-z 0-9 + / and = padding only)",
                      "invalid_base64", param) from None
    if not data:
        raise invalid(f"{param}: the file is empty", "empty_file", param)
    return data


def parse_data_url(url: str, param: str, limits: InputLimits) -> tuple[str, bytes]:
    """``data:<mime>[;k=v...];base64,<payload>`` -> (lower-case mime, bytes)."""
    m = _DATA_URL.match(url)
    if not m:
        raise invalid(f"{param}: expected a base64 data URL 'data:<mime>;base64,<data>'", "invalid_data_url", param)
    return m.group(1).lower(), b64decode_strict(url[m.end():], param, limits)


def fetch_remote(url: str, param: str, limits: InputLimits) -> tuple[str, bytes]:
    """GET an http(s) URL (only when allowed): (mime from Content-Type, at most max_file_bytes)."""
    import urllib.error
    import urllib.request

    class HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, req, fp, code, msg, headers, newurl):
            if not newurl.lower().startswith(("http://", "https://")):
                raise urllib.error.URLError("redirect to a non-http(s) URL")
            return super().redirect_request(req, fp, code, msg, headers, newurl)

    opener = urllib.request.build_opener(HttpOnlyRedirects)
    req = urllib.request.Request(url, headers={"User-Agent": "medmllm-serve"})
    try:
        with opener.open(req, timeout=limits.remote_timeout_s) as resp:  # noqa: S310 - opt-in, http(s) only
            mime = (resp.headers.get_content_type() or "").lower()
            data = resp.read(limits.max_file_bytes + 1)
    except (urllib.error.URLError, OSError, ValueError):
        raise invalid(f"{param}: the remote URL could not be fetched", "remote_fetch_failed", param) from None
    if len(data) > limits.max_file_bytes:
        raise ServeError(413, f"{param}: the remote file is larger than the limit of {limits.max_file_bytes} bytes",
                         "file_too_large", param)
    if not data:
        raise invalid(f"{param}: the remote file is empty", "empty_file", param)
    return mime, data


# ============================================================================= images

def image_from_url(url: str, param: str, limits: InputLimits) -> MediaFile:
    """An ``image_url`` url -> a checked image file (see module doc)."""
    scheme = url.split(":", 1)[0].lower() if ":" in url[:16] else ""
    if scheme == "data":
        mime, data = parse_data_url(url, param, limits)
    elif scheme in ("http", "https"):
        if not limits.allow_remote_urls:
            raise invalid(f"{param}: remote URLs are refused by this server; send the image as a base64 data URL",
                          "remote_url_refused", param)
        mime, data = fetch_remote(url, param, limits)
    else:
        raise invalid(f"{param}: expected a data: URL (or http(s) where allowed), got scheme {scheme or 'none'!r}",
                      "unsupported_url", param)
    fmt = IMAGE_MIMES.get(mime)
    if fmt is None:
        raise invalid(f"{param}: MIME type {mime[:60]!r} is not accepted; expected one of "
                      f"{sorted(set(IMAGE_MIMES) - {'image/jpg'})}", "unsupported_media_type", param)
    found = sniff(data)
    if found != fmt:
        raise invalid(f"{param}: declared {mime} but the bytes are {found or 'of no accepted format'}",
                      "mime_mismatch", param)
    check_image_header(data, fmt, param, limits)
    return MediaFile("image", fmt, data, SUFFIX[fmt])


def check_image_header(data: bytes, fmt: str, param: str, limits: InputLimits) -> tuple[int, ...]:
    """Declared image shape from the header only; refuses more than ``limits.pixels()`` pixels."""
    if fmt == "png":
        shape = _png_shape(data, param)
    elif fmt == "jpeg":
        shape = _jpeg_shape(data, param)
    elif fmt == "dicom":
        shape = _dicom_shape(data, param)
    else:
        raise invalid(f"{param}: unsupported image format {fmt!r}", "unsupported_media_type", param)
    _check_count(shape, limits.pixels(), "pixels", param, "image_too_large")
    return shape


def _check_count(shape: Sequence[int], limit: int, what: str, param: str, code: str) -> None:
    n = 1
    for d in shape:
        if d <= 0:
            raise invalid(f"{param}: the header declares shape {tuple(shape)} with a non-positive dimension",
                          "invalid_header", param)
        n *= d
    if n > limit:
        raise invalid(f"{param}: the header declares shape {tuple(shape)} = {n} {what}, above the limit of {limit}",
                      code, param)


def _png_shape(data: bytes, param: str) -> tuple[int, int]:
    """(height, width) from the IHDR chunk, which the PNG spec puts first (bytes 8..33)."""
    if len(data) < 33 or data[12:16] != b"IHDR":
        raise invalid(f"{param}: PNG without an IHDR header", "invalid_image", param)
    width, height = struct.unpack(">II", data[16:24])
    return height, width


def _jpeg_shape(data: bytes, param: str) -> tuple[int, int]:
    """(height, width) from Pillow's header-only parse (no pixel decoding)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format != "JPEG":
                raise ValueError(img.format)
            width, height = img.size
    except Image.DecompressionBombError:
        raise invalid(f"{param}: the JPEG header declares more pixels than the decoder allows",
                      "image_too_large", param) from None
    except Exception:  # noqa: BLE001 - any parse failure of client bytes is a client error
        raise invalid(f"{param}: the JPEG header could not be parsed", "invalid_image", param) from None
    return height, width


def check_dicom_syntax(data: bytes, param: str, force: bool = False) -> str:
    """The transfer syntax from the DICOM file meta group; a deflated dataset is refused (see below).

    ``force``: the file may lack the 128-byte preamble and ``DICM`` (then its syntax may be ``""``).
    """
    from pydicom.filereader import _read_file_meta_info, read_preamble

    try:
        fp = io.BytesIO(data)
        read_preamble(fp, force)
        syntax = str(_read_file_meta_info(fp).get("TransferSyntaxUID", ""))
    except Exception:  # noqa: BLE001 - client bytes
        raise invalid(f"{param}: the DICOM file meta header could not be parsed", "invalid_dicom", param) from None
    if syntax == _DEFLATED:
        raise invalid(f"{param}: deflated DICOM datasets are not accepted; send an uncompressed or "
                      "JPEG/JPEG 2000/RLE encoded file", "unsupported_media_type", param)
    return syntax


def _dicom_shape(data: bytes, param: str) -> tuple[int, ...]:
    """(frames, rows, columns, samples) from the DICOM header, parsed without the pixel data.

    A deflated dataset (transfer syntax 1.2.840.10008.1.2.1.99) is refused: pydicom inflates it
    whole before parsing, so its size cannot be bounded first.
    """
    return _dicom_header(data, param)[0]


def _dicom_header(data: bytes, param: str, member: str | None = None) -> tuple[tuple[int, int, int, int], str]:
    """((frames, rows, columns, samples), SeriesInstanceUID) from a DICOM header without its pixel data.

    ``member``: the name of the ZIP member ``data`` came from; it may then lack the preamble (parsed
    with ``force``), refusals name it and their code is ``invalid_dicom`` (else ``invalid_image``).
    The syntax is checked first (:func:`check_dicom_syntax`); a dataset without Rows/Columns is refused.
    """
    import pydicom

    force = member is not None and sniff(data) != "dicom"
    of, subject, code = ((f" of ZIP member {member!r}", f"ZIP member {member!r}", "invalid_dicom") if member is not None
                         else ("", "the DICOM file", "invalid_image"))
    check_dicom_syntax(data, param, force=force)
    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=force)
        rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        series = str(ds.get("SeriesInstanceUID", "") or "")
    except Exception:  # noqa: BLE001 - client bytes
        raise invalid(f"{param}: the DICOM header{of} could not be parsed", code, param) from None
    if not rows or not cols:
        raise invalid(f"{param}: {subject} holds no image (Rows/Columns missing)", code, param)
    return (frames, rows, cols, samples), series


# ============================================================================= other files

def file_from_part(f, param: str, limits: InputLimits) -> MediaFile:
    """An ``input_file`` object (schema.InputFile) -> a checked file (see module doc)."""
    dparam = f"{param}.data"
    if f.data.startswith("data:"):
        _, data = parse_data_url(f.data, dparam, limits)
    else:
        data = b64decode_strict(f.data, dparam, limits)
    return check_file(f.kind, data, f.filename, f.window, param, limits)


def check_file(kind: str, data: bytes, filename: str | None, window: str | None, param: str,
               limits: InputLimits) -> MediaFile:
    """Raw bytes of a ``kind`` file -> a checked :class:`MediaFile` (formats in the module doc)."""
    from medmllm.data.preprocess import CT_WINDOWS

    dparam = f"{param}.data"
    if len(data) > limits.max_file_bytes:
        raise ServeError(413, f"{dparam}: the file is larger than the limit of {limits.max_file_bytes} bytes",
                         "file_too_large", dparam)
    if window is not None and window not in CT_WINDOWS.names():
        raise invalid(f"{param}.window: expected one of {sorted(CT_WINDOWS.names())}, got {window[:40]!r}",
                      "invalid_window", f"{param}.window")
    name = (filename or "").lower()
    found = sniff(data)
    if kind == "image":
        if found not in SUFFIX:
            raise invalid(f"{dparam}: expected PNG, JPEG or DICOM bytes, got {found or 'another format'}",
                          "unsupported_media_type", dparam)
        check_image_header(data, found, dparam, limits)
        return MediaFile("image", found, data, SUFFIX[found], window)
    if kind == "volume":
        if found == "zip":  # a DICOM series: checked member by member when extracted (write_media)
            return MediaFile("volume", "dicom_zip", data, "", window)
        return MediaFile("volume", "nifti", data, _volume_suffix(data, found, name, dparam, limits), window)
    if kind == "signal":
        return _signal_file(data, found, name, dparam, limits)
    if kind == "ehr":
        return _ehr_file(data, found, name, dparam, limits)
    raise invalid(f"{param}.kind: expected image, volume, signal or ehr, got {kind[:20]!r}", "invalid_kind",
                  f"{param}.kind")


def _volume_suffix(data: bytes, found: str | None, name: str, param: str, limits: InputLimits) -> str:
    if found == "gzip":
        suffix = ".nii.gz"
    elif found == "nifti":
        suffix = ".nii"
    else:
        raise invalid(f"{param}: expected a NIfTI volume (.nii or .nii.gz) or a ZIP of one DICOM series, got "
                      f"{found or 'another format'}", "unsupported_media_type", param)
    _check_count(_nifti_shape(data, suffix, param), limits.voxels(), "voxels", param, "volume_too_large")
    return suffix


def _nifti_shape(data: bytes, suffix: str, param: str) -> tuple[int, ...]:
    """Declared data shape from the NIfTI header (only the header is decompressed)."""
    import gzip

    import nibabel as nib

    try:
        head = gzip.GzipFile(fileobj=io.BytesIO(data)).read(540 + 4) if suffix == ".nii.gz" else data[:544]
        size = int.from_bytes(head[:4], "little")
        size = size if size in (348, 540) else int.from_bytes(head[:4], "big")
        klass = nib.Nifti2Header if size == 540 else nib.Nifti1Header
        header = klass.from_fileobj(io.BytesIO(head))
        shape = tuple(int(d) for d in header.get_data_shape())
    except Exception:  # noqa: BLE001 - client bytes
        raise invalid(f"{param}: the NIfTI header could not be parsed", "invalid_volume", param) from None
    if not shape:
        raise invalid(f"{param}: the NIfTI header declares no data", "invalid_volume", param)
    return shape


def _signal_file(data: bytes, found: str | None, name: str, param: str, limits: InputLimits) -> MediaFile:
    if found == "zip":
        return MediaFile("signal", "wfdb_zip", data, ".zip")
    if found == "dicom":
        check_dicom_syntax(data, param)
        return MediaFile("signal", "dicom", data, ".dcm")
    if name.endswith(".csv") and found is None:
        _check_text(data, param, "signal CSV")
        return MediaFile("signal", "signal_csv", data, ".csv")
    raise invalid(f"{param}: expected a ZIP of one WFDB record (.hea + .dat), a signal .csv or a DICOM ECG, "
                  f"got {found or 'an unrecognised file'} named {name[-40:]!r}", "unsupported_media_type", param)


def _ehr_file(data: bytes, found: str | None, name: str, param: str, limits: InputLimits) -> MediaFile:
    if found is None and name.endswith((".json", ".csv")):
        _check_text(data, param, "EHR")
        return MediaFile("ehr", "ehr", data, ".json" if name.endswith(".json") else ".csv")
    raise invalid(f"{param}: expected EHR JSON / FHIR Bundle (.json) or EHR CSV (.csv) text, got "
                  f"{found or 'a file'} named {name[-40:]!r}", "unsupported_media_type", param)


def _check_text(data: bytes, param: str, what: str) -> None:
    if len(data) > reader_limits.MAX_TEXT_BYTES:
        raise ServeError(413, f"{param}: {what} is larger than {reader_limits.MAX_TEXT_BYTES} bytes",
                         "file_too_large", param)
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        raise invalid(f"{param}: {what} must be UTF-8 text", "invalid_text", param) from None


# ============================================================================= writing

def write_media(mf: MediaFile, folder: Path, stem: str, param: str, limits: InputLimits) -> Path:
    """Write ``mf`` under ``folder`` as ``stem + suffix``; the path to read.

    A WFDB ZIP is extracted into the folder ``folder / stem`` (returns its ``.hea``), a DICOM series
    ZIP likewise (returns the folder, which the ``dicom_series`` reader reads as one volume).
    """
    if mf.fmt == "wfdb_zip":
        return _extract_wfdb(mf.data, folder / stem, param, limits)
    if mf.fmt == "dicom_zip":
        return _extract_dicom_series(mf.data, folder / stem, param, limits)
    path = folder / f"{stem}{mf.suffix}"
    path.write_bytes(mf.data)
    return path


_WFDB_MEMBER = re.compile(r"[A-Za-z0-9_.-]{1,100}\.(hea|dat)", re.ASCII)


def _extract_wfdb(data: bytes, target: Path, param: str, limits: InputLimits) -> Path:
    """Extract a flat ZIP of one WFDB record into ``target``; returns its .hea path.

    Members: at most ``max_zip_members``, plain names matching ``*.hea`` / ``*.dat`` (no folders),
    exactly one ``.hea``, uncompressed total <= ``max_file_bytes`` (from the central directory,
    and enforced while reading). The header's declared leads x samples is checked against
    ``max_signal_samples`` before the samples are read.
    """
    zf, infos = _open_zip(data, param)
    if not infos or len(infos) > limits.max_zip_members:
        raise invalid(f"{param}: expected 1 to {limits.max_zip_members} files in the ZIP, found {len(infos)}",
                      "invalid_archive", param)
    names = [i.filename for i in infos]
    bad = [n for n in names if not _WFDB_MEMBER.fullmatch(n)]
    heads = [n for n in names if n.endswith(".hea")]
    if bad or len(heads) != 1 or len(set(names)) != len(names):
        raise invalid(f"{param}: expected one WFDB record (one .hea and its .dat files, no folders) in the ZIP",
                      "invalid_archive", param)
    _check_zip_size(infos, param, limits)
    target.mkdir(parents=True, exist_ok=False)
    budget = limits.max_file_bytes
    for info in infos:
        content = _read_member(zf, info, budget, param, limits)
        budget -= len(content)
        (target / info.filename).write_bytes(content)
    hea = target / heads[0]
    _check_wfdb_header(hea, param, limits)
    return hea


def _open_zip(data: bytes, param: str) -> tuple[zipfile.ZipFile, list[zipfile.ZipInfo]]:
    """The archive and its central directory entries; 422 when the bytes are no readable ZIP."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        return zf, zf.infolist()
    except (zipfile.BadZipFile, ValueError, OSError, EOFError):
        raise invalid(f"{param}: not a readable ZIP archive", "invalid_archive", param) from None


def _too_big(param: str, limits: InputLimits) -> ServeError:
    return ServeError(413, f"{param}: the ZIP expands beyond the limit of {limits.max_file_bytes} bytes",
                      "file_too_large", param)


def _check_zip_size(infos: Sequence[zipfile.ZipInfo], param: str, limits: InputLimits) -> None:
    """413 when the central directory declares more than ``max_file_bytes`` uncompressed."""
    if sum(i.file_size for i in infos) > limits.max_file_bytes:
        raise _too_big(param, limits)


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, budget: int, param: str, limits: InputLimits) -> bytes:
    """One member's bytes, at most ``budget`` of them (413 beyond: the declared size may lie)."""
    try:
        with zf.open(info) as src:
            content = src.read(budget + 1)
    except Exception:  # noqa: BLE001 - corrupt member, bad CRC, encryption, unsupported compression
        raise invalid(f"{param}: a ZIP member could not be extracted", "invalid_archive", param) from None
    if len(content) > budget:
        raise _too_big(param, limits)
    return content


def _check_wfdb_header(hea: Path, param: str, limits: InputLimits) -> None:
    import wfdb

    try:
        header = wfdb.rdheader(str(hea.with_suffix("")))
        n = int(header.n_sig or 0) * int(header.sig_len or 0) * max([int(s or 1) for s in
                                                                     (header.samps_per_frame or [1])])
    except Exception:  # noqa: BLE001 - client bytes
        raise invalid(f"{param}: the WFDB header could not be parsed", "invalid_signal", param) from None
    if n > limits.samples():
        raise invalid(f"{param}: the WFDB header declares {n} samples (leads x samples), above the limit of "
                      f"{limits.samples()}", "signal_too_large", param)


_SERIES_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_. -]{0,99}", re.ASCII)  # one path component, no "." / ".."


def _extract_dicom_series(data: bytes, target: Path, param: str, limits: InputLimits) -> Path:
    """Check a ZIP of one DICOM series in memory, then write its slices into ``target``; returns ``target``.

    Members (:func:`_series_members`): 1 to ``max_series_slices`` files, flat or all in one folder,
    uncompressed total <= ``max_file_bytes`` (from the central directory, and enforced while reading).
    Each must be DICOM (:func:`_slice_header`: the ``DICM`` preamble, or a ``.dcm`` name) with an image
    header, all of one SeriesInstanceUID; Rows x Columns (x frames x samples) summed over the slices
    must be <= ``max_volume_voxels``. No pixel data is decoded here; the slices are written as
    ``00000.dcm``... (names medmllm chooses) only after every check passed.
    """
    zf, infos = _open_zip(data, param)
    members = _series_members(infos, param, limits)
    _check_zip_size(members, param, limits)
    budget, contents = limits.max_file_bytes, []
    for info in members:
        contents.append(_read_member(zf, info, budget, param, limits))
        budget -= len(contents[-1])
    headers = [_slice_header(c, i.filename, param) for c, i in zip(contents, members)]
    _check_series_headers(headers, param, limits)
    target.mkdir(parents=True, exist_ok=False)
    for k, content in enumerate(contents):
        (target / f"{k:05d}.dcm").write_bytes(content)
    return target


def _series_members(infos: Sequence[zipfile.ZipInfo], param: str, limits: InputLimits) -> list[zipfile.ZipInfo]:
    """The file members of a series ZIP; 422 unless 1 to ``max_series_slices`` files with plain names
    (no ``..``, no absolute paths), all flat or all in one folder (its folder entry allowed)."""
    files = [i for i in infos if not i.is_dir()]
    if not files or len(files) > limits.max_series_slices:
        raise invalid(f"{param}: expected 1 to {limits.max_series_slices} DICOM slices in the ZIP, found "
                      f"{len(files)}", "too_many_slices" if files else "invalid_archive", param)
    file_paths = [i.filename.split("/") for i in files]              # "d/a.dcm" -> ["d", "a.dcm"]
    dir_paths = [i.filename[:-1].split("/") for i in infos if i.is_dir()]  # "d/" -> ["d"]
    plain = (all(len(p) <= 2 and all(_SERIES_NAME.fullmatch(c) for c in p) for p in file_paths)
             and all(len(p) == 1 and _SERIES_NAME.fullmatch(p[0]) for p in dir_paths))
    folders = {tuple(p[:-1]) for p in file_paths} | {tuple(p) for p in dir_paths}
    names = [i.filename for i in files]
    if not plain or len(folders) != 1 or len(set(names)) != len(names):
        raise invalid(f"{param}: expected the slices of one DICOM series in the ZIP, flat or in one folder "
                      "(plain file names, no '..')", "invalid_archive", param)
    return files


def _slice_header(content: bytes, name: str, param: str) -> tuple[int, int, int, int, str]:
    """(frames, rows, columns, samples, SeriesInstanceUID) of one member, parsed without the pixel data.

    A member needs the ``DICM`` preamble or a ``.dcm`` name; then :func:`_dicom_header` reads it.
    """
    short = name.rsplit("/", 1)[-1][-40:]
    if sniff(content) != "dicom" and not name.lower().endswith(".dcm"):
        raise invalid(f"{param}: ZIP member {short!r} is not a DICOM file (no 'DICM' preamble, not named .dcm)",
                      "invalid_archive", param)
    shape, series = _dicom_header(content, param, member=short)
    return (*shape, series)


def _check_series_headers(headers: Sequence[tuple[int, int, int, int, str]], param: str,
                          limits: InputLimits) -> None:
    """One SeriesInstanceUID; every dimension positive; the voxels summed over slices within the limit."""
    series = {h[4] for h in headers}
    if len(series) != 1:
        raise invalid(f"{param}: the ZIP holds slices of {len(series)} DICOM series; expected one",
                      "invalid_archive", param)
    total = 0
    for frames, rows, cols, samples, _ in headers:
        _check_count((frames, rows, cols, samples), limits.voxels(), "voxels", param, "volume_too_large")
        total += frames * rows * cols * samples
    if total > limits.voxels():
        raise invalid(f"{param}: the slice headers declare {total} voxels (rows x columns summed over "
                      f"{len(headers)} slices), above the limit of {limits.voxels()}", "volume_too_large", param)


# ============================================================================= messages

def to_record_messages(messages: Sequence[Message], folder: Path, limits: InputLimits
                       ) -> tuple[list[dict], list[str]]:
    """Validated OpenAI messages -> (medmllm record messages, the request field of each media part).

    Media parts become ``{"type": kind, "path": file under folder[, "options": {"window": w}]}``;
    ``developer`` is read as ``system``. Checks: media only in user messages, at most
    ``limits.max_media`` of them, the conversation ends with a user message.
    """
    if messages[-1].role != "user":
        raise invalid(f"messages.{len(messages) - 1}.role: expected the conversation to end with a user message, "
                      f"got {messages[-1].role!r}", "invalid_conversation", f"messages.{len(messages) - 1}.role")
    n_media = sum(1 for m in messages if not isinstance(m.content, str)
                  for p in m.content if not isinstance(p, TextPart))
    if n_media > limits.max_media:
        raise invalid(f"messages: {n_media} images/files in one request, above the limit of {limits.max_media}",
                      "too_many_media", "messages")
    out, params = [], []
    for i, m in enumerate(messages):
        role = "system" if m.role == "developer" else m.role
        if isinstance(m.content, str):
            out.append({"role": role, "content": [{"type": "text", "text": m.content}]})
            continue
        parts = []
        for j, p in enumerate(m.content):
            param = f"messages.{i}.content.{j}"
            if isinstance(p, TextPart):
                parts.append({"type": "text", "text": p.text})
                continue
            if role != "user":
                raise invalid(f"{param}: images and files are accepted in user messages only, not {m.role!r}",
                              "invalid_conversation", param)
            if isinstance(p, ImagePart):
                param += ".image_url.url"
                mf = image_from_url(p.image_url.url, param, limits)
            else:  # FilePart (the schema's discriminated union allows nothing else)
                param += ".input_file"
                mf = file_from_part(p.input_file, param, limits)
            path = write_media(mf, folder, f"m{len(params)}", param, limits)
            part = {"type": mf.kind, "path": str(path)}
            if mf.window:
                part["options"] = {"window": mf.window}
            parts.append(part)
            params.append(param)
        out.append({"role": role, "content": parts})
    return out, params


__all__ = ["IMAGE_MIMES", "InputLimits", "MediaFile", "b64decode_strict", "check_file", "check_image_header",
           "file_from_part",
           "image_from_url", "parse_data_url", "sniff", "to_record_messages", "write_media"]

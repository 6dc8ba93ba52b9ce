"""inputs.py: strict data URLs, the MIME allowlist against the real bytes, decompression bombs refused
from the header, input_file kinds (NIfTI, DICOM series ZIP, WFDB ZIP, CSV/JSON EHR), limits, remote URLs,
and the OpenAI -> medmllm message mapping."""

from __future__ import annotations

import base64
import gzip
import http.server
import io
import struct
import threading
import zipfile
import zlib

import numpy as np
import pytest

from medmllm.serve.errors import ServeError
from medmllm.serve.inputs import (InputLimits, check_file, image_from_url, parse_data_url, sniff,
                                  to_record_messages)
from medmllm.serve.schema import ChatRequest

LIM = InputLimits(max_media=2, max_file_bytes=256 << 10, max_image_pixels=1 << 20)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def png_declaring(width: int, height: int) -> bytes:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


def real_png(h=20, w=30) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((np.arange(h * w) % 251).astype(np.uint8).reshape(h, w)).save(buf, format="PNG")
    return buf.getvalue()


def jpeg_declaring(width: int, height: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (8, 8), 100).save(buf, format="JPEG")
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5: sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def dicom_declaring(tmp_path, rows, cols, frames=1, syntax=None) -> bytes:
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    meta.TransferSyntaxUID = syntax or ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.Rows, ds.Columns, ds.NumberOfFrames, ds.SamplesPerPixel = rows, cols, str(frames), 1
    path = tmp_path / "d.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path.read_bytes()


def _code(fn, *args):
    with pytest.raises(ServeError) as info:
        fn(*args)
    return info.value


# ----------------------------------------------------------------------------- data URLs

def test_parse_data_url_is_strict():
    assert parse_data_url("data:image/png;base64," + b64(b"\x89PNGxyz"), "p", LIM) == ("image/png", b"\x89PNGxyz")
    assert parse_data_url("data:Image/PNG;name=a.png;base64," + b64(b"abc"), "p", LIM)[0] == "image/png"
    for url in ("data:image/png;base64,YWJ", "data:image/png;base64,YW Jj", "data:image/png;base64,YW-j",
                "data:image/png;base64,YWJj=", "data:image/png,YWJj", "data:image/png;base64,", "image/png;base64,YWJj",
                "data:image/png;base64,YWJj\n"):
        err = _code(parse_data_url, url, "messages.0.content.0.image_url.url", LIM)
        assert err.status == 422 and err.param == "messages.0.content.0.image_url.url"
        assert err.code in ("invalid_base64", "invalid_data_url")


def test_sniff_reads_the_magic_numbers(tmp_path):
    assert sniff(real_png()) == "png"
    assert sniff(jpeg_declaring(8, 8)) == "jpeg"
    assert sniff(dicom_declaring(tmp_path, 8, 8)) == "dicom"
    assert sniff(gzip.compress(b"x")) == "gzip"
    assert sniff(b"GIF89a....") is None


def test_mime_allowlist_and_mismatch():
    png = real_png()
    ok = image_from_url("data:image/png;base64," + b64(png), "u", LIM)
    assert (ok.kind, ok.fmt, ok.suffix, ok.data) == ("image", "png", ".png", png)
    assert _code(image_from_url, "data:image/gif;base64," + b64(png), "u", LIM).code == "unsupported_media_type"
    assert _code(image_from_url, "data:image/jpeg;base64," + b64(png), "u", LIM).code == "mime_mismatch"
    assert _code(image_from_url, "data:application/dicom;base64," + b64(png), "u", LIM).code == "mime_mismatch"


# ----------------------------------------------------------------------------- bombs

def test_png_bomb_is_refused_from_the_header_with_the_numbers():
    err = _code(image_from_url, "data:image/png;base64," + b64(png_declaring(100_000, 100_000)), "u", LIM)
    assert err.code == "image_too_large"
    assert "(100000, 100000) = 10000000000 pixels" in err.message and str(1 << 20) in err.message
    # just under / over the limit (1 << 20 = 1024 x 1024)
    image_from_url("data:image/png;base64," + b64(png_declaring(1024, 1024)), "u", LIM)
    assert _code(image_from_url, "data:image/png;base64," + b64(png_declaring(1025, 1024)), "u", LIM).code == \
        "image_too_large"


def test_jpeg_and_dicom_bombs_are_refused_from_the_header(tmp_path):
    err = _code(image_from_url, "data:image/jpeg;base64," + b64(jpeg_declaring(2000, 1000)), "u", LIM)
    assert err.code == "image_too_large" and "(1000, 2000) = 2000000 pixels" in err.message
    dcm = dicom_declaring(tmp_path, 4096, 4096, frames=3)
    err = _code(image_from_url, "data:application/dicom;base64," + b64(dcm), "u", LIM)
    assert err.code == "image_too_large" and "(3, 4096, 4096, 1) = 50331648 pixels" in err.message


def test_deflated_dicom_is_refused(tmp_path):
    dcm = dicom_declaring(tmp_path, 8, 8, syntax="1.2.840.10008.1.2.1.99")
    err = _code(image_from_url, "data:application/dicom;base64," + b64(dcm), "u", LIM)
    assert err.code == "unsupported_media_type" and "deflated" in err.message


def test_remote_urls_are_refused_unless_allowed():
    png = real_png()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(png)))
            self.end_headers()
            self.wfile.write(png)

        def log_message(self, *a):
            pass

    srv = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}/a.png"
    try:
        assert _code(image_from_url, url, "u", LIM).code == "remote_url_refused"
        fetched = image_from_url(url, "u", InputLimits(allow_remote_urls=True))
        assert fetched.data == png and fetched.fmt == "png"
    finally:
        srv.shutdown()
    for url in ("file:///etc/passwd", "ftp://x/a.png", "javascript:alert(1)"):
        assert _code(image_from_url, url, "u", InputLimits(allow_remote_urls=True)).code == "unsupported_url"


# ----------------------------------------------------------------------------- input_file kinds

def test_nifti_volume_accepted_and_voxel_bomb_refused(tmp_path):
    import nibabel as nib

    from medmllm.data.phantoms.writers import write_nifti

    write_nifti(tmp_path / "v.nii.gz", np.zeros((4, 8, 8), np.int16), (1.0, 1.0, 1.0))
    ok = check_file("volume", (tmp_path / "v.nii.gz").read_bytes(), "v.nii.gz", "abdomen", "f", LIM)
    assert (ok.suffix, ok.window) == (".nii.gz", "abdomen")
    header = nib.Nifti1Header()
    header.set_data_shape((1000, 1000, 1000))
    err = _code(check_file, "volume", gzip.compress(header.binaryblock + b"\0" * 4), "v.nii.gz", None, "f",
                InputLimits())
    assert err.code == "volume_too_large" and "(1000, 1000, 1000) = 1000000000 voxels" in err.message


def test_wfdb_zip_is_extracted_and_read(tmp_path):
    import wfdb

    from medmllm.data.readers import read
    from medmllm.serve.inputs import write_media

    sig = np.stack([np.sin(np.arange(500) / 10), np.cos(np.arange(500) / 10)], axis=1)
    wfdb.wrsamp("rec", fs=250, units=["mV", "mV"], sig_name=["I", "II"], p_signal=sig, fmt=["16", "16"],
                write_dir=str(tmp_path))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name in ("rec.hea", "rec.dat"):
            zf.write(tmp_path / name, name)
    mf = check_file("signal", buf.getvalue(), "ecg.zip", None, "f", LIM)
    out = tmp_path / "req"
    out.mkdir()
    hea = write_media(mf, out, "m0", "f", LIM)
    arr, meta = read(hea)
    assert arr.shape == (2, 500) and meta["fs"] == 250
    np.testing.assert_allclose(arr[0], sig[:, 0], atol=2e-3)


@pytest.mark.parametrize("members", [{"../x.hea": b"x", "x.dat": b""}, {"a/x.hea": b"x"}, {"x.dat": b""},
                                     {"x.hea": b"x", "y.hea": b"y"}, {"x.hea": b"x", "x.sh": b"rm"}])
def test_bad_zip_layouts_are_refused(tmp_path, members):
    from medmllm.serve.inputs import write_media

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    mf = check_file("signal", buf.getvalue(), "ecg.zip", None, "f", LIM)
    assert _code(write_media, mf, tmp_path, "m0", "f", LIM).code == "invalid_archive"
    assert not (tmp_path.parent / "x.hea").exists()


def test_zip_bomb_is_refused_before_extracting(tmp_path):
    from medmllm.serve.inputs import write_media

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("r.hea", "r 1 250 10\nr.dat 16 200 16 0 0 0 0 I\n")
        zf.writestr("r.dat", b"\0" * (LIM.max_file_bytes + 1))
    mf = check_file("signal", buf.getvalue(), "ecg.zip", None, "f", LIM)
    err = _code(write_media, mf, tmp_path, "m0", "f", LIM)
    assert err.status == 413 and err.code == "file_too_large"
    assert not (tmp_path / "m0").exists()


# ----------------------------------------------------------------------------- DICOM series ZIP

SERIES_SHAPE = (5, 12, 10)  # (D, H, W)


def series_slices(tmp_path, uid_seed="serve-series") -> tuple[np.ndarray, list[bytes]]:
    """A MedPhantom-style CT volume (HU) and the bytes of its slices from the project's series writer."""
    from medmllm.data.phantoms.writers import write_dicom_series

    vol = np.random.default_rng(3).normal(40, 80, SERIES_SHAPE).round().astype(np.int16)
    paths = write_dicom_series(tmp_path / uid_seed, vol, (2.0, 0.8, 0.8), patient_id="P0001", uid_seed=uid_seed)
    return vol, [p.read_bytes() for p in paths]


def zip_of(members: dict[str, bytes], folders: tuple[str, ...] = (), method=zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", method) as zf:
        for name in folders:
            zf.writestr(zipfile.ZipInfo(name), b"")  # a folder entry ("ct/")
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _series_refusal(tmp_path, data: bytes, limits: InputLimits = LIM) -> ServeError:
    """The ServeError of extracting ``data`` as a volume; checks that nothing was written."""
    from medmllm.serve.inputs import write_media

    mf = check_file("volume", data, "series.zip", None, "f", limits)
    assert (mf.kind, mf.fmt) == ("volume", "dicom_zip")
    out = tmp_path / "req"
    out.mkdir(exist_ok=True)
    err = _code(write_media, mf, out, "m0", "f", limits)
    assert err.param == "f" and err.status in (413, 422)
    assert not (out / "m0").exists() and not (tmp_path / "evil.dcm").exists()
    return err


@pytest.mark.parametrize("layout", ["flat", "folder", "folder_entry", "no_suffix"])
def test_dicom_series_zip_is_extracted_and_read_as_one_volume(tmp_path, layout):
    from medmllm.data.readers import read
    from medmllm.serve.inputs import write_media
    from medmllm.serve.preview import preview

    vol, slices = series_slices(tmp_path)
    order = [3, 0, 4, 1, 2]  # the archive order does not matter: the reader sorts by position
    names = {"flat": "{k}.dcm", "folder": "ct/IM{k:03d}.dcm", "folder_entry": "CT Chest/{k}.dcm",
             "no_suffix": "ct/1.2.840.{k}"}[layout]  # no suffix: the DICM preamble makes it DICOM
    folders = ("CT Chest/",) if layout == "folder_entry" else ()
    data = zip_of({names.format(k=k): slices[k] for k in order}, folders)
    mf = check_file("volume", data, "series.zip", "abdomen", "f", LIM)
    assert (mf.kind, mf.fmt, mf.window) == ("volume", "dicom_zip", "abdomen")
    out = tmp_path / "req"
    out.mkdir()
    folder = write_media(mf, out, "m0", "f", LIM)
    assert folder == out / "m0" and sorted(p.name for p in folder.iterdir()) == [f"{k:05d}.dcm" for k in range(5)]
    arr, meta = read(folder)
    assert meta["format"] == "dicom_series" and meta["kind"] == "volume"
    assert arr.shape == SERIES_SHAPE
    np.testing.assert_array_equal(arr, vol)
    png, headers = preview(data, "volume", filename="series.zip", limits=LIM)  # the web page's preview path
    assert headers["X-Medmllm-Slices"] == str(SERIES_SHAPE[0]) and png.startswith(b"\x89PNG")


def test_series_zip_with_too_many_slices_is_refused_before_extracting(tmp_path):
    _, slices = series_slices(tmp_path)
    data = zip_of({f"{k}.dcm": s for k, s in enumerate(slices)})
    err = _series_refusal(tmp_path, data, InputLimits(max_series_slices=4))
    assert err.status == 422 and err.code == "too_many_slices"
    assert "expected 1 to 4 DICOM slices in the ZIP, found 5" in err.message
    assert InputLimits().max_series_slices > InputLimits().max_zip_members  # series have many members
    err = _series_refusal(tmp_path, zip_of({}, ("ct/",)))
    assert err.code == "invalid_archive"


def test_series_voxel_bomb_is_refused_from_the_slice_headers(tmp_path):
    from medmllm.serve.inputs import write_media

    _, slices = series_slices(tmp_path)
    data = zip_of({f"{k}.dcm": s for k, s in enumerate(slices)})
    n = 5 * 12 * 10
    err = _series_refusal(tmp_path, data, InputLimits(max_volume_voxels=n - 1))
    assert err.status == 422 and err.code == "volume_too_large"
    assert f"declare {n} voxels (rows x columns summed over 5 slices), above the limit of {n - 1}" in err.message
    out = tmp_path / "ok"
    out.mkdir()
    exact = InputLimits(max_volume_voxels=n)
    assert write_media(check_file("volume", data, "s.zip", None, "f", exact), out, "m0", "f", exact).is_dir()
    # headers declaring 40 x 4096 x 4096 with no pixel data at all: refused from the headers alone
    huge = {f"{k}.dcm": dicom_declaring(tmp_path, 4096, 4096) for k in range(40)}
    err = _series_refusal(tmp_path, zip_of(huge), InputLimits())
    assert err.code == "volume_too_large" and "671088640 voxels" in err.message


@pytest.mark.parametrize("case", ["traversal", "absolute", "two_levels", "two_folders", "text_member",
                                  "backslash", "dot_folder", "two_series"])
def test_bad_series_zip_layouts_and_members_are_refused(tmp_path, case):
    _, slices = series_slices(tmp_path)
    _, other = series_slices(tmp_path, uid_seed="another-series")
    members = {"traversal": {"../evil.dcm": slices[0], "a.dcm": slices[1]},
               "absolute": {"/evil.dcm": slices[0]},
               "two_levels": {"a/b/x.dcm": slices[0]},
               "two_folders": {"a/x.dcm": slices[0], "b/y.dcm": slices[1]},
               "text_member": {"x.dcm": slices[0], "notes.txt": b"not a DICOM file"},
               "backslash": {"..\\evil.dcm": slices[0]},
               "dot_folder": {"./x.dcm": slices[0], "./y.dcm": slices[1]},
               "two_series": {"x.dcm": slices[0], "y.dcm": other[1]}}[case]
    err = _series_refusal(tmp_path, zip_of(members))
    assert err.status == 422 and err.code == "invalid_archive"
    if case == "text_member":
        assert "'notes.txt' is not a DICOM file" in err.message


def test_corrupt_series_members_are_refused(tmp_path):
    _, slices = series_slices(tmp_path)
    good = {f"{k}.dcm": s for k, s in enumerate(slices[:2])}
    garbage = b"\0" * 128 + b"DICM" + bytes(range(256)) * 4  # the preamble, then no valid meta group
    err = _series_refusal(tmp_path, zip_of({**good, "bad.dcm": garbage}))
    assert err.code == "invalid_dicom"
    err = _series_refusal(tmp_path, zip_of({**good, "bad.dcm": b"plain text, named .dcm"}))
    assert err.code == "invalid_dicom"
    no_image = dicom_declaring(tmp_path, 0, 0)
    assert _series_refusal(tmp_path, zip_of({**good, "bad.dcm": no_image})).code == "invalid_dicom"
    deflated = dicom_declaring(tmp_path, 8, 8, syntax="1.2.840.10008.1.2.1.99")
    assert _series_refusal(tmp_path, zip_of({"x.dcm": deflated})).code == "unsupported_media_type"
    # a stored member whose bytes were damaged after zipping: the CRC check fails while reading
    data = bytearray(zip_of(good, method=zipfile.ZIP_STORED))
    at = bytes(data).index(slices[0][300:340]) + 10
    data[at] ^= 0xFF
    err = _series_refusal(tmp_path, bytes(data))
    assert err.code == "invalid_archive" and "could not be extracted" in err.message
    assert _series_refusal(tmp_path, b"PK\x03\x04" + b"\0" * 100).code == "invalid_archive"


def test_series_zip_bomb_is_refused_before_extracting(tmp_path):
    _, slices = series_slices(tmp_path)
    data = zip_of({"0.dcm": slices[0], "1.dcm": slices[1] + b"\0" * LIM.max_file_bytes})
    err = _series_refusal(tmp_path, data)
    assert err.status == 413 and err.code == "file_too_large"


def test_volume_kind_names_both_formats_when_refused():
    err = _code(check_file, "volume", real_png(), "x.png", None, "f", LIM)
    assert err.code == "unsupported_media_type" and "ZIP of one DICOM series" in err.message


def test_ehr_text_files_and_kind_checks():
    ok = check_file("ehr", b'{"vitals": {"heart_rate": 80}}', "e.json", None, "f", LIM)
    assert ok.suffix == ".json"
    assert check_file("ehr", b"name,value\nsbp,120\n", "e.csv", None, "f", LIM).suffix == ".csv"
    assert _code(check_file, "ehr", b"\xff\xfe", "e.json", None, "f", LIM).code == "invalid_text"
    assert _code(check_file, "ehr", b"{}", "e.xml", None, "f", LIM).code == "unsupported_media_type"
    assert _code(check_file, "image", real_png(), "a.png", "nope", "f", LIM).code == "invalid_window"
    assert _code(check_file, "ehr", b"x" * (LIM.max_file_bytes + 1), "e.json", None, "f", LIM).status == 413


# ----------------------------------------------------------------------------- messages

def _req(messages):
    return ChatRequest.model_validate({"messages": messages})


def test_to_record_messages_maps_parts_and_writes_files(tmp_path):
    png = real_png()
    req = _req([{"role": "developer", "content": "Be brief."},
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + b64(png)}},
                                             {"type": "text", "text": "What?"},
                                             {"type": "input_file", "input_file": {"kind": "ehr", "filename": "e.json",
                                                                                   "data": b64(b'{"sbp": 90}')}}]}])
    messages, params = to_record_messages(req.messages, tmp_path, LIM)
    assert messages[0] == {"role": "system", "content": [{"type": "text", "text": "Be brief."}]}
    parts = messages[1]["content"]
    assert [p["type"] for p in parts] == ["image", "text", "ehr"]
    assert open(parts[0]["path"], "rb").read() == png
    assert parts[0]["path"].endswith(".png") and parts[2]["path"].endswith(".json")
    assert params == ["messages.1.content.0.image_url.url", "messages.1.content.2.input_file"]


def test_too_many_media_and_media_outside_user_messages(tmp_path):
    url = "data:image/png;base64," + b64(real_png())
    img = {"type": "image_url", "image_url": {"url": url}}
    err = _code(to_record_messages, _req([{"role": "user", "content": [img, img, img]}]).messages, tmp_path, LIM)
    assert err.code == "too_many_media" and "3 images/files" in err.message and "limit of 2" in err.message
    err = _code(to_record_messages, _req([{"role": "assistant", "content": [img]},
                                          {"role": "user", "content": "q"}]).messages, tmp_path, LIM)
    assert err.code == "invalid_conversation" and err.param == "messages.0.content.0"
    err = _code(to_record_messages, _req([{"role": "user", "content": "q"},
                                          {"role": "assistant", "content": "a"}]).messages, tmp_path, LIM)
    assert err.param == "messages.1.role"
    assert not list(tmp_path.iterdir())  # refused before anything was written

"""Image reader: files written here by Pillow, compared with the source arrays and np.asarray(PIL)."""

from __future__ import annotations

import struct
import time
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest

from medmllm.data.readers import detect, read
from medmllm.data.readers.image import read_image
from medmllm.errors import InputError

Image = pytest.importorskip("PIL.Image")

RNG = np.random.default_rng(0)
GRAY8 = RNG.integers(0, 256, (17, 23), dtype=np.uint8)
GRAY16 = RNG.integers(0, 65536, (17, 23), dtype=np.uint16)
RGBA = RNG.integers(0, 256, (17, 23, 4), dtype=np.uint8)


def _pil(path: Path, convert: str | None = None) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert(convert) if convert else im)


def test_png_8bit_gray(tmp_path):
    path = tmp_path / "g.png"
    Image.fromarray(GRAY8).save(path)
    arr, meta = read_image(path)
    assert arr.dtype == np.uint8 and arr.shape == (17, 23)
    np.testing.assert_array_equal(arr, GRAY8)
    np.testing.assert_array_equal(arr, _pil(path))
    assert meta["mode"] == "L" and meta["size"] == [23, 17] and meta["n_pages"] == 1
    assert meta["kind"] == "image" and meta["spacing"] is None


def test_png_16bit_gray(tmp_path):
    path = tmp_path / "g16.png"
    Image.fromarray(GRAY16).save(path)
    arr, meta = read_image(path)
    assert arr.dtype == np.uint16 and meta["mode"].startswith("I;16")
    np.testing.assert_array_equal(arr, GRAY16)
    np.testing.assert_array_equal(arr, _pil(path).astype(np.uint16))


def test_rgba_drops_alpha_without_compositing(tmp_path):
    path = tmp_path / "rgba.png"
    Image.fromarray(RGBA, "RGBA").save(path)
    arr, meta = read_image(path)
    assert meta["mode"] == "RGBA" and arr.shape == (17, 23, 3) and arr.dtype == np.uint8
    np.testing.assert_array_equal(arr, RGBA[..., :3])


def test_la_becomes_gray(tmp_path):
    path = tmp_path / "la.png"
    Image.fromarray(np.stack([GRAY8, GRAY8[::-1]], -1), "LA").save(path)
    arr, meta = read_image(path)
    assert meta["mode"] == "LA" and arr.shape == (17, 23)
    np.testing.assert_array_equal(arr, GRAY8)


def test_palette_expands_to_rgb(tmp_path):
    palette = RNG.integers(0, 256, (256, 3), dtype=np.uint8)
    index = RNG.integers(0, 256, (9, 11), dtype=np.uint8)
    im = Image.fromarray(index, "L").convert("P")
    im.putpalette(palette.ravel().tolist())
    im.putdata(index.ravel().tolist())
    path = tmp_path / "p.png"
    im.save(path)
    arr, meta = read_image(path)
    assert meta["mode"] == "P" and arr.shape == (9, 11, 3)
    np.testing.assert_array_equal(arr, palette[index])  # palette lookup by hand


def test_bilevel_is_0_or_255(tmp_path):
    bits = RNG.integers(0, 2, (8, 16)).astype(bool)
    path = tmp_path / "b.png"
    Image.fromarray(bits).save(path)
    arr, meta = read_image(path)
    assert meta["mode"] == "1" and arr.dtype == np.uint8
    np.testing.assert_array_equal(arr, bits.astype(np.uint8) * 255)


def test_jpeg_rgb_and_cmyk(tmp_path):
    yy, xx = np.mgrid[0:17, 0:23]
    rgb = np.stack([yy * 15, xx * 11, 255 - yy * 7 - xx * 3], -1).astype(np.uint8)  # smooth: JPEG keeps it close
    Image.fromarray(rgb).save(tmp_path / "c.jpg", quality=95)
    arr, meta = read_image(tmp_path / "c.jpg")
    assert meta["mode"] == "RGB" and arr.shape == (17, 23, 3)
    np.testing.assert_array_equal(arr, _pil(tmp_path / "c.jpg"))
    assert np.abs(arr.astype(int) - rgb).mean() < 5  # lossy, but the same picture

    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "k.jpg")
    arr, meta = read_image(tmp_path / "k.jpg")
    assert meta["mode"] == "CMYK" and arr.shape == (17, 23, 3)
    np.testing.assert_array_equal(arr, _pil(tmp_path / "k.jpg", "RGB"))


def test_int32_and_float32_tiff(tmp_path):
    ints = RNG.integers(-(2**30), 2**30, (5, 7), dtype=np.int32)
    floats = RNG.standard_normal((5, 7)).astype(np.float32)
    Image.fromarray(ints).save(tmp_path / "i.tif")
    Image.fromarray(floats).save(tmp_path / "f.tif")
    arr, meta = read_image(tmp_path / "i.tif")
    assert meta["mode"] == "I" and arr.dtype == np.int32
    np.testing.assert_array_equal(arr, ints)
    arr, meta = read_image(tmp_path / "f.tif")
    assert meta["mode"] == "F" and arr.dtype == np.float32
    np.testing.assert_array_equal(arr, floats)


def test_multipage_tiff_pages(tmp_path):
    pages = [GRAY8, GRAY8[::-1].copy(), 255 - GRAY8]
    path = tmp_path / "stack.tif"
    Image.fromarray(pages[0]).save(path, save_all=True, append_images=[Image.fromarray(p) for p in pages[1:]])
    for i, expected in enumerate(pages):
        arr, meta = read_image(path, page=i)
        assert meta["n_pages"] == 3 and meta["page"] == i
        np.testing.assert_array_equal(arr, expected)
    with pytest.raises(InputError, match="page 3 out of range"):
        read_image(path, page=3)


def test_tiff_resolution_gives_spacing(tmp_path):
    Image.fromarray(GRAY8).save(tmp_path / "inch.tif", dpi=(254, 127))
    _, meta = read_image(tmp_path / "inch.tif")
    # 254 px/inch across -> 0.1 mm per column; 127 px/inch down -> 0.2 mm per row
    np.testing.assert_allclose(meta["spacing"], [0.2, 0.1])
    np.testing.assert_allclose(meta["dpi"], [254, 127])

    Image.fromarray(GRAY8).save(tmp_path / "cm.tif", resolution_unit=3, x_resolution=20.0, y_resolution=40.0)
    _, meta = read_image(tmp_path / "cm.tif")
    np.testing.assert_allclose(meta["spacing"], [10 / 40, 10 / 20])

    Image.fromarray(GRAY8).save(tmp_path / "none.tif", resolution_unit=1, x_resolution=5.0, y_resolution=5.0)
    assert read_image(tmp_path / "none.tif")[1]["spacing"] is None
    Image.fromarray(GRAY8).save(tmp_path / "bare.tif")
    _, meta = read_image(tmp_path / "bare.tif")
    assert meta["spacing"] is None and "dpi" not in meta


def test_bmp(tmp_path):
    Image.fromarray(RGBA[..., :3]).save(tmp_path / "x.bmp")
    arr, _ = read(tmp_path / "x.bmp")
    np.testing.assert_array_equal(arr, RGBA[..., :3])


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def test_decompression_bomb_is_refused_without_decoding(tmp_path):
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)  # 1e10 8-bit gray pixels
    idat = zlib.compress(b"\x00" * 1000)
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b""))
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(InputError, match=r"bomb\.png.*(refused|limit)"):
            read(bomb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - t0 < 1.0
    assert peak < 10 * 2**20


def test_header_above_our_limit_is_refused(tmp_path, monkeypatch):
    from medmllm.data.readers import base

    Image.fromarray(GRAY8).save(tmp_path / "g.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after the test
    monkeypatch.setattr(base, "MAX_IMAGE_PIXELS", 100)  # 17 x 23 = 391 pixels declared
    with pytest.raises(InputError, match="391|limit"):
        read_image(tmp_path / "g.png")


def test_truncated_png_is_an_input_error(tmp_path):
    Image.fromarray(RGBA[..., :3]).save(tmp_path / "full.png")
    raw = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(InputError, match="truncated"):
        read_image(tmp_path / "cut.png")


def test_not_an_image(tmp_path):
    (tmp_path / "junk.png").write_bytes(b"hello, not a PNG")
    with pytest.raises(InputError, match="junk.png"):
        read_image(tmp_path / "junk.png")


@pytest.mark.parametrize("name", ["a.png", "a.jpg", "a.tif", "a.bmp"])
def test_auto_detection_picks_image(tmp_path, name):
    Image.fromarray(GRAY8).save(tmp_path / name)
    assert detect(tmp_path / name) == "image"
    arr, meta = read(tmp_path / name)
    assert meta["format"] == "image" and arr.shape == (17, 23)


"""Opening images: 8-bit RGB, clear errors, and a limit on the pixels an image may declare."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from iqa_dist.images import DEFAULT_MAX_PIXELS, BadImage, check_upsampling, max_pixels, open_rgb, read_rgb


def png(width: int, height: int) -> bytes:
    return encode(Image.fromarray(np.zeros((height, width, 3), dtype=np.uint8)))


def encode(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def declaring(data: bytes, width: int, height: int) -> bytes:
    """A PNG whose header claims another size: a decompression bomb's few bytes."""
    ihdr = data[12:29]  # chunk type + 13 bytes of data
    ihdr = ihdr[:4] + struct.pack(">II", width, height) + ihdr[12:]
    return data[:12] + ihdr + struct.pack(">I", zlib.crc32(ihdr)) + data[33:]


def test_a_bomb_is_refused_before_decoding_with_the_files_name():
    bomb = declaring(png(16, 16), 20000, 20000)
    with pytest.raises(BadImage, match=r"^x/bomb\.png: 20000x20000 is 400 megapixels, over the limit of 64 "):
        open_rgb(bomb, "x/bomb.png")


def test_spaq_sized_photographs_pass_the_default_limit(monkeypatch):
    monkeypatch.delenv("IQA_MAX_PIXELS", raising=False)
    assert max_pixels() == DEFAULT_MAX_PIXELS >= 4000 * 3000
    img, converted = open_rgb(encode(Image.new("L", (4000, 3000))), "spaq.png")
    assert img.size == (4000, 3000) and converted == "L"


def test_the_limit_is_set_by_the_environment(monkeypatch, tmp_path):
    (tmp_path / "a.png").write_bytes(png(40, 30))
    monkeypatch.setenv("IQA_MAX_PIXELS", "1200")
    assert read_rgb(tmp_path / "a.png").size == (40, 30)
    monkeypatch.setenv("IQA_MAX_PIXELS", "1e3")
    with pytest.raises(BadImage, match=r"a\.png: 40x30 is 0.0012 megapixels, over the limit of 0.001 .*IQA_MAX_PIXELS"):
        read_rgb(tmp_path / "a.png")
    monkeypatch.setenv("IQA_MAX_PIXELS", "lots")
    with pytest.raises(ValueError, match="IQA_MAX_PIXELS='lots': expected a positive number of pixels"):
        read_rgb(tmp_path / "a.png")


def test_truncated_and_foreign_files_are_bad_images_naming_the_file():
    with pytest.raises(BadImage, match=r"^t\.png: unreadable image"):
        open_rgb(png(64, 64)[:60], "t.png")
    with pytest.raises(BadImage, match=r"^n\.txt: unreadable image \(not an image format"):
        open_rgb(b"hello", "n.txt")


def test_upsampling_a_small_image_to_a_patch_is_held_to_the_pixel_limit(monkeypatch):
    """A 1x60000 strip (0.06 megapixels) would be 224 x 13.4 million pixels once upsampled."""
    with pytest.raises(BadImage, match=r"^x.png: 1x60000 is too thin to upsample to a 224-pixel patch "
                                       r"\(its sides are over 20:1\)$"):
        check_upsampling(1, 60000, 224, "x.png")
    check_upsampling(10, 150, 224, "x.png")  # 15:1, 224x3360 pixels: fine at the default limit
    check_upsampling(300, 9000, 224, "x.png")  # not upsampled at all
    monkeypatch.setenv("IQA_MAX_PIXELS", "500000")
    with pytest.raises(BadImage, match=r"^x.png: 10x150 upsampled to a 224-pixel patch is 0.753 megapixels, "
                                       r"over the limit of 0.5 \(IQA_MAX_PIXELS\)$"):
        check_upsampling(10, 150, 224, "x.png")

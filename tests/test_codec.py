"""Image decoding: every stored bit depth becomes the uint8 RGB the models see, scaled, never clipped."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from ray_wsss.core import codec


def _png_16bit(samples: np.ndarray) -> bytes:
    """A 16-bit PNG (grey [H, W] or RGB [H, W, 3]) written by hand from the PNG spec: Pillow writes
    16-bit grey only, and an independent writer keeps the test from trusting the decoder's library."""
    height, width = samples.shape[:2]
    colour_type = 0 if samples.ndim == 2 else 2
    rows = b"".join(b"\x00" + samples[y].astype(">u2").tobytes() for y in range(height))  # filter 0 per row

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def _encoded(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


RNG = np.random.default_rng(0)
GREY16 = RNG.integers(0, 2 ** 16, (5, 7), dtype=np.uint16)
RGB16 = RNG.integers(0, 2 ** 16, (5, 7, 3), dtype=np.uint16)


@pytest.mark.parametrize("data", [_encoded(Image.fromarray(GREY16), "PNG"), _png_16bit(GREY16)],
                         ids=["pillow-written", "hand-written"])
def test_16bit_grey_png_is_scaled_not_clipped(data):
    with Image.open(io.BytesIO(data)) as img:
        assert img.mode.startswith("I;16")  # the mode Pillow's convert("RGB") clips to white
    rgb = codec.decode_image(data)
    assert rgb.dtype == np.uint8 and rgb.shape == (5, 7, 3)
    for channel in range(3):
        np.testing.assert_array_equal(rgb[..., channel], GREY16 >> 8)
    assert (rgb < 255).any()


def test_16bit_rgb_png():
    rgb = codec.decode_image(_png_16bit(RGB16))
    np.testing.assert_array_equal(rgb, (RGB16 >> 8).astype(np.uint8))


def test_float_and_32bit_tiffs():
    unit = RNG.random((4, 6), dtype=np.float32)
    rgb = codec.decode_image(_encoded(Image.fromarray(unit, "F"), "TIFF"))
    np.testing.assert_array_equal(rgb[..., 0], np.round(unit * 255).astype(np.uint8))
    wide = RNG.integers(0, 2 ** 31, (4, 6), dtype=np.int32)
    rgb = codec.decode_image(_encoded(Image.fromarray(wide, "I"), "TIFF"))
    np.testing.assert_array_equal(rgb[..., 1], (wide >> 24).astype(np.uint8))


def test_values_without_a_scale_are_refused():
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        codec.decode_image(_encoded(Image.fromarray(np.full((3, 3), 7.5, np.float32), "F"), "TIFF"))


def test_8bit_modes_unchanged():
    rgb = RNG.integers(0, 256, (6, 5, 3), dtype=np.uint8)
    np.testing.assert_array_equal(codec.decode_image(_encoded(Image.fromarray(rgb, "RGB"), "PNG")), rgb)
    grey = rgb[..., 0].copy()
    np.testing.assert_array_equal(codec.decode_image(_encoded(Image.fromarray(grey, "L"), "PNG"))[..., 2], grey)

"""Encoding of the binary columns in the Parquet contracts: images, masks, score maps."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image


# The PASCAL VOC colour map, so masks open in any viewer with the colours people know.
def _voc_palette() -> list[int]:
    palette = []
    for label in range(256):
        r = g = b = 0
        c = label
        for shift in range(7, -1, -1):
            r |= ((c >> 0) & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        palette += [r, g, b]
    return palette


VOC_PALETTE = _voc_palette()


def decode_image(data: bytes) -> np.ndarray:
    """Encoded image bytes -> uint8 [H, W, 3] RGB, whatever the stored mode (L, P, CMYK, RGBA, 16-bit).

    Pillow's ``convert("RGB")`` clips the 16-bit and 32-bit grey modes to 255 (a 16-bit PNG turns
    all white), so those are scaled by their bit depth here; float images must lie in [0, 1].
    Raises ValueError for an image whose values have no known scale.
    """
    with Image.open(io.BytesIO(data)) as img:
        img.load()  # raises on truncated data instead of returning a grey tail
        if img.mode in ("I", "F") or img.mode.startswith("I;16"):
            grey = _high_depth_to_uint8(img)
            return np.repeat(grey[..., None], 3, axis=2)
        return np.array(img.convert("RGB"))  # a writable copy: pydensecrf refuses read-only buffers


def _high_depth_to_uint8(img: Image.Image) -> np.ndarray:
    """A 16-bit / 32-bit integer or float grey image -> uint8 [H, W] by its bit depth (floats: [0, 1])."""
    values = np.asarray(img)
    if img.mode == "F":
        if not np.isfinite(values).all() or values.min() < 0 or values.max() > 1:
            raise ValueError(f"float image values must lie in [0, 1], got {values.min()}..{values.max()}")
        return np.round(values * 255).astype(np.uint8)
    bits = _bit_depth(img)
    if values.min() < 0 or values.max() >= 2 ** bits:
        raise ValueError(f"{img.mode} image values {values.min()}..{values.max()} do not fit its {bits} bits")
    return (values.astype(np.int64) >> (bits - 8)).astype(np.uint8)  # as Pillow reads 16-bit RGB PNGs


def _bit_depth(img: Image.Image) -> int:
    """Bits per sample of an integer grey image: its TIFF header's (12-bit data sits in 16-bit
    samples), else its mode's."""
    tiff_bits = getattr(img, "tag_v2", {}).get(258)  # BitsPerSample
    if tiff_bits:
        return int(tiff_bits[0] if isinstance(tiff_bits, tuple) else tiff_bits)
    if img.mode.startswith("I;16") or img.format == "PNG":  # older Pillow opened 16-bit grey PNGs as "I"
        return 16
    raise ValueError(f"{img.format} image of mode {img.mode} (32-bit integers) has no known bit depth")


def image_size(data: bytes) -> tuple[int, int]:
    """(height, width) of encoded image bytes, decoding the whole image to catch truncation."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return img.height, img.width


def encode_png_image(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8), "RGB").save(buf, format="PNG")
    return buf.getvalue()


def encode_mask(mask: np.ndarray) -> bytes:
    """uint8 [H, W] class ids -> palette PNG (ids are the palette indices, 255 = ignore)."""
    if mask.dtype != np.uint8 or mask.ndim != 2:
        raise ValueError(f"mask must be uint8 [H, W], got {mask.dtype} {mask.shape}")
    img = Image.fromarray(mask, "P")
    img.putpalette(VOC_PALETTE)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def decode_mask(data: bytes) -> np.ndarray:
    """PNG bytes -> uint8 [H, W] class ids. Palette and grayscale PNGs only: RGB masks are ambiguous."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        if img.mode not in ("P", "L"):
            raise ValueError(f"mask PNG must be palette or grayscale class ids, got mode {img.mode}")
        return np.asarray(img, dtype=np.uint8)


SCORE_ENCODINGS = ("float16", "uint8")
_UINT8_LEVELS = 255


def encode_scores(scores: np.ndarray, encoding: str = "float16") -> bytes:
    """float [C, h, w] -> .npy bytes (self-describing shape and dtype).

    ``"float16"``: the values as float16. ``"uint8"``: scores in [0, 1] as ``round(255 * score)``, a step of
    1/255 (at most 1/510 from the value); the seeds table's ``scores`` column is zstd-compressed on top.
    """
    if encoding not in SCORE_ENCODINGS:
        raise ValueError(f"score encoding must be one of {SCORE_ENCODINGS}, got {encoding!r}")
    scores = np.asarray(scores)
    if scores.ndim != 3:
        raise ValueError(f"scores must be [C, h, w], got shape {scores.shape}")
    if encoding == "uint8":
        if scores.size and not (np.isfinite(scores).all() and scores.min() >= 0 and scores.max() <= 1):
            raise ValueError(f"uint8 scores must lie in [0, 1], got {scores.min()}..{scores.max()}")
        scores = np.rint(scores.astype(np.float32) * _UINT8_LEVELS).astype(np.uint8)
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(scores, dtype=np.float16 if encoding == "float16" else np.uint8),
            allow_pickle=False)
    return buf.getvalue()


def decode_scores(data: bytes) -> np.ndarray:
    """.npy bytes of either encoding -> float32 [C, h, w] at the stored size.

    Readers of a seeds table use ``ray_wsss.core.seeds.stored.read_scores``, which also brings compact
    maps to the image's size.
    """
    arr = np.load(io.BytesIO(data), allow_pickle=False)
    if arr.ndim != 3:
        raise ValueError(f"scores must be [C, h, w], got shape {arr.shape}")
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / np.float32(_UINT8_LEVELS)
    if arr.dtype != np.float16:
        raise ValueError(f"scores must be float16 or uint8, got {arr.dtype}")
    return arr.astype(np.float32)

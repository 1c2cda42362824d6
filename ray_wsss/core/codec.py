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
    """Encoded image bytes -> uint8 [H, W, 3] RGB, whatever the stored mode (L, P, CMYK, RGBA)."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()  # raises on truncated data instead of returning a grey tail
        return np.array(img.convert("RGB"))  # a writable copy: pydensecrf refuses read-only buffers


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


def encode_scores(scores: np.ndarray) -> bytes:
    """float [C, h, w] -> .npy bytes of float16 (self-describing shape)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(scores, dtype=np.float16), allow_pickle=False)
    return buf.getvalue()


def decode_scores(data: bytes) -> np.ndarray:
    """.npy bytes -> float32 [C, h, w]."""
    arr = np.load(io.BytesIO(data), allow_pickle=False)
    if arr.ndim != 3:
        raise ValueError(f"scores must be [C, h, w], got shape {arr.shape}")
    return arr.astype(np.float32)

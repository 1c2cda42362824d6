"""Seed maps as the ``seeds`` table stores them, and the one way to read them back at the image's size.

A seeds row holds its image's ``height`` and ``width`` and, in ``scores``, the ``.npy`` bytes of its
min-max-normalised maps ``[len(classes), h, w]`` at the table's resolution (``dataset.json``):

* ``"image"``: h x w = height x width, nothing to resample;
* ``"grid"``: the patch grid of the largest test-time view (scale 1 at least); ``"short-side"``:
  ``short_side`` pixels on the shorter side. Either way at most the image's size on each side.

The views are summed and min-max normalised at that size (``ray_wsss.core.seeds.tta``), then encoded
(``codec.encode_scores``: float16, or uint8 steps of 1/255). :func:`read_scores` brings them to
height x width with the same bilinear resampling the views went through (``align_corners`` as the
extraction's, recorded in ``dataset.json``), so the evaluation, the CRF and the contact sheets see
image-sized maps. The dtype and shape come from the row alone; only ``align_corners`` is the table's.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from ray_wsss.core import codec
from ray_wsss.core.errors import RecordError
from ray_wsss.core.seeds.tta import TTAConfig, upsample_maps

NORMALISATION = "min-max per labelled class, after summing scales and flips at the stored resolution"


@dataclasses.dataclass(frozen=True)
class SeedFormat:
    """How a seeds table stores its maps (its ``dataset.json`` keys; the defaults are the original contract)."""

    resolution: str = "image"       # "image", "grid" or "short-side" (tta.RESOLUTIONS)
    short_side: int | None = None   # "short-side": pixels on the shorter side
    encoding: str = "float16"       # codec.SCORE_ENCODINGS
    align_corners: bool = False     # of the bilinear upsampling on read, as of the views' resampling

    @classmethod
    def of(cls, tta: TTAConfig, encoding: str) -> SeedFormat:
        if encoding not in codec.SCORE_ENCODINGS:
            raise ValueError(f"seed encoding must be one of {codec.SCORE_ENCODINGS}, got {encoding!r}")
        return cls(resolution=tta.resolution, short_side=tta.short_side, encoding=encoding,
                   align_corners=tta.align_corners)

    def metadata(self) -> dict[str, Any]:
        """The ``dataset.json`` entries of a seeds table in this format."""
        dtype = {"float16": "float16", "uint8": "uint8 round(255 * score)"}[self.encoding]
        return {
            "resolution": self.resolution,
            "short_side": self.short_side,
            "scores_encoding": self.encoding,
            "scores_format": f"npy {dtype} [len(classes), h, w]; h x w per the resolution, the array's own shape",
            "upsampling": {"mode": "bilinear", "align_corners": self.align_corners},
            "normalisation": NORMALISATION,
        }

    @classmethod
    def from_metadata(cls, meta: dict[str, Any]) -> SeedFormat:
        """The format a seeds table's ``dataset.json`` states (a table written before formats were stated:
        image resolution, float16)."""
        upsampling = meta.get("upsampling") or {}
        return cls(resolution=meta.get("resolution", "image"), short_side=meta.get("short_side"),
                   encoding=meta.get("scores_encoding", "float16"),
                   align_corners=bool(upsampling.get("align_corners", False)))

    def encode(self, scores: np.ndarray) -> bytes:
        return codec.encode_scores(scores, self.encoding)

    def read(self, row: dict[str, Any]) -> np.ndarray:
        """A seeds row (``scores``, ``height``, ``width``) -> float32 [k, height, width].

        Raises ValueError for bad bytes, or maps smaller than the image in a table of image resolution.
        """
        return read_scores(row["scores"], row["height"], row["width"], self.align_corners,
                           resample=self.resolution != "image")


def read_scores(data: bytes, height: int, width: int, align_corners: bool = False,
                resample: bool = True) -> np.ndarray:
    """A seeds row's ``scores`` bytes -> float32 [k, height, width], upsampled when stored smaller.

    Every reader of a seeds table goes through here (through :meth:`SeedFormat.read`). Raises ValueError
    for bytes that are not a score array, an array larger than the image on either side (a row of another
    image), or, with ``resample=False`` (a table of image resolution), any other size than the image's.
    """
    scores = codec.decode_scores(data)
    stored = scores.shape[1:]
    if stored == (height, width):
        return scores
    if not resample or stored[0] > height or stored[1] > width or 0 in stored:
        raise ValueError(f"stored maps of size {stored[0]}x{stored[1]} do not fit a {height}x{width} image"
                         + ("" if resample else " (the table's resolution is the image's)"))
    if not len(scores):
        return np.zeros((0, height, width), np.float32)
    return upsample_maps(torch.from_numpy(scores), (height, width), align_corners).numpy()


def decode_seeded_sample(record: dict[str, Any], seed_format: SeedFormat) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """A sample row (``image_id``, ``image``) with its seeds row under ``"seeds"`` -> (uint8 image [H, W, 3],
    float32 scores [k, H, W] read in ``seed_format``, the k class ids); RecordError names what is missing or
    does not fit."""
    image_id = record["image_id"]
    seeds = record.get("seeds")
    if seeds is None:
        raise RecordError(image_id, "no seeds for this image in the seeds table")
    try:
        rgb = codec.decode_image(record["image"])
    except Exception as err:
        raise RecordError(image_id, f"cannot decode image: {err}") from err
    try:
        scores = seed_format.read(seeds)
    except Exception as err:
        raise RecordError(image_id, f"bad seed scores: {err}") from err
    classes = [int(c) for c in seeds["classes"]]
    if scores.shape != (len(classes), *rgb.shape[:2]):
        raise RecordError(image_id, f"seed scores of shape {scores.shape} do not fit {len(classes)} classes "
                                    f"of a {rgb.shape[0]}x{rgb.shape[1]} image")
    return rgb, scores, classes

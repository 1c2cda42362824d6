"""Seed scores with test-time augmentation: multi-scale inference plus a horizontal flip.

Every (scale, flip) view's class maps are upsampled (bilinear) to the image size, un-flipped and
summed; the sum is min-max normalised per class. Views of equal input size are batched: images
whose resized shapes agree share one forward, and each image's flip rides in the same batch.

Rounding rule: a view's side is ``side * f * scale`` rounded to the nearest multiple of the patch
size (halves up), at least one patch, where ``f = base_size / max(H, W)`` when ``base_size`` is set
and 1 otherwise.
"""
from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ray_wsss.core.data.augment import normalize
from ray_wsss.core.models.vit import AttentionViT
from ray_wsss.core.seeds.acr_maps import ACRMapConfig, class_maps, minmax_per_class


def scaled_size(height: int, width: int, scale: float, patch_size: tuple[int, int],
                base_size: int | None = None) -> tuple[int, int]:
    """The (h, w) a view of an H x W image is resized to (the rounding rule in the module doc)."""
    if scale <= 0 or (base_size is not None and base_size <= 0):
        raise ValueError(f"scale {scale} and base_size {base_size} must be positive")
    factor = scale * (base_size / max(height, width) if base_size else 1.0)
    return tuple(max(p, math.floor(side * factor / p + 0.5) * p)  # type: ignore[return-value]
                 for side, p in zip((height, width), patch_size))


def seed_scores(model: AttentionViT, image_rgb: np.ndarray, classes: Sequence[int],
                scales: Sequence[float] = (1.0,), flip: bool = True, cfg: ACRMapConfig = ACRMapConfig(),
                base_size: int | None = None) -> np.ndarray:
    """uint8 [H, W, 3] image, its foreground ids -> float32 [k, H, W] scores in [0, 1], classes in order."""
    return seed_scores_batch(model, [image_rgb], [classes], scales, flip, cfg, base_size)[0]


def seed_scores_batch(model: AttentionViT, images: Sequence[np.ndarray], classes: Sequence[Sequence[int]],
                      scales: Sequence[float] = (1.0,), flip: bool = True, cfg: ACRMapConfig = ACRMapConfig(),
                      base_size: int | None = None) -> list[np.ndarray]:
    """:func:`seed_scores` for many images; images with equal view sizes share forwards.

    Bad input raises ``ValueError`` naming the image's position in the batch.
    """
    if len(images) != len(classes):
        raise ValueError(f"{len(images)} images but {len(classes)} class lists")
    if not scales:
        raise ValueError("scales is empty")
    for index, rgb in enumerate(images):
        if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3 or min(rgb.shape[:2]) == 0:
            raise ValueError(f"image {index}: expected uint8 [H, W, 3], got {rgb.dtype} {rgb.shape}")
    device = next(model.parameters()).device
    inputs = [normalize(rgb).to(device) for rgb in images]
    sums = [torch.zeros(len(row), *rgb.shape[:2], device=device) for rgb, row in zip(images, classes)]
    for scale in scales:
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for index, rgb in enumerate(images):
            if len(classes[index]):  # an image without foreground needs no forward
                groups[scaled_size(*rgb.shape[:2], scale, model.patch_size, base_size)].append(index)
        for size, members in groups.items():
            _accumulate_views(model, [inputs[i] for i in members], [classes[i] for i in members], size, flip,
                              cfg, [sums[i] for i in members])
    return [minmax_per_class(total).cpu().numpy().astype(np.float32, copy=False) for total in sums]


def _accumulate_views(model: AttentionViT, inputs: list[Tensor], classes: list[Sequence[int]],
                      size: tuple[int, int], flip: bool, cfg: ACRMapConfig, sums: list[Tensor]) -> None:
    """Adds the class maps of one view size (and its flip) of each input to its sum, in place."""
    batch = torch.stack([_resize(x, size) for x in inputs])
    if flip:
        batch, classes = torch.cat([batch, batch.flip(-1)]), list(classes) * 2
    maps = class_maps(model, batch, classes, cfg)
    for index, total in enumerate(sums):
        total += _upsample(maps[index], total.shape[-2:])
        if flip:
            total += _upsample(maps[len(sums) + index], total.shape[-2:]).flip(-1)


def _resize(image: Tensor, size: tuple[int, int]) -> Tensor:
    if tuple(image.shape[-2:]) == size:
        return image
    # antialias: downscaled views should average pixels, not skip them
    return F.interpolate(image[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]


def _upsample(maps: Tensor, size: Sequence[int]) -> Tensor:
    return F.interpolate(maps[None], size=tuple(size), mode="bilinear", align_corners=False)[0]

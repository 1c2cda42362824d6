"""Seed scores with test-time augmentation: multi-scale inference plus a horizontal flip, for any method.

Every (scale, flip) view's class maps (from the method's class-map function) are upsampled (bilinear) to
the image size, un-flipped and summed; the sum is min-max normalised per class. Views of equal input
size are batched: images whose resized shapes agree share one forward, and each image's flip rides in
the same batch.

Rounding rule: a view's side is ``side * f * scale`` rounded to the nearest multiple of the patch
size (halves up), at least one patch, where ``f = base_size / max(H, W)`` when ``base_size`` is set
and 1 otherwise.
"""
from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ray_wsss.core.data.augment import normalize

# (model, normalised images [B, 3, h, w], labelled classes per image) -> per image [k_i, gh, gw] maps
ClassMapFn = Callable[[nn.Module, Tensor, Sequence[Sequence[int]]], list[Tensor]]


@dataclasses.dataclass(frozen=True)
class TTAConfig:
    scales: tuple[float, ...] = (1.0,)
    flip: bool = True
    base_size: int | None = None   # resize the longer side to this before scaling; None = native

    def __post_init__(self) -> None:
        if not self.scales or any(s <= 0 for s in self.scales):
            raise ValueError(f"scales must be a non-empty list of positive numbers, got {self.scales}")
        if self.base_size is not None and self.base_size <= 0:
            raise ValueError(f"base_size must be positive, got {self.base_size}")


def scaled_size(height: int, width: int, scale: float, patch_size: tuple[int, int],
                base_size: int | None = None) -> tuple[int, int]:
    """The (h, w) a view of an H x W image is resized to (the rounding rule in the module doc)."""
    if scale <= 0 or (base_size is not None and base_size <= 0):
        raise ValueError(f"scale {scale} and base_size {base_size} must be positive")
    factor = scale * (base_size / max(height, width) if base_size else 1.0)
    return tuple(max(p, math.floor(side * factor / p + 0.5) * p)  # type: ignore[return-value]
                 for side, p in zip((height, width), patch_size))


def minmax_per_class(maps: Tensor) -> Tensor:
    """[k, ...] -> each class map scaled to [0, 1]; a constant map becomes 0."""
    if maps.numel() == 0:
        return maps.clone()
    flat = maps.flatten(1)
    low = flat.min(dim=1, keepdim=True).values
    span = flat.max(dim=1, keepdim=True).values - low
    # Constant maps: divide by 1 (result 0) rather than by 0.
    scaled = (flat - low) / torch.where(span > 0, span, torch.ones_like(span))
    return scaled.reshape(maps.shape)


def seed_scores(class_map_fn: ClassMapFn, model: nn.Module, image_rgb: np.ndarray, classes: Sequence[int],
                cfg: TTAConfig = TTAConfig()) -> np.ndarray:
    """uint8 [H, W, 3] image, its foreground ids -> float32 [k, H, W] scores in [0, 1], classes in order."""
    return seed_scores_batch(class_map_fn, model, [image_rgb], [classes], cfg)[0]


def seed_scores_batch(class_map_fn: ClassMapFn, model: nn.Module, images: Sequence[np.ndarray],
                      classes: Sequence[Sequence[int]], cfg: TTAConfig = TTAConfig()) -> list[np.ndarray]:
    """:func:`seed_scores` for many images; images with equal view sizes share forwards.

    Bad input raises ``ValueError`` naming the image's position in the batch.
    """
    if len(images) != len(classes):
        raise ValueError(f"{len(images)} images but {len(classes)} class lists")
    for index, rgb in enumerate(images):
        if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3 or min(rgb.shape[:2]) == 0:
            raise ValueError(f"image {index}: expected uint8 [H, W, 3], got {rgb.dtype} {rgb.shape}")
    device = next(model.parameters()).device
    inputs = [normalize(rgb).to(device) for rgb in images]
    sums = [torch.zeros(len(row), *rgb.shape[:2], device=device) for rgb, row in zip(images, classes)]
    for scale in cfg.scales:
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for index, rgb in enumerate(images):
            if len(classes[index]):  # an image without foreground needs no forward
                groups[scaled_size(*rgb.shape[:2], scale, model.patch_size, cfg.base_size)].append(index)
        for size, members in groups.items():
            _accumulate_views(class_map_fn, model, [inputs[i] for i in members], [classes[i] for i in members],
                              size, cfg.flip, [sums[i] for i in members])
    return [minmax_per_class(total).cpu().numpy().astype(np.float32, copy=False) for total in sums]


def _accumulate_views(class_map_fn: ClassMapFn, model: nn.Module, inputs: list[Tensor],
                      classes: list[Sequence[int]], size: tuple[int, int], flip: bool, sums: list[Tensor]) -> None:
    """Adds the class maps of one view size (and its flip) of each input to its sum, in place."""
    batch = torch.stack([_resize(x, size) for x in inputs])
    if flip:
        batch, classes = torch.cat([batch, batch.flip(-1)]), list(classes) * 2
    maps = class_map_fn(model, batch, classes)
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
    return F.interpolate(maps[None].float(), size=tuple(size), mode="bilinear", align_corners=False)[0]

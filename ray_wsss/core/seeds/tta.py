"""Seed scores with test-time augmentation: multi-scale inference plus a horizontal flip, for any method.

Every (scale, flip) view's class maps (from the method's class-map function) are upsampled (bilinear) to
the image size, un-flipped and summed; the sum is min-max normalised per class. Views of equal input
size are batched: images whose resized shapes agree share one forward, and each image's flip rides in
the same batch (the flip of the whole resized view, so with ``partial_patches="drop"`` a flipped view
loses its LEFT-most columns, as the MCTformer authors' does).

How a view is made (``TTAConfig.resize``):

* ``"aspect"`` (default): each side is ``side * f * scale`` rounded to the nearest multiple of the
  patch size (halves up), at least one patch, with ``f = base_size / max(H, W)`` when ``base_size``
  is set and 1 otherwise; bilinear with antialiasing on the normalised float32 image.
* ``"square"`` (the ACR authors' ``infer_cam.py``): a ``S x S`` square whatever the aspect ratio,
  ``S = base_size * scale`` rounded the same way (``base_size`` = their crop size, required);
  bilinear without antialiasing (half-pixel centres) on the float64 pixels, divided by 255 and
  normalised in float64, then cast to float32.
* ``"pillow"`` (the MCTformer authors'): ``(round(H * scale), round(W * scale))`` with Python's round
  (halves to even) and no rounding to the patch size, Pillow bicubic on the uint8 image (the image
  itself at its own size), then normalised. Sides that are not patch multiples need a model built
  with ``partial_patches="drop"``. ``base_size`` must be None.

``align_corners`` is the upsampling's (ACR authors: True; MCTformer authors: False). ``minmax_eps``:
0 gives ``(x - min) / (max - min)`` with a constant map -> 0; the authors divide by
``max - min + eps`` (ACR 1e-6, MCTformer 1e-8), which makes seeds depend slightly on the maps' scale.
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
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor

from ray_wsss.core.data.augment import normalize

# (model, normalised images [B, 3, h, w], labelled classes per image) -> per image [k_i, gh, gw] maps
ClassMapFn = Callable[[nn.Module, Tensor, Sequence[Sequence[int]]], list[Tensor]]
RESIZES = ("aspect", "square", "pillow")


@dataclasses.dataclass(frozen=True)
class TTAConfig:
    scales: tuple[float, ...] = (1.0,)
    flip: bool = True
    base_size: int | None = None   # aspect: resize the longer side to this before scaling (None = native);
    #                                square: the square's side before scaling (required)
    resize: str = "aspect"         # how a view is made: "aspect", "square" or "pillow" (module docstring)
    align_corners: bool = False    # of the bilinear upsampling of the maps to the image size
    minmax_eps: float = 0.0        # normalisation (x - min) / (max - min + eps); 0 = exact, constant -> 0

    def __post_init__(self) -> None:
        if not self.scales or any(s <= 0 for s in self.scales):
            raise ValueError(f"scales must be a non-empty list of positive numbers, got {self.scales}")
        if self.base_size is not None and self.base_size <= 0:
            raise ValueError(f"base_size must be positive, got {self.base_size}")
        if self.resize not in RESIZES:
            raise ValueError(f"resize must be one of {RESIZES}, got {self.resize!r}")
        if self.resize == "square" and self.base_size is None:
            raise ValueError("resize='square' needs base_size (the square's side, e.g. the training crop)")
        if self.resize == "pillow" and self.base_size is not None:
            raise ValueError("resize='pillow' scales the image itself; base_size must be None")
        if self.minmax_eps < 0:
            raise ValueError(f"minmax_eps must be >= 0, got {self.minmax_eps}")


def scaled_size(height: int, width: int, scale: float, patch_size: tuple[int, int],
                base_size: int | None = None) -> tuple[int, int]:
    """The (h, w) an ``"aspect"`` view of an H x W image is resized to (the rounding rule in the module doc)."""
    if scale <= 0 or (base_size is not None and base_size <= 0):
        raise ValueError(f"scale {scale} and base_size {base_size} must be positive")
    factor = scale * (base_size / max(height, width) if base_size else 1.0)
    return tuple(max(p, math.floor(side * factor / p + 0.5) * p)  # type: ignore[return-value]
                 for side, p in zip((height, width), patch_size))


def view_size(height: int, width: int, scale: float, patch_size: tuple[int, int], cfg: TTAConfig) -> tuple[int, int]:
    """The (h, w) of the ``scale`` view of an H x W image under ``cfg.resize``."""
    if cfg.resize == "square":
        side = cfg.base_size
        return tuple(max(p, math.floor(side * scale / p + 0.5) * p) for p in patch_size)  # type: ignore[return-value]
    if cfg.resize == "pillow":
        return max(1, round(height * scale)), max(1, round(width * scale))
    return scaled_size(height, width, scale, patch_size, cfg.base_size)


def view_input(rgb: np.ndarray, size: tuple[int, int], resize: str, normalised: Tensor | None = None) -> Tensor:
    """float32 [3, h, w]: the ``resize`` view of uint8 ``rgb`` [H, W, 3] at ``size``.

    ``normalised``: ``normalize(rgb)`` when the caller has it already (it is reused, not recomputed).
    """
    if resize == "square":
        return _square_view(rgb, size)
    if normalised is None:
        normalised = normalize(rgb)
    if tuple(normalised.shape[-2:]) == tuple(size):
        return normalised
    if resize == "pillow":
        return normalize(pillow_resize(rgb, size))
    # antialias: downscaled views should average pixels, not skip them
    return F.interpolate(normalised[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]


def pillow_resize(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [h, w, 3], Pillow's bicubic (the MCTformer authors' ``Image.CUBIC``)."""
    resized = Image.fromarray(np.ascontiguousarray(rgb)).resize((size[1], size[0]), Image.Resampling.BICUBIC)
    return np.array(resized)  # a writable copy, for torch.from_numpy


def _square_view(rgb: np.ndarray, size: tuple[int, int]) -> Tensor:
    """The ACR authors' input: float64 bilinear resize of the pixels, /255, float64 normalisation, float32."""
    pixels = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).to(torch.float64)
    if tuple(pixels.shape[-2:]) != tuple(size):
        pixels = F.interpolate(pixels[None], size=size, mode="bilinear", align_corners=False)[0]
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN, dtype=torch.float64).view(3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD, dtype=torch.float64).view(3, 1, 1)
    return ((pixels / 255.0 - mean) / std).to(torch.float32)


def minmax_per_class(maps: Tensor, eps: float = 0.0) -> Tensor:
    """[k, ...] -> each class map scaled to [0, 1]: (x - min) / (max - min + eps); a constant map becomes 0."""
    if maps.numel() == 0:
        return maps.clone()
    flat = maps.flatten(1)
    low = flat.min(dim=1, keepdim=True).values
    span = flat.max(dim=1, keepdim=True).values - low
    if eps > 0:
        return ((flat - low) / (span + eps)).reshape(maps.shape)
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
                groups[view_size(*rgb.shape[:2], scale, model.patch_size, cfg)].append(index)
        for size, members in groups.items():
            batch = torch.stack([view_input(images[i], size, cfg.resize, inputs[i]).to(device) for i in members])
            _accumulate_views(class_map_fn, model, batch, [classes[i] for i in members], cfg,
                              [sums[i] for i in members])
    return [minmax_per_class(total, cfg.minmax_eps).cpu().numpy().astype(np.float32, copy=False) for total in sums]


def _accumulate_views(class_map_fn: ClassMapFn, model: nn.Module, batch: Tensor, classes: list[Sequence[int]],
                      cfg: TTAConfig, sums: list[Tensor]) -> None:
    """Adds the class maps of one batch of views (and their flips) to each image's sum, in place."""
    if cfg.flip:
        batch, classes = torch.cat([batch, batch.flip(-1)]), list(classes) * 2
    maps = class_map_fn(model, batch, classes)
    for index, total in enumerate(sums):
        total += _upsample(maps[index], total.shape[-2:], cfg.align_corners)
        if cfg.flip:
            total += _upsample(maps[len(sums) + index], total.shape[-2:], cfg.align_corners).flip(-1)


def _upsample(maps: Tensor, size: Sequence[int], align_corners: bool) -> Tensor:
    return F.interpolate(maps[None].float(), size=tuple(size), mode="bilinear", align_corners=align_corners)[0]

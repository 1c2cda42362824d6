"""Seed scores with test-time augmentation: multi-scale inference plus a horizontal flip, for any method.

Every (scale, flip) view's class maps (from the method's class-map function) are resampled (bilinear) to
the map size, un-flipped and summed; the sum is min-max normalised per class. The map size
(``TTAConfig.resolution``) is the image's (``"image"``), the largest view's patch grid (``"grid"``) or
``short_side`` pixels on the shorter side (``"short-side"``); a compact map is brought to the image by
:func:`upsample_maps` on read (``ray_wsss.core.seeds.stored``). Views of equal input
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
RESOLUTIONS = ("image", "grid", "short-side")


@dataclasses.dataclass(frozen=True)
class TTAConfig:
    scales: tuple[float, ...] = (1.0,)
    flip: bool = True
    base_size: int | None = None   # aspect: resize the longer side to this before scaling (None = native);
    #                                square: the square's side before scaling (required)
    resize: str = "aspect"         # how a view is made: "aspect", "square" or "pillow" (module docstring)
    align_corners: bool = False    # of the bilinear resampling of the maps to the map size (and, stored, to the image)
    minmax_eps: float = 0.0        # normalisation (x - min) / (max - min + eps); 0 = exact, constant -> 0
    max_views: int = 32            # most views (flips included) in one forward: bounds memory, not the maps
    resolution: str = "image"      # where the views are summed and normalised: "image", "grid", "short-side"
    short_side: int | None = None  # "short-side": the maps' shorter side in pixels (never above the image's)

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
        if self.max_views < 1:
            raise ValueError(f"max_views must be >= 1, got {self.max_views}")
        if self.resolution not in RESOLUTIONS:
            raise ValueError(f"resolution must be one of {RESOLUTIONS}, got {self.resolution!r}")
        if (self.resolution == "short-side") != (self.short_side is not None) or (
                self.short_side is not None and self.short_side <= 0):
            raise ValueError(f"short_side (a positive number of pixels) goes with resolution='short-side' and only "
                             f"with it; got resolution={self.resolution!r}, short_side={self.short_side}")


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


def map_size(height: int, width: int, patch_size: tuple[int, int], cfg: TTAConfig) -> tuple[int, int]:
    """The (h, w) at which an H x W image's views are summed, normalised and stored (``cfg.resolution``).

    ``"grid"``: the patch grid of the largest test-time view (of the scale-1 view when all are smaller), so
    that no view's maps are downsampled; ``"short-side"``: the image scaled so that its shorter side is
    ``cfg.short_side`` (halves up). Neither exceeds the image on either side.
    """
    if cfg.resolution == "image":
        return height, width
    if cfg.resolution == "grid":
        view_h, view_w = view_size(height, width, max(1.0, *cfg.scales), patch_size, cfg)
        size = (max(1, view_h // patch_size[0]), max(1, view_w // patch_size[1]))
    else:
        factor = cfg.short_side / min(height, width)
        size = (max(1, math.floor(height * factor + 0.5)), max(1, math.floor(width * factor + 0.5)))
    return min(size[0], height), min(size[1], width)


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
    """uint8 [H, W, 3] image, its foreground ids -> float32 [k, h, w] scores in [0, 1], classes in order, at
    ``map_size`` (the image's H x W with the default ``resolution="image"``)."""
    return seed_scores_batch(class_map_fn, model, [image_rgb], [classes], cfg)[0]


def seed_scores_batch(class_map_fn: ClassMapFn, model: nn.Module, images: Sequence[np.ndarray],
                      classes: Sequence[Sequence[int]], cfg: TTAConfig = TTAConfig()) -> list[np.ndarray]:
    """:func:`seed_scores` for many images; images with equal view sizes share forwards (at most
    ``cfg.max_views`` views each, flips included), so more images per call fill the batches better.

    Bad input raises ``ValueError`` naming the image's position in the batch.
    """
    if len(images) != len(classes):
        raise ValueError(f"{len(images)} images but {len(classes)} class lists")
    for index, rgb in enumerate(images):
        if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3 or min(rgb.shape[:2]) == 0:
            raise ValueError(f"image {index}: expected uint8 [H, W, 3], got {rgb.dtype} {rgb.shape}")
    device = next(model.parameters()).device
    sums = [torch.zeros(len(row), *map_size(*rgb.shape[:2], model.patch_size, cfg), device=device)
            for rgb, row in zip(images, classes)]
    per_forward = max(1, cfg.max_views // 2) if cfg.flip else cfg.max_views
    for scale in cfg.scales:
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for index, rgb in enumerate(images):
            if len(classes[index]):  # an image without foreground needs no forward
                groups[view_size(*rgb.shape[:2], scale, model.patch_size, cfg)].append(index)
        for size, members in groups.items():
            for start in range(0, len(members), per_forward):
                chunk = members[start:start + per_forward]
                batch = torch.stack([_view(images[i], size, cfg.resize, device) for i in chunk])
                _accumulate_views(class_map_fn, model, batch, [classes[i] for i in chunk], cfg,
                                  [sums[i] for i in chunk])
    return [minmax_per_class(total, cfg.minmax_eps).cpu().numpy().astype(np.float32, copy=False) for total in sums]


def _view(rgb: np.ndarray, size: tuple[int, int], resize: str, device: torch.device) -> Tensor:
    """One view on ``device``; an aspect view is resized there (normalised per chunk: memory of one chunk)."""
    normalised = normalize(rgb).to(device) if resize == "aspect" else None
    return view_input(rgb, size, resize, normalised).to(device)


def _accumulate_views(class_map_fn: ClassMapFn, model: nn.Module, batch: Tensor, classes: list[Sequence[int]],
                      cfg: TTAConfig, sums: list[Tensor]) -> None:
    """Adds the class maps of one batch of views (and their flips) to each image's sum, in place."""
    if cfg.flip:
        batch, classes = torch.cat([batch, batch.flip(-1)]), list(classes) * 2
    maps = class_map_fn(model, batch, classes)
    for index, total in enumerate(sums):
        total += upsample_maps(maps[index], total.shape[-2:], cfg.align_corners)
        if cfg.flip:  # bilinear resampling commutes with the flip, so un-flipping at the map size is exact
            total += upsample_maps(maps[len(sums) + index], total.shape[-2:], cfg.align_corners).flip(-1)


def upsample_maps(maps: Tensor, size: Sequence[int], align_corners: bool) -> Tensor:
    """[k, h, w] -> float32 [k, *size], bilinear: how a view's maps reach the map size, and stored maps the image."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps.float()
    return F.interpolate(maps[None].float(), size=tuple(size), mode="bilinear", align_corners=align_corners)[0]

"""MCTformer class maps (Xu et al., CVPR 2022), following the authors' ``generate_attention_maps_ms``.

For an image, with A^l the head-averaged attention of block l, C class tokens and patches i, j:

    M[c, i]  = sum over the last K blocks of A^l[c, C + i]                 (class-to-patch attention)
    M[c, i] *= ReLU(PatchCAM[c, i])                                        (V2, "fused")
    R[c, j]  = sum_i A_pp[j, i] * M[c, i],  A_pp = sum over ALL blocks of A^l[C:, C:]   (refinement)

(the same "affinity @ cam" orientation as ACR's Eq. 8). Only the image's labelled classes are
kept. Test-time augmentation is tta.py's: each (scale, flip) view's maps are bilinearly upsampled
to the image size, un-flipped and summed, then min-max normalised per labelled class.
"""
from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ray_wsss.core.data.augment import normalize
from ray_wsss.core.models.vit import ClassifierOutput
from ray_wsss.core.seeds.acr_maps import minmax_per_class
from ray_wsss.core.seeds.tta import scaled_size

MAP_TYPES = ("fused", "patchcam", "attention")
ClassMapFn = Callable[[nn.Module, Tensor, Sequence[Sequence[int]]], list[Tensor]]


@dataclasses.dataclass
class MCTMapConfig:
    last_layers: int = 3        # K: class-to-patch attention summed over the last K blocks (authors: 3)
    refine: bool = True         # patch-to-patch attention refinement (authors' --patch-attn-refine)
    map_type: str = "fused"     # V2: "fused" = attention x ReLU(PatchCAM), "patchcam", "attention"; V1: attention


def maps_from_output(out: ClassifierOutput, cfg: MCTMapConfig = MCTMapConfig()) -> Tensor:
    """[B, C, gh, gw] maps of every class from one forward's output (no normalisation)."""
    if cfg.map_type not in MAP_TYPES:
        raise ValueError(f"unknown map_type {cfg.map_type!r}; expected one of {MAP_TYPES}")
    prefix, depth = out.num_prefix_tokens, len(out.attentions)
    if not 1 <= cfg.last_layers <= depth:
        raise ValueError(f"last_layers={cfg.last_layers} must be within 1..{depth} (the model's blocks)")
    heads_mean = [attn.float().mean(dim=1) for attn in out.attentions]  # [B, T, T] per block
    maps = torch.stack([a[:, :prefix, prefix:] for a in heads_mean[depth - cfg.last_layers:]]).sum(dim=0)
    patch_cams = getattr(out, "patch_cams", None)
    if patch_cams is not None and cfg.map_type != "attention":
        relu_cams = F.relu(patch_cams.float()).flatten(2)
        maps = maps * relu_cams if cfg.map_type == "fused" else relu_cams
    elif cfg.map_type == "patchcam":
        raise ValueError("map_type 'patchcam' needs an MCTformer-V2 (a PatchCAM head)")
    if cfg.refine:
        affinity = torch.stack([a[:, prefix:, prefix:] for a in heads_mean]).sum(dim=0)  # [B, Np, Np]
        maps = maps @ affinity.transpose(1, 2)
    return maps.reshape(*maps.shape[:2], *out.grid)


@torch.no_grad()
def mct_class_maps(model: nn.Module, images: Tensor, classes: Sequence[Sequence[int]],
                   cfg: MCTMapConfig = MCTMapConfig()) -> list[Tensor]:
    """Per image float32 [k_i, gh, gw] maps of its labelled classes (ids 1..C, in the given order).

    Put the model in eval mode first (dropout would make the attention random).
    """
    if images.ndim != 4 or len(images) != len(classes):
        raise ValueError(f"images {tuple(images.shape)} and {len(classes)} class lists do not match")
    out = model(images)
    maps = maps_from_output(out, cfg)
    num_classes = maps.shape[1]
    results = []
    for index, row in enumerate(classes):
        bad = [c for c in row if not 1 <= int(c) <= num_classes]
        if bad:
            raise ValueError(f"image {index}: class ids {bad} are not foreground classes 1..{num_classes}")
        picked = torch.as_tensor([int(c) - 1 for c in row], dtype=torch.long, device=maps.device)
        results.append(maps[index].index_select(0, picked))
    return results


def mct_seed_scores(model: nn.Module, image_rgb: np.ndarray, classes: Sequence[int],
                    scales: Sequence[float] = (1.0,), flip: bool = True, cfg: MCTMapConfig = MCTMapConfig(),
                    base_size: int | None = None) -> np.ndarray:
    """uint8 [H, W, 3] image, its foreground ids -> float32 [k, H, W] scores in [0, 1], classes in order."""
    return mct_seed_scores_batch(model, [image_rgb], [classes], scales, flip, cfg, base_size)[0]


def mct_seed_scores_batch(model: nn.Module, images: Sequence[np.ndarray], classes: Sequence[Sequence[int]],
                          scales: Sequence[float] = (1.0,), flip: bool = True, cfg: MCTMapConfig = MCTMapConfig(),
                          base_size: int | None = None) -> list[np.ndarray]:
    """:func:`mct_seed_scores` for many images; images with equal view sizes share forwards."""
    return tta_seed_scores(lambda m, x, c: mct_class_maps(m, x, c, cfg), model, images, classes,
                           scales, flip, base_size)


def tta_seed_scores(class_map_fn: ClassMapFn, model: nn.Module, images: Sequence[np.ndarray],
                    classes: Sequence[Sequence[int]], scales: Sequence[float] = (1.0,), flip: bool = True,
                    base_size: int | None = None) -> list[np.ndarray]:
    """tta.py's multi-scale + flip recipe (same rounding rule and batching) for any class-map function.

    tta.seed_scores_batch hard-wires ACR's class_maps; this takes ``class_map_fn(model, images,
    classes) -> [k_i, gh, gw] per image`` instead.
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
            batch = torch.stack([_resize(inputs[i], size) for i in members])
            rows = [classes[i] for i in members]
            if flip:
                batch, rows = torch.cat([batch, batch.flip(-1)]), rows * 2
            maps = class_map_fn(model, batch, rows)
            for slot, index in enumerate(members):
                total = sums[index]
                total += _upsample(maps[slot], total.shape[-2:])
                if flip:
                    total += _upsample(maps[len(members) + slot], total.shape[-2:]).flip(-1)
    return [minmax_per_class(total).cpu().numpy().astype(np.float32, copy=False) for total in sums]


def _resize(image: Tensor, size: tuple[int, int]) -> Tensor:
    if tuple(image.shape[-2:]) == size:
        return image
    # antialias: downscaled views should average pixels, not skip them (as tta.py)
    return F.interpolate(image[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]


def _upsample(maps: Tensor, size: Sequence[int]) -> Tensor:
    return F.interpolate(maps[None].float(), size=tuple(size), mode="bilinear", align_corners=False)[0]

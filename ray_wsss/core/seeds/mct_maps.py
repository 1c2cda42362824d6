"""MCTformer class maps (Xu et al., CVPR 2022), following the authors' ``generate_attention_maps_ms``.

For an image, with A^l the head-averaged attention of block l, C class tokens and patches i, j:

    M[c, i]  = sum over the last K blocks of A^l[c, C + i]                 (class-to-patch attention)
    M[c, i] *= ReLU(PatchCAM[c, i])                                        (V2, "fused")
    R[c, j]  = sum_i A_pp[j, i] * M[c, i],  A_pp = sum over ALL blocks of A^l[C:, C:]   (refinement)

(``layer_reduction="mean"`` averages over those blocks instead: the same maps scaled by 1/K and 1/depth.)

(the same "affinity @ cam" orientation as ACR's Eq. 8). Only the image's labelled classes are
kept. Test-time augmentation is tta.py's, as for every method: each (scale, flip) view's maps are bilinearly upsampled
to the image size, un-flipped and summed, then min-max normalised per labelled class.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ray_wsss.core.models.vit import ClassifierOutput, capturing

MAP_TYPES = ("fused", "patchcam", "attention")
LAYER_REDUCTIONS = ("sum", "mean")


@dataclasses.dataclass(frozen=True)
class MCTMapConfig:
    last_layers: int = 3        # K: class-to-patch attention summed over the last K blocks (authors: 3)
    refine: bool = True         # patch-to-patch attention refinement (authors' --patch-attn-refine)
    map_type: str = "fused"     # V2: "fused" = attention x ReLU(PatchCAM), "patchcam", "attention"; V1: attention
    layer_reduction: str = "sum"  # how blocks combine, for M and A_pp: "sum" (the authors') or "mean"


def maps_from_output(out: ClassifierOutput, cfg: MCTMapConfig = MCTMapConfig()) -> Tensor:
    """[B, C, gh, gw] maps of every class from one forward's output (no normalisation)."""
    if cfg.map_type not in MAP_TYPES:
        raise ValueError(f"unknown map_type {cfg.map_type!r}; expected one of {MAP_TYPES}")
    if cfg.layer_reduction not in LAYER_REDUCTIONS:
        raise ValueError(f"unknown layer_reduction {cfg.layer_reduction!r}; expected one of {LAYER_REDUCTIONS}")
    reduce = torch.sum if cfg.layer_reduction == "sum" else torch.mean
    prefix, depth = out.num_prefix_tokens, len(out.attentions)
    if not 1 <= cfg.last_layers <= depth:
        raise ValueError(f"last_layers={cfg.last_layers} must be within 1..{depth} (the model's blocks)")
    heads_mean = [None if a is None else a.float().mean(dim=1) for a in out.attentions]  # [B, T, T] per block
    maps = reduce(torch.stack([a[:, :prefix, prefix:] for a in heads_mean[depth - cfg.last_layers:]]), dim=0)
    patch_cams = getattr(out, "patch_cams", None)
    if patch_cams is not None and cfg.map_type != "attention":
        relu_cams = F.relu(patch_cams.float()).flatten(2)
        maps = maps * relu_cams if cfg.map_type == "fused" else relu_cams
    elif cfg.map_type == "patchcam":
        raise ValueError("map_type 'patchcam' needs an MCTformer-V2 (a PatchCAM head)")
    if cfg.refine:
        affinity = reduce(torch.stack([a[:, prefix:, prefix:] for a in heads_mean]), dim=0)  # [B, Np, Np]
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
    # Only the blocks the maps read are captured (refinement reads all); the rest keep timm's fused attention.
    depth = len(model.attention_recorder.modules)
    with capturing(model, None if cfg.refine else range(-min(cfg.last_layers, depth), 0)):
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

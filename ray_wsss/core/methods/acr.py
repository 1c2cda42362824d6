"""ACR losses: classification plus attention consistency between two views.

L = Lcls(v1) + Lcls(v2) + α·Lact + β·Laff, where Lact is the L1 distance between the
class-to-patch attention of view 1 and f⁻¹ of view 2's, and Laff the same for the
patch-to-patch attention. Attention is head-averaged; Lact and Laff are averaged over the
selected layers (all by default, as the authors' code uses all layers).

With K class tokens and P prefix tokens the class-to-patch part is rows ``[:K, P:]`` (for a
cls-token ViT, K = P = 1, that is A[0, 1:]); a multi-class-token model (MCTformer, K = P = C)
thus regularises every class token's row, a distilled DeiT (cls + dist tokens) both rows, and a
ViT with registers (P = K + registers) its class token's row only.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ray_wsss.core.methods.registry import MapOptions, Method, register_method
from ray_wsss.core.methods.views import View
from ray_wsss.core.models.vit import ClassifierOutput
from ray_wsss.core.seeds.acr_maps import ACRMapConfig, class_maps
from ray_wsss.core.weights import build_classifier


@dataclasses.dataclass
class ACRLossConfig:
    alpha: float = 125.0
    beta: float = 125.0
    layers: tuple[int, ...] | None = None   # block indices (negative counts from the end); None = all


def head_mean(attn: Tensor) -> Tensor:
    """[B, H, N, N] -> [B, N, N]."""
    return attn.mean(dim=1)


def classification_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Multi-label soft-margin loss; ``labels`` is multi-hot [B, C] over foreground classes."""
    if labels.shape != logits.shape:
        raise ValueError(f"labels of shape {tuple(labels.shape)} do not match logits {tuple(logits.shape)}")
    return F.multilabel_soft_margin_loss(logits, labels.to(logits.dtype))


def _selected_layers(depth: int, layers: tuple[int, ...] | None) -> list[int]:
    if layers is None:
        return list(range(depth))
    if not layers:
        raise ValueError("ACR layers is empty; use None for all layers")
    bad = [i for i in layers if not -depth <= i < depth]
    if bad:
        raise ValueError(f"ACR layers {bad} out of range for a model with {depth} blocks")
    return sorted({i % depth for i in layers})


def acr_losses(out1: ClassifierOutput, out2: ClassifierOutput, view: View, labels: Tensor,
               cfg: ACRLossConfig) -> dict[str, Tensor]:
    """Losses for the original view ``out1`` and ``out2`` = the model on ``view.apply(images)``.

    Returns ``cls`` (both views), ``act``, ``aff`` and ``total`` = cls + α·act + β·aff.
    """
    if len(out1.attentions) != len(out2.attentions):
        raise ValueError(f"views have {len(out1.attentions)} and {len(out2.attentions)} attention maps")
    if out2.grid != view.output_grid(out1.grid):
        raise ValueError(f"view 2 grid {out2.grid} is not {view} of view 1 grid {out1.grid}")
    prefix, class_tokens = out1.num_prefix_tokens, out1.num_class_tokens
    act_terms, aff_terms = [], []
    for layer in _selected_layers(len(out1.attentions), cfg.layers):
        attn1, attn2 = head_mean(out1.attentions[layer]), head_mean(out2.attentions[layer])
        act_terms.append(F.l1_loss(attn1[:, :class_tokens, prefix:],
                                   view.invert_cls_row(attn2[:, :class_tokens, prefix:], out1.grid)))
        aff_terms.append(F.l1_loss(attn1[:, prefix:, prefix:],
                                   view.invert_patch_block(attn2[:, prefix:, prefix:], out1.grid)))
    cls = classification_loss(out1.logits, labels) + classification_loss(out2.logits, labels)
    act = torch.stack(act_terms).mean()
    aff = torch.stack(aff_terms).mean()
    return {"cls": cls, "act": act, "aff": aff, "total": cls + cfg.alpha * act + cfg.beta * aff}


def baseline_losses(out: ClassifierOutput, labels: Tensor) -> dict[str, Tensor]:
    """Classification only."""
    cls = classification_loss(out.logits, labels)
    return {"cls": cls, "total": cls}


def vit_class_maps(model: nn.Module, images: Tensor, classes: Sequence[Sequence[int]],
                   options: MapOptions) -> list[Tensor]:
    """ACR's seeds (Eq. 7-8): gradient maps of the last 2 blocks (by default), refined by patch affinity."""
    cfg = ACRMapConfig(grad_layers=options.layers or 2, refine=options.refine, refine_layers=options.refine_layers,
                       layer_reduction=options.layer_reduction or "mean")
    return class_maps(model, images, classes, cfg)


# The paper's alpha = beta = 125 assume an ImageNet-pretrained DeiT. From random initialisation a ViT's
# attention starts near uniform, and at that weight the consistency terms keep it there: on the
# synthetic data ACR at 125 stalled at held-out mAP 0.42 where the baseline reached 0.81 (6 epochs), at
# 25 too; at 1 it learns. So a run without weights defaults to the from-scratch weight.
register_method(Method(
    name="acr", description="ViT on two views: Lcls + α·Lact + β·Laff (ACR, ICCV'23 workshop)",
    build_model=build_classifier, losses=baseline_losses, two_view_losses=acr_losses,
    class_maps=vit_class_maps, pretrained_weight=125.0, from_scratch_weight=1.0))
register_method(Method(
    name="baseline", description="the same ViT trained on Lcls alone (the ablation)",
    build_model=build_classifier, losses=baseline_losses, two_view_losses=acr_losses,
    class_maps=vit_class_maps))

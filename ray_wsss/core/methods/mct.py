"""MCTformer losses, alone and with ACR's attention consistency (ACR paper, Table 6).

MCTformer-V1: Lcls = MLSM(class-token scores). V2 adds MLSM(PatchCAM scores) (authors' engine.py
sums the two). With ACR, both views' classification terms enter Lcls, and Lact / Laff come from
:func:`ray_wsss.core.methods.acr.acr_losses` unchanged: with P = C prefix tokens, Lact covers every class
token's row ``[:C, C:]`` and Laff the patch block ``[C:, C:]``.
"""
from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch.nn as nn
from torch import Tensor

from ray_wsss.core.methods.acr import ACRLossConfig, acr_losses, classification_loss
from ray_wsss.core.methods.registry import MapOptions, Method, register_method
from ray_wsss.core.methods.views import View
from ray_wsss.core.models.vit import ClassifierOutput
from ray_wsss.core.seeds.mct_maps import MCTMapConfig, mct_class_maps
from ray_wsss.core.weights import build_mctformer


def _patchcam_loss(out: ClassifierOutput, labels: Tensor) -> Tensor | None:
    patch_logits = getattr(out, "patch_logits", None)
    return None if patch_logits is None else classification_loss(patch_logits, labels)


def mct_losses(out: ClassifierOutput, labels: Tensor) -> dict[str, Tensor]:
    """``cls`` = MLSM(class tokens) [+ MLSM(PatchCAM) for V2] and ``total`` = cls; V2 also logs ``patchcam``."""
    cls = classification_loss(out.logits, labels)
    losses = {}
    patchcam = _patchcam_loss(out, labels)
    if patchcam is not None:
        losses["patchcam"] = patchcam
        cls = cls + patchcam
    return {"cls": cls, **losses, "total": cls}


def mct_acr_losses(out1: ClassifierOutput, out2: ClassifierOutput, view: View, labels: Tensor,
                   cfg: ACRLossConfig) -> dict[str, Tensor]:
    """MCTformer + ACR: ``cls`` (both views, PatchCAM terms too for V2), ``act``, ``aff``, ``total``."""
    losses = acr_losses(out1, out2, view, labels, cfg)
    patchcam = [loss for loss in (_patchcam_loss(out1, labels), _patchcam_loss(out2, labels)) if loss is not None]
    if len(patchcam) == 1:
        raise ValueError("one view has PatchCAM logits and the other has none")
    if patchcam:
        losses["patchcam"] = patchcam[0] + patchcam[1]
        losses["cls"] = losses["cls"] + losses["patchcam"]
        losses["total"] = losses["cls"] + cfg.alpha * losses["act"] + cfg.beta * losses["aff"]
    return losses


def attention_class_maps(model: nn.Module, images: Tensor, classes: Sequence[Sequence[int]],
                         options: MapOptions) -> list[Tensor]:
    """MCTformer's seeds: class-to-patch attention of the last 3 blocks (by default), V2 fused with PatchCAM."""
    if options.refine_layers is not None:
        raise ValueError("MCTformer refines with the patch affinity of all blocks, as its authors do; "
                         f"refine_layers={options.refine_layers} applies to ACR/baseline seeds only")
    return mct_class_maps(model, images, classes, MCTMapConfig(last_layers=options.layers or 3, refine=options.refine,
                                                               layer_reduction=options.layer_reduction or "sum"))


for _version in ("v1", "v2"):
    register_method(Method(
        name=f"mct-{_version}",
        description=(f"MCTformer-{_version.upper()}: one class token per class"
                     + (" + PatchCAM" if _version == "v2" else "")),
        build_model=partial(build_mctformer, version=_version), losses=mct_losses, two_view_losses=mct_acr_losses,
        class_maps=attention_class_maps))

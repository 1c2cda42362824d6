"""Model factories. Classifiers are chosen by method; see ray_wsss.core.methods."""
from __future__ import annotations

import torch.nn as nn

from ray_wsss.core.models.vit import ViTConfig, create_classifier
from ray_wsss.core.storage import StorageOptions


def build_classifier(method: str, cfg: ViTConfig, num_classes: int,
                     storage_options: StorageOptions | None = None) -> nn.Module:
    """The classifier a method trains, over ``num_classes`` foreground classes."""
    if method in ("acr", "baseline"):
        return create_classifier(cfg, num_classes, storage_options)
    if method in ("mct-v1", "mct-v2"):
        from ray_wsss.core.models.mctformer import create_mctformer

        return create_mctformer(cfg, num_classes, version=method.split("-")[1], storage_options=storage_options)
    raise ValueError(f"unknown method {method!r}")

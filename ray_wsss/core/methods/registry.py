"""The method registry: every classification method in one entry, as timm registers its models.

A :class:`Method` holds what the rest of the project needs to know about a method: how to build its
model, its single- and two-view losses, its class-map function (seeds) and its defaults. Stages look
a method up by name (:func:`get_method`) and never branch on the name themselves, so a new method is
one module that calls :func:`register_method` (see ``acr.py`` and ``mct.py``).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import numpy as np
import torch.nn as nn
from torch import Tensor

from ray_wsss.core.methods.views import View
from ray_wsss.core.models.vit import ClassifierOutput
from ray_wsss.core.seeds.tta import TTAConfig, seed_scores_batch

Losses = dict[str, Tensor]


@dataclasses.dataclass(frozen=True)
class MapOptions:
    """What a seeds run may set about any method's class maps (each method fills in its own defaults)."""

    layers: int | None = None                    # last blocks whose maps are combined; None = the method's
    refine: bool = True                          # patch-affinity refinement
    refine_layers: tuple[int, ...] | None = None  # blocks whose patch affinity refines; None = all
    # How those blocks combine: "mean" or "sum"; None = the method's (ACR/baseline: mean, as the paper's
    # Eq. 7-8; MCTformer: sum, as its code). The authors' ACR code sums: a scale of the raw maps only.
    layer_reduction: str | None = None


@dataclasses.dataclass(frozen=True)
class Method:
    """One classification method.

    ``build_model(cfg, num_classes, storage_options)`` builds its classifier over ``num_classes``
    foreground classes. ``losses(out, labels)`` is the single-view objective; ``two_view_losses(out1,
    out2, view, labels, loss_cfg)`` adds ACR's consistency terms (``acr.ACRLossConfig``). ``class_maps(model, images,
    classes, options)`` returns per image float32 [k_i, gh, gw] maps of its labelled classes, before
    normalisation (the seeds' test-time augmentation wraps it). ``pretrained_weight`` and
    ``from_scratch_weight`` are the default α = β with and without pretrained weights.
    """

    name: str
    description: str
    build_model: Callable[..., nn.Module]
    losses: Callable[[ClassifierOutput, Tensor], Losses]
    two_view_losses: Callable[[ClassifierOutput, ClassifierOutput, View, Tensor, Any], Losses]
    class_maps: Callable[[nn.Module, Tensor, Sequence[Sequence[int]], MapOptions], list[Tensor]]
    pretrained_weight: float = 0.0
    from_scratch_weight: float = 0.0

    def default_consistency(self, pretrained: bool) -> float:
        """α = β when not given: the paper's value with pretrained weights, a smaller one from scratch."""
        return self.pretrained_weight if pretrained else self.from_scratch_weight

    def seed_scores(self, model: nn.Module, images: Sequence[np.ndarray], classes: Sequence[Sequence[int]],
                    options: MapOptions = MapOptions(), tta: TTAConfig = TTAConfig()) -> list[np.ndarray]:
        """Per image float32 [k, h, w] seed scores in [0, 1] of its labelled classes (maps + TTA), at
        ``tta.resolution``'s size (the image's H x W by default; see ``tta.map_size``)."""
        return seed_scores_batch(partial(self.class_maps, options=options), model, images, classes, tta)



_REGISTRY: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Add ``method`` to the registry; a second entry of the same name is an error."""
    if method.name in _REGISTRY:
        raise ValueError(f"method {method.name!r} is already registered")
    _REGISTRY[method.name] = method
    return method


def get_method(name: str) -> Method:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; registered methods: {list_methods()}") from None


def list_methods() -> tuple[str, ...]:
    return tuple(_REGISTRY)

"""Optimisers and the poly learning-rate schedule shared by the classifier and DeepLab.

The ACR/MCTformer authors' ``PolyOptimizer`` subclasses SGD as
``super().__init__(params, lr, weight_decay)``: the third positional argument of ``torch.optim.SGD``
is ``momentum``, so their weight decay silently becomes momentum (and weight decay is 0). Here
momentum and weight decay are passed by keyword, each where it belongs.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch

OPTIMIZERS = ("adamw", "sgd")


def build_optimizer(name: str, param_groups: Iterable[dict] | Iterable[torch.nn.Parameter], lr: float,
                    weight_decay: float, momentum: float = 0.9) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(param_groups, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(param_groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; expected one of {OPTIMIZERS}")


def poly_schedule(optimizer: torch.optim.Optimizer, total_steps: int, power: float = 0.9,
                  warmup_steps: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """lr = base_lr * (1 - step/total)^power, after an optional linear warm-up. Keeps group ratios (10x heads)."""
    total_steps = max(1, total_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, 1.0 - step / total_steps) ** power

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

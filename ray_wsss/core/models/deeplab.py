"""DeepLab-V2: a dilated ResNet (output stride 8) with a summed ASPP head, as used by ACR.

Output size rule: for an input of H x W the logits are ``ceil(H / 8) x ceil(W / 8)``. Every
stride-2 layer of the ResNet (stem conv, max-pool, layer2) maps a side ``n`` to ``ceil(n / 2)``
(kernel 7/3/3 with padding 3/1/1, or the 1x1 downsample with padding 0), layer3/layer4 keep the
size, and the ASPP convs pad by their dilation, so they keep it too.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn as nn
import torchvision

from ray_wsss.core.errors import WsssError

BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101")
ASPP_RATES = (6, 12, 18, 24)
OUTPUT_STRIDE = 8
HEAD_LR_MULT = 10.0


@dataclasses.dataclass
class DeepLabConfig:
    backbone: str = "resnet18"  # resnet18 | resnet34 | resnet50 | resnet101 (the paper uses 101)
    backbone_weights: str | None = None  # local path or s3:// URI (read by ray_wsss.core.weights), torchvision keys


def output_size(height: int, width: int) -> tuple[int, int]:
    """Spatial size of the logits for an input of ``height x width``."""
    return -(-height // OUTPUT_STRIDE), -(-width // OUTPUT_STRIDE)


def _dilate_basic_blocks(layer: nn.Sequential, dilation: int, previous_dilation: int) -> None:
    """Turn a BasicBlock stage's stride 2 into dilation, in place.

    torchvision's ``replace_stride_with_dilation`` raises for BasicBlock (ResNet-18/34), so this
    does by hand what it does for Bottleneck: no stride anywhere in the stage, the first block's
    3x3 convs keep the previous dilation, the later blocks use ``dilation`` (padding = dilation
    keeps the size).
    """
    for index, block in enumerate(layer):
        rate = previous_dilation if index == 0 else dilation
        for conv in (block.conv1, block.conv2):
            conv.stride, conv.dilation, conv.padding = (1, 1), (rate, rate), (rate, rate)
        if block.downsample is not None:
            block.downsample[0].stride = (1, 1)
        block.stride = 1


def _build_resnet(name: str) -> torchvision.models.ResNet:
    if name not in BACKBONES:
        raise ValueError(f"unknown DeepLab backbone {name!r}; choose one of {BACKBONES}")
    factory = getattr(torchvision.models, name)
    if name in ("resnet50", "resnet101"):
        resnet = factory(weights=None, replace_stride_with_dilation=[False, True, True])
    else:
        resnet = factory(weights=None)
        _dilate_basic_blocks(resnet.layer3, dilation=2, previous_dilation=1)
        _dilate_basic_blocks(resnet.layer4, dilation=4, previous_dilation=2)
    # The classifier is not part of the backbone; dropping it keeps state dicts to backbone keys.
    resnet.fc = nn.Identity()
    resnet.avgpool = nn.Identity()
    return resnet


class ASPP(nn.Module):
    """DeepLab-V2 ASPP: parallel 3x3 convs at rates 6/12/18/24, each giving class logits, summed."""

    def __init__(self, in_channels: int, num_classes: int, rates: tuple[int, ...] = ASPP_RATES):
        super().__init__()
        self.rates = tuple(rates)
        self.branches = nn.ModuleList(
            nn.Conv2d(in_channels, num_classes, 3, padding=rate, dilation=rate, bias=True)
            for rate in self.rates
        )
        for conv in self.branches:  # DeepLab-V2's init for the classifier convs
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.branches[0](x)
        for branch in self.branches[1:]:
            out = out + branch(x)
        return out


class DeepLabV2(nn.Module):
    """ResNet with output stride 8 + summed ASPP. ``forward`` gives logits at ``output_size``."""

    def __init__(self, cfg: DeepLabConfig, num_classes: int):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.cfg = cfg
        self.num_classes = num_classes
        self.backbone = _build_resnet(cfg.backbone)
        self.head = ASPP(self.backbone.layer4[-1].expansion * 512, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        b = self.backbone
        x = b.maxpool(b.relu(b.bn1(b.conv1(x))))
        return b.layer4(b.layer3(b.layer2(b.layer1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        """SGD groups: backbone at ``lr``, the freshly initialised head at 10x ``lr``.

        ``lr_mult`` is kept in each group so a schedule (e.g. poly) can rescale from a base lr.
        """
        def trainable(module: nn.Module) -> list[nn.Parameter]:
            return [p for p in module.parameters() if p.requires_grad]

        return [
            {"name": "backbone", "params": trainable(self.backbone), "lr": lr, "lr_mult": 1.0},
            {"name": "head", "params": trainable(self.head), "lr": lr * HEAD_LR_MULT,
             "lr_mult": HEAD_LR_MULT},
        ]


def load_backbone_state_dict(backbone: nn.Module, state_dict: dict[str, torch.Tensor],
                             source: str = "state dict") -> None:
    """Load a torchvision ResNet state dict (``ray_wsss.core.weights`` maps other layouts to it) strictly.

    Dilation does not change weight shapes, so ImageNet ResNet weights load as they are.
    """
    state = {k: v for k, v in state_dict.items() if not k.startswith("fc.")}
    expected = set(backbone.state_dict())
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise WsssError(
            f"backbone weights {source} do not fit a torchvision ResNet of this depth: "
            f"missing keys {missing[:10]}{' ...' if len(missing) > 10 else ''} ({len(missing)}), "
            f"unexpected keys {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''} "
            f"({len(unexpected)})"
        )
    try:
        backbone.load_state_dict(state)
    except RuntimeError as err:  # shape mismatch
        raise WsssError(f"backbone weights {source} do not fit the backbone: {err}") from err


def create_deeplab(cfg: DeepLabConfig, num_classes: int, backbone_state_dict: dict[str, torch.Tensor] | None = None,
                   source: str = "state dict") -> DeepLabV2:
    """DeepLab-V2, its backbone loaded from ``backbone_state_dict`` (torchvision ResNet keys) when given.

    ``cfg.backbone_weights`` is read by ``ray_wsss.core.weights.build_deeplab``; naming a file here
    without its state dict is an error rather than a silently random backbone.
    """
    if cfg.backbone_weights and backbone_state_dict is None:
        raise WsssError(f"DeepLabConfig.backbone_weights={cfg.backbone_weights!r} but no state dict: build with "
                        "ray_wsss.core.weights.build_deeplab, which reads it")
    model = DeepLabV2(cfg, num_classes)
    if backbone_state_dict is not None:
        load_backbone_state_dict(model.backbone, backbone_state_dict, source)
    return model

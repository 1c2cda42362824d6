"""AffinityNet (Ahn & Kwak, CVPR'18): a dilated ResNet at output stride 8 and PSA's affinity head.

The head is ``network/resnet38_aff.py`` of github.com/jiwoon-ahn/psa: the backbone's last three
stride-8 feature levels (ResNet-38's conv4/conv5/conv6: 512, 1024 and 4096 channels) each go through a
bias-free 1x1 conv to 64, 128 and 256 channels and an ELU, are concatenated (448) and go through a
bias-free 1x1 conv 448 -> 448 and an ELU. Init as there: Kaiming-normal on the three, Xavier-uniform
with gain 4 on the last.

Deviation: the backbone is a timm ResNet (``timm.create_model(name, features_only=True,
output_stride=8)``), not ResNet-38, which timm does not have. timm dilates it as ResNet-38 is: the
stride-8 stage, then stages at dilation 2 and 4 (ResNet-38's b5 and b6/b7), and its last three
feature levels are the stage outputs at stride 8 (512/1024/2048 channels for a ResNet-50), where
ResNet-38 gives its pre-activations of the same stages.

With backbone weights, as in PSA (resnet38d.py ``train``, resnet38_aff.py ``not_training``): every
BatchNorm is frozen (timm's ``freeze_batch_norm_2d``) and the stem (the layers at stride <= 2, before
``layer1``) is not trained. From random initialisation nothing is frozen: frozen statistics of an
untrained net normalise nothing, and timm zero-initialises each block's last BN weight, so a frozen
one would keep every residual branch at zero for good.
"""
from __future__ import annotations

import os
from typing import Any

import timm
import torch
from timm.layers import freeze_batch_norm_2d
from timm.models import get_pretrained_cfg_value, load_state_dict
from torch import Tensor, nn
from torch.nn import functional as F

from ray_wsss.core.affinity_pairs import STRIDE, pair_affinities

HEAD_WIDTHS = (64, 128, 256)  # resnet38_aff.py f8_3, f8_4, f8_5
EMBEDDING_DIM = sum(HEAD_WIDTHS)  # 448, f9
STEM_END = "layer1"  # timm ResNets: the stem before it (conv1, bn1 at stride 2; the max-pool has no parameters)
HEAD_LR_MULT = 10.0  # train_aff.py: the from-scratch layers at 10x lr (their biases at 20x; the head has none)
BIAS_LR_MULT = 2.0   # train_aff.py: biases at 2x lr without weight decay


class AffinityNet(nn.Module):
    """``forward(x [B, 3, H, W]) -> embedding [B, 448, H/8, W/8]`` (H, W multiples of 8)."""

    def __init__(self, backbone: str = "resnet50", backbone_weights: str | None = None):
        super().__init__()
        self.backbone = _create_backbone(backbone, backbone_weights)
        in_channels = self.backbone.feature_info.channels()
        self.levels = nn.ModuleList(nn.Conv2d(c, w, 1, bias=False) for c, w in zip(in_channels, HEAD_WIDTHS))
        self.fuse = nn.Conv2d(EMBEDDING_DIM, EMBEDDING_DIM, 1, bias=False)
        for conv in self.levels:
            nn.init.kaiming_normal_(conv.weight)
        nn.init.xavier_uniform_(self.fuse.weight, gain=4)
        self.frozen = backbone_weights is not None
        if self.frozen:
            self.backbone = freeze_batch_norm_2d(self.backbone)
            for name, child in self.backbone.named_children():
                if name == STEM_END:
                    break
                child.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        features = self.backbone(x)
        return F.elu(self.fuse(torch.cat([F.elu(conv(f)) for conv, f in zip(self.levels, features)], dim=1)))

    def affinities(self, x: Tensor, radius: int) -> Tensor:
        """Affinities [B, n_displacements, M] of the pairs within ``radius`` (``affinity_pairs.pair_affinities``)."""
        return pair_affinities(self(x), radius)

    def param_groups(self, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        """train_aff.py's groups: backbone weights at lr, its biases and norm parameters at 2x lr without
        weight decay, the head at 10x lr. Frozen parameters are left out; empty groups too.

        ``lr_mult`` is kept in each group so a schedule can rescale from a base lr.
        """
        backbone_weights, backbone_other = [], []
        for param in self.backbone.parameters():
            if param.requires_grad:
                (backbone_weights if param.ndim > 1 else backbone_other).append(param)
        head = [p for module in (self.levels, self.fuse) for p in module.parameters() if p.requires_grad]
        groups = [("backbone", backbone_weights, 1.0, weight_decay),
                  ("backbone_bias_norm", backbone_other, BIAS_LR_MULT, 0.0),
                  ("head", head, HEAD_LR_MULT, weight_decay)]
        return [{"name": name, "params": params, "lr": lr * mult, "lr_mult": mult, "weight_decay": decay}
                for name, params, mult, decay in groups if params]


def _create_backbone(name: str, weights: str | None) -> nn.Module:
    """A timm ResNet at output stride 8 giving its last three feature levels, weights from a local file."""
    if not timm.is_model(name):
        raise ValueError(f"backbone {name!r} is not a timm model; use a timm ResNet such as resnet50")
    try:
        backbone = timm.create_model(name, features_only=True, output_stride=STRIDE, out_indices=(-3, -2, -1),
                                     pretrained=False)
    except (TypeError, ValueError, RuntimeError) as err:  # e.g. a ViT: no output_stride
        raise ValueError(f"backbone {name!r} cannot be built as stride-8 features: {err}; "
                         "use a timm ResNet such as resnet50") from err
    if STEM_END not in dict(backbone.named_children()) or backbone.feature_info.reduction() != [STRIDE] * 3:
        raise ValueError(f"backbone {name!r} is not a timm ResNet with {STEM_END} and three stride-8 levels "
                         f"(got reductions {backbone.feature_info.reduction()}); use e.g. resnet18/50/101")
    if weights is not None:
        load_backbone_weights(backbone, weights, get_pretrained_cfg_value(name, "classifier"))
    return backbone


def load_backbone_weights(backbone: nn.Module, path: str, classifier: str | None = None) -> None:
    """Loads a timm model's state dict (its ``classifier``'s keys are ignored) from a local
    ``.safetensors`` or torch file, read with ``torch.load(weights_only=True)`` (timm's ``load_state_dict``).

    timm's own ``pretrained_cfg_overlay={"file": ...}`` loads a features-only model non-strictly, so a file
    missing layers would leave them random without a word; here every backbone key must be in the file.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"backbone weights {path!r}: no such file")
    try:
        state = load_state_dict(path)
    except Exception as err:
        raise ValueError(f"backbone weights {path!r} are not a readable state dict: {err}") from err
    if classifier:
        state = {k: v for k, v in state.items() if not k.startswith(classifier + ".")}
    missing = sorted(set(backbone.state_dict()) - set(state))
    unexpected = sorted(set(state) - set(backbone.state_dict()))
    if missing or unexpected:
        raise ValueError(f"backbone weights {path!r} are not weights of this timm model: {len(missing)} keys "
                         f"missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})")
    try:
        backbone.load_state_dict(state)
    except RuntimeError as err:  # shapes that do not fit: another depth or width
        raise ValueError(f"backbone weights {path!r} do not fit the backbone: {err}") from err

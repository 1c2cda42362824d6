"""Pretrained weights: the one place a weights file is read, its layout recognised and mapped.

The model modules take state dicts in their own keys; this module reads a file (local or s3://,
``torch.load(weights_only=True)`` or ``.safetensors``), unwraps ``{"model": ...}`` / ``{"state_dict":
...}`` and a DDP ``module.`` prefix, recognises the layout and maps it:

=========================  ================================================================  ====================
layout                     recognised by                                                     loads into
=========================  ================================================================  ====================
``timm-vit``               ``cls_token`` [1, 1, D] (+ ``dist_token``/``reg_token``), ``blocks.*``  ViT, MCTformer init
``project-vit``            every key under ``vit.`` (this project's classifier checkpoints)  ViT, MCTformer init
``acr``                    ``pretrained.model.*`` backbone + ``cls_head.*`` (ACR authors);    ViT, MCTformer init
                           ``bkg_token`` (unused by their forward) and decoder parts dropped
``mctformer``              ``cls_token`` [1, C, D] with C > 1 (MCTformer authors, this       MCTformer
                           project's MCTformer)
``torchvision-resnet``     ``conv1.*``, ``layer1.*`` (ImageNet ResNet; ``fc.*`` dropped)       DeepLab backbone
``torchvision-segmentation``  the ResNet under ``backbone.``: torchvision's COCO models        DeepLab backbone
                           (``deeplabv3_resnet101``, ``fcn_resnet101``; ``classifier.*``
                           dropped) and this project's DeepLab checkpoints
=========================  ================================================================  ====================

Caffe-converted DeepLab-V2 COCO inits (``base.layer1.conv1.conv.*``, e.g. deeplab-pytorch's) are not
a torchvision layout and get the unknown-layout error, which names the file, the layouts accepted
and the keys found.
"""
from __future__ import annotations

import io
import logging
from collections.abc import Callable
from typing import Any

import torch

from ray_wsss.core import storage
from ray_wsss.core.errors import WsssError
from ray_wsss.core.models.deeplab import DeepLabConfig, DeepLabV2, create_deeplab
from ray_wsss.core.models.mctformer import MCTformer, create_mctformer
from ray_wsss.core.models.vit import AttentionViT, ViTConfig, create_classifier

_logger = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]

_WRAPPERS = ("model", "state_dict")  # DeiT/MCTformer releases, this project's checkpoints; mmcv/lightning
_ACR_BACKBONE, _ACR_HEAD = "pretrained.model.", "cls_head."
_ACR_UNUSED = ("bkg_token",)  # in the authors' backbone, never used by their forward
_VIT_LAYOUTS = ("timm-vit", "project-vit", "acr")


def read_state_dict(uri: str, storage_options: storage.StorageOptions | None = None) -> StateDict:
    """name -> tensor from ``uri``; a clear error naming the file when it is none."""
    data = storage.read_bytes(uri, storage_options)
    try:
        if uri.endswith(".safetensors"):
            from safetensors.torch import load as load_safetensors

            obj: Any = load_safetensors(data)
        else:
            # weights_only: a checkpoint is data, never code to run
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:
        raise WsssError(f"cannot read weights {uri}: {type(err).__name__}: {err}") from err
    for wrapper in _WRAPPERS:
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WsssError(f"{uri} does not hold a state dict (name -> tensor), nor one under {list(_WRAPPERS)}")
    if all(k.startswith("module.") for k in obj):  # saved from a DDP-wrapped model
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def detect_layout(state_dict: StateDict) -> str | None:
    """The layout name (module docstring) of ``state_dict``, or None when it is none of them."""
    keys = state_dict.keys()
    if all(k.startswith("vit.") for k in keys):
        return "project-vit"
    if _ACR_BACKBONE + "cls_token" in state_dict:
        return "acr"
    if "backbone.conv1.weight" in state_dict and any(k.startswith("backbone.layer1.") for k in keys):
        return "torchvision-segmentation"
    if "conv1.weight" in state_dict and any(k.startswith("layer1.") for k in keys):
        return "torchvision-resnet"
    cls_token = state_dict.get("cls_token")
    if cls_token is not None and cls_token.ndim == 3 and any(k.startswith("blocks.") for k in keys):
        return "mctformer" if cls_token.shape[1] > 1 and "dist_token" not in state_dict else "timm-vit"
    return None


def _unknown(source: str, state_dict: StateDict, layout: str | None, expected: tuple[str, ...]) -> WsssError:
    found = f"a {layout} state dict" if layout else f"an unknown layout (keys: {sorted(state_dict)[:8]})"
    return WsssError(f"weights {source} hold {found}; expected one of {list(expected)} "
                     "(see ray_wsss.core.weights for what each looks like)")


def vit_state_dict(state_dict: StateDict, source: str) -> StateDict:
    """Any single-class-token ViT layout -> timm's keys (``head.*`` = the classifier, if any)."""
    layout = detect_layout(state_dict)
    if layout == "timm-vit":
        return dict(state_dict)
    if layout == "project-vit":
        return {k[len("vit."):]: v for k, v in state_dict.items()}
    if layout == "acr":
        mapped = {k[len(_ACR_BACKBONE):]: v for k, v in state_dict.items() if k.startswith(_ACR_BACKBONE)}
        mapped.update({"head." + k[len(_ACR_HEAD):]: v for k, v in state_dict.items() if k.startswith(_ACR_HEAD)})
        for key in _ACR_UNUSED:
            mapped.pop(key, None)
        others = [k for k in state_dict if not k.startswith((_ACR_BACKBONE, _ACR_HEAD))]
        if others:
            _logger.info("%s: ACR layout, ignoring %d keys outside the classifier (e.g. %s)", source, len(others),
                         others[:5])
        return mapped
    if layout == "mctformer":
        raise WsssError(f"weights {source} are an MCTformer checkpoint ({state_dict['cls_token'].shape[1]} class "
                        "tokens); they load into method mct-v1/mct-v2, not a single-class-token ViT")
    raise _unknown(source, state_dict, layout, _VIT_LAYOUTS)


def mctformer_state_dict(state_dict: StateDict, source: str) -> StateDict:
    """The MCTformer layout as it is, or any single-class-token ViT layout mapped to timm's keys."""
    layout = detect_layout(state_dict)
    if layout == "mctformer":
        return dict(state_dict)
    if layout in _VIT_LAYOUTS:
        return vit_state_dict(state_dict, source)
    raise _unknown(source, state_dict, layout, ("mctformer", *_VIT_LAYOUTS))


def resnet_state_dict(state_dict: StateDict, source: str) -> StateDict:
    """A torchvision ResNet, bare or under ``backbone.`` -> its keys, without ``fc.*``."""
    layout = detect_layout(state_dict)
    if layout == "torchvision-resnet":
        return {k: v for k, v in state_dict.items() if not k.startswith("fc.")}
    if layout == "torchvision-segmentation":
        return {k[len("backbone."):]: v for k, v in state_dict.items() if k.startswith("backbone.")}
    raise _unknown(source, state_dict, layout, ("torchvision-resnet", "torchvision-segmentation"))


def read_mapped(uri: str | None, mapping: Callable[[StateDict, str], StateDict],
                storage_options: storage.StorageOptions | None = None) -> tuple[StateDict | None, str]:
    """(``mapping`` of the file at ``uri``, ``uri``) for a model builder; (None, "state dict") without a file.

    ``mapping`` is one of the ``*_state_dict`` functions above.
    """
    if not uri:
        return None, "state dict"
    return mapping(read_state_dict(uri, storage_options), uri), uri


# ---------------------------------------------------------------- builders (the methods' build_model)


def build_classifier(cfg: ViTConfig, num_classes: int,
                     storage_options: storage.StorageOptions | None = None) -> AttentionViT:
    """The ViT classifier, with ``cfg.weights`` loaded when set."""
    return create_classifier(cfg, num_classes, *read_mapped(cfg.weights, vit_state_dict, storage_options))


def build_mctformer(cfg: ViTConfig, num_classes: int, version: str,
                    storage_options: storage.StorageOptions | None = None) -> MCTformer:
    """MCTformer-``version``, with ``cfg.weights`` (MCTformer or single-class-token ViT layout) when set."""
    return create_mctformer(cfg, num_classes, version, *read_mapped(cfg.weights, mctformer_state_dict, storage_options))


def build_deeplab(cfg: DeepLabConfig, num_classes: int,
                  storage_options: storage.StorageOptions | None = None) -> DeepLabV2:
    """DeepLab-V2, its backbone from ``cfg.backbone_weights`` (torchvision layouts) when set."""
    return create_deeplab(cfg, num_classes, *read_mapped(cfg.backbone_weights, resnet_state_dict, storage_options))

"""Checkpoints of the training jobs: a directory of data, never of code.

A checkpoint directory holds ``model.safetensors`` (the weights), ``meta.json`` (model config, method,
classes, epoch, history: what building and reading the model needs) and, for resuming, ``train_state.pt``
(optimiser, schedule and scaler state: tensors and numbers only, read with ``torch.load(weights_only=True)``).
Nothing here unpickles an arbitrary object, so a crafted checkpoint cannot run code. Checkpoints of older
versions (a pickled ``model.pt``) are refused with a message rather than loaded.
"""
from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file

from ray_wsss.core import storage
from ray_wsss.core.errors import WsssError
from ray_wsss.core.storage import StorageOptions

if TYPE_CHECKING:
    from ray_wsss.core.methods import Method

WEIGHTS_FILE = "model.safetensors"
META_FILE = "meta.json"
TRAIN_STATE_FILE = "train_state.pt"
LEGACY_FILE = "model.pt"
SEGMENTER_METHOD = "deeplab"  # what train_deeplab checkpoints say they hold
AFFINITY_METHOD = "affinitynet"  # what train_affinity checkpoints say they hold


def write_checkpoint_dir(directory: str, weights: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Weights as safetensors and the rest as JSON, in a local directory."""
    save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, os.path.join(directory, WEIGHTS_FILE))
    with open(os.path.join(directory, META_FILE), "w") as f:
        json.dump(meta, f, indent=2)


def read_checkpoint_dir(directory: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(weights, meta) of a local checkpoint directory."""
    with open(os.path.join(directory, WEIGHTS_FILE), "rb") as f:
        weights = load_safetensors(f.read())
    with open(os.path.join(directory, META_FILE)) as f:
        return weights, json.load(f)


def is_checkpoint(uri: str, options: StorageOptions | None = None) -> bool:
    return storage.exists(storage.join(uri, WEIGHTS_FILE), options)


def refuse_legacy(uri: str, options: StorageOptions | None = None) -> None:
    """A pickled checkpoint of an older version is named and refused, never unpickled."""
    if storage.exists(storage.join(uri, LEGACY_FILE), options):
        raise WsssError(f"{uri} is a checkpoint of an older ray-wsss (a pickled {LEGACY_FILE}); it is not loaded, "
                        "because unpickling can run code: retrain, or convert it where you trust it")


def load_state(checkpoint_uri: str, options: StorageOptions | None = None) -> dict[str, Any]:
    """A checkpoint directory (local or s3://) as ``{"model": weights, **meta}`` (tensors on CPU)."""
    if not is_checkpoint(checkpoint_uri, options):
        refuse_legacy(checkpoint_uri, options)
        raise WsssError(f"{checkpoint_uri} is not a checkpoint directory: no {WEIGHTS_FILE}")
    try:
        weights = load_safetensors(storage.read_bytes(storage.join(checkpoint_uri, WEIGHTS_FILE), options))
    except WsssError:
        raise
    except Exception as err:
        raise WsssError(f"{checkpoint_uri}/{WEIGHTS_FILE} is not a readable safetensors file: {err}") from err
    meta = storage.read_json(storage.join(checkpoint_uri, META_FILE), options)
    return {**meta, "model": weights}


def load_classifier(checkpoint_uri: str, options: StorageOptions | None, device: torch.device,
                    model_overrides: dict[str, Any] | None = None) -> tuple[torch.nn.Module, Method, list[str]]:
    """(model in eval mode on ``device``, its method, class names) from a classifier checkpoint directory.

    ``model_overrides``: ViTConfig fields that change how the trained model runs, not its weights
    (``partial_patches``, ``pos_embed_resampler``); None values keep the checkpoint's.
    """
    from ray_wsss.core.methods import get_method
    from ray_wsss.core.models.vit import ViTConfig

    state = load_state(checkpoint_uri, options)
    class_names = state["class_names"]
    method = get_method(state["method"])
    # The trained weights cover everything: never load the initial ones again.
    overrides = {k: v for k, v in (model_overrides or {}).items() if v is not None}
    model = method.build_model(ViTConfig(**{**state["model_config"], **overrides, "weights": None}),
                               len(class_names) - 1)
    model.load_state_dict(state["model"])
    return model.to(device).eval(), method, class_names


def load_segmenter(checkpoint_uri: str, options: StorageOptions | None,
                   device: torch.device) -> tuple[torch.nn.Module, list[str]]:
    """(DeepLab in eval mode on ``device``, class names) from a train_deeplab checkpoint directory."""
    from ray_wsss.core.models.deeplab import DeepLabConfig, create_deeplab

    state = load_state(checkpoint_uri, options)
    if state.get("method") != SEGMENTER_METHOD:
        raise WsssError(f"{checkpoint_uri} holds a {state.get('method')!r} checkpoint, not a DeepLab one "
                        "(jobs/train_deeplab.py writes those)")
    # The trained weights cover the backbone: never fetch the initial ones again.
    model_cfg = DeepLabConfig(**{**state["model_config"], "backbone_weights": None})
    model = create_deeplab(model_cfg, len(state["class_names"]))
    model.load_state_dict(state["model"])
    return model.to(device).eval(), state["class_names"]


def load_affinitynet(checkpoint_uri: str, options: StorageOptions | None,
                     device: torch.device) -> tuple[torch.nn.Module, dict[str, Any]]:
    """(AffinityNet in eval mode on ``device``, its meta: ``model_config`` holds the backbone, the radius it
    was trained at and whether its BatchNorms were frozen) from a train_affinity checkpoint directory."""
    from timm.layers import freeze_batch_norm_2d

    from ray_wsss.core.models.affinitynet import AffinityNet

    state = load_state(checkpoint_uri, options)
    if state.get("method") != AFFINITY_METHOD:
        raise WsssError(f"{checkpoint_uri} holds a {state.get('method')!r} checkpoint, not an AffinityNet one "
                        "(jobs/train_affinity.py writes those)")
    model = AffinityNet(state["model_config"]["backbone"])  # the trained weights cover the backbone
    if state["model_config"].get("frozen_bn"):  # trained from backbone weights: frozen BNs hold other keys
        model.backbone = freeze_batch_norm_2d(model.backbone)
    model.load_state_dict(state.pop("model"))
    return model.to(device).eval(), state

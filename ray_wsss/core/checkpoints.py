"""Checkpoints of the training jobs: what they hold and how later stages find the latest one.

A checkpoint is a directory with ``model.pt`` (weights, model config, optimiser state, history)
and ``meta.json`` (epoch, method, classes). ``--checkpoint`` arguments accept either a checkpoint
directory or a training job's ``--out``: then the one named in its summary, else the newest epoch.
"""
from __future__ import annotations

import io
import posixpath
from typing import TYPE_CHECKING, Any

import torch

from ray_wsss.core import storage
from ray_wsss.core.errors import WsssError
from ray_wsss.core.storage import StorageOptions

if TYPE_CHECKING:
    from ray_wsss.core.methods import Method

MODEL_FILE = "model.pt"
META_FILE = "meta.json"


def find_checkpoint(uri: str, options: StorageOptions | None = None) -> str:
    """A checkpoint directory URI from a checkpoint URI or a training job's output URI."""
    if storage.exists(storage.join(uri, MODEL_FILE), options):
        return uri
    summary_uri = storage.join(uri, "summary.json")
    if storage.exists(summary_uri, options):
        named = storage.read_json(summary_uri, options).get("checkpoint")
        if named and storage.exists(storage.join(named, MODEL_FILE), options):
            return named
    metas = [f for f in storage.list_files(uri, options) if posixpath.basename(f) == META_FILE]
    if not metas:
        raise WsssError(f"no checkpoint under {uri}: expected {MODEL_FILE} there or a training job's output")
    scored = []
    for rel in metas:
        meta = storage.read_json(storage.join(uri, rel), options)
        scored.append((int(meta.get("epoch", -1)), rel))
    _, best = max(scored)
    return storage.join(uri, posixpath.dirname(best))


def load_state(checkpoint_uri: str, options: StorageOptions | None = None) -> dict[str, Any]:
    """The dict saved in ``model.pt`` (tensors on CPU)."""
    data = storage.read_bytes(storage.join(checkpoint_uri, MODEL_FILE), options)
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)


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

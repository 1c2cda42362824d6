"""Multi-scale + flip inference of a segmentation network: fused softmax at the image's size."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

# The one place the normalisation constants come from (timm's, the ImageNet statistics).
IMAGENET_MEAN: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN
IMAGENET_STD: tuple[float, float, float] = IMAGENET_DEFAULT_STD


def normalize_image(rgb: np.ndarray) -> torch.Tensor:
    """uint8 RGB ``[H, W, 3]`` -> float32 ``[3, H, W]`` normalised with the ImageNet mean/std."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected a uint8 RGB array [H, W, 3], got {rgb.dtype} {rgb.shape}")
    image = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return image.sub_(mean).div_(std)


def _model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def predict_probs(model: nn.Module, image: torch.Tensor, scales: Sequence[float] = (1.0,),
                  flip: bool = False) -> torch.Tensor:
    """Softmax probabilities ``[K, H, W]`` of ``image`` (``[3, H, W]``, already normalised).

    For each scale the image is bilinearly resized, the logits are bilinearly upsampled back to
    exactly H x W and softmaxed; with ``flip`` the horizontally flipped image is added (its
    output flipped back). All the softmax maps are averaged. The model runs in eval mode (its
    mode is restored after) under ``no_grad`` on its own device; the result is float32 on the
    image's device.
    """
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected an image [3, H, W], got shape {tuple(image.shape)}")
    if not scales or any(s <= 0 for s in scales):
        raise ValueError(f"scales must be a non-empty sequence of positive numbers, got {scales}")
    height, width = image.shape[1:]
    batch = image.to(_model_device(model), torch.float32).unsqueeze(0)
    if flip:
        batch = torch.cat([batch, batch.flip(-1)])

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            total = None
            for scale in scales:
                size = (max(1, round(height * scale)), max(1, round(width * scale)))
                scaled = batch if size == (height, width) else F.interpolate(
                    batch, size=size, mode="bilinear", align_corners=False)
                logits = F.interpolate(model(scaled), size=(height, width), mode="bilinear",
                                       align_corners=False)
                probs = logits.float().softmax(dim=1)
                if flip:
                    probs = torch.stack([probs[0], probs[1].flip(-1)])
                summed = probs.sum(dim=0)
                total = summed if total is None else total + summed
    finally:
        model.train(was_training)
    return (total / (len(scales) * batch.shape[0])).to(image.device)

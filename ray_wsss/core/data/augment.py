"""Image decoding and augmentation for Ray Data ingest (runs in Ray Data tasks, on CPU)."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision.transforms import v2 as T

from ray_wsss.core import codec


def multi_hot(labels: list[int], num_classes: int) -> np.ndarray:
    """Foreground ids 1..K -> float32 [K] (background is not a classifier output)."""
    target = np.zeros(num_classes - 1, np.float32)
    for label in labels:
        target[int(label) - 1] = 1.0
    return target


class ClassifierTransform:
    """samples rows -> {"image": float32 [B,3,S,S] normalised, "labels": float32 [B,K]}.

    Training: random resized crop, horizontal flip, colour jitter (the ACR recipe on a fixed
    square input). Evaluation: a plain resize to S x S.
    """

    def __init__(self, img_size: int, num_classes: int, train: bool, crop_scale: tuple[float, float] = (0.35, 1.0)):
        self.num_classes = num_classes
        steps: list[Any] = [T.ToImage()]
        if train:
            steps += [
                T.RandomResizedCrop(img_size, scale=crop_scale, antialias=True),
                T.RandomHorizontalFlip(),
                T.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.05),
            ]
        else:
            steps += [T.Resize((img_size, img_size), antialias=True)]
        steps += [T.ToDtype(torch.float32, scale=True), T.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)]
        self.transform = T.Compose(steps)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = [self.transform(codec.decode_image(b)).numpy() for b in batch["image"]]
        labels = [multi_hot(list(present), self.num_classes) for present in batch["labels"]]
        return {"image": np.stack(images), "labels": np.stack(labels)}


def normalize(rgb: np.ndarray) -> torch.Tensor:
    """uint8 [H,W,3] -> float32 [3,H,W] with the ImageNet statistics every model here uses."""
    x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).float().div_(255)
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1)
    return (x - mean) / std

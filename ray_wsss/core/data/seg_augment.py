"""Joint image + mask augmentation for training the segmentation network (Ray Data tasks, CPU).

The DeepLab recipe: random scale, pad (image with the mean, i.e. 0 after normalisation; mask with
255 so padding counts for no class), random crop to a fixed square, horizontal flip.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ray_wsss.core import codec
from ray_wsss.core.data.augment import normalize
from ray_wsss.core.errors import RecordError
from ray_wsss.core.schema import IGNORE_INDEX


class SegmentationTransform:
    """Rows with ``image_id``, ``image`` and ``mask`` bytes -> {"image": float32 [B,3,S,S], "mask": int64 [B,S,S]}.

    Each call draws from fresh entropy: Ray Data ships this object to every task, so a seeded
    generator would repeat the same draws in every batch. :meth:`augment` takes a generator for tests.
    """

    def __init__(self, crop_size: int, num_classes: int, scale_range: tuple[float, float] = (0.5, 1.5),
                 flip: bool = True):
        if crop_size < 8:
            raise ValueError(f"crop size must be at least 8 pixels, got {crop_size}")
        if not 0 < scale_range[0] <= scale_range[1]:
            raise ValueError(f"scale range must be 0 < low <= high, got {scale_range}")
        self.crop_size, self.num_classes = crop_size, num_classes
        self.scale_range, self.flip = tuple(scale_range), flip

    def __call__(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        rng = np.random.default_rng()
        images, masks = [], []
        for image_id, image_bytes, mask_bytes in zip(batch["image_id"], batch["image"], batch["mask"]):
            rgb, mask = decode_pair(str(image_id), image_bytes, mask_bytes, self.num_classes)
            image, target = self.augment(rgb, mask, rng)
            images.append(image.numpy())
            masks.append(target.numpy())
        return {"image": np.stack(images), "mask": np.stack(masks)}

    def augment(self, rgb: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 [H,W,3] and uint8 [H,W] -> normalised float32 [3,S,S] and int64 [S,S] (255 = ignore)."""
        image = normalize(rgb)
        target = torch.tensor(mask, dtype=torch.int64)
        scale = rng.uniform(*self.scale_range)
        height, width = rgb.shape[:2]
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        if size != (height, width):
            image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]
            target = F.interpolate(target[None, None].float(), size=size, mode="nearest-exact")[0, 0].long()
        pad_h, pad_w = max(0, self.crop_size - size[0]), max(0, self.crop_size - size[1])
        if pad_h or pad_w:  # bottom/right, as DeepLab does
            image = F.pad(image, (0, pad_w, 0, pad_h), value=0.0)
            target = F.pad(target, (0, pad_w, 0, pad_h), value=IGNORE_INDEX)
        top = int(rng.integers(0, image.shape[1] - self.crop_size + 1))
        left = int(rng.integers(0, image.shape[2] - self.crop_size + 1))
        image = image[:, top:top + self.crop_size, left:left + self.crop_size]
        target = target[top:top + self.crop_size, left:left + self.crop_size]
        if self.flip and rng.random() < 0.5:
            image, target = image.flip(-1), target.flip(-1)
        return image.contiguous(), target.contiguous()


def decode_pair(image_id: str, image_bytes: bytes, mask_bytes: bytes | None,
                num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Decode an image and its training mask; RecordError when the mask is missing, misfits or has bad ids."""
    rgb, mask = decode_image_and_mask(image_id, image_bytes, mask_bytes)
    if mask.shape != rgb.shape[:2]:
        raise RecordError(image_id, f"mask is {mask.shape[0]}x{mask.shape[1]} but the image is "
                                    f"{rgb.shape[0]}x{rgb.shape[1]}")
    bad = (mask >= num_classes) & (mask != IGNORE_INDEX)
    if bad.any():
        raise RecordError(image_id, f"mask has class ids {np.unique(mask[bad])[:10].tolist()} outside "
                                    f"0..{num_classes - 1} (and not {IGNORE_INDEX})")
    return rgb, mask


def decode_image_and_mask(image_id: str, image_bytes: bytes, mask_bytes: bytes | None,
                          what: str = "mask") -> tuple[np.ndarray, np.ndarray]:
    """Decode an image and the PNG of class ids it trains with (writable copies: torch.from_numpy warns on the
    read-only arrays PIL hands out); RecordError when the PNG is missing or either cannot be decoded."""
    if mask_bytes is None:
        raise RecordError(image_id, f"no {what} to train on")
    try:
        return np.array(codec.decode_image(image_bytes)), np.array(codec.decode_mask(mask_bytes))
    except Exception as err:
        raise RecordError(image_id, f"cannot decode image or {what}: {type(err).__name__}: {err}") from err

"""Training crops for AffinityNet (Ray Data tasks, CPU): image + affinity labels at stride 8, cut together.

The labels are a whole image's ``affinity_labels`` row: one value per 8 x 8 block of the image padded to
multiples of 8 (``ray_wsss.core.refine.psa.affinity_labels``). A crop that starts on a multiple of 8 pixels
and is a multiple of 8 wide covers whole blocks, so its labels are a slice of the grid: nothing is resampled.
Where the crop is larger than the image, the image is padded with its mean (0 after normalisation) and the
labels with 255, so the padding forms no pair.

PSA's train_aff.py also rescales the image at random (the long side in [448, 768]) and jitters its colours;
neither is done here. A rescale would move the block borders, so the labels would have to be recomputed from
the seeds per crop (PSA's way) rather than read from the table.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ray_wsss.core.affinity_pairs import STRIDE, grid_size
from ray_wsss.core.data.augment import normalize
from ray_wsss.core.data.seg_augment import decode_image_and_mask
from ray_wsss.core.errors import RecordError
from ray_wsss.core.schema import IGNORE_INDEX


class AffinityCropTransform:
    """Rows with ``image_id``, ``image`` and ``labels`` bytes -> {"image": float32 [B, 3, S, S],
    "labels": uint8 [B, S/8, S/8]}: a random crop at multiples of 8 pixels, then a random horizontal flip.

    Each call draws from fresh entropy (Ray Data ships this object to every task; a seeded generator would
    repeat its draws in every batch). :meth:`augment` takes a generator for tests.
    """

    def __init__(self, crop_size: int, flip: bool = True):
        if crop_size < STRIDE or crop_size % STRIDE:
            raise ValueError(f"crop size must be a positive multiple of {STRIDE} pixels, got {crop_size}")
        self.crop_size, self.flip = crop_size, flip

    def __call__(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        rng = np.random.default_rng()
        images, labels = [], []
        for image_id, image_bytes, label_bytes in zip(batch["image_id"], batch["image"], batch["labels"]):
            rgb, grid = decode_labelled_image(str(image_id), image_bytes, label_bytes)
            image, target = self.augment(rgb, grid, rng)
            images.append(image.numpy())
            labels.append(target.numpy())
        return {"image": np.stack(images), "labels": np.stack(labels)}

    def augment(self, rgb: np.ndarray, grid: np.ndarray, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 image [H, W, 3] and its uint8 labels [ceil(H/8), ceil(W/8)] -> normalised float32 [3, S, S]
        and uint8 labels [S/8, S/8] (255 = ignore)."""
        cells = self.crop_size // STRIDE
        rows, cols = max(grid.shape[0], cells), max(grid.shape[1], cells)
        image = F.pad(normalize(rgb), (0, cols * STRIDE - rgb.shape[1], 0, rows * STRIDE - rgb.shape[0]))
        target = F.pad(torch.from_numpy(grid), (0, cols - grid.shape[1], 0, rows - grid.shape[0]),
                       value=IGNORE_INDEX)
        top, left = int(rng.integers(0, rows - cells + 1)), int(rng.integers(0, cols - cells + 1))
        image = image[:, top * STRIDE:(top + cells) * STRIDE, left * STRIDE:(left + cells) * STRIDE]
        target = target[top:top + cells, left:left + cells]
        if self.flip and rng.random() < 0.5:
            image, target = image.flip(-1), target.flip(-1)
        return image.contiguous(), target.contiguous()


def decode_labelled_image(image_id: str, image_bytes: bytes,
                          label_bytes: bytes | None) -> tuple[np.ndarray, np.ndarray]:
    """Decode an image and its affinity labels; RecordError when the labels are missing or not its grid."""
    rgb, grid = decode_image_and_mask(image_id, image_bytes, label_bytes, "affinity labels")
    expected = grid_size(*rgb.shape[:2])
    if grid.shape != expected:
        raise RecordError(image_id, f"affinity labels are {grid.shape[0]}x{grid.shape[1]} but the {rgb.shape[0]}x"
                                    f"{rgb.shape[1]} image's stride-8 grid is {expected[0]}x{expected[1]}")
    return rgb, grid

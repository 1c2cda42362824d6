"""Stage 5: train DeepLab-V2 on the pseudo masks (or the ground truth) with Ray Train V2 DDP.

The driver streams the training split's (samples, masks) file pairs through Ray Data (co-partitioned
tables: no join, ``harness.training.paired_split_records``), where CPU tasks also decode and augment
(random scale, pad, crop, flip); the common training loop (``harness.training``) runs
:class:`SegmenterTask`: SGD with poly decay and a 10x LR head, cross-entropy that ignores
255, and each epoch a single-scale mIoU on the ground-truth masks of the held-out split.
Checkpoints go to ``<out>/<name>/`` each epoch; a rerun with the same name resumes.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, ClassVar

import numpy as np
import pyarrow.parquet as pq
import ray
import ray.data
import ray.train
import ray.train.torch
import torch
import torch.nn as nn
import torch.nn.functional as F
from ray.data.expressions import col

from ray_wsss.core import checkpoints, codec, commit, ownership, storage, weights
from ray_wsss.core.config import option
from ray_wsss.core.data.seg_augment import SegmentationTransform
from ray_wsss.core.inference import normalize_image, predict_probs
from ray_wsss.core.metrics import ConfusionMatrix
from ray_wsss.core.models.deeplab import BACKBONES, DeepLabConfig, DeepLabV2
from ray_wsss.core.optim import build_optimizer, poly_schedule
from ray_wsss.core.schema import IGNORE_INDEX
from ray_wsss.core.storage import StorageOptions
from ray_wsss.harness import training

log = logging.getLogger(__name__)
STAGE = "deeplab"
METHOD = "deeplab"  # what checkpoints of this trainer say they hold



@dataclasses.dataclass
class TrainDeepLabConfig(training.TrainingConfig):
    out: str = option("runs/default/deeplab", "output URI for checkpoints, metrics and summary")
    name: str = option("deeplab", "run name; rerunning with the same name resumes")
    epochs: int = option(10, "epochs", min=1)
    batch_size: int = option(8, "batch size per worker", min=1)
    masks: str | None = option(None, "pseudo masks URI (make_masks' --out); not needed with --gt-masks")
    gt_masks: bool = option(False, "train on the samples' ground-truth masks instead (the fully supervised reference)")
    backbone: str = option("resnet18", "dilated ResNet depth (the paper: resnet101)", choices=BACKBONES)
    backbone_weights: str | None = option(None, "torchvision ResNet state dict (ImageNet), local or s3://")
    freeze_bn: bool | None = option(None, "keep the backbone's BatchNorm fixed, as DeepLab-V2 does "
                                      "(default: on with --backbone-weights, off from scratch)")
    crop: int = option(96, "training crop size (the paper: 321 or 513)", min=1)
    scale_range: tuple[float, ...] = option((0.5, 1.5), "random rescale range: low high", gt=0)
    lr: float = option(2.5e-3, "backbone learning rate, the head gets 10x (the paper: 2.5e-4 from ImageNet weights)",
                       gt=0)
    weight_decay: float = option(5e-4, "SGD weight decay", min=0)
    momentum: float = option(0.9, "SGD momentum", min=0, max=1)
    poly_power: float = option(0.9, "poly decay power", min=0)
    warmup_epochs: float = option(1.0, "linear warm-up before the poly decay (DeepLab-V2 has none; from scratch it "
                                   "stops the early loss spikes)", min=0)
    cpu_bf16: bool | None = option(None, "bfloat16 autocast for CPU training steps (default: on where the CPU "
                                         "computes bf16 natively, AVX512-BF16 or AMX: the convolutions run ~1.65x "
                                         "faster there; CUDA always uses float16 AMP)")

    def deeplab_config(self) -> DeepLabConfig:
        return DeepLabConfig(backbone=self.backbone, backbone_weights=self.backbone_weights)

    def frozen_bn(self) -> bool:
        return bool(self.backbone_weights) if self.freeze_bn is None else self.freeze_bn


class SegmentationStep(nn.Module):
    """Forward + loss in one module, so DDP syncs once per step: CE (ignore 255) at the crop size."""

    def __init__(self, model: DeepLabV2):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        logits = F.interpolate(self.model(images), size=masks.shape[-2:], mode="bilinear", align_corners=False)
        # Summed over labelled pixels: a crop of padding and ignore alone gives 0, not NaN.
        loss = F.cross_entropy(logits.float(), masks, ignore_index=IGNORE_INDEX, reduction="sum")
        return loss / (masks != IGNORE_INDEX).sum().clamp(min=1)


def set_train_mode(module: nn.Module, freeze_bn: bool) -> None:
    """Train mode, with every BatchNorm kept in eval mode (fixed statistics) when ``freeze_bn``."""
    module.train()
    if freeze_bn:
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def freeze_batchnorm(module: nn.Module) -> None:
    """Fix the BatchNorm affine parameters too (they leave the optimiser's groups)."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            for p in m.parameters():
                p.requires_grad_(False)


# ---------------------------------------------------------------- worker side

class SegmenterTask:
    """DeepLab's part of the training loop (see harness.training.TrainTask)."""

    batch_kwargs: ClassVar[dict[str, Any]] = {"dtypes": {"image": torch.float32, "mask": torch.int64}}
    val_columns: ClassVar[list[str]] = ["image", "gt_mask"]

    def __init__(self, cfg: TrainDeepLabConfig, config: dict[str, Any], device: torch.device):
        ctx = ray.train.get_context()
        self.cfg, self.class_names = cfg, config["class_names"]
        self.model = weights.build_deeplab(cfg.deeplab_config(), len(self.class_names), cfg.storage)
        self.freeze = cfg.frozen_bn()
        if self.freeze:
            freeze_batchnorm(self.model.backbone)
        self.step_module = ray.train.torch.prepare_model(SegmentationStep(self.model))
        steps_per_epoch = max(1, config["num_train"] // (cfg.batch_size * ctx.get_world_size()))
        self.optimizer = build_optimizer("sgd", self.model.param_groups(cfg.lr), cfg.lr, cfg.weight_decay, cfg.momentum)
        self.scheduler = poly_schedule(self.optimizer, steps_per_epoch * cfg.epochs, power=cfg.poly_power,
                                       warmup_steps=int(cfg.warmup_epochs * steps_per_epoch))
        self.masks_source = config["masks_source"]

    def train_mode(self) -> None:
        set_train_mode(self.step_module, self.freeze)

    def losses(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        loss = self.step_module(batch["image"], batch["mask"])
        return {"ce": loss, "total": loss}

    def validate(self, rows) -> np.ndarray:
        """Confusion counts of this rank's held-out rows (single scale)."""
        matrix = ConfusionMatrix(len(self.class_names))
        device = next(self.model.parameters()).device
        amp_dtype = training.autocast_dtype(self.cfg, device)  # the training steps' precision
        for row in rows:
            if row["gt_mask"] is None:
                continue
            rgb = codec.decode_image(row["image"])
            with torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                probs = predict_probs(self.model, normalize_image(rgb))
            matrix.add(probs.argmax(0).cpu().numpy().astype(np.uint8), codec.decode_mask(row["gt_mask"]))
        return matrix.counts

    def validation_metrics(self, parts: list[np.ndarray]) -> dict[str, float]:
        scores = ConfusionMatrix.from_counts(sum(parts)).scores()
        if scores["miou"] is None:
            return {}
        return {"val_miou": scores["miou"], "val_pixel_acc": scores["pixel_acc"]}

    def checkpoint_meta(self) -> dict[str, Any]:
        return {"method": checkpoints.SEGMENTER_METHOD, "class_names": self.class_names,
                "model_config": dataclasses.asdict(self.cfg.deeplab_config()), "masks": self.masks_source}


# ---------------------------------------------------------------- driver side

def training_records(cfg: TrainDeepLabConfig) -> ray.data.Dataset:
    """Rows (image_id, image, mask) of the training split, streamed file by file: each samples file paired
    with the masks file of the same name (no join), or the samples' ground truth with --gt-masks."""
    if not cfg.gt_masks:
        return training.paired_split_records(cfg, cfg.masks, "masks", "mask")
    files = training.split_files(cfg.data, cfg.train_split, cfg.storage)
    fs, _ = storage.resolve(cfg.data, cfg.storage)
    paths = [storage.resolve(f, cfg.storage)[1] for f in files]
    return (ray.data.read_parquet(paths, filesystem=fs, columns=["image_id", "image", "gt_mask"])
            .filter(expr=col("gt_mask").is_not_null())
            .rename_columns({"gt_mask": "mask"}))


def count_training_rows(cfg: TrainDeepLabConfig) -> int:
    """Rows :func:`training_records` yields, from the files' footers (no image read)."""
    if not cfg.gt_masks:
        return training.count_paired_rows(cfg, cfg.masks, "masks")
    files = training.split_files(cfg.data, cfg.train_split, cfg.storage)
    return sum(_count_valid(f, "gt_mask", cfg.storage) for f in files)


def _count_valid(uri: str, column: str, options: StorageOptions | None) -> int:
    fs, path = storage.resolve(uri, options)
    values = pq.read_table(path, filesystem=fs, columns=[column])[column]
    return len(values) - values.null_count


@ownership.owns_output(STAGE, inputs=("data", "val_data", "masks", "backbone_weights"))
def run(cfg: TrainDeepLabConfig) -> dict[str, Any]:
    """Train and return the job summary (final loss, held-out mIoU, checkpoint URI)."""
    cfg = dataclasses.replace(cfg, storage=cfg.storage.resolved())  # workers get what the driver sees
    started = time.time()
    if not cfg.gt_masks and not cfg.masks:
        raise ValueError("--masks URI (make_masks' output) is required unless --gt-masks is given")
    if len(cfg.scale_range) != 2:
        raise ValueError(f"--scale-range takes two numbers (low high), got {cfg.scale_range}")
    commit.read_manifest(cfg.data, cfg.storage)  # a clear error if the data stage never committed
    if not cfg.gt_masks:
        commit.read_manifest(cfg.masks, cfg.storage)
    dataset_meta = storage.read_json(storage.join(cfg.data, "dataset.json"), cfg.storage)
    class_names = dataset_meta["class_names"]
    by_split = dataset_meta["counts"]["by_split"]
    if not by_split.get(cfg.train_split):
        raise ValueError(f"{cfg.data} has no images in split {cfg.train_split!r}; it has {by_split}")
    num_train = count_training_rows(cfg)
    if num_train < cfg.batch_size * cfg.num_workers:
        raise ValueError(f"{num_train} images of split {cfg.train_split!r} have a mask in "
                         f"{'the ground truth' if cfg.gt_masks else cfg.masks}: fewer than one batch of "
                         f"{cfg.batch_size} for each of {cfg.num_workers} workers")
    training.check_cpu_budget(cfg)
    # Per-epoch lines are this stage's progress; Ray Data's bars inside workers would flood the log.
    ray.data.DataContext.get_current().enable_progress_bars = False
    transform = SegmentationTransform(cfg.crop, len(class_names), scale_range=tuple(cfg.scale_range))
    masks_source = "ground truth" if cfg.gt_masks else cfg.masks
    log.info("training DeepLab-V2 (%s) on %d images of %r with masks from %s", cfg.backbone, num_train,
             cfg.train_split, masks_source)
    loop_config = {"class_names": class_names, "num_train": num_train, "masks_source": masks_source}
    checkpoint_path, _ = training.fit(cfg, SegmenterTask, loop_config,
                                      training_records(cfg).map_batches(transform, batch_size=16), STAGE)
    return training.finish(cfg, checkpoint_path, started,
                           {"stage": STAGE, "backbone": cfg.backbone, "masks": masks_source, "train_images": num_train})

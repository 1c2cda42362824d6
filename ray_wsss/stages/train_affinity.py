"""Train AffinityNet (PSA, Ahn & Kwak CVPR'18) on the affinity labels, with Ray Train V2 DDP.

The driver streams the training split's (samples, affinity_labels) file pairs through Ray Data (no join: the
tables are co-partitioned), where CPU tasks decode and cut random crops at multiples of 8 pixels with a flip
(``core.data.affinity_augment``); the common training loop (``harness.training``) runs :class:`AffinityTask`:
the model (``core.models.affinitynet``: a timm ResNet at output stride 8 + PSA's head), the pairs within the
radius on each crop's stride-8 grid and PSA's balanced loss (``core.refine.psa``), SGD over PSA's parameter
groups (backbone weights at lr, its biases and norms at 2x without weight decay, the head at 10x) with a poly
decay. Held out: on each validation image with a ground-truth mask, the pairs between its pure 8 x 8 blocks,
scored as same-label when the affinity exceeds 0.5 (``val_pos_acc``, ``val_neg_acc`` and their mean
``val_pair_acc``). Checkpoints go to ``<out>/<name>/`` each epoch; a rerun with the same name resumes.

PSA's own run (train_aff.py): ResNet-38 from ImageNet weights, crops of 448, batch 8, 8 epochs, lr 0.1, weight
decay 5e-4. Its ``PolyOptimizer`` passes ``weight_decay`` as SGD's third positional argument, which is
momentum, so it trains with momentum 5e-4 and no weight decay; here momentum and weight decay are each what
their flags say (see ``core.optim``).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from typing import Any, ClassVar

import numpy as np
import ray
import ray.data
import ray.train
import ray.train.torch
import torch
import torch.nn as nn

from ray_wsss.core import checkpoints, codec, commit, ownership, storage
from ray_wsss.core.affinity_pairs import STRIDE, pair_affinities
from ray_wsss.core.config import option
from ray_wsss.core.data.affinity_augment import AffinityCropTransform
from ray_wsss.core.models.affinitynet import AffinityNet
from ray_wsss.core.optim import build_optimizer, poly_schedule
from ray_wsss.core.refine import psa
from ray_wsss.harness import training

log = logging.getLogger(__name__)
STAGE = "affinity"
LABELS_TABLE = "affinity_labels"


@dataclasses.dataclass
class TrainAffinityConfig(training.TrainingConfig):
    out: str = option("runs/default/affinity", "output URI for checkpoints, metrics and summary")
    name: str = option("affinity", "run name; rerunning with the same name resumes")
    epochs: int = option(8, "epochs (PSA: 8)", min=1)
    batch_size: int = option(8, "batch size per worker (PSA: 8)", min=1)
    labels: str = option("runs/default/affinity_labels", "affinity labels URI (jobs/affinity_labels.py's --out)")
    backbone: str = option("resnet18", "timm ResNet at output stride 8 (PSA: ResNet-38, which timm does not have; "
                                       "resnet50 or deeper comes closer)")
    backbone_weights: str | None = option(None, "the backbone's timm state dict (.safetensors or torch file), local "
                                                "or s3://; freezes its BatchNorms and stem, as PSA")
    crop: int = option(96, "training crop, a multiple of 8 pixels (PSA: 448)", min=STRIDE)
    radius: int = option(5, "pairs within this distance on the stride-8 grid (PSA: 5)", min=2)
    lr: float = option(0.01, "backbone learning rate; biases and norms get 2x, the head 10x (PSA: 0.1 from "
                             "ImageNet weights)", gt=0)
    weight_decay: float = option(5e-4, "SGD weight decay (not on biases and norms)", min=0)
    momentum: float = option(0.9, "SGD momentum", min=0, max=1)
    poly_power: float = option(0.9, "poly decay power", min=0)
    warmup_epochs: float = option(0.0, "linear warm-up before the poly decay (PSA has none)", min=0)

    def __post_init__(self) -> None:
        cells = self.crop // STRIDE
        if self.crop % STRIDE:
            raise ValueError(f"crop must be a multiple of {STRIDE} pixels, got {self.crop}")
        if cells <= 2 * (self.radius - 1):  # PSA's pairs start rf cells in from both sides
            raise ValueError(f"a crop of {self.crop} pixels ({cells} cells) holds no pair at radius {self.radius}: "
                             f"give at least {(2 * (self.radius - 1) + 1) * STRIDE} pixels, or a smaller radius")


class AffinityStep(nn.Module):
    """Forward + loss in one module, so DDP syncs once per step: PSA's three loss terms on the crop's pairs."""

    def __init__(self, model: AffinityNet, radius: int):
        super().__init__()
        self.model, self.radius = model, radius

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        # float32 affinities: the loss's 1e-5 margins vanish in float16 under AMP
        affinity = pair_affinities(self.model(images).float(), self.radius)
        return psa.affinity_loss(affinity, psa.pair_labels(labels, self.radius))._asdict()


# ---------------------------------------------------------------- worker side

class AffinityTask:
    """AffinityNet's part of the training loop (see harness.training.TrainTask)."""

    batch_kwargs: ClassVar[dict[str, Any]] = {"dtypes": {"image": torch.float32, "labels": torch.int64}}
    val_columns: ClassVar[list[str]] = ["image", "gt_mask"]

    def __init__(self, cfg: TrainAffinityConfig, config: dict[str, Any], device: torch.device):
        ctx = ray.train.get_context()
        self.cfg, self.class_names = cfg, config["class_names"]
        self.model = build_model(cfg)
        self.step_module = ray.train.torch.prepare_model(AffinityStep(self.model, cfg.radius))
        steps_per_epoch = max(1, config["num_train"] // (cfg.batch_size * ctx.get_world_size()))
        self.optimizer = build_optimizer("sgd", self.model.param_groups(cfg.lr, cfg.weight_decay), cfg.lr,
                                         cfg.weight_decay, cfg.momentum)
        self.scheduler = poly_schedule(self.optimizer, steps_per_epoch * cfg.epochs, power=cfg.poly_power,
                                       warmup_steps=int(cfg.warmup_epochs * steps_per_epoch))

    def train_mode(self) -> None:
        self.step_module.train()  # frozen BatchNorms (with backbone weights) are FrozenBatchNorm2d: no mode

    def losses(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.step_module(batch["image"], batch["labels"])

    def validate(self, rows: Iterator[dict[str, Any]]) -> np.ndarray:
        """Pair counts of this rank's held-out rows: see ``psa.pair_accuracy_counts``."""
        counts = np.zeros(4, np.int64)
        for row in rows:
            if row["gt_mask"] is None:
                continue
            affinity = psa.image_affinities(codec.decode_image(row["image"]), self.model, self.cfg.radius)
            truth = torch.from_numpy(psa.labels_at_stride(codec.decode_mask(row["gt_mask"]))).to(affinity.device)
            counts += psa.pair_accuracy_counts(affinity, truth, self.cfg.radius)
        return counts

    def validation_metrics(self, parts: list[np.ndarray]) -> dict[str, float]:
        close_pos, positive, far_neg, negative = (int(v) for v in sum(parts))
        if not positive or not negative:
            return {}
        pos_acc, neg_acc = close_pos / positive, far_neg / negative
        return {"val_pos_acc": pos_acc, "val_neg_acc": neg_acc, "val_pair_acc": (pos_acc + neg_acc) / 2}

    def checkpoint_meta(self) -> dict[str, Any]:
        return {"method": checkpoints.AFFINITY_METHOD, "class_names": self.class_names, "labels": self.cfg.labels,
                "model_config": {"backbone": self.cfg.backbone, "radius": self.cfg.radius,
                                 "frozen_bn": self.model.frozen}}


def build_model(cfg: TrainAffinityConfig) -> AffinityNet:
    """AffinityNet with the backbone weights read from a local file or fetched from a bucket into a temporary one."""
    weights = cfg.backbone_weights
    if weights is None or not storage.is_s3(weights):
        return AffinityNet(cfg.backbone, weights)
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, os.path.basename(weights))  # its suffix tells timm safetensors from torch
        with open(local, "wb") as f:
            f.write(storage.read_bytes(weights, cfg.storage))
        return AffinityNet(cfg.backbone, local)


# ---------------------------------------------------------------- driver side

@ownership.owns_output(STAGE, inputs=("data", "val_data", "labels", "backbone_weights"))
def run(cfg: TrainAffinityConfig) -> dict[str, Any]:
    """Train and return the job summary (final loss terms, held-out pair accuracy, checkpoint URI)."""
    cfg = dataclasses.replace(cfg, storage=cfg.storage.resolved())  # workers get what the driver sees
    started = time.time()
    commit.read_manifest(cfg.data, cfg.storage)  # clear errors if an input stage never committed
    commit.read_manifest(cfg.labels, cfg.storage)
    class_names = storage.read_json(storage.join(cfg.labels, "dataset.json"), cfg.storage)["class_names"]
    num_train = training.count_paired_rows(cfg, cfg.labels, LABELS_TABLE)
    if num_train < cfg.batch_size * cfg.num_workers:
        raise ValueError(f"{num_train} images of split {cfg.train_split!r} of {cfg.data} have affinity labels in "
                         f"{cfg.labels}: fewer than one batch of {cfg.batch_size} for each of {cfg.num_workers} "
                         "workers")
    training.check_cpu_budget(cfg)
    # Per-epoch lines are this stage's progress; Ray Data's bars inside workers would flood the log.
    ray.data.DataContext.get_current().enable_progress_bars = False
    log.info("training AffinityNet (%s) on %d images of %r with the affinity labels of %s", cfg.backbone, num_train,
             cfg.train_split, cfg.labels)
    records = training.paired_split_records(cfg, cfg.labels, LABELS_TABLE, "labels")
    checkpoint_path, _ = training.fit(cfg, AffinityTask, {"class_names": class_names, "num_train": num_train},
                                      records.map_batches(AffinityCropTransform(cfg.crop), batch_size=16), STAGE)
    return training.finish(cfg, checkpoint_path, started,
                           {"stage": STAGE, "backbone": cfg.backbone, "labels": cfg.labels, "train_images": num_train})

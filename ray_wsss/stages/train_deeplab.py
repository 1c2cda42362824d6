"""Stage 5: train DeepLab-V2 on the pseudo masks (or the ground truth) with Ray Train V2 DDP.

The driver joins the sample shards with the ``masks`` table on ``image_id`` in Ray Data, where CPU
tasks also decode and augment (random scale, pad, crop, flip); every worker runs
:func:`train_loop_per_worker`: SGD with poly decay and a 10x LR head, cross-entropy that ignores
255, and each epoch a single-scale mIoU on the ground-truth masks of the held-out split.
Checkpoints go to ``<out>/<name>/`` each epoch; a rerun with the same name resumes.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.data
import ray.train
import ray.train.torch
import torch
import torch.nn as nn
import torch.nn.functional as F

from ray_wsss.core import codec, storage
from ray_wsss.core import commit, ownership
from ray_wsss.harness import batch_stage
from ray_wsss.core.data.seg_augment import SegmentationTransform
from ray_wsss.core.errors import WsssError
from ray_wsss.core.metrics import ConfusionMatrix
from ray_wsss.core.models.deeplab import BACKBONES, DeepLabConfig, DeepLabV2, create_deeplab
from ray_wsss.core.schema import IGNORE_INDEX
from ray_wsss.core.inference import normalize_image, predict_probs
from ray_wsss.core.storage import StorageOptions
from ray_wsss.core import checkpoints
from ray_wsss.harness import training
from ray_wsss.core.optim import build_optimizer, poly_schedule
from ray_wsss.core.config import option

log = logging.getLogger(__name__)
STAGE = "deeplab"
METHOD = "deeplab"  # what checkpoints of this trainer say they hold



@dataclasses.dataclass
class TrainDeepLabConfig:
    masks: str | None = option(None, "pseudo masks URI (make_masks' --out); not needed with --gt-masks")
    data: str = option("runs/default/data", "sample shards URI (prepare_data's --out)")
    out: str = option("runs/default/deeplab", "output URI for checkpoints, metrics and summary")
    gt_masks: bool = option(False, "train on the samples' ground-truth masks instead (the fully supervised reference)")
    backbone: str = option("resnet18", "dilated ResNet depth (the paper: resnet101)", choices=BACKBONES)
    backbone_weights: str | None = option(None, "torchvision ResNet state dict (ImageNet), local or s3://")
    freeze_bn: bool | None = option(None, "keep the backbone's BatchNorm fixed, as DeepLab-V2 does "
                                      "(default: on with --backbone-weights, off from scratch)")
    crop: int = option(96, "training crop size (the paper: 321 or 513)")
    scale_range: tuple[float, ...] = option((0.5, 1.5), "random rescale range: low high")
    epochs: int = option(10, "epochs")
    batch_size: int = option(8, "batch size per worker")
    num_workers: int = option(1, "Ray Train workers (DDP ranks)")
    use_gpu: bool = option(False, "one GPU per worker, nccl, AMP")
    cpus_per_worker: float = option(1.0, "CPUs reserved per worker; the rest feed Ray Data")
    lr: float = option(2.5e-3, "backbone learning rate, the head gets 10x (the paper: 2.5e-4 from ImageNet weights)")
    weight_decay: float = option(5e-4, "SGD weight decay")
    momentum: float = option(0.9, "SGD momentum")
    poly_power: float = option(0.9, "poly decay power")
    warmup_epochs: float = option(1.0, "linear warm-up before the poly decay (DeepLab-V2 has none; from scratch it "
                                   "stops the early loss spikes)")
    train_split: str = option("train", "split to train on")
    val_split: str | None = option("val", "held-out split scored each epoch against its ground truth ('' for none)")
    name: str = option("deeplab", "run name; rerunning with the same name resumes")
    max_failures: int = option(2, "worker failures to recover from")
    seed: int = option(0, "random seed")
    break_lock: bool = ownership.break_lock_option()
    storage: StorageOptions = dataclasses.field(default_factory=StorageOptions)

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

def train_loop_per_worker(config: dict[str, Any]) -> None:
    cfg: TrainDeepLabConfig = config["cfg"]
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    torch.manual_seed(cfg.seed)
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))

    num_classes = len(config["class_names"])
    model = create_deeplab(cfg.deeplab_config(), num_classes, cfg.storage)
    freeze = cfg.frozen_bn()
    if freeze:
        freeze_batchnorm(model.backbone)
    step_module = ray.train.torch.prepare_model(SegmentationStep(model))

    steps_per_epoch = max(1, config["num_train"] // (cfg.batch_size * ctx.get_world_size()))
    optimizer = build_optimizer("sgd", model.param_groups(cfg.lr), cfg.lr, cfg.weight_decay, cfg.momentum)
    scheduler = poly_schedule(optimizer, steps_per_epoch * cfg.epochs, power=cfg.poly_power,
                              warmup_steps=int(cfg.warmup_epochs * steps_per_epoch))
    use_amp, scaler, start_epoch, history = training.start_or_resume(device, model, optimizer, scheduler, STAGE)

    train_shard = ray.train.get_dataset_shard("train")
    val_shard = training.dataset_shard("val", config["has_val"])
    for epoch in range(start_epoch, cfg.epochs):
        started = time.time()
        set_train_mode(step_module, freeze)
        loss_sum, batches = 0.0, 0
        for batch in train_shard.iter_torch_batches(batch_size=cfg.batch_size, drop_last=True,
                                                    dtypes={"image": torch.float32, "mask": torch.int64}):
            with torch.autocast(device_type=device.type, enabled=use_amp):
                loss = step_module(batch["image"], batch["mask"])
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            loss_sum += float(loss.detach())
            batches += 1
        if batches == 0:
            raise WsssError(f"rank {rank} got no training batch of {cfg.batch_size} in epoch {epoch + 1}: "
                            f"too few joined (image, mask) rows for {ctx.get_world_size()} workers")
        row = {"epoch": epoch + 1, "loss_ce": mean_over_ranks(loss_sum, batches, device),
               "lr": scheduler.get_last_lr()[0], "train_batches": batches}
        if rank == 0:
            row.update(evaluate_segmenter(model, val_shard, num_classes, use_amp))
            row["epoch_seconds"] = round(time.time() - started, 2)
            history.append(row)
            training.worker_print(training.format_row(STAGE, row))
            training.report_epoch(row, lambda tmp: _save_checkpoint(tmp, cfg, config, model, optimizer, scheduler,
                                                                  scaler, epoch, history))
        else:
            training.report_epoch(row, None)


def mean_over_ranks(total: float, count: int, device: torch.device) -> float:
    """sum(total) / sum(count) over all DDP ranks, so the reported loss is the whole epoch's."""
    sums = torch.tensor([total, float(count)], dtype=torch.float64, device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(sums)
    return float(sums[0] / sums[1].clamp(min=1))


@torch.no_grad()
def evaluate_segmenter(model: nn.Module, val_shard, num_classes: int, use_amp: bool) -> dict[str, float]:
    """Single-scale mIoU and pixel accuracy of the (unwrapped) model on rows with ``image`` and ``gt_mask``."""
    if val_shard is None:
        return {}
    matrix = ConfusionMatrix(num_classes)
    device_type = next(model.parameters()).device.type
    for batch in val_shard.iter_batches(batch_size=8, batch_format="numpy"):
        for image_bytes, gt_bytes in zip(batch["image"], batch["gt_mask"]):
            rgb = codec.decode_image(image_bytes)
            with torch.autocast(device_type=device_type, enabled=use_amp):
                probs = predict_probs(model, normalize_image(rgb))
            matrix.add(probs.argmax(0).cpu().numpy().astype(np.uint8), codec.decode_mask(gt_bytes))
    scores = matrix.scores()
    if scores["miou"] is None:
        return {}
    return {"val_miou": scores["miou"], "val_pixel_acc": scores["pixel_acc"]}


def _save_checkpoint(directory: str, cfg: TrainDeepLabConfig, config: dict, model: DeepLabV2, optimizer,
                     scheduler, scaler, epoch: int, history: list[dict]) -> None:
    state = {
        "model": model.state_dict(),
        "model_config": dataclasses.asdict(cfg.deeplab_config()),
        "method": METHOD,
        "class_names": config["class_names"],
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "epoch": epoch,
    }
    meta = {"epoch": epoch + 1, "method": METHOD, "class_names": config["class_names"],
            "model_config": state["model_config"], "masks": config["masks_source"]}
    training.save_checkpoint(directory, state, meta, history)


def load_segmenter(checkpoint_uri: str, options: StorageOptions | None,
                   device: torch.device) -> tuple[DeepLabV2, list[str]]:
    """(model in eval mode on ``device``, class names) from a checkpoint directory of this trainer."""
    state = checkpoints.load_state(checkpoint_uri, options)
    if state.get("method") != METHOD:
        raise WsssError(f"{checkpoint_uri} holds a {state.get('method')!r} checkpoint, not a DeepLab one "
                        "(jobs/train_deeplab.py writes those)")
    # The trained weights cover the backbone: never fetch the initial ones again.
    model_cfg = DeepLabConfig(**{**state["model_config"], "backbone_weights": None})
    model = create_deeplab(model_cfg, len(state["class_names"]))
    model.load_state_dict(state["model"])
    return model.to(device).eval(), state["class_names"]


# ---------------------------------------------------------------- driver side

def training_records(cfg: TrainDeepLabConfig) -> ray.data.Dataset:
    """Rows (image_id, image, mask) of the training split: samples joined with the masks table, or their gt."""
    if cfg.gt_masks:
        samples = batch_stage.read_committed(cfg.data, "samples", cfg.storage, ["image_id", "image", "gt_mask"],
                                       cfg.train_split)
        return samples.map_batches(
            lambda t: (t.filter(pc.is_valid(t["gt_mask"])).select(["image_id", "image", "gt_mask"])
                       .rename_columns(["image_id", "image", "mask"])), batch_format="pyarrow")
    samples = batch_stage.read_committed(cfg.data, "samples", cfg.storage, ["image_id", "image"], cfg.train_split)
    masks = batch_stage.read_committed(cfg.masks, "masks", cfg.storage, ["image_id", "mask"])
    partitions = max(2, int(ray.cluster_resources().get("CPU", 2)))
    return samples.join(masks, join_type="inner", num_partitions=partitions, on=("image_id",))


def count_training_rows(cfg: TrainDeepLabConfig, by_split: dict[str, int]) -> int:
    """Rows the join yields (ids only, no images read); with --gt-masks, the split's size."""
    if cfg.gt_masks:
        return by_split[cfg.train_split]
    mask_ids = commit.read_table(cfg.masks, "masks", cfg.storage, columns=["image_id"])["image_id"]
    samples = commit.read_table(cfg.data, "samples", cfg.storage, columns=["image_id", "split"])
    splits = pa.array([s.strip() for s in cfg.train_split.split(",") if s.strip()], pa.string())
    in_split = samples.filter(pc.is_in(samples["split"], value_set=splits))
    return int(pc.sum(pc.is_in(in_split["image_id"], value_set=mask_ids.combine_chunks())).as_py() or 0)


def validation_records(cfg: TrainDeepLabConfig) -> ray.data.Dataset:
    """Rows (image, gt_mask) of the held-out split that have a ground-truth mask."""
    samples = batch_stage.read_committed(cfg.data, "samples", cfg.storage, ["image", "gt_mask"], cfg.val_split)
    # Materialised now: at validation time a Ray Data task could wait forever for a CPU held by the
    # train split's next epoch, while the other ranks wait at the report barrier.
    return samples.map_batches(lambda t: t.filter(pc.is_valid(t["gt_mask"])), batch_format="pyarrow").materialize()


@ownership.owns_output(STAGE, inputs=("data", "masks", "backbone_weights"))
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
    num_train = count_training_rows(cfg, by_split)
    if num_train < cfg.batch_size * cfg.num_workers:
        raise ValueError(f"{num_train} images of split {cfg.train_split!r} have a mask in "
                         f"{'the ground truth' if cfg.gt_masks else cfg.masks}: fewer than one batch of "
                         f"{cfg.batch_size} for each of {cfg.num_workers} workers")
    training.check_cpu_budget(cfg)

    # Per-epoch lines are this stage's progress; Ray Data's bars inside workers would flood the log.
    ray.data.DataContext.get_current().enable_progress_bars = False
    transform = SegmentationTransform(cfg.crop, len(class_names), scale_range=tuple(cfg.scale_range))
    datasets = {"train": training_records(cfg).map_batches(transform, batch_size=16)}
    if cfg.val_split and by_split.get(cfg.val_split):
        datasets["val"] = validation_records(cfg)
    elif cfg.val_split:
        log.warning("no %r split in %s: no held-out mIoU", cfg.val_split, cfg.data)

    masks_source = "ground truth" if cfg.gt_masks else cfg.masks
    log.info("training DeepLab-V2 (%s) on %d images of %r with masks from %s", cfg.backbone, num_train,
             cfg.train_split, masks_source)
    loop_config = {"cfg": cfg, "class_names": class_names, "num_train": num_train, "has_val": "val" in datasets,
                   "masks_source": masks_source}
    checkpoint_path = training.fit(cfg, train_loop_per_worker, loop_config, datasets, STAGE)
    return training.finish(cfg, checkpoint_path, started,
                         {"stage": STAGE, "backbone": cfg.backbone, "masks": masks_source, "train_images": num_train})

"""Stage 2: train the classifier (ACR, baseline, MCTformer) with Ray Train V2 DDP.

The driver builds Ray Data pipelines over the sample shards (decode + augmentation on CPU tasks)
and a ``TorchTrainer``; every worker runs :func:`train_loop_per_worker`. Checkpoints go to
``<out>/<name>/`` each epoch; a rerun with the same name resumes from the newest one.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import numpy as np
import ray
import ray.data
import ray.train
import ray.train.torch
import torch
import torch.nn as nn

from ray_wsss.harness import batch_stage
from ray_wsss.core import storage
from ray_wsss.core import commit, ownership
from ray_wsss.core.data.augment import ClassifierTransform
from ray_wsss.core.methods import METHODS, default_consistency_weights
from ray_wsss.core.methods.acr import ACRLossConfig, acr_losses, baseline_losses
from ray_wsss.core.methods.mct import mct_acr_losses, mct_losses
from ray_wsss.core.methods.views import View, random_view
from ray_wsss.core.models import build_classifier
from ray_wsss.core.models.vit import ViTConfig
from ray_wsss.core.storage import StorageOptions
from ray_wsss.harness import training
from ray_wsss.core import metrics
from ray_wsss.core.optim import OPTIMIZERS, build_optimizer, poly_schedule
from ray_wsss.core.config import option

log = logging.getLogger(__name__)
STAGE = "train"



@dataclasses.dataclass
class TrainClassifierConfig:
    data: str = option("runs/default/data", "sample shards URI (prepare_data's --out)")
    out: str = option("runs/default/train", "output URI for checkpoints, metrics and summary")
    method: str = option("acr", "training method", choices=METHODS)
    model: str = option("vit_tiny_patch16_224", "timm ViT/DeiT name")
    img_size: int = option(96, "training crop size (pixels)")
    patch_size: int = option(16, "ViT patch size")
    depth: int | None = option(None, "number of ViT blocks (default: the model's)")
    embed_dim: int | None = option(None, "embedding width (default: the model's)")
    num_heads: int | None = option(None, "attention heads (default: the model's)")
    weights: str | None = option(None, "initial weights file (timm/DeiT state dict or a checkpoint), local or s3://")
    epochs: int = option(12, "epochs")
    batch_size: int = option(32, "batch size per worker")
    num_workers: int = option(1, "Ray Train workers (DDP ranks)")
    use_gpu: bool = option(False, "one GPU per worker, nccl, AMP")
    cpus_per_worker: float = option(1.0, "CPUs reserved per worker; the rest feed Ray Data")
    alpha: float | None = option(None, "weight of Lact (default for acr: 125 with --weights, as the paper; 1 from random init; 0 for baseline/mct)")
    beta: float | None = option(None, "weight of Laff (default: as --alpha)")
    acr_layers: tuple[int, ...] | None = option(None, "blocks whose attention the ACR losses use (default: all)")
    view_scales: tuple[float, ...] = option((1.0, 1.25), "resize factors a second view may use")
    optimizer: str = option("adamw", "optimizer", choices=OPTIMIZERS)
    lr: float = option(5e-4, "base learning rate (poly decay)")
    weight_decay: float = option(0.05, "weight decay")
    momentum: float = option(0.9, "SGD momentum")
    warmup_epochs: float = option(1.0, "linear warm-up before poly decay")
    train_split: str = option("train", "split to train on")
    val_split: str = option("val", "held-out split for mAP/F1")
    name: str = option("train", "run name; rerunning with the same name resumes")
    max_failures: int = option(2, "worker failures to recover from")
    seed: int = option(0, "random seed")
    break_lock: bool = ownership.break_lock_option()
    storage: StorageOptions = dataclasses.field(default_factory=StorageOptions)

    def vit_config(self) -> ViTConfig:
        return ViTConfig(model_name=self.model, img_size=self.img_size, patch_size=self.patch_size,
                         depth=self.depth, embed_dim=self.embed_dim, num_heads=self.num_heads,
                         weights=self.weights)

    def consistency_weights(self) -> tuple[float, float]:
        alpha, beta = default_consistency_weights(self.method, pretrained=bool(self.weights))
        return (alpha if self.alpha is None else self.alpha, beta if self.beta is None else self.beta)


class TrainStep(nn.Module):
    """One optimisation step's forward: both views and every loss term, so DDP syncs once per step.

    Single-view methods (baseline, plain MCTformer) get ``view=None``; ACR and MCTformer+ACR
    (the ACR paper's Table 6) add the second view and the consistency terms.
    """

    def __init__(self, model: nn.Module, method: str, loss_cfg: ACRLossConfig | None, patch_size: int):
        super().__init__()
        self.model = model
        self.loss_cfg = loss_cfg
        self.patch_size = patch_size
        mct = method.startswith("mct")
        self.single_view_losses = mct_losses if mct else baseline_losses
        self.two_view_losses = mct_acr_losses if mct else acr_losses

    def forward(self, images: torch.Tensor, labels: torch.Tensor, view: View | None) -> dict[str, torch.Tensor]:
        out1 = self.model(images)
        if view is None or self.loss_cfg is None:
            return self.single_view_losses(out1, labels)
        out2 = self.model(view.apply(images, self.patch_size))
        return self.two_view_losses(out1, out2, view, labels, self.loss_cfg)


# ---------------------------------------------------------------- worker side

def train_loop_per_worker(config: dict[str, Any]) -> None:
    cfg: TrainClassifierConfig = config["cfg"]
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    torch.manual_seed(cfg.seed + rank)
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))

    num_fg = config["num_classes"] - 1
    model = build_classifier(cfg.method, cfg.vit_config(), num_fg, cfg.storage)
    alpha, beta = cfg.consistency_weights()
    two_views = alpha > 0 or beta > 0
    loss_cfg = ACRLossConfig(alpha=alpha, beta=beta, layers=cfg.acr_layers) if two_views else None
    step_module = ray.train.torch.prepare_model(TrainStep(model, cfg.method, loss_cfg, cfg.patch_size))

    steps_per_epoch = max(1, config["num_train"] // (cfg.batch_size * ctx.get_world_size()))
    optimizer = build_optimizer(cfg.optimizer, model.parameters(), cfg.lr, cfg.weight_decay, cfg.momentum)
    scheduler = poly_schedule(optimizer, steps_per_epoch * cfg.epochs, warmup_steps=int(cfg.warmup_epochs * steps_per_epoch))
    use_amp, scaler, start_epoch, history = training.start_or_resume(device, model, optimizer, scheduler, STAGE)

    view_rng = torch.Generator().manual_seed(cfg.seed * 1000 + rank)
    train_shard = ray.train.get_dataset_shard("train")
    for epoch in range(start_epoch, cfg.epochs):
        started = time.time()
        step_module.train()
        sums: dict[str, float] = {}
        batches = 0
        for batch in train_shard.iter_torch_batches(batch_size=cfg.batch_size, drop_last=True):
            view = random_view(view_rng, scales=cfg.view_scales) if two_views else None
            with torch.autocast(device_type=device.type, enabled=use_amp):
                losses = step_module(batch["image"], batch["labels"], view)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(losses["total"]).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            for key, value in losses.items():
                sums[key] = sums.get(key, 0.0) + float(value.detach())
            batches += 1
        row = {"epoch": epoch + 1, **{f"loss_{k}": v / max(1, batches) for k, v in sums.items()},
               "lr": scheduler.get_last_lr()[0], "train_batches": batches}
        if rank == 0:
            val_transform = ClassifierTransform(cfg.img_size, config["num_classes"], train=False)
            row.update(evaluate_classifier(model, ray.train.get_dataset_shard("val"), val_transform,
                                           cfg.batch_size, device, use_amp))
            row["epoch_seconds"] = round(time.time() - started, 2)
            history.append(row)
            training.worker_print(training.format_row(STAGE, row))
            training.report_epoch(row, lambda tmp: _save_checkpoint(tmp, cfg, config, model, optimizer, scheduler,
                                                                  scaler, epoch, history))
        else:
            training.report_epoch(row, None)


@torch.no_grad()
def evaluate_classifier(model: nn.Module, val_rows, transform: ClassifierTransform, batch_size: int,
                        device: torch.device, use_amp: bool) -> dict[str, float]:
    """Held-out mAP and F1 of the (unwrapped) model on rank 0.

    ``val_rows`` is materialised raw rows, decoded here: a Ray Data task would need a CPU that the
    train split's next epoch may already hold, and rank 0 would wait forever (the others wait at
    the report barrier).
    """
    if val_rows is None:
        return {}
    was_training = model.training
    model.eval()
    all_logits, all_targets = [], []
    for raw in val_rows.iter_batches(batch_size=batch_size, batch_format="numpy"):
        batch = transform(raw)
        with torch.autocast(device_type=device.type, enabled=use_amp):
            logits = model(torch.from_numpy(batch["image"]).to(device)).logits
        all_logits.append(logits.float().cpu().numpy())
        all_targets.append(batch["labels"])
    model.train(was_training)
    if not all_logits:
        return {}
    logits, targets = np.concatenate(all_logits), np.concatenate(all_targets)
    return {"val_map": metrics.mean_average_precision(logits, targets),
            **{f"val_{k}": v for k, v in metrics.f1_scores(logits, targets).items()}}


def _save_checkpoint(directory: str, cfg: TrainClassifierConfig, config: dict, model: nn.Module, optimizer, scheduler,
                     scaler, epoch: int, history: list[dict]) -> None:
    state = {
        "model": model.state_dict(),
        "model_config": dataclasses.asdict(cfg.vit_config()),
        "method": cfg.method,
        "class_names": config["class_names"],
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "epoch": epoch,
    }
    meta = {"epoch": epoch + 1, "method": cfg.method, "class_names": config["class_names"],
            "model_config": state["model_config"]}
    training.save_checkpoint(directory, state, meta, history)


# ---------------------------------------------------------------- driver side

def split_dataset(data: str, split: str, options: StorageOptions | None, columns: list[str]) -> ray.data.Dataset:
    """Rows of one split of committed sample shards, as a Ray dataset."""
    return batch_stage.read_committed(data, "samples", options, columns=columns, split=split)


@ownership.owns_output(STAGE, inputs=("data", "weights"))
def run(cfg: TrainClassifierConfig) -> dict[str, Any]:
    """Train and return the job summary (final losses, held-out metrics, checkpoint URI)."""
    cfg = dataclasses.replace(cfg, storage=cfg.storage.resolved())  # workers get what the driver sees
    started = time.time()
    dataset_meta = storage.read_json(storage.join(cfg.data, "dataset.json"), cfg.storage)
    commit.read_manifest(cfg.data, cfg.storage)  # a clear error if the data stage never committed
    class_names = dataset_meta["class_names"]
    by_split = dataset_meta["counts"]["by_split"]
    if not by_split.get(cfg.train_split):
        raise ValueError(f"{cfg.data} has no images in split {cfg.train_split!r}; it has {by_split}")
    training.check_cpu_budget(cfg)

    num_classes = len(class_names)
    # Per-epoch lines are this stage's progress; Ray Data's bars inside workers would flood the log.
    ray.data.DataContext.get_current().enable_progress_bars = False
    # Raw (encoded) rows read once: re-reading the shards each epoch (listing, footer-reader actors,
    # read tasks) delayed every epoch's first batch by seconds. Only decode + augmentation re-run.
    train_ds = split_dataset(cfg.data, cfg.train_split, cfg.storage, ["image", "labels"]).materialize().map_batches(
        ClassifierTransform(cfg.img_size, num_classes, train=True), batch_size=64)
    datasets = {"train": train_ds}
    if by_split.get(cfg.val_split):
        # Raw rows, materialised now: rank 0 decodes them itself (see evaluate_classifier).
        datasets["val"] = split_dataset(cfg.data, cfg.val_split, cfg.storage, ["image", "labels"]).materialize()
    else:
        log.warning("no %r split in %s: no held-out metrics", cfg.val_split, cfg.data)

    checkpoint_path = training.fit(
        cfg, train_loop_per_worker,
        {"cfg": cfg, "num_classes": num_classes, "class_names": class_names, "num_train": by_split[cfg.train_split]},
        datasets, STAGE)
    return training.finish(cfg, checkpoint_path, started, {"stage": STAGE, "method": cfg.method})


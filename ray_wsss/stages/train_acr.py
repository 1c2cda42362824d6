"""Stage 2: train the classifier (ACR, baseline, MCTformer) with Ray Train V2 DDP.

The driver streams the training split's files through Ray Data (decode + augmentation on CPU tasks) into
the common training loop (``harness.training``); :class:`ClassifierTask` is this stage's part of it: the
method's model and losses (``core.methods``), timm's optimiser groups, held-out mAP and F1. Checkpoints go to
``<out>/<name>/`` each epoch; a rerun with the same name resumes from the newest one.
"""
from __future__ import annotations

import dataclasses
import logging
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
from timm.optim import create_optimizer_v2

from ray_wsss.core import commit, metrics, ownership, storage
from ray_wsss.core.config import option
from ray_wsss.core.data.augment import ClassifierTransform
from ray_wsss.core.methods import Method, get_method, list_methods
from ray_wsss.core.methods.acr import ACRLossConfig
from ray_wsss.core.methods.views import VIEW_SETS, View, draw_view
from ray_wsss.core.models.vit import POS_EMBED_RESAMPLERS, ViTConfig
from ray_wsss.core.optim import OPTIMIZERS, poly_schedule
from ray_wsss.harness import training

log = logging.getLogger(__name__)
STAGE = "train"


@dataclasses.dataclass
class TrainClassifierConfig(training.TrainingConfig):
    out: str = option("runs/default/train", "output URI for checkpoints, metrics and summary")
    method: str = option("acr", "training method", choices=list_methods())
    model: str = option("vit_tiny_patch16_224", "timm ViT/DeiT name")
    img_size: int = option(96, "training crop size (pixels)", min=1)
    patch_size: int = option(16, "ViT patch size", min=1)
    depth: int | None = option(None, "number of ViT blocks (default: the model's)", min=1)
    embed_dim: int | None = option(None, "embedding width (default: the model's)", min=1)
    num_heads: int | None = option(None, "attention heads (default: the model's)", min=1)
    drop_path_rate: float = option(0.0, "stochastic depth of the ViT blocks (MCTformer's main.py: 0.1)", min=0, max=1)
    weights: str | None = option(None, "initial weights file (timm/DeiT state dict or a checkpoint), local or s3://")
    alpha: float | None = option(None, "weight of Lact (default for acr: 125 with --weights, as the paper; 1 from "
                                       "random init; 0 for baseline/mct)", min=0)
    beta: float | None = option(None, "weight of Laff (default: as --alpha)", min=0)
    acr_layers: tuple[int, ...] | None = option(None, "blocks whose attention the ACR losses use (default: all)")
    view_set: str = option("random", "ACR's second view: random (flips, quarter turns, --view-scales) or hflip "
                           "(always the horizontal flip, the authors' code)", choices=VIEW_SETS)
    view_scales: tuple[float, ...] = option((1.0, 1.25), "resize factors a random second view may use", gt=0)
    pre_norm_head: bool = option(False, "classifier head on the last block's class token BEFORE the final "
                                        "LayerNorm (the ACR authors' head); off: timm's head after the norm")
    pos_embed_resampler: str = option("timm", "MCTformer position-embedding resampling to the input grid: timm "
                                              "(antialiased bicubic) or mctformer (the authors' bicubic at "
                                              "(g+0.1)/g0)", choices=POS_EMBED_RESAMPLERS)
    optimizer: str = option("adamw", "optimizer (timm's create_optimizer_v2: no weight decay on norms, biases, "
                                     "position embedding and class tokens)", choices=OPTIMIZERS)
    lr: float = option(5e-4, "base learning rate (poly decay)", gt=0)
    weight_decay: float = option(0.05, "weight decay", min=0)
    momentum: float = option(0.9, "SGD momentum", min=0, max=1)
    warmup_epochs: float = option(1.0, "linear warm-up before poly decay", min=0)

    def vit_config(self) -> ViTConfig:
        return ViTConfig(model_name=self.model, img_size=self.img_size, patch_size=self.patch_size,
                         depth=self.depth, embed_dim=self.embed_dim, num_heads=self.num_heads,
                         drop_path_rate=self.drop_path_rate, weights=self.weights, pre_norm_head=self.pre_norm_head,
                         pos_embed_resampler=self.pos_embed_resampler)

    def consistency_weights(self) -> tuple[float, float]:
        weight = get_method(self.method).default_consistency(pretrained=bool(self.weights))
        return (weight if self.alpha is None else self.alpha, weight if self.beta is None else self.beta)


class TrainStep(nn.Module):
    """One optimisation step's forward: both views and every loss term, so DDP syncs once per step.

    Single-view methods (baseline, plain MCTformer) get ``view=None``; ACR and MCTformer+ACR
    (the ACR paper's Table 6) add the second view and the consistency terms.
    """

    def __init__(self, model: nn.Module, method: Method, loss_cfg: ACRLossConfig | None, patch_size: int):
        super().__init__()
        self.model = model
        self.loss_cfg = loss_cfg
        self.patch_size = patch_size
        self.single_view_losses = method.losses
        self.two_view_losses = method.two_view_losses

    def forward(self, images: torch.Tensor, labels: torch.Tensor, view: View | None) -> dict[str, torch.Tensor]:
        out1 = self.model(images)
        if view is None or self.loss_cfg is None:
            return self.single_view_losses(out1, labels)
        out2 = self.model(view.apply(images, self.patch_size))
        return self.two_view_losses(out1, out2, view, labels, self.loss_cfg)


class ClassifierTask:
    """The classifier's part of the training loop (see harness.training.TrainTask)."""

    batch_kwargs: ClassVar[dict[str, Any]] = {}
    val_columns: ClassVar[list[str]] = ["image", "labels"]

    def __init__(self, cfg: TrainClassifierConfig, config: dict[str, Any], device: torch.device):
        ctx = ray.train.get_context()
        self.cfg, self.device, self.class_names = cfg, device, config["class_names"]
        method = get_method(cfg.method)
        self.model = method.build_model(cfg.vit_config(), len(self.class_names) - 1, storage_options=cfg.storage)
        alpha, beta = cfg.consistency_weights()
        self.two_views = alpha > 0 or beta > 0
        loss_cfg = ACRLossConfig(alpha=alpha, beta=beta, layers=cfg.acr_layers) if self.two_views else None
        self.step_module = ray.train.torch.prepare_model(TrainStep(self.model, method, loss_cfg, cfg.patch_size))
        steps_per_epoch = max(1, config["num_train"] // (cfg.batch_size * ctx.get_world_size()))
        self.optimizer = create_optimizer_v2(self.model, opt=cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                             **({"momentum": cfg.momentum} if cfg.optimizer == "sgd" else {}))
        self.scheduler = poly_schedule(self.optimizer, steps_per_epoch * cfg.epochs,
                                       warmup_steps=int(cfg.warmup_epochs * steps_per_epoch))
        self.view_rng = torch.Generator().manual_seed(cfg.seed * 1000 + ctx.get_world_rank())
        self.val_transform = ClassifierTransform(cfg.img_size, len(self.class_names), train=False)

    def train_mode(self) -> None:
        self.step_module.train()

    def losses(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        view = draw_view(self.cfg.view_set, self.view_rng, self.cfg.view_scales) if self.two_views else None
        return self.step_module(batch["image"], batch["labels"], view)

    def validate(self, rows: Iterator[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
        """(logits, targets) of this rank's held-out rows."""
        logits, targets = [np.zeros((0, len(self.class_names) - 1), np.float32)], [
            np.zeros((0, len(self.class_names) - 1), np.float32)]
        for chunk in _chunks(rows, self.cfg.batch_size):
            batch = self.val_transform({"image": [r["image"] for r in chunk], "labels": [r["labels"] for r in chunk]})
            with torch.autocast(device_type=self.device.type, enabled=self.device.type == "cuda"):
                out = self.model(torch.from_numpy(batch["image"]).to(self.device)).logits
            logits.append(out.float().cpu().numpy())
            targets.append(batch["labels"])
        return np.concatenate(logits), np.concatenate(targets)

    def validation_metrics(self, parts: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
        logits = np.concatenate([p[0] for p in parts])
        targets = np.concatenate([p[1] for p in parts])
        if not len(logits):
            return {}
        return {"val_map": metrics.mean_average_precision(logits, targets),
                "val_map_chance": metrics.chance_mean_average_precision(targets),
                **{f"val_{k}": v for k, v in metrics.f1_scores(logits, targets).items()}}

    def checkpoint_meta(self) -> dict[str, Any]:
        return {"method": self.cfg.method, "class_names": self.class_names,
                "model_config": dataclasses.asdict(self.cfg.vit_config())}


def _chunks(rows: Iterator[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    chunk: list[dict[str, Any]] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# ---------------------------------------------------------------- driver side

def train_dataset(cfg: TrainClassifierConfig, num_classes: int) -> ray.data.Dataset:
    """The training split, streamed from its files and augmented in Ray Data tasks each epoch (not materialised)."""
    files = training.split_files(cfg.data, cfg.train_split, cfg.storage)
    fs, _ = storage.resolve(cfg.data, cfg.storage)
    paths = [storage.resolve(f, cfg.storage)[1] for f in files]
    return ray.data.read_parquet(paths, filesystem=fs, columns=["image", "labels"]).map_batches(
        ClassifierTransform(cfg.img_size, num_classes, train=True), batch_size=64)


@ownership.owns_output(STAGE, inputs=("data", "val_data", "weights"))
def run(cfg: TrainClassifierConfig, callbacks: list | None = None) -> dict[str, Any]:
    """Train and return the job summary (final losses, held-out metrics, checkpoint URI).

    ``callbacks``: extra Ray Train callbacks (the Tune sweep passes its ``TuneReportCallback``).
    """
    cfg = dataclasses.replace(cfg, storage=cfg.storage.resolved())  # workers get what the driver sees
    started = time.time()
    checkpoint_path = fit_classifier(cfg, STAGE, callbacks)
    return training.finish(cfg, checkpoint_path, started, {"stage": STAGE, "method": cfg.method})


def fit_classifier(cfg: TrainClassifierConfig, tag: str, callbacks: list | None = None) -> str:
    """Train the classifier of ``cfg`` on ``cfg.data`` as stage ``tag`` (which must hold ``cfg.out``'s lock);
    -> the last checkpoint's path. The classifier stage and the pretrain stage share it."""
    commit.read_manifest(cfg.data, cfg.storage)  # a clear error if the data stage never committed
    dataset_meta = storage.read_json(storage.join(cfg.data, "dataset.json"), cfg.storage)
    class_names = dataset_meta["class_names"]
    by_split = dataset_meta["counts"]["by_split"]
    if not by_split.get(cfg.train_split):
        raise ValueError(f"{cfg.data} has no images in split {cfg.train_split!r}; it has {by_split}")
    training.check_cpu_budget(cfg)
    # Per-epoch lines are this stage's progress; Ray Data's bars inside workers would flood the log.
    ray.data.DataContext.get_current().enable_progress_bars = False
    loop_config = {"class_names": class_names, "num_train": by_split[cfg.train_split]}
    checkpoint_path, _ = training.fit(cfg, ClassifierTask, loop_config, train_dataset(cfg, len(class_names)), tag,
                                      callbacks)
    return checkpoint_path

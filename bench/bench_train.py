"""Throughput of the classifier training loop: Ray Train (1 worker, Ray Data ingest) vs plain PyTorch.

Both sides train the same model (``TrainStep``: both ACR views and every loss term), with the same
optimiser, schedule, batch size, synthetic data and ``ClassifierTransform`` augmentation, and both
evaluate on the held-out split each epoch. The Ray side is the real ``train_acr.run`` and its
per-epoch ``epoch_seconds`` (train + held-out evaluation, as ``metrics.jsonl`` records them); the
plain side is a single-process loop timed the same way. Epoch 1 is warm-up on both sides (Ray
start, worker start, first Ray Data pipeline, allocator) and is left out: throughput is the train
images of epochs 2..N over their seconds. Prints images/s of each and the ratio ray/plain.

Ray runs its worker processes at nice 15; on a machine shared with other work that alone starves
them against the nice-0 plain loop, so the bench starts Ray with RAY_worker_niceness=0 (both sides
equal; pass --ray-niceness 15 for Ray's default).

Run: python bench/bench_train.py [--num-train 256] [--img-size 96] [--depth 12] [--epochs 5]
     [--plain-loader-workers 1]   # plain side decodes in a DataLoader worker, like Ray Data does
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
from typing import Any

import numpy as np
import pyarrow.compute as pc
import ray
import torch

from ray_wsss.core import commit, storage
from ray_wsss.core.data.augment import ClassifierTransform
from ray_wsss.core.methods import get_method
from ray_wsss.core.methods.acr import ACRLossConfig
from ray_wsss.core.methods.views import draw_view
from ray_wsss.core.optim import build_optimizer, poly_schedule
from ray_wsss.stages import train_acr
from ray_wsss.stages.prepare_data import PrepareConfig
from ray_wsss.stages.prepare_data import run as prepare
from ray_wsss.stages.train_acr import TrainClassifierConfig, TrainStep, evaluate_classifier


class _SplitBatches(torch.utils.data.Dataset):
    """Batch ``i`` of one split, decoded and augmented on access (in a DataLoader worker or in-process)."""

    def __init__(self, rows: dict[str, list], transform: ClassifierTransform, batch_size: int, drop_last: bool):
        self.rows, self.transform, self.batch_size = rows, transform, batch_size
        n = len(rows["image"])
        self.num_batches = n // batch_size if drop_last else -(-n // batch_size)

    def __len__(self) -> int:
        return self.num_batches

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        part = slice(i * self.batch_size, (i + 1) * self.batch_size)
        batch = self.transform({"image": self.rows["image"][part], "labels": self.rows["labels"][part]})
        return {k: torch.from_numpy(v) for k, v in batch.items()}


class _RawRows:
    """The one method of the materialised val dataset that ``evaluate_classifier`` calls."""

    def __init__(self, rows: dict[str, list]):
        self.rows = rows

    def iter_batches(self, batch_size: int, batch_format: str = "numpy"):
        for start in range(0, len(self.rows["image"]), batch_size):
            yield {key: np.array(values[start:start + batch_size], dtype=object) for key, values in self.rows.items()}


def _read_split(cfg: TrainClassifierConfig, split: str) -> dict[str, list]:
    table = commit.read_table(cfg.data, "samples", cfg.storage, columns=["image", "labels", "split"])
    table = table.filter(pc.equal(table["split"], split))
    return {"image": table["image"].to_pylist(), "labels": table["labels"].to_pylist()}


def _loader(rows, transform, batch_size: int, drop_last: bool, workers: int):
    data = _SplitBatches(rows, transform, batch_size, drop_last)
    return torch.utils.data.DataLoader(data, batch_size=None, shuffle=False, num_workers=workers,
                                       persistent_workers=workers > 0)


def plain_loop(cfg: TrainClassifierConfig, threads: int, loader_workers: int) -> list[dict[str, Any]]:
    """``train_loop_per_worker`` without Ray: same module, optimiser, schedule, views and evaluation."""
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(threads)
    class_names = storage.read_json(storage.join(cfg.data, "dataset.json"), cfg.storage)["class_names"]
    num_classes = len(class_names)
    model = get_method(cfg.method).build_model(cfg.vit_config(), num_classes - 1, storage_options=cfg.storage)
    alpha, beta = cfg.consistency_weights()
    two_views = alpha > 0 or beta > 0
    step_module = TrainStep(model, cfg.method,
                            ACRLossConfig(alpha=alpha, beta=beta, layers=cfg.acr_layers) if two_views else None,
                            cfg.patch_size)
    train_rows, val_rows = _read_split(cfg, cfg.train_split), _read_split(cfg, cfg.val_split)
    train_loader = _loader(train_rows, ClassifierTransform(cfg.img_size, num_classes, train=True), cfg.batch_size,
                           True, loader_workers)
    val_transform = ClassifierTransform(cfg.img_size, num_classes, train=False)
    steps_per_epoch = max(1, len(train_rows["image"]) // cfg.batch_size)
    optimizer = build_optimizer(cfg.optimizer, model.parameters(), cfg.lr, cfg.weight_decay, cfg.momentum)
    scheduler = poly_schedule(optimizer, steps_per_epoch * cfg.epochs, warmup_steps=int(cfg.warmup_epochs * steps_per_epoch))
    view_rng = torch.Generator().manual_seed(cfg.seed * 1000)
    history = []
    for epoch in range(cfg.epochs):
        started = time.time()
        step_module.train()
        batches = 0
        for batch in train_loader:
            view = draw_view(cfg.view_set, view_rng, cfg.view_scales) if two_views else None
            losses = step_module(batch["image"], batch["labels"], view)
            optimizer.zero_grad(set_to_none=True)
            losses["total"].backward()
            optimizer.step()
            scheduler.step()
            batches += 1
        train_seconds = time.time() - started
        row = {"epoch": epoch + 1, "train_batches": batches, "loss_total": float(losses["total"]),
               **evaluate_classifier(model, _RawRows(val_rows), val_transform, cfg.batch_size,
                                     torch.device("cpu"), use_amp=False)}
        row["epoch_seconds"] = round(time.time() - started, 2)
        row["train_seconds"] = round(train_seconds, 2)
        history.append(row)
        print("[plain] " + json.dumps(row), flush=True)
    return history


def images_per_second(history: list[dict[str, Any]], batch_size: int) -> float:
    """Train images over seconds of epochs 2..N (epoch 1 is warm-up)."""
    timed = history[1:] or history
    return sum(row["train_batches"] * batch_size for row in timed) / sum(row["epoch_seconds"] for row in timed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", help="where data and runs go (default: a temporary directory)")
    parser.add_argument("--num-train", type=int, default=256)
    parser.add_argument("--num-val", type=int, default=32)
    parser.add_argument("--method", default="acr")
    parser.add_argument("--model", default="vit_tiny_patch16_224")
    parser.add_argument("--img-size", type=int, default=96)
    parser.add_argument("--patch-size", type=int, default=16)
    parser.add_argument("--depth", type=int, default=12)
    parser.add_argument("--embed-dim", type=int, default=None)
    parser.add_argument("--num-heads", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--cpus-per-worker", type=float, default=1.0)
    parser.add_argument("--num-cpus", type=int, default=None, help="Ray's CPUs (default: all)")
    parser.add_argument("--ray-niceness", type=int, default=0,
                        help="nice value of Ray's worker processes (Ray's default: 15; the plain loop runs at 0)")
    parser.add_argument("--plain-loader-workers", type=int, default=0,
                        help="DataLoader worker processes for the plain loop (0: decode in the training process)")
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be at least 2: epoch 1 is warm-up")

    workdir = args.workdir or tempfile.mkdtemp(prefix="bench_train_")
    os.environ["RAY_worker_niceness"] = str(args.ray_niceness)  # read by the raylet ray.init starts
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=True)
    data = os.path.join(workdir, f"data_{args.num_train}_{args.num_val}")
    prepare(PrepareConfig(out=data, num_train=args.num_train, num_val=args.num_val))
    cfg = TrainClassifierConfig(
        data=data, out=os.path.join(workdir, f"ray_{time.strftime('%Y%m%d_%H%M%S')}"), method=args.method,
        model=args.model, img_size=args.img_size, patch_size=args.patch_size, depth=args.depth,
        embed_dim=args.embed_dim, num_heads=args.num_heads, epochs=args.epochs, batch_size=args.batch_size,
        num_workers=1, cpus_per_worker=args.cpus_per_worker, max_failures=0, name="bench")
    threads = max(1, int(args.cpus_per_worker))  # what the Ray worker sets

    plain = plain_loop(cfg, threads, args.plain_loader_workers)
    started = time.time()
    summary = train_acr.run(cfg)
    ray_wall = time.time() - started
    ray_history = [json.loads(line) for line in open(os.path.join(cfg.out, "metrics.jsonl")) if line.strip()]

    plain_ips = images_per_second(plain, cfg.batch_size)
    ray_ips = images_per_second(ray_history, cfg.batch_size)
    report = {
        "config": {k: v for k, v in dataclasses.asdict(cfg).items()
                   if k in ("method", "model", "img_size", "patch_size", "depth", "embed_dim", "num_heads",
                            "batch_size", "epochs", "cpus_per_worker")},
        "num_train": args.num_train, "num_val": args.num_val, "torch_threads": threads,
        "plain_loader_workers": args.plain_loader_workers, "ray_worker_niceness": args.ray_niceness,
        "cluster_cpus": ray.cluster_resources().get("CPU"),
        "plain_epoch_seconds": [row["epoch_seconds"] for row in plain],
        "plain_train_seconds": [row["train_seconds"] for row in plain],
        "ray_epoch_seconds": [row["epoch_seconds"] for row in ray_history],
        "ray_run_seconds_incl_startup": round(ray_wall, 1),
        "ray_final_loss_total": summary["losses"].get("total"),
        "plain_images_per_s": round(plain_ips, 2),
        "ray_images_per_s": round(ray_ips, 2),
        "ratio_ray_over_plain": round(ray_ips / plain_ips, 3),
    }
    ray.shutdown()
    print(json.dumps(report, indent=2))
    print(f"train throughput, epochs 2..{cfg.epochs}: ray {ray_ips:.1f} img/s, plain {plain_ips:.1f} img/s, "
          f"ratio ray/plain {ray_ips / plain_ips:.3f}")


if __name__ == "__main__":
    main()

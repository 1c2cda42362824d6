"""The classifier training loop on Ray Train (1 worker, Ray Data ingest) vs plain PyTorch: start-up, first epoch
and steady epochs, each reported on its own.

Both sides run the SAME task (``train_acr.ClassifierTask``: model, both ACR views, every loss term, timm's
optimiser groups, the poly schedule, held-out mAP) through the SAME epoch function
(``harness.training._train_epoch``) and the same held-out scoring (``harness.training.validate``); they
differ only in what is measured: Ray Train + Ray Data streaming the Parquet files, or a plain process with
a DataLoader over the decoded rows. Prints:

* start-up: ``ray.init``; Ray Train until its first epoch begins (the first report's arrival minus epoch 1);
  the plain side's model build;
* epoch 1 on each side (Ray Data's first pipeline and the allocator warm up here), with its wait for input;
* epochs 2..N: train images per second of each and the ratio ray / plain;
* the Ray run's whole wall time and what lies outside its epochs (checkpoints, reports, commit).

Ray runs its worker processes at nice 15; on a machine shared with other work that alone starves them
against the nice-0 plain loop, so the bench starts Ray with RAY_worker_niceness=0 (pass --ray-niceness 15
for Ray's default). The load average is printed: wall seconds on a shared machine move with it.

Run: python bench/bench_train.py [--num-train 256] [--img-size 96] [--depth 12] [--epochs 4]
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
from unittest import mock

import pyarrow.parquet as pq
import ray
import ray.train
import torch

from ray_wsss.core import commit, storage
from ray_wsss.core.data.augment import ClassifierTransform
from ray_wsss.harness import training
from ray_wsss.stages import train_acr
from ray_wsss.stages.prepare_data import PrepareConfig
from ray_wsss.stages.prepare_data import run as prepare
from ray_wsss.stages.train_acr import ClassifierTask, TrainClassifierConfig


class ReportTimes(ray.train.UserCallback):
    """Appends the arrival time of each epoch's report to a file (the callback runs in Ray Train's controller)."""

    def __init__(self, path: str):
        self.path = path

    def after_report(self, run_context, metrics, checkpoint) -> None:
        with open(self.path, "a") as f:
            f.write(f"{time.time()}\n")


class _OneProcess:
    """What ClassifierTask asks Ray Train's context, for a run outside Ray Train."""

    @staticmethod
    def get_world_size() -> int:
        return 1

    @staticmethod
    def get_world_rank() -> int:
        return 0


class _LocalShard:
    """The one method of a Ray Train dataset shard the epoch loop calls, over a DataLoader of the decoded rows."""

    def __init__(self, rows: dict[str, list], transform: ClassifierTransform, workers: int):
        self.rows, self.transform, self.workers = rows, transform, workers

    def _batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        batch = self.transform({k: [self.rows[k][i] for i in indices] for k in ("image", "labels")})
        return {k: torch.from_numpy(v) for k, v in batch.items()}

    def iter_torch_batches(self, batch_size: int, drop_last: bool, **_):
        n = len(self.rows["image"])
        starts = range(0, n - batch_size + 1 if drop_last else n, batch_size)
        return torch.utils.data.DataLoader([list(range(s, min(s + batch_size, n))) for s in starts],
                                           batch_size=None, collate_fn=self._batch, num_workers=self.workers)


def plain_loop(cfg: TrainClassifierConfig, threads: int, loader_workers: int) -> dict[str, Any]:
    """The harness's epoch loop without Ray: same task, epoch function and held-out scoring."""
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(threads)
    built = time.time()
    meta = storage.read_json(storage.join(cfg.data, "dataset.json"))
    with mock.patch("ray.train.get_context", _OneProcess), mock.patch("ray.train.torch.prepare_model", lambda m: m):
        task = ClassifierTask(cfg, {"class_names": meta["class_names"],
                                    "num_train": meta["counts"]["by_split"][cfg.train_split]}, torch.device("cpu"))
    startup = time.time() - built
    files = training.split_files(cfg.data, cfg.train_split, None)
    rows = {k: [v for f in files for v in pq.read_table(f, columns=[k])[k].to_pylist()] for k in ("image", "labels")}
    shard = _LocalShard(rows, ClassifierTransform(cfg.img_size, len(meta["class_names"]), train=True), loader_workers)
    val_files = training.split_files(cfg.data, cfg.val_split, None)
    history = []
    for epoch in range(cfg.epochs):
        started = time.time()
        task.train_mode()
        _, batches, waited = training._train_epoch(task, shard, cfg.batch_size, torch.device("cpu"), None,
                                                   torch.amp.GradScaler("cuda", enabled=False))
        row = {"epoch": epoch + 1, "train_batches": batches, "data_wait_seconds": round(waited, 2),
               **training.validate(task, val_files, 0, 1, None), "epoch_seconds": round(time.time() - started, 2)}
        history.append(row)
        print("[plain] " + json.dumps(row), flush=True)
    return {"startup_s": startup, "history": history}


def images_per_second(history: list[dict[str, Any]], batch_size: int) -> float:
    """Train images over seconds of epochs 2..N."""
    timed = history[1:]
    return sum(row["train_batches"] * batch_size for row in timed) / sum(row["epoch_seconds"] for row in timed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", help="where data and runs go (default: a temporary directory)")
    parser.add_argument("--num-train", type=int, default=256)
    parser.add_argument("--num-val", type=int, default=32)
    parser.add_argument("--method", default="acr")
    parser.add_argument("--model", default="vit_tiny_patch16_224")
    parser.add_argument("--img-size", type=int, default=96)
    parser.add_argument("--depth", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--cpus-per-worker", type=float, default=1.0)
    parser.add_argument("--threads-per-worker", type=int, default=None, help="torch threads (default: the reservation)")
    parser.add_argument("--num-cpus", type=int, default=None, help="Ray's CPUs (default: all)")
    parser.add_argument("--ray-niceness", type=int, default=0,
                        help="nice value of Ray's worker processes (Ray's default: 15; the plain loop runs at 0)")
    parser.add_argument("--plain-loader-workers", type=int, default=0,
                        help="DataLoader worker processes for the plain loop (0: decode in the training process)")
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be at least 2: epoch 1 is reported apart")

    workdir = args.workdir or tempfile.mkdtemp(prefix="bench_train_")
    os.environ["RAY_worker_niceness"] = str(args.ray_niceness)  # read by the raylet ray.init starts
    from ray_wsss.harness.cluster import LOCAL_RUNTIME_ENV

    started = time.time()
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=True, runtime_env=LOCAL_RUNTIME_ENV)
    ray_init_s = time.time() - started
    data = os.path.join(workdir, f"data_{args.num_train}_{args.num_val}")
    if not commit.is_committed(data):
        prepare(PrepareConfig(out=data, num_train=args.num_train, num_val=args.num_val))
    cfg = TrainClassifierConfig(
        data=data, out=os.path.join(workdir, f"ray_{time.strftime('%Y%m%d_%H%M%S')}"), method=args.method,
        model=args.model, img_size=args.img_size, depth=args.depth, epochs=args.epochs, batch_size=args.batch_size,
        num_workers=1, cpus_per_worker=args.cpus_per_worker, threads_per_worker=args.threads_per_worker,
        max_failures=0, name="bench")
    threads = training.cpu_threads(cfg)  # what the Ray worker sets

    plain = plain_loop(cfg, threads, args.plain_loader_workers)
    reports = os.path.join(workdir, f"reports_{time.time():.0f}.txt")
    load_before = os.getloadavg()
    started = time.time()
    summary = train_acr.run(cfg, callbacks=[ReportTimes(reports)])
    ray_wall = time.time() - started
    load_after = os.getloadavg()
    ray.shutdown()
    arrivals = [float(line) - started for line in open(reports)]
    ray_history = [json.loads(line) for line in open(os.path.join(cfg.out, "metrics.jsonl")) if line.strip()]
    epochs = [row["epoch_seconds"] for row in ray_history]

    plain_ips = images_per_second(plain["history"], cfg.batch_size)
    ray_ips = images_per_second(ray_history, cfg.batch_size)
    report = {
        "config": {k: v for k, v in dataclasses.asdict(cfg).items()
                   if k in ("method", "model", "img_size", "depth", "batch_size", "epochs", "cpus_per_worker",
                            "threads_per_worker")},
        "num_train": args.num_train, "num_val": args.num_val, "torch_threads": threads,
        "plain_loader_workers": args.plain_loader_workers, "ray_worker_niceness": args.ray_niceness,
        "load_average_1min": [round(load_before[0], 1), round(load_after[0], 1)],
        "startup_s": {"ray_init": round(ray_init_s, 1),
                      "ray_train_until_epoch_1": round(arrivals[0] - epochs[0], 1),
                      "plain_task_build": round(plain["startup_s"], 1)},
        "epoch_1_s": {"ray": epochs[0], "ray_data_wait": ray_history[0].get("data_wait_seconds"),
                      "plain": plain["history"][0]["epoch_seconds"]},
        "epochs_2_on_s": {"ray": epochs[1:], "plain": [row["epoch_seconds"] for row in plain["history"][1:]]},
        "ray_run_s": round(ray_wall, 1),
        "ray_run_outside_epochs_s": round(ray_wall - sum(epochs), 1),
        "ray_after_last_report_s": round(ray_wall - arrivals[-1], 1),
        "ray_final_loss_total": summary["losses"].get("total"),
        "plain_images_per_s": round(plain_ips, 2), "ray_images_per_s": round(ray_ips, 2),
        "ratio_ray_over_plain_epochs_2_on": round(ray_ips / plain_ips, 3),
    }
    print(json.dumps(report, indent=2))
    print(f"start-up: ray.init {ray_init_s:.1f} s + Ray Train {arrivals[0] - epochs[0]:.1f} s; epoch 1: ray "
          f"{epochs[0]:.1f} s vs plain {plain['history'][0]['epoch_seconds']:.1f} s; epochs 2..{cfg.epochs}: ray "
          f"{ray_ips:.1f} img/s, plain {plain_ips:.1f} img/s, ratio {ray_ips / plain_ips:.3f}")


if __name__ == "__main__":
    main()

"""Helpers of the classifier-training tests: tiny data and model, metrics, Train worker processes (not a conftest)."""
from __future__ import annotations

import glob
import json
import os
from pathlib import Path
from typing import Any

from ray_wsss.core import storage
from ray_wsss.stages.prepare_data import PrepareConfig
from ray_wsss.stages.prepare_data import run as prepare
from ray_wsss.stages.train_acr import TrainClassifierConfig

# A 2-block ViT on 32 px crops: a training step costs milliseconds, so Ray's overhead dominates.
TINY = dict(model="vit_tiny_patch16_224", depth=2, embed_dim=64, num_heads=2, img_size=32, patch_size=8,
            batch_size=8, lr=1e-3, warmup_epochs=0.0)
NUM_TRAIN, NUM_VAL = 24, 12


def tiny_data(root: Path) -> str:
    """Synthetic sample shards under ``root/train-data``; a committed set is reused (prepare skips it)."""
    out = str(root / "train-data")
    prepare(PrepareConfig(out=out, num_train=NUM_TRAIN, num_val=NUM_VAL))
    return out


def tiny_config(data: str, out: str, **overrides: Any) -> TrainClassifierConfig:
    """One worker holding one of the two test CPUs, so Ray Data keeps the other."""
    fields: dict[str, Any] = {**TINY, "num_workers": 1, "cpus_per_worker": 1.0, "epochs": 1, "max_failures": 0}
    return TrainClassifierConfig(data=data, out=out, **{**fields, **overrides})


def read_metrics(out: str, options=None) -> list[dict[str, Any]]:
    text = storage.read_bytes(storage.join(out, "metrics.jsonl"), options).decode()
    return [json.loads(line) for line in text.splitlines() if line]


def train_worker_pids() -> set[int]:
    """PIDs of the live Ray Train worker actors of the connected cluster.

    ``ray.util.state`` needs the dashboard, which the test cluster does not run (and on a shared
    machine its default port may belong to another cluster), so this reads the GCS actor table.
    """
    from ray._private.state import actors

    return {int(a["Pid"]) for a in actors().values()
            if a["State"] == "ALIVE" and a["ActorClassName"] == "RayTrainWorker" and a.get("Pid")}


def _logs_dir() -> str:
    import ray

    return ray._private.worker._global_node.get_logs_dir_path()  # no public API names it


def worker_log_files() -> list[str]:
    """stdout files of this cluster's worker processes (the test cluster does not stream them to the driver)."""
    return sorted(glob.glob(os.path.join(_logs_dir(), "worker-*.out")))


def controller_messages(run_name: str) -> list[str]:
    """What the Ray Train controllers of this cluster logged about run ``run_name`` (JSON-lines logs)."""
    messages = []
    for path in sorted(glob.glob(os.path.join(_logs_dir(), "train", "ray-train-app-controller-*.log"))):
        with open(path, errors="replace") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if record.get("run_name") == run_name:
                    messages.append(str(record.get("message", "")))
    return messages


def worker_lines(containing: str) -> dict[str, list[str]]:
    """log file -> all its lines, for the worker logs with a line that contains ``containing``."""
    found = {}
    for path in worker_log_files():
        with open(path, errors="replace") as f:
            lines = f.read().splitlines()
        if any(containing in line for line in lines):
            found[path] = lines
    return found

"""What the Ray Train jobs (classifier, DeepLab) share: the run, checkpoints, resume and the finish.

A training config passes as a :class:`TrainRun`: any dataclass with the fields below. Rank 0 saves
each epoch's checkpoint (``model.pt``, ``meta.json``, ``metrics.jsonl``, ``learning_curve.png``);
:func:`finish` copies the newest metrics and curve next to the run and commits it with
``summary.json`` and ``_SUCCESS``.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from typing import Any, Callable, Protocol

import ray
import ray.train
import torch
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from ray_wsss.core import config as config_lib
from ray_wsss.core import storage
from ray_wsss.core import commit, ownership
from ray_wsss.core.storage import StorageOptions
from ray_wsss.core import checkpoints
from ray_wsss.core.viz import learning_curves_png

METRICS_FILE = "metrics.jsonl"
CURVE_FILE = "learning_curve.png"


class TrainRun(Protocol):
    """The fields of a training config that running, resuming and committing a run need."""

    out: str
    name: str
    num_workers: int
    use_gpu: bool
    cpus_per_worker: float
    max_failures: int
    storage: StorageOptions


# ---------------------------------------------------------------- worker side

def save_checkpoint(directory: str, state: dict[str, Any], meta: dict[str, Any], history: list[dict]) -> None:
    """Write one checkpoint directory: weights + training state, meta, metrics so far and their curve."""
    torch.save({**state, "history": history}, os.path.join(directory, checkpoints.MODEL_FILE))
    with open(os.path.join(directory, checkpoints.META_FILE), "w") as f:
        json.dump(meta, f, indent=2)
    with open(os.path.join(directory, METRICS_FILE), "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in history)
    with open(os.path.join(directory, CURVE_FILE), "wb") as f:
        f.write(learning_curves_png(history))


def load_resumed_state(device: torch.device, tag: str) -> dict[str, Any] | None:
    """The state saved in Ray Train's latest checkpoint of this run, or None on a fresh start."""
    resumed = ray.train.get_checkpoint()
    if not resumed:
        return None
    with resumed.as_directory() as ckpt_dir:
        state = torch.load(os.path.join(ckpt_dir, checkpoints.MODEL_FILE), map_location=device, weights_only=False)
    if ray.train.get_context().get_world_rank() == 0:
        worker_print(f"[{tag}] resuming from checkpoint {resumed.path} (epoch {state['epoch'] + 1} done)")
    return state


def start_or_resume(device: torch.device, model: torch.nn.Module, optimizer, scheduler,
                    tag: str) -> tuple[bool, torch.amp.GradScaler, int, list[dict]]:
    """-> (AMP on?, its grad scaler, first epoch to run, history so far), restored from Train's checkpoint if any."""
    use_amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    state = load_resumed_state(device, tag)
    if not state:
        return use_amp, scaler, 0, []
    start_epoch, history = restore(state, model, optimizer, scheduler, scaler)
    return use_amp, scaler, start_epoch, history


def restore(state: dict[str, Any], model: torch.nn.Module, optimizer, scheduler, scaler) -> tuple[int, list[dict]]:
    """Load a resumed state into the training objects; -> (first epoch to run, history so far)."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    return state["epoch"] + 1, state["history"]


def report_epoch(row: dict[str, Any], write_checkpoint: Callable[[str], None] | None) -> None:
    """``ray.train.report`` from every rank; the rank passing ``write_checkpoint`` (rank 0) adds the checkpoint."""
    if write_checkpoint is None:
        ray.train.report(row)
        return
    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint(tmp)
        ray.train.report(row, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def dataset_shard(name: str, present: bool):
    """This worker's shard of dataset ``name``, or None when the driver did not pass one."""
    return ray.train.get_dataset_shard(name) if present else None


def worker_print(line: str) -> None:
    """Print one progress line from a training worker, once.

    Train V2 patches ``print`` to also send the line to its logger, so a plain print reaches the
    driver twice; the process's own stdout bypasses that patch.
    """
    print(line, file=sys.__stdout__, flush=True)


def format_row(tag: str, row: dict[str, Any]) -> str:
    return f"[{tag}] " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())


# ---------------------------------------------------------------- driver side

def worker_resources(run: TrainRun) -> dict[str, float]:
    resources = {"CPU": run.cpus_per_worker}
    if run.use_gpu:
        resources["GPU"] = 1
    return resources


def check_cpu_budget(run: TrainRun) -> None:
    """Train workers that hold every CPU starve Ray Data and the job hangs: refuse up front."""
    total = ray.cluster_resources().get("CPU", 0)
    wanted = run.num_workers * run.cpus_per_worker
    if total and wanted >= total:
        raise ValueError(
            f"{run.num_workers} workers x {run.cpus_per_worker} CPUs = {wanted} CPUs leaves none of the cluster's "
            f"{total:g} for Ray Data ingest; lower --cpus-per-worker (fractions are fine) or --num-workers")


def checkpoint_uri(run: TrainRun, fs_path: str) -> str:
    """A URI for the path Ray Train reports (bucket-relative on S3)."""
    return "s3://" + fs_path if storage.is_s3(run.out) else fs_path


def latest_checkpoint(run: TrainRun) -> str | None:
    try:
        return checkpoints.find_checkpoint(storage.join(run.out, run.name), run.storage)
    except Exception:  # noqa: BLE001 - no run yet
        return None


def fit(run: TrainRun, train_loop: Callable[[dict], None], loop_config: dict[str, Any],
        datasets: dict[str, Any], tag: str) -> str:
    """Run ``train_loop`` on Ray Train (resuming run ``run.name`` if it exists); -> the last checkpoint's path.

    Claims ``run.out`` for stage ``tag`` first, with Ray Train's run folder ``<out>/<name>/`` in the
    journal, so a crashed run's out is still the stage's (and its rerun resumes from that folder).
    """
    ownership.require_lock(run.out, tag)
    commit.claim(run.out, tag, run.storage, dirs=[run.name])
    storage_fs, storage_path = storage.resolve(run.out, run.storage)
    previous = latest_checkpoint(run)
    if previous:
        print(f"[{tag}] run {run.name!r} exists: resuming from checkpoint {previous}", flush=True)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=run.num_workers, use_gpu=run.use_gpu,
                                     resources_per_worker=worker_resources(run)),
        run_config=RunConfig(name=run.name, storage_path=storage_path, storage_filesystem=storage_fs,
                             failure_config=FailureConfig(max_failures=run.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=["train"]),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training run {run.name!r} finished without a checkpoint")
    return result.checkpoint.path


def finish(run: TrainRun, checkpoint_path: str, started: float, fields: dict[str, Any]) -> dict[str, Any]:
    """Copy the newest metrics and curve next to the run, write config.yaml and summary.json, commit.

    The summary is ``fields`` plus the checkpoint URI, the epochs done, the final losses
    (``loss_*`` metrics) and held-out metrics (``val_*``) and the seconds taken.
    """
    ckpt = checkpoint_uri(run, checkpoint_path)
    history = [json.loads(line) for line in
               storage.read_bytes(storage.join(ckpt, METRICS_FILE), run.storage).decode().splitlines() if line]
    for name in (METRICS_FILE, CURVE_FILE):
        commit.write_output(run.out, name, storage.read_bytes(storage.join(ckpt, name), run.storage), run.storage)
    final = history[-1] if history else {}
    summary = {
        **fields, "name": run.name, "checkpoint": ckpt,
        "epochs": final.get("epoch"),
        "losses": {k[len("loss_"):]: v for k, v in final.items() if k.startswith("loss_")},
        "val": {k[len("val_"):]: v for k, v in final.items() if k.startswith("val_")},
        "seconds": round(time.time() - started, 2),
    }
    commit.write_output(run.out, "config.yaml", config_lib.dump_yaml(run).encode(), run.storage)
    commit.write_output(run.out, "summary.json", storage.json_bytes(summary), run.storage)
    commit.commit_outputs(run.out, fields.get("stage"), {"checkpoint": ckpt}, run.storage)
    return summary

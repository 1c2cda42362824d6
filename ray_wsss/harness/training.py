"""The training harness: one epoch loop on Ray Train V2 for the classifier, DeepLab and the Tune sweep.

A trainer stage supplies a :class:`TrainTask` (built on every worker: model, optimiser, one step's
losses, validation on a slice of the held-out rows) and the datasets; :func:`fit` runs them in a
``TorchTrainer`` and :func:`finish` commits the run. What the loop does, for every trainer alike:

* seeds torch per rank, picks the device Ray grants (float16 AMP on CUDA; bfloat16 autocast on CPU when the
  trainer's ``cpu_bf16`` says so), sets CPU threads (``threads_per_worker``);
* records where each epoch went: waiting for input, steps, held-out scoring, the worker's CPU seconds;
* resumes from Ray Train's latest checkpoint of the run (fixed ``RunConfig(name=...)``, same storage);
* averages every logged loss over all ranks, so the learning curve is the whole epoch's;
* validates in EVERY rank on its own slice of the held-out split, read straight from the Parquet files
  (no Ray Data in the loop, so no rank can wait for a CPU that another rank's epoch holds — the
  deadlock a rank-0-only validation over a Ray Data shard risked), then gathers the slices; Ray 2.60's
  ``ValidationConfig`` runs asynchronously after the report, which would leave the learning curve and
  ASHA without the epoch's held-out metric;
* releases Ray Train's controller and data actors when the run ends (:func:`fit_and_release`);
* saves a checkpoint each epoch from rank 0: ``model.safetensors`` (weights), ``train_state.pt`` (optimiser,
  schedule, scaler: plain tensors and numbers, loaded with ``weights_only=True``) and ``meta.json`` (model
  config, method, classes, epoch, history), plus ``metrics.jsonl`` and ``learning_curve.png``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import posixpath
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any, Protocol

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
import ray.data
import ray.train
import ray.train.torch
import torch
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from ray_wsss.core import checkpoints, commit, ownership, storage
from ray_wsss.core import config as config_lib
from ray_wsss.core.config import option
from ray_wsss.core.errors import WsssError
from ray_wsss.core.storage import StorageOptions
from ray_wsss.core.viz import learning_curves_png
from ray_wsss.harness.batch_stage import FileTask, committed_files, iter_task_records

METRICS_FILE = "metrics.jsonl"
CURVE_FILE = "learning_curve.png"


@dataclasses.dataclass
class TrainingConfig:
    """What every trainer's config has; a trainer's config dataclass subclasses it."""

    data: str = option("runs/default/data", "sample shards URI (prepare_data's --out)")
    val_data: str | None = option(None, "sample shards of the held-out split when they are another directory "
                                        "(default: --data)")
    out: str = option("runs/default/train", "output URI for checkpoints, metrics and summary")
    name: str = option("train", "run name; rerunning with the same name resumes")
    train_split: str = option("train", "split to train on")
    val_split: str | None = option("val", "held-out split scored each epoch ('' for none)")
    epochs: int = option(12, "epochs", min=1)
    batch_size: int = option(32, "batch size per worker", min=1)
    num_workers: int = option(1, "Ray Train workers (DDP ranks)", min=1)
    use_gpu: bool = option(False, "one GPU per worker, nccl, AMP")
    cpus_per_worker: float = option(1.0, "CPUs reserved per worker; the rest feed Ray Data", gt=0)
    threads_per_worker: int | None = option(None, "torch threads per CPU worker, at most the CPUs it may run on "
                                                  "(default: its reserved CPUs; the pipeline gives its one training "
                                                  "at a time the cluster's CPUs)", min=1)
    cpu_bf16: bool | None = option(False, "bfloat16 autocast for CPU training steps (fast on CPUs with native "
                                          "bf16: AVX512-BF16 or AMX; CUDA always uses float16 AMP)")
    max_failures: int = option(2, "worker failures to recover from (-1: without limit)", min=-1)
    seed: int = option(0, "random seed", min=0)
    break_lock: bool = ownership.break_lock_option()
    storage: StorageOptions = dataclasses.field(default_factory=StorageOptions)

    def held_out_data(self) -> str:
        return self.val_data or self.data


class TrainTask(Protocol):
    """One trainer's part of the loop, built on every worker as ``task_class(cfg, loop_config, device)``."""

    model: torch.nn.Module          # the unwrapped model (saved, validated)
    step_module: torch.nn.Module    # what the loop calls (DDP-wrapped by ray.train.torch.prepare_model)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    batch_kwargs: dict[str, Any]    # extra arguments of iter_torch_batches (dtypes)
    val_columns: list[str]          # columns of the held-out rows validate() needs

    def train_mode(self) -> None: ...

    def losses(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...

    def validate(self, rows: Iterator[dict[str, Any]]) -> Any: ...

    def validation_metrics(self, parts: list[Any]) -> dict[str, float]: ...

    def checkpoint_meta(self) -> dict[str, Any]: ...


# ---------------------------------------------------------------- worker side

def train_loop_per_worker(config: dict[str, Any]) -> None:
    cfg: TrainingConfig = config["cfg"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.seed + rank)
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(cpu_threads(cfg))
    task: TrainTask = config["task"](cfg, config, device)
    amp_dtype = autocast_dtype(cfg, device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)  # bfloat16 needs no loss scaling
    start_epoch, history = resume(task, scaler, device, config["tag"])
    shard = ray.train.get_dataset_shard("train")
    for epoch in range(start_epoch, cfg.epochs):
        started, started_cpu = time.time(), time.process_time()
        task.train_mode()
        sums, batches, waited = _train_epoch(task, shard, cfg.batch_size, device, amp_dtype, scaler)
        if batches == 0:
            raise WsssError(f"rank {rank} got no training batch of {cfg.batch_size} in epoch {epoch + 1}: "
                            f"too few training rows for {world} workers")
        row = {"epoch": epoch + 1, **{f"loss_{k}": v for k, v in mean_over_ranks(sums, batches, device).items()},
               "lr": task.scheduler.get_last_lr()[0], "train_batches": batches}
        trained = time.time()
        row.update(validate(task, config.get("val_files") or [], rank, world, cfg.storage))
        # Where the epoch went (rank 0's view): waiting for input batches, training steps, held-out scoring; and
        # this worker's CPU seconds, which a machine shared with other work stretches far less than wall seconds.
        row.update(data_wait_seconds=round(waited, 2), step_seconds=round(trained - started - waited, 2),
                   validation_seconds=round(time.time() - trained, 2), epoch_seconds=round(time.time() - started, 2),
                   epoch_cpu_seconds=round(time.process_time() - started_cpu, 2))
        history.append(row)
        if rank == 0:
            worker_print(format_row(config["tag"], row))
        report_epoch(row, partial(save_checkpoint, task=task, scaler=scaler, epoch=epoch, history=history)
                     if rank == 0 else None)


def cpu_threads(cfg: TrainingConfig) -> int:
    """Torch threads of a CPU worker: ``threads_per_worker``, else its reserved CPUs; never more than the CPUs
    this process may run on (a cluster's CPUs can span nodes)."""
    wanted = cfg.threads_per_worker or int(cfg.cpus_per_worker)
    return max(1, min(wanted, len(os.sched_getaffinity(0))))


def autocast_dtype(cfg: TrainingConfig, device: torch.device) -> torch.dtype | None:
    """float16 AMP on CUDA; bfloat16 on CPU when ``cpu_bf16`` (None: when this CPU computes bf16 natively);
    else None (float32)."""
    if device.type == "cuda":
        return torch.float16
    wanted = native_cpu_bf16() if cfg.cpu_bf16 is None else cfg.cpu_bf16
    return torch.bfloat16 if wanted else None


def native_cpu_bf16() -> bool:
    """Whether oneDNN runs bf16 natively here (AVX512-BF16 or AMX); elsewhere bf16 convs are emulated, slow."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _train_epoch(task: TrainTask, shard, batch_size: int, device: torch.device, amp_dtype: torch.dtype | None,
                 scaler: torch.amp.GradScaler) -> tuple[dict[str, float], int, float]:
    """One pass over the shard -> (summed losses, batches, seconds spent waiting for the next batch)."""
    sums: dict[str, float] = {}
    batches = 0
    waited = 0.0
    batches_in = iter(shard.iter_torch_batches(batch_size=batch_size, drop_last=True, **task.batch_kwargs))
    while True:
        asked = time.time()
        batch = next(batches_in, None)
        waited += time.time() - asked
        if batch is None:
            break
        with torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            losses = task.losses(batch)
        task.optimizer.zero_grad(set_to_none=True)
        scaler.scale(losses["total"]).backward()
        scaler.step(task.optimizer)
        scaler.update()
        task.scheduler.step()
        for key, value in losses.items():
            sums[key] = sums.get(key, 0.0) + float(value.detach())
        batches += 1
    return sums, batches, waited


def mean_over_ranks(sums: dict[str, float], count: int, device: torch.device) -> dict[str, float]:
    """sum(value) / sum(count) over all DDP ranks for every key: the whole epoch's mean, whatever the rank."""
    keys = sorted(sums)
    values = torch.tensor([sums[k] for k in keys] + [float(count)], dtype=torch.float64, device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(values)
    return {k: float(values[i] / values[-1].clamp(min=1)) for i, k in enumerate(keys)}


def validate(task: TrainTask, val_files: list[str], rank: int, world: int,
             options: StorageOptions | None) -> dict[str, float]:
    """Every rank scores rows rank, rank + world, ... of the held-out files; the parts are gathered to all."""
    if not val_files:
        return {}
    was_training = task.model.training
    task.model.eval()
    with torch.no_grad():
        part = task.validate(_rank_rows(val_files, task.val_columns, rank, world, options))
    task.model.train(was_training)
    parts = [part]
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        parts = [None] * world
        torch.distributed.all_gather_object(parts, part)
    return task.validation_metrics(parts)


def _rank_rows(files: list[str], columns: list[str], rank: int, world: int,
               options: StorageOptions | None) -> Iterator[dict[str, Any]]:
    index = 0
    for uri in files:
        fs, path = storage.resolve(uri, options)
        with fs.open_input_file(path) as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=64, columns=columns):
                for row in batch.to_pylist():
                    if index % world == rank:
                        yield row
                    index += 1


def resume(task: TrainTask, scaler: torch.amp.GradScaler, device: torch.device, tag: str) -> tuple[int, list[dict]]:
    """Restore Ray Train's latest checkpoint of this run, if any; -> (first epoch to run, history so far)."""
    resumed = ray.train.get_checkpoint()
    if not resumed:
        return 0, []
    with resumed.as_directory() as ckpt_dir:
        weights, meta = checkpoints.read_checkpoint_dir(ckpt_dir)
        state = torch.load(os.path.join(ckpt_dir, checkpoints.TRAIN_STATE_FILE), map_location=device,
                           weights_only=True)
    task.model.load_state_dict(weights)
    task.optimizer.load_state_dict(state["optimizer"])
    task.scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    if ray.train.get_context().get_world_rank() == 0:
        worker_print(f"[{tag}] resuming from checkpoint {resumed.path} (epoch {meta['epoch']} done)")
    return meta["epoch"], meta["history"]


def save_checkpoint(directory: str, task: TrainTask, scaler: torch.amp.GradScaler, epoch: int,
                    history: list[dict]) -> None:
    """Write one checkpoint directory: weights, training state, meta, the metrics so far and their curve."""
    meta = {**task.checkpoint_meta(), "epoch": epoch + 1, "history": history}
    checkpoints.write_checkpoint_dir(directory, task.model.state_dict(), meta)
    torch.save({"optimizer": task.optimizer.state_dict(), "scheduler": task.scheduler.state_dict(),
                "scaler": scaler.state_dict()}, os.path.join(directory, checkpoints.TRAIN_STATE_FILE))
    with open(os.path.join(directory, METRICS_FILE), "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in history)
    with open(os.path.join(directory, CURVE_FILE), "wb") as f:
        f.write(learning_curves_png(history))


def report_epoch(row: dict[str, Any], write_checkpoint: Callable[[str], None] | None) -> None:
    """``ray.train.report`` from every rank; the rank passing ``write_checkpoint`` (rank 0) adds the checkpoint."""
    if write_checkpoint is None:
        ray.train.report(row)
        return
    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint(tmp)
        ray.train.report(row, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def worker_print(line: str) -> None:
    """Print one progress line from a training worker, once.

    Train V2 patches ``print`` to also send the line to its logger, so a plain print reaches the
    driver twice; the process's own stdout bypasses that patch.
    """
    print(line, file=sys.__stdout__, flush=True)


def format_row(tag: str, row: dict[str, Any]) -> str:
    return f"[{tag}] " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())


# ---------------------------------------------------------------- driver side

def worker_resources(cfg: TrainingConfig) -> dict[str, float]:
    resources = {"CPU": cfg.cpus_per_worker}
    if cfg.use_gpu:
        resources["GPU"] = 1
    return resources


def check_cpu_budget(cfg: TrainingConfig) -> None:
    """Train workers that hold every CPU starve Ray Data and the job hangs: refuse up front."""
    total = ray.cluster_resources().get("CPU", 0)
    wanted = cfg.num_workers * cfg.cpus_per_worker
    if total and wanted >= total:
        raise ValueError(
            f"{cfg.num_workers} workers x {cfg.cpus_per_worker} CPUs = {wanted} CPUs leaves none of the cluster's "
            f"{total:g} for Ray Data ingest; lower --cpus-per-worker (fractions are fine) or --num-workers")


def absolute_uri(uri: str) -> str:
    """A local path made absolute on the driver: Ray Train (and Tune) run workers in their own directories,
    where a relative path would name another file."""
    return uri if storage.is_s3(uri) else os.path.abspath(uri)


def split_files(data: str, split: str | None, options: StorageOptions | None) -> list[str]:
    """URIs of the sample files of ``split`` (every samples file holds one split)."""
    if not split:
        return []
    return [storage.join(data, "samples", name)
            for name, file_split in sorted(commit.file_splits(data, "samples", options).items()) if file_split == split]


def paired_split_records(cfg: TrainingConfig, table_uri: str, table: str, column: str) -> ray.data.Dataset:
    """Rows (image_id, image, ``column``) of the training split as a Ray Data dataset, streamed file by file:
    each samples file paired with the file of the same name of ``table`` under ``table_uri`` (co-partitioned:
    no join, no shuffle). Images without a row there are left out; a samples file without a paired file too."""
    pairs = [{"samples": absolute_uri(samples), "paired": absolute_uri(paired)}
             for samples, paired in _paired_files(cfg, table_uri, table)]
    return ray.data.from_items(pairs, override_num_blocks=max(1, len(pairs))).flat_map(
        _paired_rows, fn_kwargs={"role": table, "column": column, "options": cfg.storage})


def count_paired_rows(cfg: TrainingConfig, table_uri: str, table: str) -> int:
    """Rows :func:`paired_split_records` yields, from the paired files' footers (no image read)."""
    total = 0
    for _, paired in _paired_files(cfg, table_uri, table):
        fs, path = storage.resolve(paired, cfg.storage)
        total += pq.read_metadata(path, filesystem=fs).num_rows
    return total


def _paired_files(cfg: TrainingConfig, table_uri: str, table: str) -> list[tuple[str, str]]:
    names = set(committed_files(table_uri, table, cfg.storage))  # complete, or named
    return [(f, storage.join(table_uri, table, posixpath.basename(f)))
            for f in split_files(cfg.data, cfg.train_split, cfg.storage) if posixpath.basename(f) in names]


def _paired_rows(pair: dict[str, str], role: str, column: str, options: StorageOptions | None) -> list[dict[str, Any]]:
    """A (samples file, paired file) pair -> its (image_id, image, column) rows, matched by id in file order."""
    task = FileTask(name=pair["samples"], primary=pair["samples"], paired=((role, pair["paired"]),))
    columns = {"primary": ["image_id", "image"], role: ["image_id", column]}
    rows = []
    for records in iter_task_records(task, columns, 64, options, []):
        rows += [{"image_id": r["image_id"], "image": r["image"], column: r[role][column]}
                 for r in records if r[role] is not None]
    return rows


def fit(cfg: TrainingConfig, task: type, loop_config: dict[str, Any], train_ds, tag: str,
        callbacks: list | None = None) -> tuple[str, dict[str, Any]]:
    """Run the loop on Ray Train (resuming run ``cfg.name`` if it exists); -> (last checkpoint path, its metrics).

    Claims ``cfg.out`` for stage ``tag`` first, with Ray Train's run folder ``<out>/<name>/`` in the
    journal, so a crashed run's out is still the stage's (and its rerun resumes from that folder).
    """
    ownership.require_lock(cfg.out, tag)
    commit.claim(cfg.out, tag, cfg.storage, dirs=[cfg.name], inputs=[cfg.data, cfg.val_data])
    storage_fs, storage_path = storage.resolve(cfg.out, cfg.storage)
    previous = _run_checkpoint(cfg, storage_fs, posixpath.join(storage_path, cfg.name))
    if previous:
        print(f"[{tag}] run {cfg.name!r} exists: resuming from checkpoint {previous}", flush=True)
    val_files = [absolute_uri(f) for f in split_files(cfg.held_out_data(), cfg.val_split, cfg.storage)]
    if cfg.val_split and not val_files:
        print(f"[{tag}] no {cfg.val_split!r} split in {cfg.held_out_data()}: training without held-out metrics "
              "(give --val-data URI if it lives elsewhere)", flush=True)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={**loop_config, "cfg": cfg, "task": task, "tag": tag, "val_files": val_files},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker=worker_resources(cfg)),
        run_config=RunConfig(name=cfg.name, storage_path=storage_path, storage_filesystem=storage_fs,
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2), callbacks=callbacks or []),
        datasets={"train": train_ds},
        dataset_config=DataConfig(datasets_to_split=["train"]),
    )
    result = fit_and_release(trainer)
    if result.checkpoint is None:
        raise RuntimeError(f"training run {cfg.name!r} finished without a checkpoint")
    return result.checkpoint.path, dict(result.metrics or {})


def fit_and_release(trainer: TorchTrainer) -> ray.train.Result:
    """``trainer.fit()``, then the SIGINT handler it installs goes: that handler holds the TrainController's
    actor handle, so without this the controller and the data actors it owns (about 1 GB of RSS each, torch
    imported) stay alive until the next fit or the driver's end, e.g. through a pipeline's later stages
    (Ray 2.60's ``DataParallelTrainer._register_sigint_handler``)."""
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if in_main_thread else None
    try:
        return trainer.fit()
    finally:
        if in_main_thread:
            signal.signal(signal.SIGINT, previous if previous is not None else signal.SIG_DFL)


def _run_checkpoint(cfg: TrainingConfig, fs: pafs.FileSystem, run_path: str) -> str | None:
    """The latest checkpoint Ray Train recorded for this run, or None for a new run."""
    try:
        result = ray.train.Result.from_path(run_path, storage_filesystem=fs)
    except RuntimeError:  # no such run yet
        return None
    return checkpoint_uri_for(cfg.out, result.checkpoint.path) if result.checkpoint else None


def finish(cfg: TrainingConfig, checkpoint_path: str, started: float, fields: dict[str, Any]) -> dict[str, Any]:
    """Copy the newest metrics and curve next to the run, write config.yaml and summary.json, commit.

    The summary is ``fields`` plus the checkpoint URI, the epochs done, the final losses
    (``loss_*`` metrics) and held-out metrics (``val_*``) and the seconds taken.
    """
    ckpt = checkpoint_uri_for(cfg.out, checkpoint_path)
    history = [json.loads(line) for line in
               storage.read_bytes(storage.join(ckpt, METRICS_FILE), cfg.storage).decode().splitlines() if line]
    for name in (METRICS_FILE, CURVE_FILE):
        commit.write_output(cfg.out, name, storage.read_bytes(storage.join(ckpt, name), cfg.storage), cfg.storage)
    final = history[-1] if history else {}
    summary = {
        **fields, "name": cfg.name, "checkpoint": ckpt,
        "epochs": final.get("epoch"),
        "losses": {k[len("loss_"):]: v for k, v in final.items() if k.startswith("loss_")},
        "val": {k[len("val_"):]: v for k, v in final.items() if k.startswith("val_")},
        "seconds": round(time.time() - started, 2),
    }
    commit.write_output(cfg.out, "config.yaml", config_lib.dump_yaml(cfg).encode(), cfg.storage)
    commit.write_output(cfg.out, "summary.json", storage.json_bytes(summary), cfg.storage)
    commit.commit_outputs(cfg.out, fields.get("stage"), {"checkpoint": ckpt}, cfg.storage)
    return summary


def find_checkpoint(uri: str, options: StorageOptions | None = None) -> str:
    """A checkpoint directory URI from a checkpoint URI or a training job's ``--out``.

    A committed run names its checkpoint in ``summary.json``; an uncommitted one (crashed, or still
    running) is read through Ray Train's own record of its runs (``Result.from_path``): the latest
    checkpoint of the newest run under ``uri``.
    """
    if checkpoints.is_checkpoint(uri, options):
        return uri
    summary_uri = storage.join(uri, "summary.json")
    if storage.exists(summary_uri, options):
        named = storage.read_json(summary_uri, options).get("checkpoint")
        if named and checkpoints.is_checkpoint(named, options):
            return named
    fs, path = storage.resolve(uri, options)
    found = []
    for info in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)):
        if info.type != pafs.FileType.Directory:
            continue
        try:
            result = ray.train.Result.from_path(info.path, storage_filesystem=fs)
        except RuntimeError:  # not a Ray Train run folder
            continue
        if result.checkpoint is not None:
            found.append((info.mtime_ns or 0, result.checkpoint.path))
    if not found:
        checkpoints.refuse_legacy(uri, options)
        raise WsssError(f"no checkpoint under {uri}: expected {checkpoints.WEIGHTS_FILE} there, or a training "
                        "job's --out (a summary.json naming its checkpoint, or Ray Train run folders)")
    return checkpoint_uri_for(uri, max(found)[1])


def checkpoint_uri_for(out: str, fs_path: str) -> str:
    """A URI for a filesystem path Ray Train reports under ``out`` (bucket-relative on S3)."""
    return "s3://" + fs_path if storage.is_s3(out) else fs_path

"""How the harnesses use a cluster: the actor pool's size, results streaming as files finish, training threads."""
from __future__ import annotations

import os
import sys
import time
from typing import ClassVar

import pytest
import torch

from ray_wsss.harness import batch_stage, training


@pytest.mark.parametrize("num_tasks, most, remote_args, cluster, expected", [
    (8, None, {"num_cpus": 1}, {"CPU": 2.0}, 2),                    # one per CPU
    (1, None, {"num_cpus": 1}, {"CPU": 16.0}, 1),                   # one per task
    (8, 3, {"num_cpus": 1}, {"CPU": 16.0}, 3),                      # --num-actors caps it
    (8, None, {"num_cpus": 0.5}, {"CPU": 2.0}, 4),                  # fractional CPUs
    (8, None, {"num_gpus": 1, "resources": {}}, {"CPU": 8.0, "GPU": 2.0}, 2),
    (8, None, {"num_gpus": 1}, {"CPU": 8.0}, 1),                    # GPUs not up yet: start one, autoscale later
    (8, None, {"num_cpus": 1, "resources": {"crf_pool": 1.0}}, {"CPU": 8.0, "crf_pool": 3.0}, 3),
])
def test_initial_actors(num_tasks, most, remote_args, cluster, expected):
    assert batch_stage.initial_actors(num_tasks, most, remote_args, cluster) == expected


class _Gate:
    """A worker whose records marked ``wait`` block until the driver creates ``marker``."""

    columns: ClassVar[dict] = {}

    def __init__(self, cfg, marker: str):
        self.marker = marker

    def process(self, records):
        if any(r["wait"] for r in records):
            deadline = time.time() + 90
            while not os.path.exists(self.marker):
                if time.time() > deadline:
                    raise TimeoutError("the driver never saw the other file's result")
                time.sleep(0.05)
        return [], []


@pytest.mark.usefixtures("ray_local")
def test_a_files_result_reaches_the_driver_while_later_files_run(tmp_path):
    """Two files on one actor (two tasks in flight, run in submission order): the first finishes at once, the
    second waits until the driver has the first's result.

    The driver used to receive each result only once the next file was done (Ray Data's iter_rows
    prefetches a block), so this waited forever. One actor, not two: with two tasks in flight per actor, both
    files could land on whichever actor started first, the waiting one ahead of the other, and the test then
    timed out for a reason unrelated to streaming.
    """
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the actors cannot import a test module
    marker = str(tmp_path / "first-result-seen")
    tasks = [batch_stage.FileTask(name=name, records=({"image_id": name, "wait": name == "waits"},))
             for name in ("quick", "waits")]
    stage = batch_stage.BatchStage(name="gate", table=None, worker=_Gate, worker_args=(marker,), tasks=tasks,
                                   metadata={}, summary={})
    cfg = batch_stage.StageConfig(out=str(tmp_path / "out"), num_actors=1)
    results = []
    for result in batch_stage.map_tasks(cfg, stage, tasks):
        results.append(result)
        open(marker, "w").close()
    assert sorted(r["name"] for r in results) == ["quick", "waits"]
    assert results[0]["name"] == "quick" and all(r["errors"] == 0 for r in results), results


def test_cpu_threads_and_autocast():
    base = training.TrainingConfig()
    available = len(os.sched_getaffinity(0))
    assert training.cpu_threads(base) == 1  # the reservation, as before
    assert training.cpu_threads(training.TrainingConfig(threads_per_worker=available)) == available
    assert training.cpu_threads(training.TrainingConfig(threads_per_worker=available + 5)) == available
    assert training.cpu_threads(training.TrainingConfig(cpus_per_worker=0.5)) == 1
    assert training.autocast_dtype(base, torch.device("cpu")) is None
    assert training.autocast_dtype(training.TrainingConfig(cpu_bf16=True), torch.device("cpu")) is torch.bfloat16
    assert training.autocast_dtype(base, torch.device("cuda")) is torch.float16
    auto = training.TrainingConfig(cpu_bf16=None)  # DeepLab's default: bf16 where the CPU has it natively
    native = torch.bfloat16 if training.native_cpu_bf16() else None
    assert training.autocast_dtype(auto, torch.device("cpu")) is native


def test_pipeline_gives_its_trainings_the_cpus_unless_the_machine_is_busy(monkeypatch):
    import ray

    from ray_wsss.stages import pipeline

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0})
    cfg = pipeline.PipelineConfig(num_workers=2)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.5, 0.5, 0.5))
    assert pipeline.training_threads(cfg) == {"threads_per_worker": 2}
    monkeypatch.setattr(os, "getloadavg", lambda: (6.0, 6.0, 6.0))  # other work holds the cores
    assert pipeline.training_threads(cfg) == {}
    assert pipeline.training_threads(pipeline.PipelineConfig(use_gpu=True)) == {}

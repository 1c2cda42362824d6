"""A batch stage's actor pool grows when the cluster gains a node mid-stage (it is not sized at job start).

On an autoscaling cluster a GPU or CPU pool may be at zero nodes when a job starts; a pool frozen from
``ray.cluster_resources()`` at that moment would keep one actor for the whole stage. The harness asks
for ``ActorPoolStrategy(min_size=1, max_size=num_actors)``, so Ray Data adds actors as resources appear.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from typing import Any, ClassVar

import pytest

from ray_wsss.core import ownership
from ray_wsss.harness import batch_stage

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow


class _SlowWorker:
    """Sleeps per record and reports which node and process made each file."""

    columns: ClassVar[dict[str, list[str]]] = {}

    def __init__(self, cfg: batch_stage.StageConfig, seconds: float):
        self.seconds = seconds

    def process(self, records: list[dict[str, Any]]) -> tuple[list[dict], list[tuple[str, str]]]:
        time.sleep(self.seconds * len(records))
        return [], []

    def task_result(self) -> dict[str, Any]:
        import ray

        return {"node": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}


@pytest.fixture
def growing_cluster(monkeypatch):
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    temp_root = tempfile.mkdtemp(prefix="rwa", dir="/tmp")
    monkeypatch.setenv("RAY_TMPDIR", temp_root)
    node_args = dict(include_dashboard=False, object_store_memory=100 * 1024 * 1024)
    cluster = Cluster(initialize_head=True, head_node_args={**node_args, "num_cpus": 1})
    try:
        # The worker class lives in this test module: workers import it from tests/.
        pythonpath = os.pathsep.join([REPO, os.path.join(REPO, "tests")])
        ray.init(address=cluster.address, log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": pythonpath}})
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(temp_root, ignore_errors=True)


def test_the_pool_grows_onto_a_node_that_joins_mid_stage(growing_cluster, tmp_path):
    tasks = [batch_stage.FileTask(name=f"f{i}", records=({"image_id": f"i{i}"},)) for i in range(30)]
    results: list[dict[str, Any]] = []

    def reduce(rows):
        for row in rows:
            results.append(row)
        return {}

    stage = batch_stage.BatchStage(name="slow", table=None, worker=_SlowWorker, worker_args=(2.0,), tasks=tasks,
                                   metadata={}, summary={}, reduce=reduce)
    cfg = batch_stage.StageConfig(out=str(tmp_path / "out"), batch_size=1)

    def run_stage():
        with ownership.OutputLock(cfg.out, "slow"):  # what a stage's run() does (owns_output)
            batch_stage.run(cfg, "slow", lambda: stage)

    runner = threading.Thread(target=run_stage, daemon=True)
    runner.start()
    deadline = time.time() + 300
    while not results and time.time() < deadline:  # the stage is under way on the head's one CPU
        time.sleep(0.5)
    assert results, "no task finished on the one-CPU head"
    new_node = growing_cluster.add_node(include_dashboard=False, object_store_memory=100 * 1024 * 1024, num_cpus=2)
    runner.join(timeout=600)
    assert not runner.is_alive() and len(results) == len(tasks)
    nodes = {r["node"] for r in results}
    assert new_node.node_id in nodes, "no actor ran on the node that joined"
    assert len({(r["node"], r["pid"]) for r in results}) >= 2, "the pool never grew past its first actor"

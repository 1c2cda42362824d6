"""The whole pipeline on a simulated three-node cluster, with its data on a loopback S3 server.

``ray.cluster_utils.Cluster`` starts, on this machine, a head that advertises the pools marker
(``wsss_pools``) and holds no CPU, a "GPU-pool" node (``gpu_pool``, one CPU, no GPU: ``use_gpu`` stays
off) and a "CPU-pool" node (``crf_pool`` x2, two CPUs). Ray Train workers and the seed/segment actors
ask for plain CPUs and land on either worker node; the CRF actors ask for ``crf_pool`` as well
(``ray_wsss.harness.cluster.pool_resources``), so they must all land on the CPU-pool node. Three logical
CPUs on the 2-core machine: the training stages need ``num_workers * cpus_per_worker`` below the
cluster's CPUs (``check_cpu_budget``), and the CRF pool sizes itself from ``crf_pool``.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import pytest

from ray_wsss.core import checkpoints, commit, storage
from ray_wsss.core.storage import StorageOptions
from ray_wsss.harness import training
from ray_wsss.stages import pipeline
from ray_wsss.stages.pipeline import PipelineConfig

# Nine stages, each with its own Ray Data / Ray Train start-up on three nodes' cold worker pools: about
# 6 minutes on the 2-core CI machine under load, so more than the suite's default 600 s timeout to spare.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
REPO = Path(__file__).resolve().parents[1]

PREPARE = dict(num_train=8, num_val=4, min_size=32, max_size=48, batch_size=4)
TRAIN = dict(model="vit_tiny_patch16_224", depth=2, embed_dim=64, num_heads=2, img_size=32, patch_size=8,
             batch_size=8, lr=1e-3, warmup_epochs=0.0, epochs=1, cpus_per_worker=1.0, max_failures=0)
SEEDS = dict(flip=False, batch_size=4, num_actors=1, allow_untrained=True)  # one epoch may learn nothing
MASKS = dict(crf={"iterations": 5}, batch_size=2)  # pool size left to crf_pool: up to 2 actors
DEEPLAB = dict(backbone="resnet18", crop=48, batch_size=4, epochs=1, cpus_per_worker=1.0, max_failures=0)
SEGMENT = dict(flip=False, batch_size=4, num_actors=1)


@pytest.fixture
def pool_cluster(monkeypatch):
    """Head (pools marker, no CPU) + GPU-pool node + CPU-pool node; yields the node ids by role.

    The session's local Ray (``ray_local``), if up, is shut down first: a driver connects to one
    cluster. conftest's ``pytest_runtest_setup`` restarts it for later tests that ask for it.
    The cluster lives under its own short temp dir (RAY_TMPDIR): ``Cluster`` writes its address to
    ``<tmp>/ray/ray_current_cluster``, and a bare ``ray.init()`` elsewhere on this machine (another
    test run) must not find this cluster in ``/tmp/ray`` and join it.
    """
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    temp_root = tempfile.mkdtemp(prefix="rwm", dir="/tmp")  # short: Ray's socket paths have a length limit
    monkeypatch.setenv("RAY_TMPDIR", temp_root)
    node_args = dict(include_dashboard=False, object_store_memory=200 * 1024 * 1024)
    cluster = Cluster(initialize_head=True,
                      head_node_args={**node_args, "num_cpus": 0, "resources": {"wsss_pools": 1}})
    try:
        gpu_node = cluster.add_node(**node_args, num_cpus=1, resources={"gpu_pool": 1})
        cpu_node = cluster.add_node(**node_args, num_cpus=2, resources={"crf_pool": 2})
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False, runtime_env={
            "env_vars": {"PYTHONPATH": str(REPO)},
            "worker_process_setup_hook": "ray_wsss.harness.cluster.quiet_worker_logging"})
        resources = ray.cluster_resources()
        assert resources.get("CPU") == 3 and resources.get("crf_pool") == 2 and resources.get("gpu_pool") == 1
        yield {"head": cluster.head_node.node_id, "gpu": gpu_node.node_id, "cpu": cpu_node.node_id}
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(temp_root, ignore_errors=True)


def _committed_rows(uri: str, table: str, options: StorageOptions) -> list[dict]:
    assert commit.is_committed(uri, options), f"{uri} is not committed"
    return commit.read_table(uri, table, options).to_pylist()


def _miou(uri: str, options: StorageOptions) -> float:
    miou = storage.read_json(storage.join(uri, "summary.json"), options)["miou"]
    assert 0.0 <= miou <= 1.0, f"{uri}: miou {miou}"
    return miou


def test_pipeline_on_pools_from_s3_then_rerun_skips(pool_cluster, s3_bucket, s3_endpoint):
    opts = StorageOptions(endpoint_url=s3_endpoint, region="us-east-1", access_key="testing", secret_key="testing")
    cfg = PipelineConfig(out=f"{s3_bucket}/run", storage=opts, prepare=PREPARE, train=TRAIN, seeds=SEEDS,
                         masks=MASKS, deeplab=DEEPLAB, segment=SEGMENT)

    started = time.time()
    first = pipeline.run(cfg)
    first_seconds = time.time() - started

    # (1) Every stage's output exists and is committed.
    assert [row["stage"] for row in first["stages"]] == list(pipeline.STAGES)
    assert not any(row["skipped"] for row in first["stages"])
    assert storage.read_json(storage.join(cfg.out, "summary.json"), opts)["stages"] == first["stages"]

    samples = _committed_rows(cfg.uri("data"), "samples", opts)
    split_ids = {split: {s["image_id"] for s in samples if s["split"] == split} for split in ("train", "val")}
    assert {k: len(v) for k, v in split_ids.items()} == {"train": 8, "val": 4}

    for trained in ("train", "deeplab"):
        assert commit.is_committed(cfg.uri(trained), opts)
        ckpt = storage.read_json(storage.join(cfg.uri(trained), "summary.json"), opts)["checkpoint"]
        assert ckpt.startswith(s3_bucket) and storage.exists(storage.join(ckpt, checkpoints.WEIGHTS_FILE), opts)
        assert training.find_checkpoint(cfg.uri(trained), opts) == ckpt

    seeds = _committed_rows(cfg.uri("seeds"), "seeds", opts)
    assert sorted(r["image_id"] for r in seeds) == sorted(split_ids["train"] | split_ids["val"])
    masks = _committed_rows(cfg.uri("masks"), "masks", opts)
    assert sorted(r["image_id"] for r in masks) == sorted(split_ids["train"])
    segmented = _committed_rows(cfg.uri("segment"), "masks", opts)
    assert sorted(r["image_id"] for r in segmented) == sorted(split_ids["val"])
    for stage_name in ("seeds", "masks", "segment"):
        assert _committed_rows(cfg.uri(stage_name), "errors", opts) == []
        _miou(storage.join(cfg.uri(stage_name), "eval"), opts)

    # (2) The CRF actors ran on the CPU-pool node, and only there.
    masks_summary = storage.read_json(storage.join(cfg.uri("masks"), "summary.json"), opts)
    masks_meta = storage.read_json(storage.join(cfg.uri("masks"), "dataset.json"), opts)
    assert masks_summary["worker_nodes"] == masks_meta["worker_nodes"] == [pool_cluster["cpu"]]
    assert not storage.exists(storage.join(cfg.uri("masks"), commit.STAGING_DIR), opts)

    # (3) The same pipeline again: every stage is committed, so every stage is skipped, quickly.
    started = time.time()
    second = pipeline.run(cfg)
    second_seconds = time.time() - started
    assert [row["stage"] for row in second["stages"]] == list(pipeline.STAGES)
    assert all(row["skipped"] for row in second["stages"]), second["stages"]
    assert all(row["skipped"] for row in storage.read_json(storage.join(cfg.out, "summary.json"), opts)["stages"])
    assert second_seconds < 0.2 * first_seconds, (first_seconds, second_seconds)
    print(f"first run {first_seconds:.1f} s, rerun {second_seconds:.1f} s")

"""The classifier training stage on Ray Train V2: DDP on CPU, the baseline, resume, the job CLI and S3."""
from __future__ import annotations

import io
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fixtures_train import NUM_TRAIN, NUM_VAL, TINY, read_metrics, tiny_config, tiny_data, worker_lines
from PIL import Image

from ray_wsss.core import checkpoints, commit, storage
from ray_wsss.harness import training
from ray_wsss.stages import train_acr
from ray_wsss.stages.prepare_data import PrepareConfig
from ray_wsss.stages.prepare_data import run as prepare

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_local")]
REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def train_data(ray_local, tmp_path_factory) -> str:
    return tiny_data(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def ddp_run(train_data, tmp_path_factory):
    """Two DDP workers (gloo) of half a CPU each, ACR, two epochs."""
    out = str(tmp_path_factory.mktemp("ddp"))
    cfg = tiny_config(train_data, out, num_workers=2, cpus_per_worker=0.5, epochs=2, name="ddp")
    return cfg, train_acr.run(cfg)


def _assert_finite(values: dict) -> None:
    assert values and all(math.isfinite(v) for v in values.values()), values


def test_refuses_workers_that_hold_every_cpu(train_data, tmp_path):
    cfg = tiny_config(train_data, str(tmp_path), num_workers=2, cpus_per_worker=1.0)
    with pytest.raises(ValueError, match="leaves none of the cluster"):
        train_acr.run(cfg)
    assert not os.listdir(tmp_path)  # refused before anything was started or written


def test_a_finished_run_releases_its_actors(ddp_run):
    """The controller and the data actors it owns die when fit returns (Ray Train's SIGINT handler kept
    the last run's controller, about 1 GB of RSS each, alive through a pipeline's later stages)."""
    import ray._private.state

    kept = ("TrainController", "DatasetManager", "SplitCoordinator", "RayTrainWorker")
    deadline = time.time() + 60
    while True:
        alive = [a["ActorClassName"] for a in ray._private.state.actors().values()
                 if a["State"] != "DEAD" and any(k in a["ActorClassName"] for k in kept)]
        if not alive or time.time() > deadline:
            break
        time.sleep(0.5)
    assert not alive


def test_two_worker_ddp_run(ddp_run):
    cfg, summary = ddp_run
    assert summary["stage"] == "train" and summary["method"] == "acr" and summary["epochs"] == 2
    assert set(summary["losses"]) == {"cls", "act", "aff", "total"}
    _assert_finite(summary["losses"])
    assert {"map", "f1"} <= set(summary["val"])
    assert 0.0 <= summary["val"]["map"] <= 1.0 and 0.0 <= summary["val"]["f1"] <= 1.0

    rows = read_metrics(cfg.out)
    assert [row["epoch"] for row in rows] == [1, 2]
    # Each rank reads its half of the train split: 12 rows -> one full batch of 8.
    assert all(row["train_batches"] == NUM_TRAIN // 2 // cfg.batch_size for row in rows)
    assert rows[-1]["loss_total"] == pytest.approx(summary["losses"]["total"])

    png = (Path(cfg.out) / "learning_curve.png").read_bytes()
    assert png.startswith(PNG_MAGIC)
    assert Image.open(io.BytesIO(png)).size[0] > 100

    ckpt = summary["checkpoint"]
    assert ckpt.startswith(os.path.join(cfg.out, cfg.name) + os.sep)
    assert {checkpoints.WEIGHTS_FILE, checkpoints.META_FILE} <= set(os.listdir(ckpt))
    assert training.find_checkpoint(cfg.out) == ckpt
    meta = json.loads((Path(ckpt) / checkpoints.META_FILE).read_text())
    assert meta["epoch"] == 2 and meta["method"] == "acr"
    assert meta["model_config"]["depth"] == 2 and meta["model_config"]["embed_dim"] == 64
    state = checkpoints.load_state(ckpt)
    assert state["epoch"] == 2 and len(state["history"]) == 2
    assert checkpoints.TRAIN_STATE_FILE in os.listdir(ckpt) and "model.pt" not in os.listdir(ckpt)
    assert json.loads((Path(cfg.out) / "summary.json").read_text()) == summary


def test_rerun_with_the_same_name_resumes(ddp_run, tmp_path, capfd):
    first_cfg, _ = ddp_run
    out = str(tmp_path / "out")
    shutil.copytree(first_cfg.out, out)  # a run of our own to extend; the DDP test's stays as it was
    first_rows = read_metrics(out)
    capfd.readouterr()

    cfg = tiny_config(first_cfg.data, out, num_workers=2, cpus_per_worker=0.5, epochs=3, name=first_cfg.name)
    summary = train_acr.run(cfg)

    driver_log = capfd.readouterr().out
    run_dir = os.path.join(out, cfg.name)
    assert f"[train] run {cfg.name!r} exists: resuming from checkpoint {run_dir}" in driver_log
    [resumed_log] = worker_lines(f"[train] resuming from checkpoint {run_dir}{os.sep}").values()
    assert [line.split()[1] for line in resumed_log if "[train] epoch=" in line] == ["epoch=3"]  # one more epoch
    assert summary["epochs"] == 3
    rows = read_metrics(out)
    assert [row["epoch"] for row in rows] == [1, 2, 3]
    assert rows[:2] == first_rows  # restored history, not retrained (epoch_seconds would differ)
    assert checkpoints.load_state(summary["checkpoint"])["epoch"] == 3


def test_job_cli_with_yaml_config_trains_the_baseline(train_data, tmp_path, ray_local):
    out = tmp_path / "cli"
    yaml_path = tmp_path / "train.yaml"
    # Written by hand: the YAML keys are the config's field names.
    yaml_path.write_text(
        f"data: {train_data}\n"
        f"out: {out}\n"
        "model: vit_tiny_patch16_224\n"
        "depth: 2\nembed_dim: 64\nnum_heads: 2\nimg_size: 32\npatch_size: 8\n"
        "batch_size: 8\n"
        "cpus_per_worker: 1.0\n"
        "max_failures: 0\n"
        "epochs: 5  # the command line's --epochs wins\n")
    # Join the test cluster instead of starting a second Ray next to it.
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    proc = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "train_acr.py"), "--config", str(yaml_path),
         "--epochs", "1", "--method", "baseline", "--name", "cli"],
        capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.strip().splitlines()
    summary = json.loads(lines[-1])
    assert summary["method"] == "baseline" and summary["epochs"] == 1 and summary["name"] == "cli"
    assert set(summary["losses"]) == {"cls", "total"}  # Lcls only: no act/aff terms
    assert summary["losses"]["total"] == pytest.approx(summary["losses"]["cls"])
    assert {"map", "f1"} <= set(summary["val"])

    ckpt = training.find_checkpoint(str(out))
    assert ckpt == summary["checkpoint"]
    meta = json.loads((Path(ckpt) / checkpoints.META_FILE).read_text())
    assert meta["method"] == "baseline"
    assert {k: meta["model_config"][k] for k in ("depth", "embed_dim", "num_heads", "img_size", "patch_size")} == {
        k: TINY[k] for k in ("depth", "embed_dim", "num_heads", "img_size", "patch_size")}
    rows = read_metrics(str(out))
    assert [row["epoch"] for row in rows] == [1]
    assert not any(key in rows[0] for key in ("loss_act", "loss_aff"))


def test_train_to_and_from_s3(train_data, s3_bucket):
    out = s3_bucket + "/train"
    cfg = tiny_config(train_data, out, name="s3run")
    summary = train_acr.run(cfg)

    ckpt = summary["checkpoint"]
    assert ckpt.startswith(f"{out}/{cfg.name}/")
    assert training.find_checkpoint(out) == ckpt
    for name in (checkpoints.WEIGHTS_FILE, checkpoints.META_FILE):
        assert storage.exists(storage.join(ckpt, name))
    assert storage.read_json(storage.join(ckpt, checkpoints.META_FILE))["epoch"] == 1
    assert checkpoints.load_state(ckpt)["method"] == "acr"
    assert [row["epoch"] for row in read_metrics(out)] == [1]
    assert storage.read_bytes(storage.join(out, "learning_curve.png")).startswith(PNG_MAGIC)
    assert storage.read_json(storage.join(out, "summary.json")) == summary
    assert commit.is_committed(out)


def test_trains_without_a_val_split_and_with_val_data_elsewhere(tmp_path, capfd, ray_local):
    """One split per directory: train-only shards train and say there is no held-out split (Train V2's
    get_dataset_shard would raise KeyError for a missing split); --val-data points at the other directory."""
    train_only, val_only = str(tmp_path / "train-only"), str(tmp_path / "val-only")
    prepare(PrepareConfig(out=train_only, split="train", num_train=NUM_TRAIN, num_val=NUM_VAL))
    prepare(PrepareConfig(out=val_only, split="val", num_train=NUM_TRAIN, num_val=NUM_VAL))
    capfd.readouterr()

    alone = train_acr.run(tiny_config(train_only, str(tmp_path / "alone")))
    assert alone["epochs"] == 1 and alone["val"] == {}
    assert "no 'val' split in" in capfd.readouterr().out

    paired = train_acr.run(tiny_config(train_only, str(tmp_path / "paired"), val_data=val_only))
    assert {"map", "map_chance", "f1"} <= set(paired["val"])
    assert 0.0 <= paired["val"]["map"] <= 1.0

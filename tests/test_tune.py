"""The ACR sweep: Ray Tune trials that drive Ray Train V2 runs, ASHA on val_map, seed mIoU as objective."""
from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest
import yaml

from ray_wsss.core import checkpoints
from ray_wsss.core import config as config_lib
from ray_wsss.harness import training
from ray_wsss.stages import tune_acr
from ray_wsss.stages.extract_seeds import ExtractSeedsConfig
from ray_wsss.stages.prepare_data import PrepareConfig
from ray_wsss.stages.prepare_data import run as prepare
from ray_wsss.stages.train_acr import TrainClassifierConfig

REPO = Path(__file__).resolve().parents[1]
# A 2-block ViT on 32 px crops (as in the training tests): Ray's overhead dominates each trial.
TINY_TRAIN = dict(model="vit_tiny_patch16_224", depth=2, embed_dim=64, num_heads=2, img_size=32, patch_size=8,
                  batch_size=8, warmup_epochs=0.0, max_failures=0)


def _cli():
    sys.path.insert(0, str(REPO / "jobs"))
    return importlib.import_module("_cli")


# ---------------------------------------------------------------- the config (no Ray)

def test_search_space_flags_and_validation():
    cfg = _cli().parse_config(tune_acr.TuneACRConfig, "", [
        "--alpha", "10", "300", "--alpha-sampling", "loguniform", "--lr", "1e-4", "1e-3", "--lr-sampling", "grid",
        "--layers", "1", "3", "--layers-sampling", "uniform", "--num-samples", "4"])
    assert cfg.alpha == (10.0, 300.0) and cfg.lr == (1e-4, 1e-3) and cfg.layers == (1, 3) and cfg.num_samples == 4
    space = cfg.param_space()
    assert space["lr"] == {"grid_search": [1e-4, 1e-3]}
    assert (space["alpha"].lower, space["alpha"].upper) == (10.0, 300.0)
    assert (space["layers"].lower, space["layers"].upper) == (1, 4)  # Tune's randint excludes the upper bound
    assert set(space["beta"].categories) == {0.0, 1.0, 5.0, 25.0, 125.0}

    with pytest.raises(ValueError, match="loguniform needs a low bound > 0"):
        tune_acr.TuneACRConfig(alpha=(0.0, 300.0), alpha_sampling="loguniform")
    with pytest.raises(ValueError, match="two values, low < high"):
        tune_acr.TuneACRConfig(lr=(1e-3,), lr_sampling="uniform")
    with pytest.raises(ValueError, match=r"`train:` section may not set \['alpha', 'epochs'\]"):
        tune_acr.TuneACRConfig(train={"alpha": 1.0, "epochs": 3, "depth": 2})
    with pytest.raises(ValueError, match=r"`seeds:` section may not set \['layers'\]"):
        tune_acr.TuneACRConfig(seeds={"layers": 2})


def test_trial_configs_are_stage_configs():
    sweep = tune_acr.TuneACRConfig(data="d", out="o", epochs=3, train={"depth": 2}, seeds={"flip": False})
    train = sweep.train_config({"alpha": 30.0, "beta": 0.0, "lr": 2e-4}, "o/t", "trial")
    assert (train.alpha, train.beta, train.lr, train.epochs, train.depth, train.out, train.name) == (
        30.0, 0.0, 2e-4, 3, 2, "o/t", "trial")
    seeds = sweep.seeds_config(3, "ckpt", "o/s")
    assert (seeds.layers, seeds.checkpoint, seeds.flip, seeds.data) == (3, "ckpt", False, "d")


def test_concurrency_leaves_a_cpu_for_ray_data(ray_local):
    """On 2 CPUs a trial's seed actor (1 CPU) plus another's Train worker would starve Ray Data's tasks."""
    assert ray_local.cluster_resources()["CPU"] == 2
    assert tune_acr.concurrent_trials(tune_acr.TuneACRConfig()) == 1
    with pytest.raises(ValueError, match="2 concurrent trials would hang on 2 CPUs"):
        tune_acr.concurrent_trials(tune_acr.TuneACRConfig(max_concurrent_trials=2))
    assert tune_acr.concurrent_trials(tune_acr.TuneACRConfig(max_concurrent_trials=1)) == 1


# ---------------------------------------------------------------- a real 2-trial sweep

@pytest.fixture(scope="module")
def sweep(ray_local, tmp_path_factory):
    """Two trials on the 2-CPU test cluster (one at a time: see concurrent_trials), two epochs each.

    ASHA may stop the second trial after epoch 1 when its val_map is below the first one's.
    """
    root = tmp_path_factory.mktemp("tune")
    data = str(root / "data")
    prepare(PrepareConfig(out=data, num_train=16, num_val=8))
    cfg = tune_acr.TuneACRConfig(
        data=data, out=str(root / "sweep"), num_samples=2, epochs=2, grace_period=1,
        alpha=(0.0, 125.0), beta=(0.0, 125.0), lr=(5e-4, 2e-3), layers=(1, 2), cpus_per_worker=0.5,
        train=TINY_TRAIN, seeds={"flip": False, "batch_size": 8, "allow_untrained": True})  # 2 tiny epochs
    return cfg, tune_acr.run(cfg)


@pytest.mark.slow
def test_sweep_reports_epochs_and_seed_miou(sweep):
    cfg, summary = sweep
    rows = summary["table"]
    assert summary["trials"] == len(rows) == 2 and summary["errors"] == 0 and summary["max_concurrent_trials"] == 1
    assert summary["completed"] + summary["stopped_early"] == 2 and summary["completed"] >= 1
    done = [r for r in rows if r["status"] == "done"]
    # Finished trials trained every epoch; ASHA stops only at its rung after epoch 1.
    assert all(r["epochs"] == 2 for r in done)
    assert all(r["epochs"] == 1 and r["seed_miou"] is None for r in rows if r["status"] == "stopped")

    best = summary["best"]
    assert isinstance(best["seed_miou"], float) and 0.0 <= best["seed_miou"] <= 1.0
    assert best["seed_miou"] == max(r["seed_miou"] for r in done)
    assert best["layers"] in (1, 2) and best["alpha"] in (0.0, 125.0) and 5e-4 <= best["lr"] <= 2e-3
    assert json.loads((Path(cfg.out) / "summary.json").read_text()) == summary

    # Each trial's own Train run under the sweep's out, named after the trial; the best one's checkpoint.
    for row in rows:
        assert (Path(cfg.out) / "trials" / row["trial"] / "train" / row["trial"]).is_dir()
    assert Path(training.find_checkpoint(best["checkpoint"]), checkpoints.WEIGHTS_FILE).is_file()


@pytest.mark.slow
def test_train_epochs_reach_tune_through_the_callback(sweep):
    """Tune's own per-trial results hold one row per Train epoch (val_map), then the seed row."""
    cfg, _ = sweep
    result_files = sorted((Path(cfg.out) / cfg.name).glob("*/result.json"))
    assert len(result_files) == 2
    for path in result_files:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line]
        epochs = [r for r in rows if "epoch" in r]
        assert [r["epoch"] for r in epochs] in ([1], [1, 2])
        assert all(0.0 <= r["val_map"] <= 1.0 and "loss_total" in r for r in epochs)
        if len(epochs) == 2:
            assert "seed_miou" in rows[-1] and rows[-1]["epochs_trained"] == 2


@pytest.mark.slow
def test_best_config_files_load_as_job_configs(sweep):
    cfg, summary = sweep
    best = summary["best"]
    train_yaml = summary["best_config"]
    assert train_yaml == str(Path(cfg.out) / "best_config.yaml")
    # Exactly what `python jobs/train_acr.py --config <file>` builds.
    train = _cli().parse_config(TrainClassifierConfig, "", ["--config", train_yaml])
    assert train == config_lib.load(TrainClassifierConfig, train_yaml)
    assert (train.alpha, train.beta, train.lr) == (best["alpha"], best["beta"], best["lr"])
    assert (train.depth, train.embed_dim, train.img_size, train.epochs, train.data) == (2, 64, 32, 2, cfg.data)
    assert "layers" not in yaml.safe_load(Path(train_yaml).read_text())

    seeds = _cli().parse_config(ExtractSeedsConfig, "", ["--config", summary["best_seeds"]])
    assert seeds.layers == best["layers"] and seeds.flip is False and seeds.checkpoint == train.out


@pytest.mark.slow
def test_rerunning_the_sweep_resumes_it_instead_of_starting_over(sweep):
    """The same command again finds the experiment (Tuner.can_restore) and restores it: finished trials
    keep their results and their Train runs are not repeated."""
    cfg, summary = sweep
    runs = sorted((Path(cfg.out) / "trials").glob("*/train/*/checkpoint_*"))
    before = {path: path.stat().st_mtime for path in runs}
    again = tune_acr.run(cfg)
    assert again["best"] == summary["best"] and again["trials"] == summary["trials"]
    assert {path: path.stat().st_mtime for path in sorted((Path(cfg.out) / "trials").glob(
        "*/train/*/checkpoint_*"))} == before  # nothing retrained

"""Hyper-parameter sweep of ACR with Ray Tune over Ray Train V2 runs.

Train V2 pattern: every Tune trial runs :func:`run_trial`, a function trainable that builds its own
``TorchTrainer`` with a ``TuneReportCallback`` in the Train ``RunConfig``, so each epoch's metrics
(``val_map``, ``loss_*``) reach Tune and ASHA can stop weak trials. A trial that trains to the end
then extracts seeds on a labelled split with its checkpoint and reports their mIoU (``seed_miou``),
the sweep's objective. The best trial's settings are written as ``best_config.yaml`` (a
``train_acr.py --config`` file) and ``best_seeds.yaml`` (an ``extract_seeds.py --config`` file).

Layout under ``out``: ``<name>/`` Tune's experiment state, ``trials/<trial id>/{train,seeds}`` each
trial's run (a restarted trial resumes its Train run), ``best_config.yaml``, ``best_seeds.yaml``,
``summary.json``.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import posixpath
import time
from typing import Any

import ray
from ray import tune

from ray_wsss.core import commit, storage
from ray_wsss.core import config as config_lib
from ray_wsss.core.config import option
from ray_wsss.core.storage import StorageOptions
from ray_wsss.harness import training
from ray_wsss.stages import evaluate, extract_seeds, train_acr

log = logging.getLogger(__name__)
SAMPLINGS = ("choice", "grid", "loguniform", "uniform")
TUNED = ("alpha", "beta", "lr", "layers")
# Fields the sweep sets itself: a `train:` / `seeds:` YAML section may not set them.
TRAIN_WIRED = {"data", "out", "name", "alpha", "beta", "lr", "epochs", "num_workers", "cpus_per_worker",
               "use_gpu", "storage"}
SEEDS_WIRED = {"checkpoint", "data", "out", "split", "layers", "use_gpu", "storage"}
# The trial function only waits on its Train run and Ray Data, so it holds no CPU: a fraction would
# leave less than the one whole CPU a Ray Data task needs once Train workers hold the rest. Tune
# needs a non-empty bundle, so it reserves a little memory instead.
TRIAL_MEMORY = 256 * 2**20
SEED_ACTOR_CPUS = 1.0  # what extract's CPU actor pool gives each actor



@dataclasses.dataclass
class TuneACRConfig:
    data: str = option("runs/default/data", "sample shards URI (prepare_data's --out)")
    out: str = option("runs/default/tune", "output URI: Tune state, per-trial runs, best_config.yaml")
    name: str = option("tune_acr", "Tune experiment name")
    num_samples: int = option(8, "trials to sample (each grid point gets this many)", min=1)
    max_concurrent_trials: int | None = option(
        None, "default: the cluster's GPUs / GPUs per trial, else what its CPUs run without a hang", min=1)
    epochs: int = option(6, "training epochs per trial", min=1)
    grace_period: int = option(1, "ASHA: epochs every trial trains before it can be stopped", min=1)
    reduction_factor: float = option(2.0, "ASHA: a rung keeps the best 1/reduction_factor of trials", gt=1)
    asha_metric: str = option("val_map", "per-epoch held-out metric ASHA compares (maximised)")
    eval_split: str = option("val", "labelled split (with gt masks) whose seed mIoU is the objective")
    alpha: tuple[float, ...] = option((0.0, 1.0, 5.0, 25.0, 125.0),
                                      "Lact weight: values (choice, grid) or low high (loguniform, uniform)", min=0)
    alpha_sampling: str = option("choice", "how alpha is searched", choices=SAMPLINGS)
    beta: tuple[float, ...] = option((0.0, 1.0, 5.0, 25.0, 125.0), "Laff weight: values or low high, as for alpha",
                                     min=0)
    beta_sampling: str = option("choice", "how beta is searched", choices=SAMPLINGS)
    lr: tuple[float, ...] = option((1e-4, 1e-3), "learning rate: values or low high", gt=0)
    lr_sampling: str = option("loguniform", "how lr is searched", choices=SAMPLINGS)
    layers: tuple[int, ...] = option((1, 2, 3), "seed extraction's last layers: values or low high", min=1)
    layers_sampling: str = option("choice", "how layers is searched", choices=SAMPLINGS)
    num_workers: int = option(1, "Ray Train workers per trial", min=1)
    cpus_per_worker: float = option(0.5, "CPUs per Train worker (the rest feed Ray Data and the seed actors)", gt=0)
    use_gpu: bool = option(False, "one GPU per Train worker and per seed actor")
    search_seed: int = option(0, "seed of the sampled configurations", min=0)
    max_failures: int = option(0, "Tune: restarts of a failed trial (its Train run resumes)", min=-1)
    train: dict = dataclasses.field(default_factory=dict)  # YAML only: fixed TrainClassifierConfig fields
    seeds: dict = dataclasses.field(default_factory=dict)  # YAML only: fixed ExtractSeedsConfig fields
    storage: StorageOptions = dataclasses.field(default_factory=StorageOptions)

    def __post_init__(self) -> None:
        self.train = config_lib.check_fields(train_acr.TrainClassifierConfig, self.train, "the `train:` section")
        self.seeds = config_lib.check_fields(extract_seeds.ExtractSeedsConfig, self.seeds, "the `seeds:` section")
        for name in TUNED:
            _check_space(name, getattr(self, name), getattr(self, f"{name}_sampling"))
        for section, wired in (("train", TRAIN_WIRED), ("seeds", SEEDS_WIRED)):
            clash = sorted(set(getattr(self, section)) & wired)
            if clash:
                raise ValueError(f"the `{section}:` section may not set {clash}: the sweep sets them")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")

    def param_space(self) -> dict[str, Any]:
        """Tune's search space over alpha, beta, lr and the seed layers."""
        return {name: search_space(getattr(self, name), getattr(self, f"{name}_sampling"), integer=name == "layers")
                for name in TUNED}

    def train_config(self, params: dict[str, Any], out: str, name: str) -> train_acr.TrainClassifierConfig:
        """One trial's (or the best) training config: the fixed `train:` fields plus the sampled ones."""
        wired = {"data": self.data, "out": out, "name": name, "epochs": self.epochs, "num_workers": self.num_workers,
                 "cpus_per_worker": self.cpus_per_worker, "use_gpu": self.use_gpu, "storage": self.storage,
                 "alpha": float(params["alpha"]), "beta": float(params["beta"]), "lr": float(params["lr"])}
        return config_lib.from_dict(train_acr.TrainClassifierConfig, {**self.train, **wired}, f"{self.name}.train")

    def seed_actors(self) -> int:
        """Seed actors per trial: one unless the `seeds:` section says otherwise (trials share the cluster)."""
        return int(self.seeds.get("num_actors") or 1)

    def seeds_config(self, layers: int, checkpoint: str, out: str, **extra: Any) -> extract_seeds.ExtractSeedsConfig:
        wired = {"checkpoint": checkpoint, "data": self.data, "out": out, "layers": int(layers),
                 "use_gpu": self.use_gpu, "storage": self.storage, **extra}
        return config_lib.from_dict(extract_seeds.ExtractSeedsConfig, {**self.seeds, **wired}, f"{self.name}.seeds")


def _check_space(name: str, values: tuple, sampling: str) -> None:
    if sampling not in SAMPLINGS:
        raise ValueError(f"{name}_sampling must be one of {SAMPLINGS}, got {sampling!r}")
    if not values:
        raise ValueError(f"{name}: give at least one value")
    if sampling in ("loguniform", "uniform"):
        if len(values) != 2 or not values[0] < values[1]:
            raise ValueError(f"{name}: {sampling} sampling takes two values, low < high; got {list(values)}")
        if sampling == "loguniform" and values[0] <= 0:
            raise ValueError(f"{name}: loguniform needs a low bound > 0, got {values[0]} (use choice to include 0)")


def search_space(values: tuple, sampling: str, integer: bool = False) -> Any:
    """A Tune domain: choice/grid over ``values``, or a (log)uniform range ``values = (low, high)``."""
    if sampling == "choice":
        return tune.choice(list(values))
    if sampling == "grid":
        return tune.grid_search(list(values))
    low, high = values
    if integer:  # Tune's integer ranges exclude the upper bound
        return (tune.lograndint if sampling == "loguniform" else tune.randint)(int(low), int(high) + 1)
    return (tune.loguniform if sampling == "loguniform" else tune.uniform)(low, high)


def concurrent_trials(cfg: TuneACRConfig) -> int:
    """Trials at once: the cluster's GPUs / GPUs per trial, or on CPUs as many as cannot hang.

    A CPU trial holds its Train workers' CPUs, then its seed actors' (a whole CPU each, as extract's
    CPU pool asks), for whole phases, while its Ray Data tasks each need one whole CPU besides: if
    the concurrent trials' held CPUs leave less than one free, every trial waits on the others.
    """
    resources = ray.cluster_resources()
    if cfg.use_gpu:
        return cfg.max_concurrent_trials or max(1, int(resources.get("GPU", 0)) // cfg.num_workers)
    cpus = resources.get("CPU", 1.0)
    train_cpus = cfg.num_workers * cfg.cpus_per_worker
    held = max(train_cpus, SEED_ACTOR_CPUS * cfg.seed_actors())
    safe = max(1, int((cpus - 1) // held))
    if cfg.max_concurrent_trials and cfg.max_concurrent_trials > safe:
        raise ValueError(
            f"{cfg.max_concurrent_trials} concurrent trials would hang on {cpus:g} CPUs: each holds up to {held:g} "
            f"CPUs (Train workers, then seed actors) and Ray Data tasks need one more free; at most {safe} fit")
    return cfg.max_concurrent_trials or min(safe, max(1, int(cpus // (train_cpus + 1))))


# ---------------------------------------------------------------- a trial (runs in a Tune actor)

def run_trial(params: dict[str, Any], sweep: TuneACRConfig) -> None:
    """Tune function trainable: train (epoch metrics go to Tune), extract seeds, report ``seed_miou``.

    The training is train_acr's own run (the same loop, checkpoints and resume), with Tune's callback.
    """
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = tune.get_context().get_trial_id()
    trial_out = storage.join(sweep.out, "trials", trial_id)
    train_cfg = sweep.train_config(params, storage.join(trial_out, "train"), trial_id)
    summary = train_acr.run(train_cfg, callbacks=[TuneReportCallback()])
    seeds_cfg = sweep.seeds_config(params["layers"], summary["checkpoint"], storage.join(trial_out, "seeds"),
                                   split=sweep.eval_split, num_actors=sweep.seed_actors())
    extract_seeds.run(seeds_cfg)
    scores = evaluate.run(evaluate.EvaluateConfig(pred=seeds_cfg.out, data=sweep.data, kind="seeds",
                                                  split=sweep.eval_split, num_actors=sweep.seed_actors(),
                                                  storage=sweep.storage))
    # No `epoch` key: ASHA ignores this result, so it judges training epochs only.
    tune.report({"seed_miou": scores["miou"], "seed_threshold": scores["threshold"], "seed_images": scores["images"],
                 "checkpoint_uri": summary["checkpoint"], "epochs_trained": summary["epochs"],
                 **{f"val_{k}": v for k, v in summary["val"].items()}})


# ---------------------------------------------------------------- the sweep (driver side)

def _scheduler(cfg: TuneACRConfig):
    """ASHA on the per-epoch metric, deciding only before the last epoch.

    A rung at the last epoch would stop a trial that has finished training just before its seeds
    are measured, so ``max_t`` is ``epochs - 1``; with no earlier rung there is no early stopping.
    """
    from ray.tune.schedulers import ASHAScheduler

    if cfg.epochs - 1 < cfg.grace_period:
        log.info("ASHA off: %d epochs leave no rung before the last (grace period %d)", cfg.epochs, cfg.grace_period)
        return None
    return ASHAScheduler(time_attr="epoch", metric=cfg.asha_metric, mode="max", max_t=cfg.epochs - 1,
                         grace_period=cfg.grace_period, reduction_factor=cfg.reduction_factor,
                         stop_last_trials=False)


def run(cfg: TuneACRConfig) -> dict[str, Any]:
    """Run the sweep; write best_config.yaml, best_seeds.yaml and summary.json; return the summary."""
    from ray.tune.search import BasicVariantGenerator

    started = time.time()
    cfg = dataclasses.replace(cfg, data=training.absolute_uri(cfg.data), out=training.absolute_uri(cfg.out))
    commit.read_manifest(cfg.data, cfg.storage)  # a clear error if the data stage never committed
    training.check_cpu_budget(cfg)  # the sweep config has the Train run's resource fields
    concurrency = concurrent_trials(cfg)
    log.info("sweep: %d samples, %d at once", cfg.num_samples, concurrency)

    trainable = tune.with_resources(tune.with_parameters(run_trial, sweep=cfg), {"CPU": 0, "memory": TRIAL_MEMORY})
    storage_fs, storage_path = storage.resolve(cfg.out, cfg.storage)
    experiment = posixpath.join(storage_path, cfg.name)
    if tune.Tuner.can_restore(experiment, storage_filesystem=storage_fs):
        # A sweep that was interrupted (driver killed, cluster lost) resumes: finished trials stay,
        # unfinished and errored ones run again (their Train runs resume from their checkpoints).
        log.info("sweep %s exists under %s: resuming it", cfg.name, cfg.out)
        tuner = tune.Tuner.restore(experiment, trainable, resume_unfinished=True, resume_errored=True,
                                   storage_filesystem=storage_fs)
        return _finish(cfg, tuner.fit(), started, concurrency)
    tuner = tune.Tuner(
        trainable,
        param_space=cfg.param_space(),
        # The concurrency limit goes to the search algorithm: Tune ignores TuneConfig's with a generator.
        tune_config=tune.TuneConfig(num_samples=cfg.num_samples, scheduler=_scheduler(cfg),
                                    search_alg=BasicVariantGenerator(max_concurrent=concurrency,
                                                                     random_state=cfg.search_seed)),
        run_config=tune.RunConfig(name=cfg.name, storage_path=storage_path, storage_filesystem=storage_fs,
                                  failure_config=tune.FailureConfig(max_failures=cfg.max_failures)),
    )
    results = tuner.fit()
    return _finish(cfg, results, started, concurrency)


def _trial_row(result) -> dict[str, Any]:
    metrics = result.metrics or {}
    status = "error" if result.error else ("done" if "seed_miou" in metrics else "stopped")
    return {"trial": metrics.get("trial_id", os.path.basename(result.path)), "status": status,
            "config": {k: _plain(result.config[k]) for k in TUNED},
            "epochs": metrics.get("epochs_trained", metrics.get("epoch")), "val_map": metrics.get("val_map"),
            "seed_miou": metrics.get("seed_miou")}


def _finish(cfg: TuneACRConfig, results, started: float, concurrency: int) -> dict[str, Any]:
    rows = [_trial_row(r) for r in results]
    if not any(row["status"] == "done" for row in rows):
        errors = [str(r.error).splitlines()[0] for r in results if r.error][:3]
        raise RuntimeError(f"no trial of {len(rows)} reached the seed step ({errors or 'all stopped early'}); "
                           f"see {storage.join(cfg.out, cfg.name)}")
    # Trials stopped by ASHA or failed never report seed_miou, so they cannot be picked.
    best = results.get_best_result(metric="seed_miou", mode="max")
    params = {k: best.config[k] for k in TUNED}
    best_train = cfg.train_config(params, storage.join(cfg.out, "best", "train"), "train")
    best_seeds = cfg.seeds_config(params["layers"], best_train.out, storage.join(cfg.out, "best", "seeds"))
    train_yaml, seeds_yaml = storage.join(cfg.out, "best_config.yaml"), storage.join(cfg.out, "best_seeds.yaml")
    storage.write_bytes(train_yaml, config_lib.dump_yaml(best_train).encode(), cfg.storage)
    storage.write_bytes(seeds_yaml, config_lib.dump_yaml(best_seeds).encode(), cfg.storage)

    summary = {
        "stage": "tune", "out": cfg.out, "trials": len(rows), "max_concurrent_trials": concurrency,
        "completed": sum(r["status"] == "done" for r in rows),
        "stopped_early": sum(r["status"] == "stopped" for r in rows),
        "errors": sum(r["status"] == "error" for r in rows),
        "best": {**{k: _plain(v) for k, v in params.items()}, "seed_miou": best.metrics["seed_miou"],
                 "seed_threshold": best.metrics["seed_threshold"], "val_map": best.metrics.get("val_map"),
                 "checkpoint": best.metrics["checkpoint_uri"], "trial": best.metrics["trial_id"]},
        "best_config": train_yaml, "best_seeds": seeds_yaml, "table": rows,
        "seconds": round(time.time() - started, 1),
    }
    storage.write_json(storage.join(cfg.out, "summary.json"), summary, cfg.storage)
    return summary


def _plain(value: Any) -> Any:
    """numpy scalars from Tune's samplers -> Python numbers (YAML and JSON safe)."""
    return value.item() if hasattr(value, "item") else value

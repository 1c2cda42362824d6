"""The whole pipeline, stage after stage, each under ``<out>/<stage>/``.

prepare -> train -> seeds -> evaluate seeds -> masks -> evaluate masks -> deeplab -> segment ->
evaluate segmentation. A stage whose committed output exists is skipped, so a crashed pipeline
reruns from where it stopped. Stage settings come from the YAML sections named after the stages
(``train: {epochs: 20}``), on top of what the pipeline wires between them.

With ``masks: {method: psa}`` (or ``psa+crf``) the masks are PSA's random walk, and two stages come before
them: ``affinity_labels`` (from the seeds) and ``affinity`` (AffinityNet training on them). The seeds
AffinityNet learns from are the masks' own, or with ``affinity_seeds: unrefined`` a second extraction without
the affinity refinement (``affinity_seeds`` stage): ACR's recipe, AffinityNet trained on ACR* seeds walking the
refined ones.

The ``evaluate:`` section sets the evaluation protocol (threshold grid and pick, averaging) of every evaluation the
pipeline runs; what each evaluation scores (``pred``, ``kind``, ``split``, ``data``, ``out``) is the pipeline's.
With ``val_data`` (prepared sample shards of the held-out split, e.g. COCO's val2014, which ``prepare_data`` makes
from its own annotations file) the pipeline prepares only the training split and validates, segments and scores
the held-out one from there.

With ``pretrain: {enabled: true}`` a ``pretrain`` stage comes first: it trains the classifier's backbone on
the whole-object shapes task under ``<out>/pretrain`` (once: a committed run is reused) and the classifier
starts from it, as with ``train: {weights: <out>/pretrain/backbone.safetensors}``. The section's other keys
are the pretrain stage's settings; the model's fields come from the ``train:`` section.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from ray_wsss.core import commit, storage
from ray_wsss.core import config as config_lib
from ray_wsss.core.config import option
from ray_wsss.core.methods import list_methods
from ray_wsss.core.storage import StorageOptions

log = logging.getLogger(__name__)
STAGES = ("prepare", "train", "seeds", "eval_seeds", "masks", "eval_masks", "deeplab", "segment", "eval_segment")
PSA_STAGES = ("affinity_seeds", "affinity_labels", "affinity")  # before "masks" when the masks walk
PRETRAIN_STAGE = "pretrain"  # before "train" when the `pretrain:` section is enabled
AFFINITY_SEEDS = ("seeds", "unrefined")
EVALUATE_WIRED = ("pred", "kind", "split", "data", "out")  # set per evaluation by the pipeline


@dataclasses.dataclass
class PipelineConfig:
    out: str = option("runs/default", "output URI; each stage writes under <out>/<stage>/")
    data: str | None = option(None, "raw source (with --format) or prepared sample shards; default: synthetic data")
    format: str = option("synthetic", "layout of a raw --data", choices=("synthetic", "voc", "coco"))
    annotations: str | None = option(None, "COCO instances JSON when --format coco")
    split: str = option("train,val", "splits to prepare; the first trains, the last is scored")
    val_data: str | None = option(None, "prepared sample shards of the held-out split (the last of --split) when "
                                        "--data holds only the training split (COCO: one split per annotations "
                                        "file); validation, segment and its evaluation read it")
    method: str = option("acr", "classifier method", choices=list_methods())
    use_gpu: bool = option(False, "GPUs for training, seeds and segmentation")
    num_workers: int = option(1, "Ray Train workers for every training", min=1)
    affinity_seeds: str = option("seeds", "with masks: {method: psa}, the seeds AffinityNet learns from: the masks' "
                                          "own, or 'unrefined' (extracted again without refinement: ACR's recipe)",
                                 choices=AFFINITY_SEEDS)
    until: str | None = option(None, "stop after this stage (default: run every stage)",
                               choices=(PRETRAIN_STAGE, *STAGES, *PSA_STAGES))
    prepare: dict = dataclasses.field(default_factory=dict)   # YAML only: per-stage overrides
    pretrain: dict = dataclasses.field(default_factory=dict)  # {enabled: true, ...}: the pretrain stage's settings
    train: dict = dataclasses.field(default_factory=dict)
    seeds: dict = dataclasses.field(default_factory=dict)
    affinity_labels: dict = dataclasses.field(default_factory=dict)
    affinity: dict = dataclasses.field(default_factory=dict)
    masks: dict = dataclasses.field(default_factory=dict)
    deeplab: dict = dataclasses.field(default_factory=dict)
    segment: dict = dataclasses.field(default_factory=dict)
    evaluate: dict = dataclasses.field(default_factory=dict)  # the protocol of every evaluation
    storage: StorageOptions = dataclasses.field(default_factory=StorageOptions)

    def __post_init__(self) -> None:
        """Each stage section's types and ranges now, not when its stage starts hours later."""
        for section, cls in stage_configs().items():
            setattr(self, section, config_lib.check_fields(cls, getattr(self, section), f"the `{section}:` section"))
        wired = sorted(set(self.evaluate) & set(EVALUATE_WIRED))
        if wired:
            raise ValueError(f"the `evaluate:` section sets {wired}, which the pipeline sets for each evaluation; "
                             "it takes the protocol only (thresholds, threshold_pick, mean_over, threshold, ...)")
        if self.val_data is not None and len(self.splits()) < 2:
            raise ValueError(f"val_data holds the held-out split: --split names the training split first and the "
                             f"held-out one last, got {self.split!r}")
        self._check_pretrain()
        if self.affinity_seeds != "seeds" and not self.walks():
            raise ValueError(f"affinity_seeds: {self.affinity_seeds} is for masks: {{method: psa}} or psa+crf; "
                             f"the masks' method is {self.masks_method()!r}")
        if self.until is not None and self.until not in self.stage_names():
            raise ValueError(f"until: {self.until!r} is not a stage of this pipeline: {list(self.stage_names())}")

    def _check_pretrain(self) -> None:
        from ray_wsss.stages.pretrain import PretrainConfig

        settings = config_lib.check_fields(PretrainConfig, {k: v for k, v in self.pretrain.items() if k != "enabled"},
                                           "the `pretrain:` section")
        enabled = self.pretrain.get("enabled", False)
        if not isinstance(enabled, bool):
            raise ValueError(f"the `pretrain:` section: enabled = {enabled!r}; expected true or false")
        if enabled and self.train.get("weights"):
            raise ValueError(f"`pretrain: {{enabled: true}}` and `train: {{weights: {self.train['weights']}}}` both "
                             "set the classifier's initial weights; give one of them")
        self.pretrain = {"enabled": enabled, **settings}

    def pretrains(self) -> bool:
        return self.pretrain["enabled"]

    def classifier_weights(self) -> str | None:
        """The classifier's initial weights: the pretrain stage's backbone, the `train:` section's, or none."""
        from ray_wsss.stages.pretrain import BACKBONE_FILE

        return storage.join(self.uri(PRETRAIN_STAGE), BACKBONE_FILE) if self.pretrains() else self.train.get("weights")

    def masks_method(self) -> str:
        return self.masks.get("method", "crf")

    def walks(self) -> bool:
        """Whether the masks are PSA's random walk, which needs an AffinityNet trained before them."""
        return self.masks_method() != "crf"

    def stage_names(self) -> tuple[str, ...]:
        stages = STAGES
        if self.pretrains():
            before = stages.index("train")
            stages = (*stages[:before], PRETRAIN_STAGE, *stages[before:])
        if not self.walks():
            return stages
        psa = PSA_STAGES if self.affinity_seeds == "unrefined" else PSA_STAGES[1:]
        before = stages.index("masks")
        return (*stages[:before], *psa, *stages[before:])

    def splits(self) -> list[str]:
        return [name.strip() for name in self.split.split(",")]

    def train_split(self) -> str:
        return self.splits()[0]

    def eval_split(self) -> str:
        return self.splits()[-1]

    def uri(self, stage: str) -> str:
        return storage.join(self.out, stage)


def stage_configs() -> dict[str, type]:
    """The config class each YAML section of the pipeline fills (imported here: each pulls its stage's deps)."""
    from ray_wsss.stages import (
        affinity_labels,
        evaluate,
        extract_seeds,
        make_masks,
        prepare_data,
        segment,
        train_acr,
        train_affinity,
        train_deeplab,
    )

    return {"prepare": prepare_data.PrepareConfig, "train": train_acr.TrainClassifierConfig,
            "seeds": extract_seeds.ExtractSeedsConfig, "affinity_labels": affinity_labels.AffinityLabelsConfig,
            "affinity": train_affinity.TrainAffinityConfig, "masks": make_masks.MakeMasksConfig,
            "deeplab": train_deeplab.TrainDeepLabConfig, "segment": segment.SegmentConfig,
            "evaluate": evaluate.EvaluateConfig}


def _is_prepared(uri: str, options: StorageOptions) -> bool:
    meta = storage.join(uri, "dataset.json")
    return commit.is_committed(uri, options) and storage.read_json(meta, options).get("table") == "samples"


def _stage_config(cls: type, wired: dict[str, Any], overrides: dict[str, Any], storage_options: StorageOptions):
    """A stage's config: the pipeline's wiring, then the YAML section on top (except the wired URIs)."""
    values = {**wired, **{k: v for k, v in overrides.items() if k not in ("data", "out", "storage")}}
    return config_lib.from_dict(cls, {**values, "storage": storage_options}, cls.__name__)


def stage_runners(cfg: PipelineConfig) -> list[tuple[str, str, Callable[[], dict[str, Any]]]]:
    """(name, output URI, thunk) per stage, in order. Imports stay inside: each stage pulls its own deps."""
    from ray_wsss.stages import evaluate, extract_seeds, make_masks, prepare_data, segment, train_acr, train_deeplab

    opts = cfg.storage
    data = cfg.data if cfg.data and _is_prepared(cfg.data, opts) else cfg.uri("data")
    held_out = cfg.val_data or data  # what validation, segment and its evaluation read
    validation = {"val_data": cfg.val_data, "val_split": cfg.eval_split()}
    seeds_eval, masks_eval, seg_eval = (storage.join(cfg.uri(s), "eval") for s in ("seeds", "masks", "segment"))
    gpu = {"use_gpu": cfg.use_gpu}

    def prepare_stage():
        if data != cfg.uri("data"):
            return {"stage": "prepare", "skipped": True, "out": data, "note": "--data is prepared already"}
        splits = cfg.train_split() if cfg.val_data else cfg.split  # the held-out split is prepared already
        wired = {"out": data, "format": cfg.format, "src": cfg.data, "split": splits, "annotations": cfg.annotations}
        return prepare_data.run(_stage_config(prepare_data.PrepareConfig, wired, cfg.prepare, opts))

    def evaluation(pred: str, out: str, kind: str, split: str, truth: str = data) -> Callable[[], dict[str, Any]]:
        wired = {"pred": pred, "data": truth, "kind": kind, "out": out, "split": split}
        return lambda: evaluate.run(_stage_config(evaluate.EvaluateConfig, wired, cfg.evaluate, opts))

    # The masks' background threshold is the seeds evaluation's best one, unless the YAML sets one.
    threshold = {} if "threshold" in cfg.masks else {"threshold_from": storage.join(seeds_eval, "summary.json")}
    affinity = {"affinity": cfg.uri("affinity")} if cfg.walks() else {}

    weights = {"weights": cfg.classifier_weights()} if cfg.classifier_weights() else {}

    return [
        ("prepare", data, prepare_stage),
        *([_pretrain_runner(cfg)] if cfg.pretrains() else []),
        ("train", cfg.uri("train"), lambda: _skip_or(cfg.uri("train"), opts, lambda: train_acr.run(_stage_config(
            train_acr.TrainClassifierConfig,
            {"data": data, "out": cfg.uri("train"), "method": cfg.method, "num_workers": cfg.num_workers,
             "train_split": cfg.train_split(), **validation, **weights, **gpu, **training_threads(cfg)},
            cfg.train, opts)))),
        ("seeds", cfg.uri("seeds"), lambda: extract_seeds.run(_stage_config(
            extract_seeds.ExtractSeedsConfig, {"checkpoint": cfg.uri("train"), "data": data, "out": cfg.uri("seeds"),
                                         "refine": refine_by_default(cfg), **gpu},
            cfg.seeds, opts))),
        ("eval_seeds", seeds_eval, evaluation(cfg.uri("seeds"), seeds_eval, "seeds", cfg.train_split())),
        *(_psa_runners(cfg, data) if cfg.walks() else []),
        ("masks", cfg.uri("masks"), lambda: make_masks.run(_stage_config(
            make_masks.MakeMasksConfig, {"seeds": cfg.uri("seeds"), "data": data, "out": cfg.uri("masks"),
                                         "split": cfg.train_split(), **threshold, **affinity, **gpu},
            cfg.masks, opts))),
        ("eval_masks", masks_eval, evaluation(cfg.uri("masks"), masks_eval, "masks", cfg.train_split())),
        ("deeplab", cfg.uri("deeplab"), lambda: _skip_or(cfg.uri("deeplab"), opts,
                                                         lambda: train_deeplab.run(_stage_config(
            train_deeplab.TrainDeepLabConfig,
            {"masks": cfg.uri("masks"), "data": data, "out": cfg.uri("deeplab"), "num_workers": cfg.num_workers,
             "train_split": cfg.train_split(), **validation, **gpu, **training_threads(cfg)}, cfg.deeplab, opts)))),
        ("segment", cfg.uri("segment"), lambda: segment.run(_stage_config(
            segment.SegmentConfig, {"checkpoint": cfg.uri("deeplab"), "data": held_out, "out": cfg.uri("segment"),
                                    "split": cfg.eval_split(), **gpu}, cfg.segment, opts))),
        ("eval_segment", seg_eval, evaluation(cfg.uri("segment"), seg_eval, "masks", cfg.eval_split(), held_out)),
    ]


def _pretrain_runner(cfg: PipelineConfig) -> tuple[str, str, Callable[[], dict[str, Any]]]:
    """The pretrain stage, its model built as the classifier's (the `train:` section's model fields)."""
    from ray_wsss.stages import pretrain

    out = cfg.uri(PRETRAIN_STAGE)
    model = {k: cfg.train[k] for k in pretrain.MODEL_FIELDS if k in cfg.train}
    wired = {**model, "out": out, "num_workers": cfg.num_workers, "use_gpu": cfg.use_gpu}
    settings = {k: v for k, v in cfg.pretrain.items() if k != "enabled"}
    return (PRETRAIN_STAGE, out, lambda: _skip_or(out, cfg.storage, lambda: pretrain.run(_stage_config(
        pretrain.PretrainConfig, {**wired, **training_threads(cfg)}, settings, cfg.storage))))


def _psa_runners(cfg: PipelineConfig, data: str) -> list[tuple[str, str, Callable[[], dict[str, Any]]]]:
    """The stages that train the AffinityNet the masks walk on: [affinity_seeds], affinity_labels, affinity."""
    from ray_wsss.stages import affinity_labels, extract_seeds, train_affinity

    opts, gpu = cfg.storage, {"use_gpu": cfg.use_gpu}
    # A second extraction only where it differs: with the masks' seeds unrefined already, it would repeat them.
    second = cfg.affinity_seeds == "unrefined" and cfg.seeds.get("refine", refine_by_default(cfg))
    labels_seeds = cfg.uri("affinity_seeds") if second else cfg.uri("seeds")

    def affinity_seeds_stage() -> dict[str, Any]:
        if not second:
            return {"stage": "affinity_seeds", "skipped": True, "out": labels_seeds,
                    "note": "the seeds are unrefined already: AffinityNet learns from them"}
        wired = {"checkpoint": cfg.uri("train"), "data": data, "out": labels_seeds, **gpu}
        return extract_seeds.run(_stage_config(extract_seeds.ExtractSeedsConfig, wired,
                                               {**cfg.seeds, "refine": False, "split": cfg.train_split()}, opts))

    runners = [
        ("affinity_seeds", labels_seeds, affinity_seeds_stage),
        ("affinity_labels", cfg.uri("affinity_labels"), lambda: affinity_labels.run(_stage_config(
            affinity_labels.AffinityLabelsConfig,
            {"seeds": labels_seeds, "data": data, "out": cfg.uri("affinity_labels"), "split": cfg.train_split()},
            cfg.affinity_labels, opts))),
        ("affinity", cfg.uri("affinity"), lambda: _skip_or(cfg.uri("affinity"), opts, lambda: train_affinity.run(
            _stage_config(train_affinity.TrainAffinityConfig,
                          {"labels": cfg.uri("affinity_labels"), "data": data, "out": cfg.uri("affinity"),
                           "num_workers": cfg.num_workers, "train_split": cfg.train_split(),
                           "val_data": cfg.val_data, "val_split": cfg.eval_split(), **gpu, **training_threads(cfg)},
                          cfg.affinity, opts)))),
    ]
    return [runner for runner in runners if runner[0] in cfg.stage_names()]


def training_threads(cfg: PipelineConfig) -> dict[str, int]:
    """CPU trainings get the cluster's CPUs as torch threads, unless this machine is busy with other work
    (a YAML ``threads_per_worker`` wins either way).

    The pipeline runs one stage at a time, so while it trains nothing else of its own runs but the training's
    Ray Data ingest, a few percent of a step's CPU: one thread per reserved CPU (a training job's default)
    leaves half of a 2-core machine idle through both trainings. But OpenMP threads that share their cores
    with other work wait on each other at every operation: on the 2-core machine at a load average of 20-40,
    two threads made a DeepLab step 3-4x and an ACR ViT step 3-9x SLOWER than one. So when the 1-minute load
    average already reaches the CPU count, the trainings keep one thread per reserved CPU. Called when the
    stage starts (Ray is up by then).
    """
    if cfg.use_gpu:
        return {}
    import ray

    cpus = int(ray.cluster_resources().get("CPU", 1))
    load = os.getloadavg()[0]
    if load >= cpus:
        log.info("load average %.1f on %d CPUs: training keeps one thread per reserved CPU", load, cpus)
        return {}
    return {"threads_per_worker": max(1, cpus // cfg.num_workers)}


def refine_by_default(cfg: PipelineConfig) -> bool:
    """Affinity refinement on for a classifier from pretrained weights (the papers' setting; the pretrain stage's
    too), off from scratch.

    A from-scratch ViT's late-layer patch attention points background patches at the discriminative
    part, so refining with it inverted the demo's seeds (ACR: 0.18 refined vs 0.32 without, best-threshold
    mIoU on the synthetic train split). A ``seeds: {refine: ...}`` YAML section overrides this.
    """
    return bool(cfg.classifier_weights())


def _skip_or(out: str, options: StorageOptions, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Training stages: a committed run is not even restarted (the trainer would resume and stop)."""
    if commit.is_committed(out, options):
        return {**storage.read_json(storage.join(out, "summary.json"), options), "skipped": True}
    return run()


def run(cfg: PipelineConfig) -> dict[str, Any]:
    started = time.time()
    rows = []
    for name, uri, thunk in stage_runners(cfg):
        if cfg.until is not None and rows and rows[-1]["stage"] == cfg.until:
            break
        t0 = time.time()
        log.info("=== stage %s -> %s", name, uri)
        print(f"[pipeline] stage {name} -> {uri}", flush=True)
        result = thunk()
        rows.append({"stage": name, "out": uri, "skipped": bool(result.get("skipped")),
                     "seconds": round(time.time() - t0, 1), "metrics": headline_metrics(name, result)})
        print(f"[pipeline] stage {name} {'skipped (committed)' if result.get('skipped') else 'done'} "
              f"in {rows[-1]['seconds']} s: {rows[-1]['metrics']}", flush=True)
    summary = {"out": cfg.out, "method": cfg.method, "masks_method": cfg.masks_method(), "stages": rows,
               "seconds": round(time.time() - started, 1)}
    storage.write_json(storage.join(cfg.out, "summary.json"), summary, cfg.storage)
    print(format_table(rows), flush=True)
    return summary


def headline_metrics(stage: str, result: dict[str, Any]) -> dict[str, Any]:
    """The few numbers worth a column in the final table."""
    keep: dict[str, Any] = {}
    for key in ("rows", "errors", "miou", "threshold", "fp", "fn", "epochs"):
        if result.get(key) is not None:
            keep[key] = result[key]
    for group in ("val", "losses"):
        for key, value in (result.get(group) or {}).items():
            keep[f"{group}_{key}"] = value
    return keep


def format_table(rows: list[dict[str, Any]]) -> str:
    def fmt(value: Any) -> str:
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    lines = [f"{'stage':<14}{'status':<10}{'seconds':>9}  metrics", "-" * 90]
    for row in rows:
        metrics = ", ".join(f"{k}={fmt(v)}" for k, v in row["metrics"].items())
        lines.append(f"{row['stage']:<14}{'skipped' if row['skipped'] else 'ran':<10}{row['seconds']:>9.1f}  {metrics}")
    lines.append(f"{'total':<24}{sum(r['seconds'] for r in rows):>9.1f}")
    return "\n".join(lines)

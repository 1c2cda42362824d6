"""Stage 4: seeds -> pixel pseudo masks (the `masks` contract), dense CRF on a CPU actor pool.

CPU steering: on clusters whose CPU nodes advertise the custom resource ``crf_pool`` (see
cluster.yaml and ray_wsss.harness.cluster), every CRF actor asks for it, so CRF work lands only on the CPU
node type and never takes the CPUs that GPU nodes keep for their seed-extraction actors. Without
that resource (a laptop) actors take plain CPUs.

Where the CRF ran: each actor, on its first batch, drops an empty marker named by its Ray node id
(``ray.get_runtime_context().get_node_id()``) under ``<out>/_staging/worker_nodes/``; the commit
puts the sorted node ids in ``dataset.json`` and ``summary.json`` as ``"worker_nodes"`` (markers
of an earlier, crashed run of the same stage count too: those nodes made some of the masks).
"""
from __future__ import annotations

import dataclasses
import logging
from functools import partial
from typing import Any, ClassVar

import numpy as np
import ray

from ray_wsss.core import codec, commit, ownership, storage
from ray_wsss.core import config as config_lib
from ray_wsss.core.config import option
from ray_wsss.core.errors import RecordError, WsssError
from ray_wsss.core.refine.crf import CRFConfig, LabellingConfig, make_mask
from ray_wsss.core.seeds.stored import SeedFormat
from ray_wsss.core.storage import StorageOptions
from ray_wsss.harness import batch_stage
from ray_wsss.harness.cluster import CPU_POOL_RESOURCE, pool_resources

log = logging.getLogger(__name__)
STAGE = "masks"
DEFAULT_THRESHOLD = 0.5
NODES_DIR = "worker_nodes"  # under <out>/_staging/: one empty marker per node whose CRF actors made masks



@dataclasses.dataclass
class MakeMasksConfig(batch_stage.DataStageConfig):
    out: str = option("runs/default/masks", "output URI")
    batch_size: int = option(4, "images per batch", min=1)
    seeds: str = option("runs/default/seeds", "seeds stage URI")
    split: str | None = option(None, "comma-separated splits (default: every split the seeds table has)")
    threshold: float | None = option(None, "background threshold (or --threshold-from)", min=0, max=1)
    threshold_from: str | None = option(None, "an evaluation summary.json whose best threshold to use, e.g. "
                                              "<seeds>/eval/summary.json (what the pipeline passes)")
    background: str = option("threshold", "background score: constant threshold, or PSA (1-max)^alpha", choices=("threshold", "power"))
    power_alpha: float = option(8.0, "alpha of the PSA background", gt=0)
    crf: CRFConfig = dataclasses.field(default_factory=CRFConfig)  # PSA's values; --no-crf: argmax of the seeds
    ignore_low: float | None = option(None, "pixels with confidence in [low, high) become 255 (off by default)", min=0, max=1)
    ignore_high: float | None = option(None, "upper end of the ignore band", min=0, max=1)
    num_cpus_per_task: float = option(1.0, "CPUs per CRF actor", gt=0)

    def __post_init__(self) -> None:
        if isinstance(self.crf, bool):  # MakeMasksConfig(crf=False), as YAML's `crf: false`
            self.crf = dataclasses.replace(CRFConfig(), enabled=self.crf)

    def labelling(self, threshold: float) -> LabellingConfig:
        return LabellingConfig(background=self.background, threshold=threshold, power_alpha=self.power_alpha,
                               crf=self.crf.enabled, ignore_low=self.ignore_low, ignore_high=self.ignore_high,
                               crf_config=self.crf)


def mask_row(record: dict[str, Any], labelling: LabellingConfig, seed_format: SeedFormat) -> dict[str, Any]:
    """One sample with its seeds row (``record["seeds"]``, stored in ``seed_format``) -> one masks row;
    RecordError names what is wrong."""
    image_id = record["image_id"]
    seeds = record.get("seeds")
    if seeds is None:
        raise RecordError(image_id, "no seeds for this image in the seeds table")
    try:
        rgb = codec.decode_image(record["image"])
    except Exception as err:
        raise RecordError(image_id, f"cannot decode image: {err}") from err
    try:
        scores = seed_format.read(seeds)
    except Exception as err:
        raise RecordError(image_id, f"bad seed scores: {err}") from err
    classes = [int(c) for c in seeds["classes"]]
    if scores.shape != (len(classes), *rgb.shape[:2]):
        raise RecordError(image_id, f"seed scores of shape {scores.shape} do not fit {len(classes)} classes "
                                    f"of a {rgb.shape[0]}x{rgb.shape[1]} image")
    mask = make_mask(rgb, scores, classes, labelling)
    return {"image_id": image_id, "height": rgb.shape[0], "width": rgb.shape[1], "mask": codec.encode_mask(mask)}


class MaskMaker:
    """The masks worker on the CPU pool: (sample, seeds) records -> masks rows."""

    columns: ClassVar[dict[str, list[str]]] = {"primary": ["image_id", "image"],
                                               "seeds": ["image_id", "height", "width", "classes", "scores"]}
    unclaimed_are_errors = ("seeds",)  # a seeds row of an image the data lacks is reported, never dropped

    def __init__(self, cfg: MakeMasksConfig, threshold: float, seed_format: SeedFormat):
        self.labelling, self.seed_format = cfg.labelling(threshold), seed_format
        self.out, self.options, self.node_recorded = cfg.out, cfg.storage, False

    def process(self, records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
        if not self.node_recorded:
            record_node(self.out, self.options)
            self.node_recorded = True
        rows, failures = [], []
        for record in records:
            try:
                rows.append(mask_row(record, self.labelling, self.seed_format))
            except RecordError as err:
                failures.append((err.image_id, err.message))
        return rows, failures


def record_node(out: str, options: StorageOptions | None) -> None:
    """Mark the Ray node this process runs on as one the CRF ran on (see the module docstring)."""
    node_id = ray.get_runtime_context().get_node_id()
    storage.write_bytes(storage.join(out, commit.STAGING_DIR, NODES_DIR, node_id), b"", options)


def worker_nodes(out: str, options: StorageOptions | None) -> list[str]:
    """Sorted ids of the nodes whose CRF actors staged masks for ``out`` (before its commit)."""
    return storage.list_files(storage.join(out, commit.STAGING_DIR, NODES_DIR), options)


def resolve_threshold(cfg: MakeMasksConfig) -> tuple[float, str]:
    """(threshold, where it came from): --threshold, or the best one of the evaluation --threshold-from."""
    if (cfg.threshold is None) == (cfg.threshold_from is None):
        raise WsssError("give exactly one of --threshold T or --threshold-from SUMMARY (an evaluation summary.json "
                        f"such as {storage.join(cfg.seeds, 'eval', 'summary.json')})")
    if cfg.threshold is not None:
        return cfg.threshold, "flag"
    found = storage.read_json(cfg.threshold_from, cfg.storage).get("threshold")
    if found is None:
        raise WsssError(f"{cfg.threshold_from} holds no 'threshold': it is not a seeds evaluation summary")
    return float(found), cfg.threshold_from


def crf_pool_args(cfg: MakeMasksConfig) -> dict[str, Any]:
    """Actors on the CPU pool: the crf_pool resource when the cluster has one, else plain CPUs."""
    return {"num_cpus": cfg.num_cpus_per_task, "resources": pool_resources(CPU_POOL_RESOURCE, cfg.num_cpus_per_task)}


@ownership.owns_output(STAGE, inputs=("seeds", "data"))
def run(cfg: MakeMasksConfig) -> dict[str, Any]:
    cfg = dataclasses.replace(cfg, storage=cfg.storage.resolved())  # workers get what the driver sees
    return batch_stage.run(cfg, STAGE, lambda: _stage(cfg), inputs=[cfg.seeds, cfg.data])


def _stage(cfg: MakeMasksConfig) -> batch_stage.BatchStage:
    seeds_meta = storage.read_json(storage.join(cfg.seeds, "dataset.json"), cfg.storage)
    seed_format = SeedFormat.from_metadata(seeds_meta)
    threshold, threshold_source = resolve_threshold(cfg)
    seeds_splits = sorted(set(commit.file_splits(cfg.seeds, "seeds", cfg.storage).values()))
    files = batch_stage.samples_files(cfg.data, cfg.storage, cfg.splits() or seeds_splits)
    log.info("pseudo masks for %s: threshold %.2f (%s), CRF %s", sorted(set(files.values())), threshold,
             threshold_source, "on" if cfg.crf.enabled else "off")
    metadata = {
        "table": "masks",
        "class_names": seeds_meta["class_names"],
        "num_classes": seeds_meta["num_classes"],
        "seeds": cfg.seeds,
        "threshold": threshold,
        "threshold_source": threshold_source,
        "crf": cfg.crf.enabled,
        "job": "make_masks",
        "config": config_lib.to_dict(cfg),
    }

    titles = ["image", f"seeds @{threshold:.2f}", "pseudo mask" + (" (CRF)" if cfg.crf.enabled else ""), "ground truth"]

    return batch_stage.BatchStage(
        name=STAGE, table="masks", worker=MaskMaker, worker_args=(threshold, seed_format),
        tasks=batch_stage.follow_samples(cfg.data, sorted(files), cfg.storage, {"seeds": (cfg.seeds, "seeds")}),
        metadata=metadata, summary={"stage": STAGE, "out": cfg.out, "threshold": threshold, "crf": cfg.crf.enabled},
        remote_args=crf_pool_args(cfg), file_splits=files,
        after_tasks=lambda: {"worker_nodes": worker_nodes(cfg.out, cfg.storage)},
        contact_sheet=lambda: batch_stage.contact_sheet(
            cfg.out, "masks", cfg.data, partial(_contact_panels, cfg, threshold, seed_format), titles, cfg.storage))


def _contact_panels(cfg: MakeMasksConfig, threshold: float, seed_format: SeedFormat, row: dict[str, Any],
                    sample: dict[str, Any]) -> list:
    """image | seed labelling (no CRF) | pseudo mask | ground truth."""
    from ray_wsss.core import viz
    from ray_wsss.core.metrics import scores_to_labels

    rgb = codec.decode_image(sample["image"])
    seed = commit.read_rows_by_id(cfg.seeds, "seeds", [row["image_id"]], cfg.storage).get(row["image_id"])
    seed_labels = (scores_to_labels(seed_format.read(seed), seed["classes"], threshold)
                   if seed else np.zeros(rgb.shape[:2], np.uint8))
    gt = codec.decode_mask(sample["gt_mask"]) if sample["gt_mask"] else None
    return [rgb, viz.colorize(seed_labels), viz.colorize(codec.decode_mask(row["mask"])),
            viz.colorize(gt) if gt is not None else None]

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
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import ray.data

from ray_wsss.core import codec, storage
from ray_wsss.core import commit, ownership
from ray_wsss.harness import batch_stage
from ray_wsss.core import config as config_lib
from ray_wsss.harness.cluster import CPU_POOL_RESOURCE, pool_resources
from ray_wsss.core.errors import RecordError
from ray_wsss.core.refine.crf import CRFConfig, LabellingConfig, make_mask
from ray_wsss.core.storage import StorageOptions
from ray_wsss.core.config import option

log = logging.getLogger(__name__)
STAGE = "masks"
DEFAULT_THRESHOLD = 0.5
NODES_DIR = "worker_nodes"  # under <out>/_staging/: one empty marker per node whose CRF actors made masks



@dataclasses.dataclass
class MakeMasksConfig:
    seeds: str = option("runs/default/seeds", "seeds stage URI")
    data: str = option("runs/default/data", "sample shards URI (images)")
    out: str = option("runs/default/masks", "output URI")
    split: str | None = option(None, "comma-separated splits (default: the splits the seeds were extracted for)")
    threshold: float | None = option(None, "background threshold (default: the best one from evaluating the seeds)")
    background: str = option("threshold", "background score: constant threshold, or PSA (1-max)^alpha", choices=("threshold", "power"))
    power_alpha: float = option(8.0, "alpha of the PSA background")
    crf: bool = option(True, "dense CRF refinement (--no-crf: argmax of the seeds)")
    crf_iterations: int = option(10, "mean-field iterations")
    crf_gaussian_sxy: float = option(3.0, "Gaussian kernel spatial std")
    crf_gaussian_compat: float = option(3.0, "Gaussian kernel compatibility")
    crf_bilateral_sxy: float = option(80.0, "bilateral kernel spatial std")
    crf_bilateral_srgb: float = option(13.0, "bilateral kernel colour std")
    crf_bilateral_compat: float = option(10.0, "bilateral kernel compatibility")
    crf_scale: float = option(10.0, "logit scale of the seed scores before the softmax unary")
    ignore_low: float | None = option(None, "pixels with confidence in [low, high) become 255 (off by default)")
    ignore_high: float | None = option(None, "upper end of the ignore band")
    num_cpus_per_task: float = option(1.0, "CPUs per CRF actor")
    num_actors: int | None = option(None, "CRF actors (default: every CPU the pool has)")
    batch_size: int = option(4, "images per batch")
    max_errors: int | None = option(None, "fail when more images than this fail")
    overwrite: bool = option(False, "redo a committed stage")
    break_lock: bool = ownership.break_lock_option()
    storage: StorageOptions = dataclasses.field(default_factory=StorageOptions)

    def labelling(self, threshold: float) -> LabellingConfig:
        crf = CRFConfig(gaussian_sxy=self.crf_gaussian_sxy, gaussian_compat=self.crf_gaussian_compat,
                        bilateral_sxy=self.crf_bilateral_sxy, bilateral_srgb=self.crf_bilateral_srgb,
                        bilateral_compat=self.crf_bilateral_compat, iterations=self.crf_iterations,
                        scale=self.crf_scale)
        return LabellingConfig(background=self.background, threshold=threshold, power_alpha=self.power_alpha,
                               crf=self.crf, ignore_low=self.ignore_low, ignore_high=self.ignore_high, crf_config=crf)


def mask_row(record: dict[str, Any], labelling: LabellingConfig) -> dict[str, Any]:
    """One joined (sample, seeds) record -> one masks row; RecordError names what is wrong."""
    image_id = record["image_id"]
    if record.get("scores") is None:
        raise RecordError(image_id, "no seeds for this image in the seeds table")
    try:
        rgb = codec.decode_image(record["image"])
    except Exception as err:  # noqa: BLE001
        raise RecordError(image_id, f"cannot decode image: {err}") from err
    try:
        scores = codec.decode_scores(record["scores"])
    except Exception as err:  # noqa: BLE001
        raise RecordError(image_id, f"bad seed scores: {err}") from err
    classes = [int(c) for c in record["classes"]]
    if scores.shape != (len(classes), *rgb.shape[:2]):
        raise RecordError(image_id, f"seed scores of shape {scores.shape} do not fit {len(classes)} classes "
                                    f"of a {rgb.shape[0]}x{rgb.shape[1]} image")
    mask = make_mask(rgb, scores, classes, labelling)
    return {"image_id": image_id, "height": rgb.shape[0], "width": rgb.shape[1], "mask": codec.encode_mask(mask)}


class MaskMaker:
    """Ray Data UDF on the CPU pool: joined rows -> masks rows; failures go to the errors table."""

    def __init__(self, cfg: MakeMasksConfig, threshold: float):
        self.labelling = cfg.labelling(threshold)
        self.sink = batch_stage.ErrorSink(cfg.out, STAGE, cfg.storage)
        self.out, self.options, self.node_recorded = cfg.out, cfg.storage, False

    def __call__(self, batch: dict[str, Any]) -> pa.Table:
        if not self.node_recorded:
            record_node(self.out, self.options)
            self.node_recorded = True
        return batch_stage.map_records(batch_stage.batch_records(batch), "masks", lambda r: mask_row(r, self.labelling),
                                 lambda r: str(r["image_id"]), self.sink)


def record_node(out: str, options: StorageOptions | None) -> None:
    """Mark the Ray node this process runs on as one the CRF ran on (see the module docstring)."""
    node_id = ray.get_runtime_context().get_node_id()
    storage.write_bytes(storage.join(out, commit.STAGING_DIR, NODES_DIR, node_id), b"", options)


def worker_nodes(out: str, options: StorageOptions | None) -> list[str]:
    """Sorted ids of the nodes whose CRF actors staged masks for ``out`` (before its commit)."""
    return storage.list_files(storage.join(out, commit.STAGING_DIR, NODES_DIR), options)


def resolve_threshold(cfg: MakeMasksConfig) -> tuple[float, str]:
    """(threshold, where it came from): the flag, else the seeds' evaluation, else 0.5."""
    if cfg.threshold is not None:
        return cfg.threshold, "flag"
    evaluation = storage.join(cfg.seeds, "eval", "summary.json")
    if storage.exists(evaluation, cfg.storage):
        found = storage.read_json(evaluation, cfg.storage).get("threshold")
        if found is not None:
            return float(found), evaluation
    log.warning("no --threshold and no seed evaluation at %s: using %.2f", evaluation, DEFAULT_THRESHOLD)
    return DEFAULT_THRESHOLD, "default"


def crf_pool(cfg: MakeMasksConfig) -> tuple[ray.data.ActorPoolStrategy, dict[str, Any]]:
    """Actors on the CPU pool: the crf_pool resource when the cluster has one, else plain CPUs."""
    resources = pool_resources(CPU_POOL_RESOURCE, cfg.num_cpus_per_task)
    available = ray.cluster_resources().get(CPU_POOL_RESOURCE if resources else "CPU", 1)
    size = cfg.num_actors or max(1, int(available // cfg.num_cpus_per_task))
    return (ray.data.ActorPoolStrategy(min_size=1, max_size=size),
            {"num_cpus": cfg.num_cpus_per_task, "resources": resources})


def joined_records(cfg: MakeMasksConfig, split: str | None):
    """Every sample of the split, with its seeds when there are any (left outer join)."""
    samples = batch_stage.read_committed(cfg.data, "samples", cfg.storage, ["image_id", "image"], split)
    seeds = batch_stage.read_committed(cfg.seeds, "seeds", cfg.storage, ["image_id", "classes", "scores"])
    partitions = max(2, int(ray.cluster_resources().get("CPU", 2)))
    return samples.join(seeds, join_type="left_outer", num_partitions=partitions, on=("image_id",))


@ownership.owns_output(STAGE, inputs=("seeds", "data"))
def run(cfg: MakeMasksConfig) -> dict[str, Any]:
    cfg = dataclasses.replace(cfg, storage=cfg.storage.resolved())  # workers get what the driver sees
    timer = batch_stage.Timer()
    skipped = batch_stage.begin(cfg.out, STAGE, cfg.overwrite, cfg.storage)
    if skipped:
        return skipped
    seeds_meta = storage.read_json(storage.join(cfg.seeds, "dataset.json"), cfg.storage)
    split = cfg.split or seeds_meta.get("config", {}).get("split")
    threshold, threshold_source = resolve_threshold(cfg)
    log.info("pseudo masks: threshold %.2f (%s), CRF %s", threshold, threshold_source, "on" if cfg.crf else "off")

    done = batch_stage.done_ids(cfg.out, "masks", cfg.storage)
    if done:
        log.info("resuming: %d images already staged by an earlier run", len(done))
    compute, remote_args = crf_pool(cfg)
    masks = batch_stage.skip_done(joined_records(cfg, split), done).map_batches(
        MaskMaker, fn_constructor_args=(cfg, threshold), batch_size=cfg.batch_size, compute=compute,
        batch_format="numpy", **remote_args)
    batch_stage.write_rows(masks, cfg.out, "masks", cfg.storage)
    nodes = worker_nodes(cfg.out, cfg.storage)

    metadata = {
        "table": "masks",
        "class_names": seeds_meta["class_names"],
        "num_classes": seeds_meta["num_classes"],
        "seeds": cfg.seeds,
        "threshold": threshold,
        "threshold_source": threshold_source,
        "crf": cfg.crf,
        "worker_nodes": nodes,
        "job": "make_masks",
        "config": config_lib.to_dict(cfg),
    }
    summary = {"stage": STAGE, "out": cfg.out, "threshold": threshold, "crf": cfg.crf, "worker_nodes": nodes,
               "seconds": timer.seconds()}
    summary = batch_stage.commit_tables(cfg.out, "masks", metadata, summary, cfg.max_errors, cfg.storage)
    write_contact_sheet(cfg, threshold)
    return summary


def write_contact_sheet(cfg: MakeMasksConfig, threshold: float, count: int = 6) -> None:
    """image | seed labelling (no CRF) | pseudo mask | ground truth."""
    from ray_wsss.core import viz
    from ray_wsss.core.metrics import scores_to_labels

    masks = commit.read_first_rows(cfg.out, "masks", count, cfg.storage)
    if not masks:
        return
    ids = [m["image_id"] for m in masks]
    samples = commit.read_rows_by_id(cfg.data, "samples", ids, cfg.storage, ["image_id", "image", "gt_mask"])
    seeds = commit.read_rows_by_id(cfg.seeds, "seeds", ids, cfg.storage)
    panels = []
    for row in masks:
        sample, seed = samples[row["image_id"]], seeds.get(row["image_id"])
        rgb = codec.decode_image(sample["image"])
        seed_labels = (scores_to_labels(codec.decode_scores(seed["scores"]), seed["classes"], threshold)
                       if seed else np.zeros(rgb.shape[:2], np.uint8))
        gt = codec.decode_mask(sample["gt_mask"]) if sample["gt_mask"] else None
        panels.append([rgb, viz.colorize(seed_labels), viz.colorize(codec.decode_mask(row["mask"])),
                       viz.colorize(gt) if gt is not None else None])
    titles = ["image", f"seeds @{threshold:.2f}", "pseudo mask" + (" (CRF)" if cfg.crf else ""), "ground truth"]
    commit.write_output(cfg.out, "contact_sheet.png", viz.contact_sheet(panels, titles), cfg.storage)

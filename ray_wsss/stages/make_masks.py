"""Stage 4: seeds -> pixel pseudo masks (the `masks` contract): a dense CRF, or PSA's random walk.

``--method crf`` (the default): the seeds with a background row, through a dense CRF (``core.refine.crf``), on a
CPU actor pool. ``--method psa``: PSA's random walk (``core.refine.psa.walk_scores``) on the affinities of a
trained AffinityNet (``--affinity``, jobs/train_affinity.py), on a GPU or CPU actor pool, each actor loading
the model once; ``--method psa+crf``: the walk's scores then go through the same dense CRF. The walk starts
from the seeds with the same background row as the CRF's (``--background``: a constant ``--threshold``, as
MCTformer's run of PSA, or (1 - max)^``--power-alpha``, as PSA's own at 16).

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
from typing import Any, ClassVar, NamedTuple

import numpy as np
import ray
import torch

from ray_wsss.core import checkpoints, codec, commit, ownership, storage
from ray_wsss.core import config as config_lib
from ray_wsss.core.config import option
from ray_wsss.core.errors import RecordError, WsssError
from ray_wsss.core.refine.crf import CRFConfig, LabellingConfig, make_mask, mask_from_label_scores
from ray_wsss.core.refine.psa import PSAConfig, walk_scores
from ray_wsss.core.seeds.stored import SeedFormat, decode_seeded_sample
from ray_wsss.core.storage import StorageOptions
from ray_wsss.harness import batch_stage
from ray_wsss.harness.cluster import cpu_pool_actor_args, model_actor_args

log = logging.getLogger(__name__)
STAGE = "masks"
DEFAULT_THRESHOLD = 0.5
NODES_DIR = "worker_nodes"  # under <out>/_staging/: one empty marker per node whose CRF actors made masks
METHODS = ("crf", "psa", "psa+crf")


@dataclasses.dataclass
class MakeMasksConfig(batch_stage.DataStageConfig):
    out: str = option("runs/default/masks", "output URI")
    batch_size: int = option(4, "images per batch", min=1)
    seeds: str = option("runs/default/seeds", "seeds stage URI")
    split: str | None = option(None, "comma-separated splits (default: every split the seeds table has)")
    method: str = option("crf", "crf: dense CRF on the seeds; psa: PSA's random walk on AffinityNet's affinities; "
                                "psa+crf: the walk, then the dense CRF", choices=METHODS)
    affinity: str | None = option(None, "AffinityNet checkpoint, or jobs/train_affinity.py's --out (its checkpoint); "
                                        "for --method psa and psa+crf")
    psa_beta: float = option(8.0, "the walk's transition matrix is D^-1 A^beta (PSA: 8)", gt=0)
    psa_logt: int = option(8, "the walk takes 2^logt steps (PSA: 8; MCTformer's run: 6)", min=0, max=16)
    threshold: float | None = option(None, "background threshold (or --threshold-from)", min=0, max=1)
    threshold_from: str | None = option(None, "an evaluation summary.json whose best threshold to use, e.g. "
                                              "<seeds>/eval/summary.json (what the pipeline passes)")
    background: str = option("threshold", "background score: constant threshold, or PSA (1-max)^alpha "
                                          "(of the seeds, or of the walk's start with --method psa)",
                             choices=("threshold", "power"))
    power_alpha: float = option(8.0, "alpha of the PSA background (PSA's walk: 16)", gt=0)
    crf: CRFConfig = dataclasses.field(default_factory=CRFConfig)  # PSA's values; --method crf --no-crf: the argmax
    ignore_low: float | None = option(None, "pixels with confidence in [low, high) become 255 (off by default)",
                                      min=0, max=1)
    ignore_high: float | None = option(None, "upper end of the ignore band", min=0, max=1)
    num_cpus_per_task: float = option(1.0, "CPUs per CRF actor", gt=0)

    def __post_init__(self) -> None:
        if isinstance(self.crf, bool):  # MakeMasksConfig(crf=False), as YAML's `crf: false`
            self.crf = dataclasses.replace(CRFConfig(), enabled=self.crf)
        if (self.method == "crf") == (self.affinity is not None):
            raise ValueError(f"--method {self.method} " + ("takes no --affinity (it is for psa and psa+crf)"
                                                           if self.method == "crf" else
                                                           "needs --affinity: an AffinityNet checkpoint or "
                                                           "jobs/train_affinity.py's --out"))

    def walks(self) -> bool:
        return self.method != "crf"

    def labelling(self, threshold: float) -> LabellingConfig:
        """--method crf: the CRF section says whether it runs; the psa methods say it in their name."""
        crf_on = self.crf.enabled if self.method == "crf" else self.method == "psa+crf"
        return LabellingConfig(background=self.background, threshold=threshold, power_alpha=self.power_alpha,
                               crf=crf_on, ignore_low=self.ignore_low, ignore_high=self.ignore_high,
                               crf_config=self.crf)

    def psa_config(self, threshold: float, radius: int) -> PSAConfig:
        """The walk's settings: ``radius`` is the one AffinityNet was trained at; its start's background is the
        CRF's (``--background``, ``--threshold``, ``--power-alpha``)."""
        return PSAConfig(radius=radius, beta=self.psa_beta, logt=self.psa_logt, infer_background=self.background,
                         infer_threshold=threshold, infer_alpha=self.power_alpha)


class Walk(NamedTuple):
    """What an actor of the psa methods holds: the AffinityNet and the walk's settings."""
    model: torch.nn.Module
    cfg: PSAConfig


def load_walk(cfg: MakeMasksConfig, threshold: float, checkpoint_uri: str) -> Walk:
    device = torch.device("cuda" if cfg.use_gpu and torch.cuda.is_available() else "cpu")
    model, meta = checkpoints.load_affinitynet(checkpoint_uri, cfg.storage, device)
    return Walk(model, cfg.psa_config(threshold, int(meta["model_config"]["radius"])))


def pseudo_mask(rgb: np.ndarray, scores: np.ndarray, classes: list[int], labelling: LabellingConfig,
                walk: Walk | None) -> np.ndarray:
    """The mask of one image: the seeds' (``walk`` None), or the walk's scores, labelled as ``labelling`` says."""
    if walk is None or not classes:  # without classes every pixel is background either way
        return make_mask(rgb, scores, classes, labelling)
    return mask_from_label_scores(rgb, walk_scores(rgb, scores, classes, walk.model, walk.cfg), classes, labelling)


class MaskMaker:
    """The masks worker: (sample, seeds) records -> masks rows; with a ``checkpoint_uri``, by PSA's walk."""

    columns: ClassVar[dict[str, list[str]]] = {"primary": ["image_id", "image"],
                                               "seeds": ["image_id", "height", "width", "classes", "scores"]}
    unclaimed_are_errors = ("seeds",)  # a seeds row of an image the data lacks is reported, never dropped

    def __init__(self, cfg: MakeMasksConfig, threshold: float, seed_format: SeedFormat, checkpoint_uri: str | None):
        self.labelling, self.seed_format = cfg.labelling(threshold), seed_format
        self.walk = load_walk(cfg, threshold, checkpoint_uri) if checkpoint_uri else None
        self.out, self.options, self.node_recorded = cfg.out, cfg.storage, False

    def process(self, records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
        if not self.node_recorded:
            record_node(self.out, self.options)
            self.node_recorded = True
        rows, failures = [], []
        for record in records:
            try:
                rows.append(mask_row(record, self.labelling, self.seed_format, self.walk))
            except RecordError as err:
                failures.append((err.image_id, err.message))
        return rows, failures


def mask_row(record: dict[str, Any], labelling: LabellingConfig, seed_format: SeedFormat,
             walk: Walk | None = None) -> dict[str, Any]:
    """One sample with its seeds row (``record["seeds"]``) -> one masks row; RecordError names what is wrong."""
    rgb, scores, classes = decode_seeded_sample(record, seed_format)
    mask = pseudo_mask(rgb, scores, classes, labelling, walk)
    return {"image_id": record["image_id"], "height": rgb.shape[0], "width": rgb.shape[1],
            "mask": codec.encode_mask(mask)}


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


@ownership.owns_output(STAGE, inputs=("seeds", "data", "affinity"))
def run(cfg: MakeMasksConfig) -> dict[str, Any]:
    cfg = dataclasses.replace(cfg, storage=cfg.storage.resolved())  # workers get what the driver sees
    return batch_stage.run(cfg, STAGE, lambda: _stage(cfg), inputs=[cfg.seeds, cfg.data, cfg.affinity])


def _stage(cfg: MakeMasksConfig) -> batch_stage.BatchStage:
    seeds_meta = storage.read_json(storage.join(cfg.seeds, "dataset.json"), cfg.storage)
    seed_format = SeedFormat.from_metadata(seeds_meta)
    threshold, threshold_source = resolve_threshold(cfg)
    # Imported here, in the driver: the actors unpickle this module (see extract_seeds._stage).
    from ray_wsss.harness import training

    affinity = training.find_checkpoint(cfg.affinity, cfg.storage) if cfg.walks() else None
    crf_on = cfg.labelling(threshold).crf
    seeds_splits = sorted(set(commit.file_splits(cfg.seeds, "seeds", cfg.storage).values()))
    files = batch_stage.samples_files(cfg.data, cfg.storage, cfg.splits() or seeds_splits)
    log.info("pseudo masks for %s by %s: threshold %.2f (%s), CRF %s%s", sorted(set(files.values())), cfg.method,
             threshold, threshold_source, "on" if crf_on else "off", f", AffinityNet {affinity}" if affinity else "")
    metadata = {
        "table": "masks",
        "class_names": seeds_meta["class_names"],
        "num_classes": seeds_meta["num_classes"],
        "seeds": cfg.seeds,
        "method": cfg.method,
        "affinity": affinity,
        "threshold": threshold,
        "threshold_source": threshold_source,
        "crf": crf_on,
        "job": "make_masks",
        "config": config_lib.to_dict(cfg),
    }
    titles = ["image", f"seeds @{threshold:.2f}", "CRF mask" if crf_on else "seeds' argmax"]
    if cfg.walks():
        titles = [*titles[:2], "CRF mask", f"{cfg.method.upper()} mask"]
    titles.append("ground truth")
    return batch_stage.BatchStage(
        name=STAGE, table="masks", worker=MaskMaker, worker_args=(threshold, seed_format, affinity),
        tasks=batch_stage.follow_samples(cfg.data, sorted(files), cfg.storage, {"seeds": (cfg.seeds, "seeds")}),
        metadata=metadata,
        summary={"stage": STAGE, "out": cfg.out, "method": cfg.method, "threshold": threshold, "crf": crf_on},
        remote_args=model_actor_args(cfg.use_gpu) if cfg.walks() else cpu_pool_actor_args(cfg.num_cpus_per_task),
        file_splits=files, after_tasks=lambda: {"worker_nodes": worker_nodes(cfg.out, cfg.storage)},
        contact_sheet=lambda: batch_stage.contact_sheet(
            cfg.out, "masks", cfg.data, partial(_contact_panels, cfg, threshold, seed_format), titles, cfg.storage))


def _contact_panels(cfg: MakeMasksConfig, threshold: float, seed_format: SeedFormat, row: dict[str, Any],
                    sample: dict[str, Any]) -> list:
    """image | seed labelling (no CRF) | the stage's mask | ground truth; the psa methods add the CRF mask of the
    same seeds before theirs (made here, for the few images shown)."""
    from ray_wsss.core import viz
    from ray_wsss.core.metrics import scores_to_labels

    rgb = codec.decode_image(sample["image"])
    seed = commit.read_rows_by_id(cfg.seeds, "seeds", [row["image_id"]], cfg.storage).get(row["image_id"])
    scores = seed_format.read(seed) if seed else np.zeros((0, *rgb.shape[:2]), np.float32)
    classes = [int(c) for c in seed["classes"]] if seed else []
    panels = [rgb, viz.colorize(scores_to_labels(scores, classes, threshold))]
    if cfg.walks():
        crf_labelling = dataclasses.replace(cfg, method="crf", affinity=None, crf=True).labelling(threshold)
        panels.append(viz.colorize(make_mask(rgb, scores, classes, crf_labelling)))
    gt = codec.decode_mask(sample["gt_mask"]) if sample["gt_mask"] else None
    return [*panels, viz.colorize(codec.decode_mask(row["mask"])), viz.colorize(gt) if gt is not None else None]

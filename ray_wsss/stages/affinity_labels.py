"""Seeds -> PSA's affinity labels (the `affinity_labels` table), on a CPU actor pool: what train_affinity learns from.

For each image (PSA's infer_cls.py + VOC12AffDataset, ``ray_wsss.core.refine.psa.affinity_labels``): the seeds
with a background (1 - max_c seed)^alpha at a low and a high alpha, each through a dense CRF on the image
(``--label-crf``, on by default as in both papers), pooled to stride 8 and argmax'd; confident foreground from the
low-alpha labelling, confident background from the high-alpha one, 255 elsewhere. One uint8 PNG per image at
the ``ceil(H/8) x ceil(W/8)`` grid.

A stage of its own, not the first step of train_affinity: it is a batch stage (two dense CRFs per image, on the
CPU pool, with errors rows, resume per file and a contact sheet) where training is a Ray Train stage on GPUs;
and its table outlives a training run, so AffinityNet can be retrained (other epochs, crop, backbone) without
redoing the CRFs. Files follow the samples files like every per-image table.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np

from ray_wsss.core import codec, commit, ownership, storage
from ray_wsss.core import config as config_lib
from ray_wsss.core.affinity_pairs import STRIDE
from ray_wsss.core.config import option
from ray_wsss.core.errors import RecordError
from ray_wsss.core.refine.psa import PSAConfig, affinity_labels
from ray_wsss.core.seeds.stored import SeedFormat, decode_seeded_sample
from ray_wsss.harness import batch_stage
from ray_wsss.harness.cluster import cpu_pool_actor_args

log = logging.getLogger(__name__)
STAGE = "affinity_labels"
TABLE = "affinity_labels"


@dataclasses.dataclass
class AffinityLabelsConfig(batch_stage.DataStageConfig):
    out: str = option("runs/default/affinity_labels", "output URI")
    batch_size: int = option(4, "images per batch", min=1)
    seeds: str = option("runs/default/seeds", "seeds stage URI (for ACR's recipe: seeds without refinement, ACR*)")
    split: str | None = option(None, "comma-separated splits (default: every split the seeds table has; "
                                     "AffinityNet trains on one)")
    low_alpha: float = option(1.0, "background power of the confident-foreground labelling (MCTformer's run: 1; "
                                   "PSA's infer_cls.py: 4)", gt=0)
    high_alpha: float = option(12.0, "background power of the confident-background labelling (MCTformer's run: 12; "
                                     "PSA's: 32); must exceed --low-alpha", gt=0)
    label_crf: bool = option(True, "dense CRF on each labelling before pooling, as both papers")
    num_cpus_per_task: float = option(1.0, "CPUs per actor", gt=0)

    def __post_init__(self) -> None:
        self.psa_config()  # low < high, checked where the config is built

    def psa_config(self) -> PSAConfig:
        return PSAConfig(low_alpha=self.low_alpha, high_alpha=self.high_alpha, label_crf=self.label_crf)


class LabelMaker:
    """The worker: (sample, seeds) records -> affinity_labels rows."""

    unclaimed_are_errors = ("seeds",)  # a seeds row of an image the data lacks is reported, never dropped

    def __init__(self, cfg: AffinityLabelsConfig, seed_format: SeedFormat):
        self.psa, self.seed_format = cfg.psa_config(), seed_format
        self.columns = {"primary": ["image_id", "image"], "seeds": ["image_id", "height", "width", "classes", "scores"]}

    def process(self, records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
        rows, failures = [], []
        for record in records:
            try:
                rows.append(self._row(record))
            except RecordError as err:
                failures.append((err.image_id, err.message))
        return rows, failures

    def _row(self, record: dict[str, Any]) -> dict[str, Any]:
        rgb, scores, classes = decode_seeded_sample(record, self.seed_format)
        try:
            labels = affinity_labels(scores, classes, self.psa, rgb)
        except ValueError as err:  # seeds the labelling cannot take (e.g. a class id out of range)
            raise RecordError(record["image_id"], str(err)) from err
        return {"image_id": record["image_id"], "height": rgb.shape[0], "width": rgb.shape[1],
                "labels": codec.encode_mask(labels)}


@ownership.owns_output(STAGE, inputs=("seeds", "data"))
def run(cfg: AffinityLabelsConfig) -> dict[str, Any]:
    cfg = dataclasses.replace(cfg, storage=cfg.storage.resolved())  # workers get what the driver sees
    return batch_stage.run(cfg, STAGE, lambda: _stage(cfg), inputs=[cfg.seeds, cfg.data])


def _stage(cfg: AffinityLabelsConfig) -> batch_stage.BatchStage:
    seeds_meta = storage.read_json(storage.join(cfg.seeds, "dataset.json"), cfg.storage)
    seeds_splits = sorted(set(commit.file_splits(cfg.seeds, "seeds", cfg.storage).values()))
    files = batch_stage.samples_files(cfg.data, cfg.storage, cfg.splits() or seeds_splits)
    log.info("affinity labels for %s from %s: alpha %g / %g, CRF %s", sorted(set(files.values())), cfg.seeds,
             cfg.low_alpha, cfg.high_alpha, "on" if cfg.label_crf else "off")
    metadata = {
        "table": TABLE,
        "class_names": seeds_meta["class_names"],
        "num_classes": seeds_meta["num_classes"],
        "seeds": cfg.seeds,
        "resolution": f"stride {STRIDE}: ceil(height/{STRIDE}) x ceil(width/{STRIDE})",
        "low_alpha": cfg.low_alpha,
        "high_alpha": cfg.high_alpha,
        "label_crf": cfg.label_crf,
        "job": "affinity_labels",
        "config": config_lib.to_dict(cfg),
    }
    return batch_stage.BatchStage(
        name=STAGE, table=TABLE, worker=LabelMaker, worker_args=(SeedFormat.from_metadata(seeds_meta),),
        tasks=batch_stage.follow_samples(cfg.data, sorted(files), cfg.storage, {"seeds": (cfg.seeds, "seeds")}),
        metadata=metadata, summary={"stage": STAGE, "out": cfg.out, "seeds": cfg.seeds},
        remote_args=cpu_pool_actor_args(cfg.num_cpus_per_task), file_splits=files,
        contact_sheet=lambda: batch_stage.contact_sheet(
            cfg.out, TABLE, cfg.data, _contact_panels, ["image", "affinity labels (white: ignored)", "ground truth"],
            cfg.storage))


def _contact_panels(row: dict[str, Any], sample: dict[str, Any]) -> list:
    """image | affinity labels blown up to the image (each cell 8 x 8 pixels) | ground truth."""
    from ray_wsss.core import viz

    rgb = codec.decode_image(sample["image"])
    cells = codec.decode_mask(row["labels"])
    blown_up = np.kron(cells, np.ones((STRIDE, STRIDE), np.uint8))[:rgb.shape[0], :rgb.shape[1]]
    gt = codec.decode_mask(sample["gt_mask"]) if sample["gt_mask"] else None
    return [rgb, viz.colorize(blown_up), viz.colorize(gt) if gt is not None else None]

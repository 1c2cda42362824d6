"""Stage 3: a trained classifier -> seeds (class localisation maps per image, the `seeds` contract).

Ray Data ``map_batches`` with a callable class on an ``ActorPoolStrategy`` pool: each actor loads
the model once (one GPU per actor on GPU clusters, a CPU pool otherwise) and computes maps for a
batch of images. The method (ACR/baseline gradient maps, MCTformer attention maps) comes from
the checkpoint. Resumable and atomic like every stage (see ray_wsss.harness.batch_stage).
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, ClassVar

import numpy as np
import torch

from ray_wsss.core import checkpoints, codec, storage
from ray_wsss.core import config as config_lib
from ray_wsss.core.config import option
from ray_wsss.core.errors import RecordError
from ray_wsss.core.methods import MapOptions
from ray_wsss.core.seeds.tta import TTAConfig
from ray_wsss.harness import batch_stage
from ray_wsss.harness.cluster import model_actor_args

log = logging.getLogger(__name__)
STAGE = "seeds"
SCORES_FORMAT = "npy float16 [len(classes), height, width]"



@dataclasses.dataclass
class ExtractSeedsConfig(batch_stage.DataStageConfig):
    out: str = option("runs/default/seeds", "output URI")
    checkpoint: str = option("runs/default/train", "a checkpoint dir, or a training job's --out (its latest checkpoint)")
    scales: tuple[float, ...] = option((1.0,), "test-time scales", gt=0)
    flip: bool = option(True, "add horizontally flipped inputs")
    layers: int | None = option(None, "last layers whose maps are combined (default: 2 for ACR/baseline, 3 for MCTformer)", min=1)
    refine: bool = option(True, "refine with patch-to-patch attention (--no-refine: ACR*)")
    refine_layers: tuple[int, ...] | None = option(None, "blocks whose patch affinity refines (default: all)")
    base_size: int | None = option(None, "resize the longer image side to this before scaling (default: native)", min=1)


class SeedExtractor:
    """The seeds worker: samples rows -> seeds rows. The model is loaded once per actor."""

    columns: ClassVar[dict[str, list[str]]] = {"primary": ["image_id", "image", "labels"]}

    def __init__(self, cfg: ExtractSeedsConfig, checkpoint_uri: str):
        self.device = torch.device("cuda" if cfg.use_gpu and torch.cuda.is_available() else "cpu")
        self.model, self.method, _ = checkpoints.load_classifier(checkpoint_uri, cfg.storage, self.device)
        self.map_options = MapOptions(layers=cfg.layers, refine=cfg.refine, refine_layers=cfg.refine_layers)
        self.tta = TTAConfig(scales=tuple(cfg.scales), flip=cfg.flip, base_size=cfg.base_size)

    def process(self, records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
        decoded, failures = [], []
        for record in records:
            try:
                decoded.append((record["image_id"], codec.decode_image(record["image"]),
                                [int(c) for c in record["labels"]]))
            except Exception as err:
                failures.append((record["image_id"], f"cannot decode image: {type(err).__name__}: {err}"))
        maps = self.method.seed_scores(self.model, [d[1] for d in decoded], [d[2] for d in decoded],
                                       self.map_options, self.tta)
        return [_seed_row(i, rgb, cls, m) for (i, rgb, cls), m in zip(decoded, maps)], failures


def _seed_row(image_id: str, rgb: np.ndarray, classes: list[int], scores: np.ndarray) -> dict[str, Any]:
    h, w = rgb.shape[:2]
    if scores.shape != (len(classes), h, w):
        raise RecordError(image_id, f"seed map shape {scores.shape} != ({len(classes)}, {h}, {w})")
    return {"image_id": image_id, "height": h, "width": w, "classes": classes, "scores": codec.encode_scores(scores)}


def run(cfg: ExtractSeedsConfig) -> dict[str, Any]:
    cfg = dataclasses.replace(cfg, storage=cfg.storage.resolved())  # workers get what the driver sees
    return batch_stage.run(cfg, STAGE, lambda: _stage(cfg))


def _stage(cfg: ExtractSeedsConfig) -> batch_stage.BatchStage:
    # Imported here, in the driver: the actors unpickle this module, and Ray Train and matplotlib
    # (which the training harness pulls in) added about 2 s of CPU to every actor's start.
    from ray_wsss.harness import training

    checkpoint_uri = training.find_checkpoint(cfg.checkpoint, cfg.storage)
    meta = storage.read_json(storage.join(checkpoint_uri, checkpoints.META_FILE), cfg.storage)
    log.info("extracting seeds with %s checkpoint %s (epoch %s)", meta["method"], checkpoint_uri, meta["epoch"])
    files = batch_stage.samples_files(cfg.data, cfg.storage, cfg.splits())
    data_meta = storage.read_json(storage.join(cfg.data, "dataset.json"), cfg.storage)
    metadata = {
        "table": "seeds",
        "class_names": data_meta["class_names"],
        "num_classes": data_meta["num_classes"],
        "method": meta["method"],
        "checkpoint": checkpoint_uri,
        "resolution": "image",
        "scores_format": SCORES_FORMAT,
        "normalisation": "min-max per labelled class, after summing scales and flips",
        "job": "extract_seeds",
        "config": config_lib.to_dict(cfg),
    }
    return batch_stage.BatchStage(
        name=STAGE, table="seeds", worker=SeedExtractor, worker_args=(checkpoint_uri,),
        tasks=batch_stage.follow_samples(cfg.data, sorted(files), cfg.storage), metadata=metadata,
        summary={"stage": STAGE, "out": cfg.out, "method": meta["method"], "checkpoint": checkpoint_uri},
        remote_args=model_actor_args(cfg.use_gpu), file_splits=files,
        contact_sheet=lambda: batch_stage.contact_sheet(
            cfg.out, "seeds", cfg.data, _contact_panels, ["image", "seeds (max)", "labels @0.5", "ground truth"],
            cfg.storage))


def _contact_panels(row: dict[str, Any], sample: dict[str, Any]) -> list:
    """image | seeds (max over classes) | argmax labelling at 0.5 | ground truth."""
    from ray_wsss.core import viz
    from ray_wsss.core.metrics import scores_to_labels

    rgb = codec.decode_image(sample["image"])
    scores = codec.decode_scores(row["scores"])
    peak = scores.max(0) if len(scores) else np.zeros(rgb.shape[:2], np.float32)
    gt = codec.decode_mask(sample["gt_mask"]) if sample["gt_mask"] else None
    return [rgb, viz.overlay(rgb, viz.heatmap(peak)), viz.colorize(scores_to_labels(scores, row["classes"], 0.5)),
            viz.colorize(gt) if gt is not None else None]

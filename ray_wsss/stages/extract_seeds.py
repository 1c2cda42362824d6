"""Stage 3: a trained classifier -> seeds (class localisation maps per image, the `seeds` contract).

Ray Data ``map_batches`` with a callable class on an ``ActorPoolStrategy`` pool: each actor loads
the model once (one GPU per actor on GPU clusters, a CPU pool otherwise) and computes maps for a
batch of images. The method (ACR/baseline gradient maps, MCTformer attention maps) comes from
the checkpoint. Resumable and atomic like every stage (see ray_wsss.harness.batch_stage).
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from ray_wsss.core import codec, schema, storage
from ray_wsss.core import commit, ownership
from ray_wsss.harness import batch_stage
from ray_wsss.core import config as config_lib
from ray_wsss.core.errors import RecordError
from ray_wsss.core.models import build_classifier
from ray_wsss.core.models.vit import ViTConfig
from ray_wsss.core.storage import StorageOptions
from ray_wsss.core import checkpoints
from ray_wsss.harness.cluster import model_actor_pool
from ray_wsss.core.config import option

log = logging.getLogger(__name__)
STAGE = "seeds"
SCORES_FORMAT = "npy float16 [len(classes), height, width]"



@dataclasses.dataclass
class ExtractSeedsConfig:
    checkpoint: str = option("runs/default/train", "a checkpoint dir, or a training job's --out (its latest checkpoint)")
    data: str = option("runs/default/data", "sample shards URI")
    out: str = option("runs/default/seeds", "output URI")
    split: str | None = option(None, "comma-separated splits to extract (default: all)")
    scales: tuple[float, ...] = option((1.0,), "test-time scales")
    flip: bool = option(True, "add horizontally flipped inputs")
    layers: int | None = option(None, "last layers whose maps are combined (default: 2 for ACR/baseline, 3 for MCTformer)")
    refine: bool = option(True, "refine with patch-to-patch attention (--no-refine: ACR*)")
    refine_layers: tuple[int, ...] | None = option(None, "blocks whose patch affinity refines (default: all)")
    base_size: int | None = option(None, "resize the longer image side to this before scaling (default: native)")
    batch_size: int = option(8, "images per actor batch")
    use_gpu: bool = option(False, "one GPU per actor")
    num_actors: int | None = option(None, "actor pool size (default: the cluster's GPUs, or CPUs minus one)")
    max_errors: int | None = option(None, "fail when more images than this fail")
    overwrite: bool = option(False, "redo a committed stage")
    break_lock: bool = ownership.break_lock_option()
    storage: StorageOptions = dataclasses.field(default_factory=StorageOptions)


def load_classifier(checkpoint_uri: str, options: StorageOptions | None, device: torch.device):
    """(model in eval mode on ``device``, method, class names) from a checkpoint directory."""
    state = checkpoints.load_state(checkpoint_uri, options)
    class_names = state["class_names"]
    cfg = ViTConfig(**{**state["model_config"], "weights": None})
    model = build_classifier(state["method"], cfg, len(class_names) - 1)
    model.load_state_dict(state["model"])
    return model.to(device).eval(), state["method"], class_names


class SeedExtractor:
    """Ray Data UDF: samples rows -> seeds rows. The model is loaded once per actor."""

    def __init__(self, cfg: ExtractSeedsConfig, checkpoint_uri: str):
        self.cfg = cfg
        self.device = torch.device("cuda" if cfg.use_gpu and torch.cuda.is_available() else "cpu")
        self.model, self.method, _ = load_classifier(checkpoint_uri, cfg.storage, self.device)
        self.sink = batch_stage.ErrorSink(cfg.out, STAGE, cfg.storage)

    def __call__(self, batch: dict[str, Any]) -> pa.Table:
        decoded, failures = [], []
        for record in batch_stage.batch_records(batch):
            try:
                decoded.append((record["image_id"], codec.decode_image(record["image"]),
                                [int(c) for c in record["labels"]]))
            except Exception as err:  # noqa: BLE001
                failures.append((record["image_id"], f"cannot decode image: {type(err).__name__}: {err}"))
        rows = []
        try:
            maps = self._scores([d[1] for d in decoded], [d[2] for d in decoded])
            rows = [_seed_row(i, rgb, cls, m) for (i, rgb, cls), m in zip(decoded, maps)]
        except Exception:  # noqa: BLE001 - isolate the bad image instead of failing the batch
            for image_id, rgb, cls in decoded:
                try:
                    rows.append(_seed_row(image_id, rgb, cls, self._scores([rgb], [cls])[0]))
                except Exception as err:  # noqa: BLE001
                    failures.append((image_id, f"seed extraction failed: {type(err).__name__}: {err}"))
        self.sink.write(failures)
        return pa.Table.from_pylist(rows, schema=schema.SEEDS)

    def _scores(self, images: list[np.ndarray], classes: list[list[int]]) -> list[np.ndarray]:
        return seed_scores_for_method(self.method, self.model, images, classes, self.cfg)


def seed_scores_for_method(method: str, model: torch.nn.Module, images: list[np.ndarray],
                           classes: list[list[int]], cfg: ExtractSeedsConfig) -> list[np.ndarray]:
    """Per image float32 [k, H, W] in [0, 1] for its k labelled classes, by the method's recipe."""
    if method in ("acr", "baseline"):
        from ray_wsss.core.seeds.acr_maps import ACRMapConfig
        from ray_wsss.core.seeds.tta import seed_scores_batch

        map_cfg = ACRMapConfig(grad_layers=cfg.layers or 2, refine=cfg.refine, refine_layers=cfg.refine_layers)
        return seed_scores_batch(model, images, classes, scales=cfg.scales, flip=cfg.flip, cfg=map_cfg,
                                 base_size=cfg.base_size)
    from ray_wsss.core.seeds.mct_maps import MCTMapConfig, mct_seed_scores_batch

    map_cfg = MCTMapConfig(last_layers=cfg.layers or 3, refine=cfg.refine)
    return mct_seed_scores_batch(model, images, classes, scales=cfg.scales, flip=cfg.flip, cfg=map_cfg,
                                 base_size=cfg.base_size)


def _seed_row(image_id: str, rgb: np.ndarray, classes: list[int], scores: np.ndarray) -> dict[str, Any]:
    h, w = rgb.shape[:2]
    if scores.shape != (len(classes), h, w):
        raise RecordError(image_id, f"seed map shape {scores.shape} != ({len(classes)}, {h}, {w})")
    return {"image_id": image_id, "height": h, "width": w, "classes": classes, "scores": codec.encode_scores(scores)}



@ownership.owns_output(STAGE, inputs=("checkpoint", "data"))
def run(cfg: ExtractSeedsConfig) -> dict[str, Any]:
    cfg = dataclasses.replace(cfg, storage=cfg.storage.resolved())  # workers get what the driver sees
    timer = batch_stage.Timer()
    skipped = batch_stage.begin(cfg.out, STAGE, cfg.overwrite, cfg.storage)
    if skipped:
        return skipped
    checkpoint_uri = checkpoints.find_checkpoint(cfg.checkpoint, cfg.storage)
    meta = storage.read_json(storage.join(checkpoint_uri, checkpoints.META_FILE), cfg.storage)
    log.info("extracting seeds with %s checkpoint %s (epoch %s)", meta["method"], checkpoint_uri, meta["epoch"])

    samples = batch_stage.read_committed(cfg.data, "samples", cfg.storage, ["image_id", "image", "labels"], cfg.split)
    done = batch_stage.done_ids(cfg.out, "seeds", cfg.storage)
    if done:
        log.info("resuming: %d images already staged by an earlier run", len(done))
    compute, remote_args = model_actor_pool(cfg.use_gpu, cfg.num_actors)
    seeds = batch_stage.skip_done(samples, done).map_batches(
        SeedExtractor, fn_constructor_args=(cfg, checkpoint_uri), batch_size=cfg.batch_size,
        compute=compute, batch_format="numpy", **remote_args)
    batch_stage.write_rows(seeds, cfg.out, "seeds", cfg.storage)

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
    summary = {"stage": STAGE, "out": cfg.out, "method": meta["method"], "checkpoint": checkpoint_uri,
               "seconds": timer.seconds()}
    summary = batch_stage.commit_tables(cfg.out, "seeds", metadata, summary, cfg.max_errors, cfg.storage)
    _write_contact_sheet(cfg)
    return summary


def _write_contact_sheet(cfg: ExtractSeedsConfig, count: int = 6) -> None:
    """image | seeds (max over classes) | argmax labelling at 0.5 | ground truth, for a few samples."""
    from ray_wsss.core import viz
    from ray_wsss.core.metrics import scores_to_labels

    seeds = commit.read_first_rows(cfg.out, "seeds", count, cfg.storage)
    if not seeds:
        return
    samples = commit.read_rows_by_id(cfg.data, "samples", [s["image_id"] for s in seeds], cfg.storage,
                                      columns=["image_id", "image", "gt_mask"])
    panels = []
    for row in seeds:
        sample = samples[row["image_id"]]
        rgb = codec.decode_image(sample["image"])
        scores = codec.decode_scores(row["scores"])
        peak = scores.max(0) if len(scores) else np.zeros(rgb.shape[:2], np.float32)
        labels = scores_to_labels(scores, row["classes"], 0.5)
        gt = codec.decode_mask(sample["gt_mask"]) if sample["gt_mask"] else None
        panels.append([rgb, viz.overlay(rgb, viz.heatmap(peak)), viz.colorize(labels),
                       viz.colorize(gt) if gt is not None else None])
    commit.write_output(cfg.out, "contact_sheet.png",
                        viz.contact_sheet(panels, ["image", "seeds (max)", "labels @0.5", "ground truth"]), cfg.storage)

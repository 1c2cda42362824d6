"""Stage 6: a trained DeepLab -> masks for a split (the `masks` contract), on a Ray Data actor pool.

Each actor loads the model once (one GPU per actor with ``--use-gpu``, else CPU actors) and, per
image, fuses the softmax of every scale and flip (:func:`predict_probs`), optionally refines it with
a dense CRF on the image, and takes the argmax at exactly the image's size. Resumable and atomic
like every stage (see ray_wsss.harness.batch_stage); ``jobs/evaluate.py --kind masks`` scores the output.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import torch

from ray_wsss.core import codec, storage
from ray_wsss.core import commit, ownership
from ray_wsss.harness import batch_stage
from ray_wsss.core import config as config_lib
from ray_wsss.core.errors import RecordError, WsssError
from ray_wsss.core.refine.crf import CRFConfig, dense_crf
from ray_wsss.core.inference import normalize_image, predict_probs
from ray_wsss.core.storage import StorageOptions
from ray_wsss.core import checkpoints
from ray_wsss.stages.train_deeplab import load_segmenter
from ray_wsss.harness.cluster import model_actor_pool
from ray_wsss.core.config import option

log = logging.getLogger(__name__)
STAGE = "segment"



@dataclasses.dataclass
class SegmentConfig:
    checkpoint: str = option("runs/default/deeplab", "a DeepLab checkpoint dir, or train_deeplab's --out (its latest)")
    data: str = option("runs/default/data", "sample shards URI")
    out: str = option("runs/default/segment", "output URI")
    split: str = option("val", "comma-separated splits to segment")
    scales: tuple[float, ...] = option((1.0,), "test-time scales (the paper: 0.5 0.75 1.0 1.25 1.5)")
    flip: bool = option(True, "add horizontally flipped inputs")
    crf: bool = option(False, "dense CRF on the fused probabilities")
    # deeplab-pytorch's VOC values, which ACR's segmentation step uses.
    crf_iterations: int = option(10, "mean-field iterations")
    crf_gaussian_sxy: float = option(1.0, "Gaussian kernel spatial std")
    crf_gaussian_compat: float = option(3.0, "Gaussian kernel compatibility")
    crf_bilateral_sxy: float = option(67.0, "bilateral kernel spatial std")
    crf_bilateral_srgb: float = option(3.0, "bilateral kernel colour std")
    crf_bilateral_compat: float = option(4.0, "bilateral kernel compatibility")
    batch_size: int = option(8, "images per actor batch")
    use_gpu: bool = option(False, "one GPU per actor")
    num_actors: int | None = option(None, "actor pool size (default: the cluster's GPUs, or CPUs minus one)")
    max_errors: int | None = option(None, "fail when more images than this fail")
    overwrite: bool = option(False, "redo a committed stage")
    break_lock: bool = ownership.break_lock_option()
    storage: StorageOptions = dataclasses.field(default_factory=StorageOptions)

    def crf_config(self) -> CRFConfig | None:
        if not self.crf:
            return None
        return CRFConfig(gaussian_sxy=self.crf_gaussian_sxy, gaussian_compat=self.crf_gaussian_compat,
                         bilateral_sxy=self.crf_bilateral_sxy, bilateral_srgb=self.crf_bilateral_srgb,
                         bilateral_compat=self.crf_bilateral_compat, iterations=self.crf_iterations)


def segment_image(model: torch.nn.Module, rgb: np.ndarray, scales: Sequence[float] = (1.0,), flip: bool = False,
                  crf: CRFConfig | None = None) -> np.ndarray:
    """uint8 RGB [H, W, 3] -> uint8 class ids [H, W]: fused softmax over scales and flips, CRF optional."""
    device = next(model.parameters()).device
    with torch.autocast(device_type=device.type, enabled=device.type == "cuda"):
        probs = predict_probs(model, normalize_image(rgb), scales=scales, flip=flip)
    probs = probs.float().cpu().numpy()
    if crf is not None:
        probs = dense_crf(rgb, probs, crf)
    return probs.argmax(axis=0).astype(np.uint8)


def mask_row(image_id: str, image_bytes: bytes, model: torch.nn.Module, cfg: SegmentConfig) -> dict[str, Any]:
    """One samples record -> one masks row; RecordError names what is wrong."""
    try:
        rgb = codec.decode_image(image_bytes)
    except Exception as err:  # noqa: BLE001
        raise RecordError(image_id, f"cannot decode image: {type(err).__name__}: {err}") from err
    mask = segment_image(model, rgb, cfg.scales, cfg.flip, cfg.crf_config())
    if mask.shape != rgb.shape[:2]:
        raise RecordError(image_id, f"prediction {mask.shape} does not match the image {rgb.shape[:2]}")
    return {"image_id": image_id, "height": rgb.shape[0], "width": rgb.shape[1], "mask": codec.encode_mask(mask)}


class Segmenter:
    """Ray Data UDF: samples rows -> masks rows. The model is loaded once per actor."""

    def __init__(self, cfg: SegmentConfig, checkpoint_uri: str):
        self.cfg = cfg
        self.device = torch.device("cuda" if cfg.use_gpu and torch.cuda.is_available() else "cpu")
        self.model, _ = load_segmenter(checkpoint_uri, cfg.storage, self.device)
        self.sink = batch_stage.ErrorSink(cfg.out, STAGE, cfg.storage)

    def __call__(self, batch: dict[str, Any]) -> pa.Table:
        return batch_stage.map_records(batch_stage.batch_records(batch), "masks",
                                 lambda r: mask_row(str(r["image_id"]), r["image"], self.model, self.cfg),
                                 lambda r: str(r["image_id"]), self.sink)



@ownership.owns_output(STAGE, inputs=("checkpoint", "data"))
def run(cfg: SegmentConfig) -> dict[str, Any]:
    cfg = dataclasses.replace(cfg, storage=cfg.storage.resolved())  # workers get what the driver sees
    timer = batch_stage.Timer()
    skipped = batch_stage.begin(cfg.out, STAGE, cfg.overwrite, cfg.storage)
    if skipped:
        return skipped
    if not cfg.scales or any(s <= 0 for s in cfg.scales):
        raise ValueError(f"--scales must be positive numbers, got {cfg.scales}")
    checkpoint_uri = checkpoints.find_checkpoint(cfg.checkpoint, cfg.storage)
    meta = storage.read_json(storage.join(checkpoint_uri, checkpoints.META_FILE), cfg.storage)
    data_meta = storage.read_json(storage.join(cfg.data, "dataset.json"), cfg.storage)
    if meta.get("class_names") != data_meta["class_names"]:
        raise WsssError(f"checkpoint {checkpoint_uri} was trained on classes {meta.get('class_names')}, "
                        f"but {cfg.data} has {data_meta['class_names']}")
    by_split = data_meta["counts"]["by_split"]
    splits = [s.strip() for s in cfg.split.split(",") if s.strip()]
    missing = [s for s in splits if not by_split.get(s)]
    if not splits or missing:
        raise WsssError(f"{cfg.data} has no images in split(s) {missing or cfg.split!r}; it has {by_split}")
    log.info("segmenting %s of %s with checkpoint %s (epoch %s), scales %s, flip %s, CRF %s", splits, cfg.data,
             checkpoint_uri, meta.get("epoch"), cfg.scales, cfg.flip, cfg.crf)

    samples = batch_stage.read_committed(cfg.data, "samples", cfg.storage, ["image_id", "image"], cfg.split)
    done = batch_stage.done_ids(cfg.out, "masks", cfg.storage)
    if done:
        log.info("resuming: %d images already staged by an earlier run", len(done))
    compute, remote_args = model_actor_pool(cfg.use_gpu, cfg.num_actors)
    masks = batch_stage.skip_done(samples, done).map_batches(
        Segmenter, fn_constructor_args=(cfg, checkpoint_uri), batch_size=cfg.batch_size,
        compute=compute, batch_format="numpy", **remote_args)
    batch_stage.write_rows(masks, cfg.out, "masks", cfg.storage)

    metadata = {
        "table": "masks",
        "class_names": data_meta["class_names"],
        "num_classes": data_meta["num_classes"],
        "checkpoint": checkpoint_uri,
        "split": cfg.split,
        "scales": list(cfg.scales),
        "flip": cfg.flip,
        "crf": cfg.crf,
        "job": "segment",
        "config": config_lib.to_dict(cfg),
    }
    summary = {"stage": STAGE, "out": cfg.out, "checkpoint": checkpoint_uri, "split": cfg.split,
               "scales": list(cfg.scales), "flip": cfg.flip, "crf": cfg.crf, "seconds": timer.seconds()}
    summary = batch_stage.commit_tables(cfg.out, "masks", metadata, summary, cfg.max_errors, cfg.storage)
    write_contact_sheet(cfg)
    return summary


def write_contact_sheet(cfg: SegmentConfig, count: int = 6) -> None:
    """image | prediction | ground truth, for a few images."""
    from ray_wsss.core import viz

    masks = commit.read_first_rows(cfg.out, "masks", count, cfg.storage)
    if not masks:
        return
    samples = commit.read_rows_by_id(cfg.data, "samples", [m["image_id"] for m in masks], cfg.storage,
                                      columns=["image_id", "image", "gt_mask"])
    panels = []
    for row in masks:
        sample = samples[row["image_id"]]
        gt = codec.decode_mask(sample["gt_mask"]) if sample["gt_mask"] else None
        panels.append([codec.decode_image(sample["image"]), viz.colorize(codec.decode_mask(row["mask"])),
                       viz.colorize(gt) if gt is not None else None])
    title = "prediction" + (" (CRF)" if cfg.crf else "")
    commit.write_output(cfg.out, "contact_sheet.png",
                        viz.contact_sheet(panels, ["image", title, "ground truth"]), cfg.storage)

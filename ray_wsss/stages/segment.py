"""Stage 6: a trained DeepLab -> masks for a split (the `masks` contract), on a Ray Data actor pool.

Each actor loads the model once (one GPU per actor with ``--use-gpu``, else CPU actors) and, per
image, fuses the softmax of every scale and flip (:func:`predict_probs`), optionally refines it with
a dense CRF on the image, and takes the argmax at exactly the image's size. Resumable and atomic
like every stage (see ray_wsss.harness.batch_stage); ``jobs/evaluate.py --kind masks`` scores the output.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from ray_wsss.core import checkpoints, codec, ownership, storage
from ray_wsss.core import config as config_lib
from ray_wsss.core.config import option
from ray_wsss.core.errors import RecordError, WsssError
from ray_wsss.core.inference import normalize_image, predict_probs
from ray_wsss.core.refine.crf import CRFConfig, deeplab_crf, dense_crf
from ray_wsss.harness import batch_stage
from ray_wsss.harness.cluster import model_actor_args

log = logging.getLogger(__name__)
STAGE = "segment"



@dataclasses.dataclass
class SegmentConfig(batch_stage.DataStageConfig):
    out: str = option("runs/default/segment", "output URI")
    split: str | None = option("val", "comma-separated splits to segment")
    checkpoint: str = option("runs/default/deeplab", "a DeepLab checkpoint dir, or train_deeplab's --out (its latest)")
    scales: tuple[float, ...] = option((1.0,), "test-time scales (the paper: 0.5 0.75 1.0 1.25 1.5)", gt=0)
    flip: bool = option(True, "add horizontally flipped inputs")
    crf: CRFConfig = dataclasses.field(default_factory=deeplab_crf)  # on the fused probabilities; --crf turns it on

    def __post_init__(self) -> None:
        if isinstance(self.crf, bool):  # SegmentConfig(crf=True), as YAML's `crf: true`
            self.crf = dataclasses.replace(deeplab_crf(), enabled=self.crf)

    def crf_config(self) -> CRFConfig | None:
        return self.crf if self.crf.enabled else None


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
    except Exception as err:
        raise RecordError(image_id, f"cannot decode image: {type(err).__name__}: {err}") from err
    mask = segment_image(model, rgb, cfg.scales, cfg.flip, cfg.crf_config())
    if mask.shape != rgb.shape[:2]:
        raise RecordError(image_id, f"prediction {mask.shape} does not match the image {rgb.shape[:2]}")
    return {"image_id": image_id, "height": rgb.shape[0], "width": rgb.shape[1], "mask": codec.encode_mask(mask)}


class Segmenter:
    """The segment worker: samples rows -> masks rows. The model is loaded once per actor."""

    columns: ClassVar[dict[str, list[str]]] = {"primary": ["image_id", "image"]}

    def __init__(self, cfg: SegmentConfig, checkpoint_uri: str):
        self.cfg = cfg
        self.device = torch.device("cuda" if cfg.use_gpu and torch.cuda.is_available() else "cpu")
        self.model, _ = checkpoints.load_segmenter(checkpoint_uri, cfg.storage, self.device)

    def process(self, records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
        rows, failures = [], []
        for record in records:
            try:
                rows.append(mask_row(str(record["image_id"]), record["image"], self.model, self.cfg))
            except RecordError as err:
                failures.append((err.image_id, err.message))
        return rows, failures


@ownership.owns_output(STAGE, inputs=("checkpoint", "data"))
def run(cfg: SegmentConfig) -> dict[str, Any]:
    cfg = dataclasses.replace(cfg, storage=cfg.storage.resolved())  # workers get what the driver sees
    return batch_stage.run(cfg, STAGE, lambda: _stage(cfg), inputs=[cfg.checkpoint, cfg.data])


def _stage(cfg: SegmentConfig) -> batch_stage.BatchStage:
    if not cfg.scales or any(s <= 0 for s in cfg.scales):
        raise ValueError(f"--scales must be positive numbers, got {cfg.scales}")
    # Imported here, in the driver: the actors unpickle this module, and Ray Train and matplotlib
    # (which the training harness pulls in) added about 2 s of CPU to every actor's start.
    from ray_wsss.harness import training

    checkpoint_uri = training.find_checkpoint(cfg.checkpoint, cfg.storage)
    meta = storage.read_json(storage.join(checkpoint_uri, checkpoints.META_FILE), cfg.storage)
    data_meta = storage.read_json(storage.join(cfg.data, "dataset.json"), cfg.storage)
    if meta.get("method") != checkpoints.SEGMENTER_METHOD:
        raise WsssError(f"{checkpoint_uri} holds a {meta.get('method')!r} checkpoint, not a DeepLab one "
                        "(segment needs train_deeplab's output)")
    if meta.get("class_names") != data_meta["class_names"]:
        raise WsssError(f"checkpoint {checkpoint_uri} was trained on classes {meta.get('class_names')}, "
                        f"but {cfg.data} has {data_meta['class_names']}")
    files = batch_stage.samples_files(cfg.data, cfg.storage, cfg.splits())
    log.info("segmenting %s of %s with checkpoint %s (epoch %s), scales %s, flip %s, CRF %s",
             sorted(set(files.values())), cfg.data, checkpoint_uri, meta.get("epoch"), cfg.scales, cfg.flip,
             cfg.crf.enabled)
    metadata = {
        "table": "masks",
        "class_names": data_meta["class_names"],
        "num_classes": data_meta["num_classes"],
        "checkpoint": checkpoint_uri,
        "split": cfg.split,
        "scales": list(cfg.scales),
        "flip": cfg.flip,
        "crf": cfg.crf.enabled,
        "job": "segment",
        "config": config_lib.to_dict(cfg),
    }
    title = "prediction" + (" (CRF)" if cfg.crf.enabled else "")
    return batch_stage.BatchStage(
        name=STAGE, table="masks", worker=Segmenter, worker_args=(checkpoint_uri,),
        tasks=batch_stage.follow_samples(cfg.data, sorted(files), cfg.storage), metadata=metadata,
        summary={"stage": STAGE, "out": cfg.out, "checkpoint": checkpoint_uri, "split": cfg.split,
                 "scales": list(cfg.scales), "flip": cfg.flip, "crf": cfg.crf.enabled},
        remote_args=model_actor_args(cfg.use_gpu), file_splits=files,
        contact_sheet=lambda: batch_stage.contact_sheet(cfg.out, "masks", cfg.data, _contact_panels,
                                                        ["image", title, "ground truth"], cfg.storage))


def _contact_panels(row: dict[str, Any], sample: dict[str, Any]) -> list:
    """image | prediction | ground truth."""
    from ray_wsss.core import viz

    gt = codec.decode_mask(sample["gt_mask"]) if sample["gt_mask"] else None
    return [codec.decode_image(sample["image"]), viz.colorize(codec.decode_mask(row["mask"])),
            viz.colorize(gt) if gt is not None else None]

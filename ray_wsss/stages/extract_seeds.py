"""Stage 3: a trained classifier -> seeds (class localisation maps per image, the `seeds` contract).

Ray Data ``map_batches`` with a callable class on an ``ActorPoolStrategy`` pool: each actor loads
the model once (one GPU per actor on GPU clusters, a CPU pool otherwise) and computes maps for a
batch of images. The method (ACR/baseline gradient maps, MCTformer attention maps) comes from
the checkpoint. Resumable and atomic like every stage (see ray_wsss.harness.batch_stage).
"""
from __future__ import annotations

import dataclasses
import logging
from functools import partial
from typing import Any, ClassVar

import numpy as np
import torch

from ray_wsss.core import checkpoints, codec, ownership, storage
from ray_wsss.core import config as config_lib
from ray_wsss.core.config import option
from ray_wsss.core.errors import RecordError, WsssError
from ray_wsss.core.methods import MapOptions, list_methods
from ray_wsss.core.metrics import no_learning
from ray_wsss.core.models.vit import PARTIAL_PATCHES, POS_EMBED_RESAMPLERS
from ray_wsss.core.seeds.acr_maps import LAYER_REDUCTIONS
from ray_wsss.core.seeds.stored import SeedFormat
from ray_wsss.core.seeds.tta import RESIZES, RESOLUTIONS, TTAConfig, map_size
from ray_wsss.harness import batch_stage
from ray_wsss.harness.cluster import model_actor_args

log = logging.getLogger(__name__)
STAGE = "seeds"


@dataclasses.dataclass
class ExtractSeedsConfig(batch_stage.DataStageConfig):
    out: str = option("runs/default/seeds", "output URI")
    # Views of equal size share a forward, so the more images a call holds, the fuller its forwards: on the
    # synthetic sizes 8 images gave 2.3 views per forward, 128 give 9.7 (flips included).
    batch_size: int = option(128, "images an actor takes at once (their views of equal size share forwards)", min=1)
    max_views: int = option(32, "most views in one forward, flips included (bounds memory; the maps do not change)",
                            min=1)
    checkpoint: str = option("runs/default/train",
                             "a checkpoint dir, or a training job's --out (its latest checkpoint)")
    scales: tuple[float, ...] = option((1.0,), "test-time scales", gt=0)
    flip: bool = option(True, "add horizontally flipped inputs")
    layers: int | None = option(None, "last layers whose maps are combined (default: 2 for ACR/baseline, "
                                      "3 for MCTformer)", min=1)
    refine: bool = option(True, "refine with patch-to-patch attention (--no-refine: ACR*)")
    refine_layers: tuple[int, ...] | None = option(None, "blocks whose patch affinity refines (default: all)")
    layer_reduction: str | None = option(None, "how blocks combine in the maps, mean or sum (default: mean for "
                                               "ACR/baseline, sum for MCTformer; the ACR authors' code sums)",
                                         choices=LAYER_REDUCTIONS)
    resize: str = option("aspect", "how a view is made: aspect (keep the aspect ratio; --base-size sets the longer "
                                   "side), square (the ACR authors': squash to --base-size, float64 bilinear) or "
                                   "pillow (the MCTformer authors': Pillow bicubic to round(side*scale))",
                         choices=RESIZES)
    base_size: int | None = option(None, "aspect: resize the longer image side to this before scaling (default: "
                                         "native); square: the square's side (the training crop)", min=1)
    align_corners: bool = option(False, "resample the maps bilinearly with align_corners, to the stored size and "
                                       "on read to the image (the ACR authors: on)")
    minmax_eps: float = option(0.0, "per-class normalisation (x-min)/(max-min+eps); the authors: ACR 1e-6, "
                                    "MCTformer 1e-8; 0 = exact, a constant map -> 0", min=0)
    resolution: str = option("grid", "where the views are summed, normalised and stored: grid (the largest view's "
                                     "patch grid), short-side (--short-side pixels) or image; readers upsample "
                                     "bilinearly to the image", choices=RESOLUTIONS)
    short_side: int | None = option(None, "--resolution short-side: the stored maps' shorter side in pixels", min=1)
    encoding: str = option("uint8", "stored scores: uint8 (steps of 1/255) or float16", choices=codec.SCORE_ENCODINGS)
    partial_patches: str | None = option(None, "image sides that are not patch multiples: error, or drop the last "
                                               "rows/columns as a patch conv does (needed by --resize pillow; "
                                               "default: the checkpoint's)", choices=PARTIAL_PATCHES)
    pos_embed_resampler: str | None = option(None, "MCTformer position-embedding resampling, timm or mctformer "
                                                   "(default: the checkpoint's)", choices=POS_EMBED_RESAMPLERS)
    allow_untrained: bool = option(False, "extract seeds even when the checkpoint's held-out metrics show that the "
                                          "classifier learned nothing")

    def __post_init__(self) -> None:
        self.seed_format()  # a bad combination (e.g. square without base_size) fails at load, not in an actor

    def tta_config(self) -> TTAConfig:
        return TTAConfig(scales=tuple(self.scales), flip=self.flip, base_size=self.base_size, resize=self.resize,
                         align_corners=self.align_corners, minmax_eps=self.minmax_eps, resolution=self.resolution,
                         short_side=self.short_side, max_views=self.max_views)

    def seed_format(self) -> SeedFormat:
        return SeedFormat.of(self.tta_config(), self.encoding)

    def map_options(self) -> MapOptions:
        return MapOptions(layers=self.layers, refine=self.refine, refine_layers=self.refine_layers,
                          layer_reduction=self.layer_reduction)

    def model_overrides(self) -> dict[str, Any]:
        """How the trained model runs (checkpoints.load_classifier); None keeps the checkpoint's."""
        return {"partial_patches": self.partial_patches, "pos_embed_resampler": self.pos_embed_resampler}


class SeedExtractor:
    """The seeds worker: samples rows -> seeds rows. The model is loaded once per actor."""

    columns: ClassVar[dict[str, list[str]]] = {"primary": ["image_id", "image", "labels"]}

    def __init__(self, cfg: ExtractSeedsConfig, checkpoint_uri: str):
        self.device = torch.device("cuda" if cfg.use_gpu and torch.cuda.is_available() else "cpu")
        self.model, self.method, _ = checkpoints.load_classifier(checkpoint_uri, cfg.storage, self.device,
                                                                 cfg.model_overrides())
        self.map_options = cfg.map_options()
        self.tta = cfg.tta_config()
        self.format = cfg.seed_format()

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
        return [self._seed_row(i, rgb, cls, m) for (i, rgb, cls), m in zip(decoded, maps)], failures

    def _seed_row(self, image_id: str, rgb: np.ndarray, classes: list[int], scores: np.ndarray) -> dict[str, Any]:
        h, w = rgb.shape[:2]
        expected = (len(classes), *map_size(h, w, self.model.patch_size, self.tta))
        if scores.shape != expected:
            raise RecordError(image_id, f"seed map shape {scores.shape} != {expected}")
        return {"image_id": image_id, "height": h, "width": w, "classes": classes,
                "scores": self.format.encode(scores)}


@ownership.owns_output(STAGE, inputs=("checkpoint", "data"))
def run(cfg: ExtractSeedsConfig) -> dict[str, Any]:
    cfg = dataclasses.replace(cfg, storage=cfg.storage.resolved())  # workers get what the driver sees
    return batch_stage.run(cfg, STAGE, lambda: _stage(cfg), inputs=[cfg.checkpoint, cfg.data])


def _stage(cfg: ExtractSeedsConfig) -> batch_stage.BatchStage:
    # Imported here, in the driver: the actors unpickle this module, and Ray Train and matplotlib
    # (which the training harness pulls in) added about 2 s of CPU to every actor's start.
    from ray_wsss.harness import training

    checkpoint_uri = training.find_checkpoint(cfg.checkpoint, cfg.storage)
    meta = storage.read_json(storage.join(checkpoint_uri, checkpoints.META_FILE), cfg.storage)
    data_meta = storage.read_json(storage.join(cfg.data, "dataset.json"), cfg.storage)
    check_classifier(checkpoint_uri, meta, cfg.data, data_meta["class_names"], cfg.allow_untrained)
    log.info("extracting seeds with %s checkpoint %s (epoch %s)", meta["method"], checkpoint_uri, meta["epoch"])
    files = batch_stage.samples_files(cfg.data, cfg.storage, cfg.splits())
    metadata = {
        "table": "seeds",
        "class_names": data_meta["class_names"],
        "num_classes": data_meta["num_classes"],
        "method": meta["method"],
        "checkpoint": checkpoint_uri,
        **cfg.seed_format().metadata(),
        "job": "extract_seeds",
        "config": config_lib.to_dict(cfg),
    }
    return batch_stage.BatchStage(
        name=STAGE, table="seeds", worker=SeedExtractor, worker_args=(checkpoint_uri,),
        tasks=batch_stage.follow_samples(cfg.data, sorted(files), cfg.storage), metadata=metadata,
        summary={"stage": STAGE, "out": cfg.out, "method": meta["method"], "checkpoint": checkpoint_uri},
        remote_args=model_actor_args(cfg.use_gpu), file_splits=files,
        contact_sheet=lambda: batch_stage.contact_sheet(
            cfg.out, "seeds", cfg.data, partial(_contact_panels, cfg.seed_format()),
            ["image", "seeds (max)", "labels @0.5", "ground truth"], cfg.storage))


def check_classifier(checkpoint_uri: str, meta: dict[str, Any], data: str, class_names: list[str],
                     allow_untrained: bool) -> None:
    """Refuse, before any work, a checkpoint that is not a classifier of these classes, or one that learned nothing."""
    method = meta.get("method")
    if method not in list_methods():
        raise WsssError(f"{checkpoint_uri} holds a {method!r} checkpoint, not a classifier of {list(list_methods())}: "
                        "extract_seeds needs train_acr's output" + (" (this is a DeepLab checkpoint)"
                                                                    if method == checkpoints.SEGMENTER_METHOD else ""))
    if meta.get("class_names") != class_names:
        raise WsssError(f"checkpoint {checkpoint_uri} was trained on classes {meta.get('class_names')}, but {data} "
                        f"has {class_names}: the class ids would mean different things")
    history = meta.get("history") or []
    val = {k[len("val_"):]: v for k, v in (history[-1] if history else {}).items() if k.startswith("val_")}
    if not val:
        log.warning("checkpoint %s has no held-out metrics (trained without a val split): nothing says whether the "
                    "classifier learned anything before its seeds are extracted", checkpoint_uri)
        return
    reason = no_learning(val)
    if reason and not allow_untrained:
        raise WsssError(
            f"the classifier of {checkpoint_uri} learned nothing after {meta.get('epoch')} epochs: {reason}. Its seeds "
            "would be noise. Train longer (--epochs), at a larger --img-size, from pretrained --weights, or with a "
            "smaller patch size; or pass --allow-untrained to extract them anyway")
    if reason:
        log.warning("--allow-untrained: extracting seeds although %s", reason)


def _contact_panels(seed_format: SeedFormat, row: dict[str, Any], sample: dict[str, Any]) -> list:
    """image | seeds (max over classes) | argmax labelling at 0.5 | ground truth."""
    from ray_wsss.core import viz
    from ray_wsss.core.metrics import scores_to_labels

    rgb = codec.decode_image(sample["image"])
    scores = seed_format.read(row)
    peak = scores.max(0) if len(scores) else np.zeros(rgb.shape[:2], np.float32)
    gt = codec.decode_mask(sample["gt_mask"]) if sample["gt_mask"] else None
    return [rgb, viz.overlay(rgb, viz.heatmap(peak)), viz.colorize(scores_to_labels(scores, row["classes"], 0.5)),
            viz.colorize(gt) if gt is not None else None]

"""Stage 7: score a seeds or masks stage against the ground-truth masks (mIoU, FP, FN per class)."""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from ray_wsss.core import commit, ownership, storage
from ray_wsss.core.config import option
from ray_wsss.core.metrics import DEFAULT_THRESHOLDS, ConfusionMatrix, ThresholdSweep
from ray_wsss.core.storage import StorageOptions


KINDS = ("seeds", "masks")
STAGE = "evaluate"


@dataclasses.dataclass
class EvaluateConfig:
    pred: str = option("runs/default/seeds", "seeds or masks stage URI")
    data: str = option("runs/default/data", "sample shards with gt_mask")
    kind: str = option("seeds", "what --pred holds", choices=KINDS)
    out: str | None = option(None, "where summary.json goes (default: <pred>/eval)")
    split: str | None = option(None, "comma-separated splits to score (default: all)")
    threshold: float | None = option(None, "seeds: score at this background threshold instead of sweeping")
    break_lock: bool = ownership.break_lock_option()
    storage: StorageOptions = dataclasses.field(default_factory=StorageOptions)

    def out_uri(self) -> str:
        return self.out or storage.join(self.pred, "eval")


class _BatchScorer:
    """Ray Data UDF: joined (prediction, gt_mask) rows -> one row of int64 counts per batch."""

    def __init__(self, kind: str, num_classes: int, thresholds: tuple[float, ...]):
        self.kind, self.num_classes, self.thresholds = kind, num_classes, thresholds

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        from ray_wsss.core import codec

        acc = (ThresholdSweep(self.num_classes, self.thresholds) if self.kind == "seeds"
               else ConfusionMatrix(self.num_classes))
        mismatched: list[str] = []
        for i, image_id in enumerate(batch["image_id"]):
            gt = codec.decode_mask(batch["gt_mask"][i])
            if self.kind == "seeds":
                scores = codec.decode_scores(batch["scores"][i])
                if scores.shape[1:] != gt.shape:
                    mismatched.append(str(image_id))
                    continue
                acc.add(scores, [int(c) for c in batch["classes"][i]], gt)
            else:
                pred = codec.decode_mask(batch["mask"][i])
                if pred.shape != gt.shape:
                    mismatched.append(str(image_id))
                    continue
                acc.add(pred, gt)
        return {"counts": [acc.counts.tobytes()], "images": [len(batch["image_id"]) - len(mismatched)],
                "mismatched": ["\n".join(mismatched)]}


@ownership.owns_output(STAGE, inputs=("data",), contains_out=("pred",), out=EvaluateConfig.out_uri)
def run(cfg: EvaluateConfig) -> dict[str, Any]:
    """Score a seeds or masks stage against the ground-truth masks; commits summary.json (see out_uri)."""
    cfg = dataclasses.replace(cfg, storage=cfg.storage.resolved())  # workers get what the driver sees
    import ray

    from ray_wsss.harness import batch_stage

    if cfg.kind not in KINDS:
        raise ValueError(f"--kind must be one of {KINDS}, got {cfg.kind!r}")
    commit.claim(cfg.out_uri(), STAGE, cfg.storage, inputs=[cfg.pred, cfg.data])
    timer = batch_stage.Timer()
    class_names = storage.read_json(storage.join(cfg.data, "dataset.json"), cfg.storage)["class_names"]
    num_classes = len(class_names)
    pred_columns = ["image_id", "classes", "scores"] if cfg.kind == "seeds" else ["image_id", "mask"]
    pred = batch_stage.read_committed(cfg.pred, cfg.kind, cfg.storage, pred_columns)
    gt = batch_stage.read_committed(cfg.data, "samples", cfg.storage, ["image_id", "gt_mask"], cfg.split)
    gt = gt.filter(lambda row: row["gt_mask"] is not None)
    partitions = max(2, int(ray.cluster_resources().get("CPU", 2)))
    joined = pred.join(gt, join_type="inner", num_partitions=partitions, on=("image_id",))
    thresholds = (float(cfg.threshold),) if cfg.threshold is not None else DEFAULT_THRESHOLDS
    parts = joined.map_batches(_BatchScorer, fn_constructor_args=(cfg.kind, num_classes, thresholds),
                               batch_size=32, batch_format="numpy",
                               compute=ray.data.ActorPoolStrategy(min_size=1, max_size=partitions)).take_all()

    template = (ThresholdSweep(num_classes, thresholds) if cfg.kind == "seeds" else ConfusionMatrix(num_classes))
    for part in parts:
        template.counts += np.frombuffer(part["counts"], np.int64).reshape(template.counts.shape)
    images = int(sum(p["images"] for p in parts))
    mismatched = [i for p in parts for i in p["mismatched"].split("\n") if i]
    if images == 0:
        raise ValueError(f"no image of {cfg.pred} has a ground-truth mask in {cfg.data}"
                         + (f" (split {cfg.split})" if cfg.split else ""))
    if cfg.kind == "seeds":
        result = template.best(class_names)
    else:
        result = {**template.scores(class_names), "threshold": None}
    summary = {"kind": cfg.kind, "pred": cfg.pred, "images": images, "size_mismatches": mismatched,
               "miou": result["miou"], "threshold": result.get("threshold"), "fp": result["fp"],
               "fn": result["fn"], "per_class": result["per_class"], "seconds": timer.seconds()}
    if "curve" in result:
        summary["curve"] = result["curve"]
    commit.write_output(cfg.out_uri(), "summary.json", storage.json_bytes(summary), cfg.storage)
    commit.commit_outputs(cfg.out_uri(), STAGE, {}, cfg.storage)
    return summary



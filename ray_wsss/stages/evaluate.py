"""Stage 7: score a seeds or masks stage against the ground-truth masks (mIoU, FP, FN per class).

File-granular like every batch stage: each prediction file is paired with the samples file of the same name
(its ground truth), so nothing is joined or shuffled. Each task returns its confusion counts, and the driver
folds them as they stream in, holding one at a time. Predictions whose image is not in the data are errors
rows, never dropped. Writes ``<out>/summary.json`` (default ``<pred>/eval``) as a committed output.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from typing import Any

import numpy as np

from ray_wsss.core import codec, commit, ownership, storage
from ray_wsss.core import config as config_lib
from ray_wsss.core.config import option
from ray_wsss.core.errors import RecordError, WsssError
from ray_wsss.core.metrics import (
    DEFAULT_THRESHOLD_GRID,
    MEAN_OVER,
    THRESHOLD_PICKS,
    ConfusionMatrix,
    ThresholdSweep,
    parse_threshold_grid,
)
from ray_wsss.core.seeds.stored import SeedFormat
from ray_wsss.harness import batch_stage

log = logging.getLogger(__name__)
STAGE = "evaluate"
KINDS = ("seeds", "masks")


@dataclasses.dataclass
class EvaluateConfig(batch_stage.DataStageConfig):
    out: str | None = option(None, "where summary.json goes (default: <pred>/eval)")
    batch_size: int = option(32, "predictions an actor scores per batch", min=1)
    pred: str = option("runs/default/seeds", "seeds or masks stage URI")
    kind: str = option("seeds", "what --pred holds", choices=KINDS)
    threshold: float | None = option(None, "seeds: score at this background threshold instead of sweeping",
                                     min=0, max=1)
    thresholds: str = option(DEFAULT_THRESHOLD_GRID, "seeds: background thresholds to sweep, start:stop:step with "
                                                     "stop included (MCTformer's curve: 0.00:0.59:0.01)")
    threshold_pick: str = option("max", "seeds: the threshold reported, max (highest mIoU) or early-stop "
                                        "(MCTformer's --curve: stop at the first one not above the best)",
                                 choices=THRESHOLD_PICKS)
    mean_over: str = option("present", "mIoU/FP/FN over the classes present in ground truth or prediction, or "
                                       "all classes of the data set, absent ones as 0 (the papers' code)",
                            choices=MEAN_OVER)

    def out_uri(self) -> str:
        return self.out or storage.join(self.pred, "eval")

    def __post_init__(self) -> None:
        parse_threshold_grid(self.thresholds)  # a malformed grid fails at load, not after the join


class Scorer:
    """The evaluation worker: prediction rows (+ their ground truth) -> confusion counts per file."""

    def __init__(self, cfg: EvaluateConfig, num_classes: int, thresholds: tuple[float, ...],
                 seed_format: SeedFormat | None = None):
        self.kind, self.num_classes, self.thresholds = cfg.kind, num_classes, thresholds
        self.seed_format = seed_format or SeedFormat()
        prediction = (["image_id", "height", "width", "classes", "scores"] if cfg.kind == "seeds"
                      else ["image_id", "mask"])
        self.columns = {"primary": prediction, "samples": ["image_id", "gt_mask"]}
        self._reset()

    def _reset(self) -> None:
        self.acc = (ThresholdSweep(self.num_classes, self.thresholds) if self.kind == "seeds"
                    else ConfusionMatrix(self.num_classes))
        self.images = 0
        self.without_gt = 0

    def process(self, records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
        failures = []
        for record in records:
            try:
                self._add(record)
            except RecordError as err:
                failures.append((err.image_id, err.message))
        return [], failures

    def _add(self, record: dict[str, Any]) -> None:
        image_id, sample = record["image_id"], record["samples"]
        if sample is None:
            raise RecordError(image_id, "a prediction for an image that is not in the data")
        if sample["gt_mask"] is None:
            self.without_gt += 1
            return
        gt = codec.decode_mask(sample["gt_mask"])
        if self.kind == "seeds":
            try:
                scores = self.seed_format.read(record)
            except ValueError as err:
                raise RecordError(image_id, f"bad seed scores: {err}") from err
            if scores.shape[1:] != gt.shape:
                raise RecordError(image_id, f"seed maps of size {scores.shape[1:]} for a {gt.shape} ground truth")
            self.acc.add(scores, [int(c) for c in record["classes"]], gt)
        else:
            pred = codec.decode_mask(record["mask"])
            if pred.shape != gt.shape:
                raise RecordError(image_id, f"a mask of size {pred.shape} for a {gt.shape} ground truth")
            self.acc.add(pred, gt)
        self.images += 1

    def task_result(self) -> dict[str, Any]:
        result = {"counts": self.acc.counts.tobytes(), "images": self.images, "without_gt": self.without_gt}
        self._reset()
        return result


@ownership.owns_output(STAGE, inputs=("data",), contains_out=("pred",), out=EvaluateConfig.out_uri)
def run(cfg: EvaluateConfig) -> dict[str, Any]:
    """Score a seeds or masks stage against the ground-truth masks; writes summary.json."""
    cfg = dataclasses.replace(cfg, storage=cfg.storage.resolved(), out=cfg.out_uri())
    return batch_stage.run(cfg, STAGE, lambda: _stage(cfg), inputs=[cfg.pred, cfg.data])


def _stage(cfg: EvaluateConfig) -> batch_stage.BatchStage:
    class_names = storage.read_json(storage.join(cfg.data, "dataset.json"), cfg.storage)["class_names"]
    pred_meta = storage.read_json(storage.join(cfg.pred, "dataset.json"), cfg.storage)
    pred_classes = pred_meta.get("class_names")
    if pred_classes != class_names:
        raise WsssError(f"{cfg.pred} holds predictions over classes {pred_classes}, but {cfg.data} has {class_names}: "
                        "the class ids would mean different things")
    thresholds = (float(cfg.threshold),) if cfg.threshold is not None else parse_threshold_grid(cfg.thresholds)
    batch_stage.committed_files(cfg.pred, cfg.kind, cfg.storage)  # complete, or named
    pred_files = commit.file_splits(cfg.pred, cfg.kind, cfg.storage)
    splits = cfg.splits()
    names = sorted(n for n, s in pred_files.items() if splits is None or s in splits)
    samples = batch_stage.committed_files(cfg.data, "samples", cfg.storage)
    tasks = [batch_stage.FileTask(name=n, primary=storage.join(cfg.pred, cfg.kind, n),
                                  paired=(("samples", storage.join(cfg.data, "samples", n)),) if n in samples else ())
             for n in names]

    def reduce(results: Iterator[dict[str, Any]]) -> dict[str, Any]:
        total = (ThresholdSweep(len(class_names), thresholds) if cfg.kind == "seeds"
                 else ConfusionMatrix(len(class_names)))
        images = without_gt = 0
        for result in results:
            total.counts += np.frombuffer(result["counts"], np.int64).reshape(total.counts.shape)
            images += int(result["images"])
            without_gt += int(result["without_gt"])
        if images == 0:
            raise WsssError(f"no prediction of {cfg.pred} has a ground-truth mask in {cfg.data}"
                            + (f" (split {cfg.split})" if cfg.split else ""))
        scores = (total.best(class_names, cfg.mean_over, cfg.threshold_pick) if cfg.kind == "seeds"
                  else {**total.scores(class_names, cfg.mean_over), "threshold": None})
        return {"images": images, "without_ground_truth": without_gt,
                **{k: scores.get(k) for k in ("miou", "threshold", "fp", "fn", "per_class", "curve") if k in scores}}

    metadata = {"table": None, "kind": cfg.kind, "pred": cfg.pred, "data": cfg.data, "job": "evaluate",
                "class_names": class_names, "config": config_lib.to_dict(cfg)}
    seed_format = SeedFormat.from_metadata(pred_meta) if cfg.kind == "seeds" else None
    return batch_stage.BatchStage(
        name=STAGE, table=None, worker=Scorer, worker_args=(len(class_names), thresholds, seed_format), tasks=tasks,
        metadata=metadata, summary={"kind": cfg.kind, "pred": cfg.pred, "split": cfg.split}, reduce=reduce)

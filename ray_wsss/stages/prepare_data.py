"""Stage 1: a source (VOC, COCO, synthetic) -> sample shards (the `samples` contract) + dataset.json."""
from __future__ import annotations

import dataclasses
import logging
from typing import Any

import ray
import ray.data

from ray_wsss.core import config as config_lib
from ray_wsss.harness import batch_stage
from ray_wsss.core import storage
from ray_wsss.core import commit, ownership
from ray_wsss.core.errors import WsssError
from ray_wsss.core.storage import StorageOptions
from ray_wsss.core.config import option

log = logging.getLogger(__name__)
STAGE = "prepare"
FORMATS = ("synthetic", "voc", "coco")


@dataclasses.dataclass
class PrepareConfig:
    out: str = option("runs/default/data", "output URI (local path or s3://)")
    format: str = option("synthetic", "source layout", choices=FORMATS)
    src: str | None = option(None, "source root URI (VOCdevkit/VOC2012, COCO image folder); unused for synthetic")
    split: str = option("train,val", "comma-separated split names, e.g. train_aug,val")
    annotations: str | None = option(None, "COCO instances JSON URI")
    max_errors: int | None = option(None, "fail when more records than this fail (default: never)")
    seed: int = option(0, "synthetic: generator seed")
    num_train: int | None = option(None, "synthetic: train images (default: the generator's)")
    num_val: int | None = option(None, "synthetic: val images (default: the generator's)")
    min_size: int | None = option(None, "synthetic: smallest image side (default: the generator's)")
    max_size: int | None = option(None, "synthetic: largest image side (default: the generator's)")
    batch_size: int = option(16, "records per Ray Data batch")
    overwrite: bool = option(False, "redo a stage that is already committed")
    break_lock: bool = ownership.break_lock_option()
    storage: StorageOptions = dataclasses.field(default_factory=StorageOptions)

    def splits(self) -> list[str]:
        return [s.strip() for s in self.split.split(",") if s.strip()]


class SampleReader:
    """Ray Data UDF: one record reference per row -> one samples row; failures go to the errors table.

    A class, so heavy state (the COCO annotation index) is built once per actor.
    """

    def __init__(self, cfg: PrepareConfig):
        self.cfg = cfg
        self.sink = batch_stage.ErrorSink(cfg.out, STAGE, cfg.storage)
        self.coco = None
        if cfg.format == "coco":
            from ray_wsss.core.data.coco import CocoSource

            self.coco = CocoSource(cfg.annotations, cfg.storage)

    def __call__(self, batch: dict[str, Any]):
        return batch_stage.map_records(batch_stage.batch_records(batch), "samples", self._read,
                                 lambda r: str(r["image_id"]), self.sink)

    def _read(self, record: dict[str, Any]) -> dict[str, Any]:
        cfg = self.cfg
        if cfg.format == "synthetic":
            from ray_wsss.core.data import synthetic

            return synthetic.generate_sample(_synthetic_config(cfg), record["split"], int(record["index"]))
        if cfg.format == "voc":
            from ray_wsss.core.data.voc import read_voc_sample

            return read_voc_sample(cfg.src, record["image_id"], record["split"], cfg.storage)
        image_bytes = _read_coco_image(cfg, record["file_name"], record["image_id"])
        return self.coco.sample(int(record["coco_id"]), image_bytes, record["split"])


def _read_coco_image(cfg: PrepareConfig, file_name: str, image_id: str) -> bytes:
    from ray_wsss.core.errors import RecordError

    uri = storage.join(cfg.src, file_name)
    try:
        return storage.read_bytes(uri, cfg.storage)
    except WsssError as err:
        raise RecordError(image_id, f"image file {uri}: {err}") from err


def _synthetic_config(cfg: PrepareConfig):
    from ray_wsss.core.data import synthetic

    base = synthetic.SyntheticConfig(seed=cfg.seed)
    overrides = {k: getattr(cfg, k) for k in ("num_train", "num_val", "min_size", "max_size")
                 if getattr(cfg, k) is not None}
    return dataclasses.replace(base, **overrides)


def list_records(cfg: PrepareConfig) -> tuple[list[dict[str, Any]], list[tuple[str, str]], list[str]]:
    """(records to read, errors found while listing, class names). Raises on a wrong source as a whole."""
    records: list[dict[str, Any]] = []
    listing_errors: list[tuple[str, str]] = []
    if cfg.format == "synthetic":
        from ray_wsss.core.data import synthetic

        sizes = synthetic.split_sizes(_synthetic_config(cfg))
        for split in cfg.splits():
            if split not in sizes:
                raise WsssError(f"synthetic data has splits {sorted(sizes)}, not {split!r}")
            records += [{"image_id": f"{split}_{i:06d}", "split": split, "index": i} for i in range(sizes[split])]
        return records, listing_errors, synthetic.class_names()
    if not cfg.src:
        raise WsssError(f"--src is required for --format {cfg.format}")
    if cfg.format == "voc":
        from ray_wsss.core.data import voc

        for split in cfg.splits():
            records += [{"image_id": i, "split": split} for i in voc.list_voc_ids(cfg.src, split, cfg.storage)]
        return records, listing_errors, ["background", *voc.VOC_CLASSES]
    if cfg.format == "coco":
        from ray_wsss.core.data.coco import CocoSource

        if not cfg.annotations:
            raise WsssError("--annotations FILE (COCO instances JSON) is required for --format coco")
        if len(cfg.splits()) != 1:
            raise WsssError("COCO takes one --split name per annotations file")
        source = CocoSource(cfg.annotations, cfg.storage)
        split = cfg.splits()[0]
        for coco_id in source.image_ids():
            info = source.coco.imgs[coco_id]
            stem = info["file_name"].rsplit(".", 1)[0]
            records.append({"image_id": stem, "split": split, "coco_id": coco_id, "file_name": info["file_name"]})
        for ann in source.orphan_annotations():
            listing_errors.append((str(ann["image_id"]), f"annotation {ann['id']} names image id "
                                  f"{ann['image_id']}, which is not in the annotations' images list"))
        if not records:
            raise WsssError(f"{cfg.annotations} lists no images")
        return records, listing_errors, source.class_names()
    raise WsssError(f"unknown format {cfg.format!r}; expected one of {FORMATS}")


@ownership.owns_output(STAGE, inputs=("src", "annotations"))
def run(cfg: PrepareConfig) -> dict[str, Any]:
    """Prepare sample shards under ``cfg.out``. Returns the job summary."""
    cfg = dataclasses.replace(cfg, storage=cfg.storage.resolved())  # workers get what the driver sees
    timer = batch_stage.Timer()
    skipped = batch_stage.begin(cfg.out, STAGE, cfg.overwrite, cfg.storage)
    if skipped:
        return skipped
    records, listing_errors, class_names = list_records(cfg)
    for split in cfg.splits():
        if not any(r["split"] == split for r in records):
            raise WsssError(f"split {split!r} of {cfg.src or cfg.format} lists no images")
    done = batch_stage.done_ids(cfg.out, "samples", cfg.storage)
    todo = [r for r in records if r["image_id"] not in done]
    log.info("preparing %d records from %s (%s) into %s; %d already staged by an earlier run",
             len(todo), cfg.src or "generator", cfg.format, cfg.out, len(records) - len(todo))
    batch_stage.ErrorSink(cfg.out, STAGE, cfg.storage).write([e for e in listing_errors if e[0] not in done])

    if todo:
        ds = ray.data.from_items(todo, override_num_blocks=max(1, min(len(todo) // cfg.batch_size, 200)))
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        rows = ds.map_batches(SampleReader, fn_constructor_args=(cfg,), batch_size=cfg.batch_size,
                              compute=ray.data.ActorPoolStrategy(min_size=1, max_size=cpus), batch_format="numpy")
        batch_stage.write_rows(rows, cfg.out, "samples", cfg.storage)

    splits = commit.staged_column(cfg.out, "samples", "split", cfg.storage)
    by_split = {s: splits.count(s) for s in sorted(set(splits))}
    metadata = {
        "table": "samples",
        "class_names": class_names,
        "num_classes": len(class_names),
        "source": {"format": cfg.format, "src": cfg.src, "annotations": cfg.annotations},
        "counts": {"samples": len(splits), "by_split": by_split},
        "job": "prepare_data",
        "config": config_lib.to_dict(cfg),
    }
    summary = {"stage": STAGE, "out": cfg.out, "by_split": by_split, "seconds": timer.seconds()}
    return batch_stage.commit_tables(cfg.out, "samples", metadata, summary, cfg.max_errors, cfg.storage)

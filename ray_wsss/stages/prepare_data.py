"""Stage 1: a source (VOC, COCO, a generator) -> sample shards (the `samples` contract) + dataset.json.

The generators: ``synthetic``, the WSSS data (:mod:`ray_wsss.core.data.synthetic`), and ``shapes``, the
pretrain stage's whole-object task (:mod:`ray_wsss.core.data.shapes`).
"""
from __future__ import annotations

import dataclasses
import logging
from types import ModuleType
from typing import Any, ClassVar

from ray_wsss.core import config as config_lib
from ray_wsss.core import ownership, storage
from ray_wsss.core.config import option
from ray_wsss.core.errors import RecordError, WsssError
from ray_wsss.harness import batch_stage

log = logging.getLogger(__name__)
STAGE = "prepare"
FORMATS = ("synthetic", "shapes", "voc", "coco")
GENERATED = ("synthetic", "shapes")
GENERATOR_SETTINGS = ("num_train", "num_val", "min_size", "max_size")  # seed has a default
SHAPES_ONLY = ("hue_cue",)


@dataclasses.dataclass
class PrepareConfig(batch_stage.StageConfig):
    out: str = option("runs/default/data", "output URI (local path or s3://)")
    batch_size: int = option(16, "records an actor reads per batch", min=1)
    format: str = option("synthetic", "source layout", choices=FORMATS)
    src: str | None = option(None, "source root URI (VOCdevkit/VOC2012, COCO image folder); unused for the "
                                   "generators (synthetic, shapes)")
    split: str = option("train,val", "comma-separated split names, e.g. train_aug,val")
    annotations: str | None = option(None, "COCO instances JSON URI")
    rows_per_file: int = option(256, "sample rows per shard file: the grain of parallelism and of resume for "
                                     "every later stage", min=1)
    seed: int = option(0, "synthetic, shapes: generator seed", min=0)
    num_train: int | None = option(None, "synthetic, shapes: train images (default: the generator's)", min=0)
    num_val: int | None = option(None, "synthetic, shapes: val images (default: the generator's)", min=0)
    min_size: int | None = option(None, "synthetic, shapes: smallest image side (default: the generator's)")
    max_size: int | None = option(None, "synthetic, shapes: largest image side (default: the generator's)")
    hue_cue: bool | None = option(None, "shapes: each category also has its own hue (default: the generator's, off)")

    def __post_init__(self) -> None:
        if not self.splits():
            raise ValueError(f"split {self.split!r} names no split")
        generator = [name for name in GENERATOR_SETTINGS if getattr(self, name) is not None]
        if self.format not in GENERATED and generator:
            raise ValueError(f"{', '.join(generator)}: generator settings, for formats {list(GENERATED)} only "
                             f"(not {self.format})")
        shapes_only = [name for name in SHAPES_ONLY if getattr(self, name) is not None]
        if self.format != "shapes" and shapes_only:
            raise ValueError(f"{', '.join(shapes_only)}: settings of the shapes generator, not of format {self.format}")
        if self.format in GENERATED:
            _generator(self)  # the generator checks its own limits (min_size <= max_size, ...)

    def splits(self) -> list[str]:
        return [s.strip() for s in self.split.split(",") if s.strip()]


class SampleReader:
    """The prepare worker: listing records -> samples rows. Heavy state (the COCO index) is built once per actor."""

    columns: ClassVar[dict[str, list[str]]] = {}

    def __init__(self, cfg: PrepareConfig):
        self.cfg = cfg
        self.coco = None
        if cfg.format == "coco":
            from ray_wsss.core.data.coco import CocoSource

            self.coco = CocoSource(cfg.annotations, cfg.storage)

    def process(self, records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
        rows, failures = [], []
        for record in records:
            try:
                rows.append(self._read(record))
            except RecordError as err:
                failures.append((err.image_id, err.message))
            except Exception as err:
                failures.append((str(record["image_id"]), f"{type(err).__name__}: {err}"))
        return rows, failures

    def _read(self, record: dict[str, Any]) -> dict[str, Any]:
        cfg = self.cfg
        if cfg.format in GENERATED:
            module, generator_cfg = _generator(cfg)
            return module.generate_sample(generator_cfg, record["split"], int(record["index"]))
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


def _generator(cfg: PrepareConfig) -> tuple[ModuleType, Any]:
    """(the generator module of ``cfg.format``, its config: the seed and the settings given)."""
    from ray_wsss.core.data import shapes, synthetic

    module, config_class = {"synthetic": (synthetic, synthetic.SyntheticConfig),
                            "shapes": (shapes, shapes.ShapesConfig)}[cfg.format]
    settings = GENERATOR_SETTINGS + (SHAPES_ONLY if cfg.format == "shapes" else ())
    overrides = {k: getattr(cfg, k) for k in settings if getattr(cfg, k) is not None}
    return module, config_class(seed=cfg.seed, **overrides)


def list_records(cfg: PrepareConfig) -> tuple[list[dict[str, Any]], list[tuple[str, str]], list[str]]:
    """(records to read, errors found while listing, class names). Raises on a wrong source as a whole."""
    records: list[dict[str, Any]] = []
    listing_errors: list[tuple[str, str]] = []
    if cfg.format in GENERATED:
        module, generator_cfg = _generator(cfg)
        sizes = module.split_sizes(generator_cfg)
        for split in cfg.splits():
            if split not in sizes:
                raise WsssError(f"{cfg.format} data has splits {sorted(sizes)}, not {split!r}")
            records += [{"image_id": f"{split}_{i:06d}", "split": split, "index": i} for i in range(sizes[split])]
        return records, listing_errors, module.class_names(generator_cfg)
    if not cfg.src:
        raise WsssError(f"--src is required for --format {cfg.format}")
    if cfg.format == "voc":
        from ray_wsss.core.data import voc

        records, listing_errors = voc.list_splits(cfg.src, cfg.splits(), cfg.storage)
        return records, listing_errors, voc.class_names()
    if cfg.format == "coco":
        from ray_wsss.core.data.coco import CocoSource

        if not cfg.annotations:
            raise WsssError("--annotations FILE (COCO instances JSON) is required for --format coco")
        if len(cfg.splits()) != 1:
            raise WsssError("COCO takes one --split name per annotations file")
        source = CocoSource(cfg.annotations, cfg.storage)
        split = cfg.splits()[0]
        images, listing_errors = source.list_images()
        records = [{"image_id": image, "split": split, "coco_id": coco_id, "file_name": name}
                   for coco_id, image, name in images]
        if not records:
            refused = f"; {len(listing_errors)} refused, the first: {listing_errors[0][1]}" if listing_errors else ""
            raise WsssError(f"{cfg.annotations} lists no images that can be read{refused}")
        return records, listing_errors, source.class_names()
    raise WsssError(f"unknown format {cfg.format!r}; expected one of {FORMATS}")


@ownership.owns_output(STAGE, inputs=("src", "annotations"))
def run(cfg: PrepareConfig) -> dict[str, Any]:
    """Prepare sample shards under ``cfg.out``. Returns the job summary."""
    cfg = dataclasses.replace(cfg, storage=cfg.storage.resolved())  # workers get what the driver sees
    return batch_stage.run(cfg, STAGE, lambda: _stage(cfg), inputs=[cfg.src, cfg.annotations])


def _stage(cfg: PrepareConfig) -> batch_stage.BatchStage:
    records, listing_errors, class_names = list_records(cfg)
    for split in cfg.splits():
        if not any(r["split"] == split for r in records):
            raise WsssError(f"split {split!r} of {cfg.src or cfg.format} lists no images")
    tasks = shard_tasks(records, cfg.rows_per_file)
    by_split = {split: sum(r["split"] == split for r in records) for split in cfg.splits()}
    log.info("preparing %d records of %s from %s (%s) into %d files under %s", len(records), by_split,
             cfg.src or "the generator", cfg.format, len(tasks), cfg.out)
    metadata = {
        "table": "samples",
        "class_names": class_names,
        "num_classes": len(class_names),
        "source": {"format": cfg.format, "src": cfg.src, "annotations": cfg.annotations},
        "counts": {"listed": len(records), "by_split": by_split},
        "job": "prepare_data",
        "config": config_lib.to_dict(cfg),
    }
    return batch_stage.BatchStage(
        name=STAGE, table="samples", worker=SampleReader, worker_args=(), tasks=tasks, metadata=metadata,
        summary={"stage": STAGE, "out": cfg.out, "by_split": by_split},
        file_splits={t.name: t.records[0]["split"] for t in tasks}, listing_errors=listing_errors)


def shard_tasks(records: list[dict[str, Any]], rows_per_file: int) -> list[batch_stage.FileTask]:
    """The listing cut into files of one split and at most ``rows_per_file`` records each, in listing order."""
    tasks = []
    for split in dict.fromkeys(r["split"] for r in records):
        rows = [r for r in records if r["split"] == split]
        for index, start in enumerate(range(0, len(rows), rows_per_file)):
            tasks.append(batch_stage.FileTask(name=f"{split}-{index:05d}.parquet",
                                              records=tuple(rows[start:start + rows_per_file])))
    return tasks

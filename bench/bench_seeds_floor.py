"""The seeds stage's CPU per image against its floor: a no-grad forward of the same model on the same views.

One thread (a seeds actor holds one CPU), synthetic images of the generator's sizes, cut into the stage's record
batches. Side by side, interleaved over ``--repeats`` rounds (best CPU time of each kept):

  stage         the stage's worker, ``SeedExtractor.process``, as configured by default: decode the PNGs, class
                maps (forward + gradients), test-time augmentation, normalisation, encoding
  floor         a no-grad forward of every view batch the stage forms (same grouping, flips included)
  before        the worker as it ran before issue 16: 8 images per call, every block's attention captured
                (unfused), maps summed and stored at image resolution as float16
  before floor  the no-grad forward of the view batches those 8-image calls formed
  padded floor  (cost only) a no-grad forward of the stage's views padded to shared 32-pixel buckets: what
                filling batches by padding (with masked attention) would cost before any masking

Prints CPU ms per image, the mean views per forward, and the ratios stage / floor (the issue's target: <= 2.0)
and before / before floor. The stage's Ray and Parquet overhead outside the worker is not in these figures.
CPU time (all threads of this process) barely depends on other load; wall time is printed too.

Run: nice -n 15 python bench/bench_seeds_floor.py [--images 256] [--repeats 3] [--refine] [--checkpoint DIR]
     (default model: the pipeline's classifier, vit_tiny at 96 px, random weights: the cost does not depend on them)
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from ray_wsss.core import checkpoints, codec
from ray_wsss.core.data import synthetic
from ray_wsss.core.methods import get_method
from ray_wsss.core.models import vit
from ray_wsss.core.seeds import acr_maps, mct_maps
from ray_wsss.core.seeds.tta import seed_scores_batch
from ray_wsss.stages.extract_seeds import ExtractSeedsConfig, SeedExtractor
from ray_wsss.stages.train_acr import TrainClassifierConfig

BEFORE = {"batch_size": 8, "resolution": "image", "encoding": "float16"}


def random_checkpoint(directory: str) -> str:
    """The pipeline's default classifier with random weights, as a checkpoint directory."""
    train = TrainClassifierConfig()
    class_names = synthetic.class_names()
    model = get_method(train.method).build_model(train.vit_config(), len(class_names) - 1)
    meta = {"method": train.method, "class_names": class_names, "epoch": 0,
            "model_config": dataclasses.asdict(train.vit_config())}
    checkpoints.write_checkpoint_dir(directory, model.state_dict(), meta)
    return directory


@contextlib.contextmanager
def every_block_captured() -> Iterator[None]:
    """The maps as before issue 16: every block's attention captured, none fused."""
    def all_blocks(model, blocks):
        return vit.capturing(model, None)

    saved = acr_maps.capturing, mct_maps.capturing
    acr_maps.capturing = mct_maps.capturing = all_blocks
    try:
        yield
    finally:
        acr_maps.capturing, mct_maps.capturing = saved


def records(count: int) -> list[dict]:
    cfg = synthetic.SyntheticConfig()
    rows = [synthetic.generate_sample(cfg, "train", i) for i in range(count)]
    return [{"image_id": r["image_id"], "image": r["image"], "labels": r["labels"]} for r in rows]


def batches(rows: list[dict], size: int) -> list[list[dict]]:
    return [rows[i:i + size] for i in range(0, len(rows), size)]


def run_worker(worker: SeedExtractor, record_batches: list[list[dict]]) -> None:
    for batch in record_batches:
        _, failures = worker.process(batch)
        if failures:
            raise RuntimeError(failures[:3])


def view_batches(worker: SeedExtractor, record_batches: list[list[dict]]) -> list[torch.Tensor]:
    """Every view batch (flips included) the worker's test-time augmentation forms on these records."""
    formed: list[torch.Tensor] = []

    def capture(model, images, classes):
        formed.append(images.clone())
        grid = [s // p for s, p in zip(images.shape[-2:], model.patch_size)]
        return [images.new_zeros(len(c), *grid) for c in classes]

    for batch in record_batches:
        rgbs = [codec.decode_image(r["image"]) for r in batch]
        seed_scores_batch(capture, worker.model, rgbs, [r["labels"] for r in batch], worker.tta)
    return formed


def padded(views: list[torch.Tensor], bucket: int) -> list[torch.Tensor]:
    """The views regrouped into shared shapes: each side padded up to a multiple of ``bucket``, same-shape
    views batched together up to the largest batch the stage formed."""
    limit = max(len(v) for v in views)
    by_shape: dict[tuple[int, int], list[torch.Tensor]] = {}
    for batch in views:
        for view in batch:
            h, w = view.shape[-2:]
            shape = (math.ceil(h / bucket) * bucket, math.ceil(w / bucket) * bucket)
            by_shape.setdefault(shape, []).append(F.pad(view, (0, shape[1] - w, 0, shape[0] - h)))
    return [torch.stack(group[i:i + limit]) for group in by_shape.values() for i in range(0, len(group), limit)]


def forward_all(model: torch.nn.Module, views: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for batch in views:
            model(batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--refine", action=argparse.BooleanOptionalAction, default=False,
                        help="patch-affinity refinement (default off: the pipeline from scratch)")
    parser.add_argument("--checkpoint", default=None, help="a classifier checkpoint (default: random weights)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the seeds actors': 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = records(args.images)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint or random_checkpoint(tmp)
        stage_cfg = ExtractSeedsConfig(checkpoint=checkpoint, refine=args.refine)
        before_cfg = dataclasses.replace(stage_cfg, **BEFORE)
        stage, before = SeedExtractor(stage_cfg, checkpoint), SeedExtractor(before_cfg, checkpoint)
    stage_batches, before_batches = batches(rows, stage_cfg.batch_size), batches(rows, before_cfg.batch_size)
    stage_views, before_views = view_batches(stage, stage_batches), view_batches(before, before_batches)
    padded_views = padded(stage_views, 32)

    def run_before() -> None:
        with every_block_captured():
            run_worker(before, before_batches)

    variants: dict[str, Callable[[], None]] = {
        "stage": lambda: run_worker(stage, stage_batches),
        "floor": lambda: forward_all(stage.model, stage_views),
        "before": run_before,
        "before floor": lambda: forward_all(before.model, before_views),
        "padded floor": lambda: forward_all(stage.model, padded_views),
    }
    best = {name: (math.inf, math.inf) for name in variants}
    for _ in range(args.repeats):  # interleaved rounds, best of each: robust to other load
        for name, fn in variants.items():
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            best[name] = (min(best[name][0], wall), min(best[name][1], cpu))

    def mean_views(views: list[torch.Tensor]) -> float:
        return float(np.mean([len(v) for v in views]))

    tokens = sum(v.shape[0] * v.shape[-2] * v.shape[-1] for v in padded_views) / sum(
        v.shape[0] * v.shape[-2] * v.shape[-1] for v in stage_views)
    print(f"{len(rows)} synthetic images, {torch.get_num_threads()} thread(s), refine {args.refine}, "
          f"{'checkpoint ' + args.checkpoint if args.checkpoint else 'random weights'}; load average "
          f"{os.getloadavg()[0]:.1f}")
    print(f"views per forward: stage {mean_views(stage_views):.2f} ({stage_cfg.batch_size} images per call), "
          f"before {mean_views(before_views):.2f} ({before_cfg.batch_size}), padded to 32 px "
          f"{mean_views(padded_views):.2f} with {tokens:.2f}x the pixels")
    for name, (wall, cpu) in best.items():
        print(f"{name:>13}: {1000 * cpu / len(rows):7.2f} CPU ms/image ({1000 * wall / len(rows):7.2f} wall)")
    cpu = {name: value[1] for name, value in best.items()}
    print(f"stage / floor: {cpu['stage'] / cpu['floor']:.2f}x;  before / before floor: "
          f"{cpu['before'] / cpu['before floor']:.2f}x;  before / stage: {cpu['before'] / cpu['stage']:.2f}x;  "
          f"padded floor / floor: {cpu['padded floor'] / cpu['floor']:.2f}x")


if __name__ == "__main__":
    main()

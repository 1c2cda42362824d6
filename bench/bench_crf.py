"""Pseudo-mask (dense CRF) stage throughput: 1 vs 2 CRF actors, and Ray overhead vs bare pydensecrf.

    python bench/bench_crf.py --images 192 --size 256

Prints, measured side by side in one run on the same images and seeds:
  * bare:   decode + make_mask() (softmax unary + pydensecrf) + encode in a plain loop, one process
  * ray-1:  the real masks stage (Ray Data join + CPU actor pool) with 1 actor
  * ray-2:  the same with 2 actors
and the ratios ray-2/ray-1 throughput (target >= 1.8) and ray-1/bare per-image cost (target <= 1.10).
The stage's per-image cost is marginal: each stage runs on all images and on half of them, and the
difference over the extra images removes the fixed start-up/commit cost; whole-stage ratios are printed too.
Seeds are the ground-truth masks blurred into scores, so the CRF has real work to do.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ray_wsss.core import codec, commit, schema, storage
from ray_wsss.stages.make_masks import MakeMasksConfig, make_mask
from ray_wsss.stages.make_masks import run as make_masks
from ray_wsss.stages.prepare_data import PrepareConfig
from ray_wsss.stages.prepare_data import run as prepare


def blurred_seeds(gt: np.ndarray, labels: list[int], rng: np.random.Generator) -> np.ndarray:
    """Per labelled class: its gt region, box-blurred and shifted a little (a plausible seed)."""
    maps = []
    for c in labels:
        region = (gt == c).astype(np.float32)
        k = 7
        padded = np.pad(region, k, mode="edge")
        blurred = sum(np.roll(np.roll(padded, dy, 0), dx, 1) for dy in range(-k, k + 1, 2)
                      for dx in range(-k, k + 1, 2))[k:-k, k:-k]
        blurred = np.roll(blurred / blurred.max() if blurred.max() else blurred, rng.integers(-3, 4), axis=1)
        maps.append(blurred)
    return np.stack(maps) if maps else np.zeros((0, *gt.shape), np.float32)


def build(root: str, images: int, size: int) -> tuple[str, str, str]:
    """(data, seeds of every image, seeds of the first half of the images)."""
    data, seeds, half = os.path.join(root, "data"), os.path.join(root, "seeds"), os.path.join(root, "seeds_half")
    prepare(PrepareConfig(out=data, num_train=images, num_val=1, split="train", min_size=size // 2, max_size=size))
    rng = np.random.default_rng(0)
    rows = []
    for row in commit.read_table(data, "samples").to_pylist():
        gt = codec.decode_mask(row["gt_mask"])
        rows.append({"image_id": row["image_id"], "height": row["height"], "width": row["width"],
                     "classes": row["labels"], "scores": codec.encode_scores(blurred_seeds(gt, row["labels"], rng))})
    meta = storage.read_json(storage.join(data, "dataset.json"))
    for out, part in ((seeds, rows), (half, rows[:len(rows) // 2])):
        commit.write_staged_table(out, "seeds", pa.Table.from_pylist(part, schema=schema.SEEDS))
        commit.commit_stage(out, ["seeds", "errors"], {**meta, "table": "seeds", "config": {"split": "train"}})
    return data, seeds, half


def bare_seconds(data: str, seeds: str, cfg: MakeMasksConfig) -> tuple[float, int]:
    samples = {r["image_id"]: r for r in commit.read_table(data, "samples").to_pylist()}
    labelling = cfg.labelling(cfg.threshold)
    work = [(samples[row["image_id"]]["image"], row["scores"], row["classes"])
            for row in commit.read_table(seeds, "seeds").to_pylist()]
    start = time.perf_counter()
    for image_png, scores_npy, classes in work:  # the stage's per-image work: decode, CRF, encode
        rgb, scores = codec.decode_image(image_png), codec.decode_scores(scores_npy)
        codec.encode_mask(make_mask(rgb, scores, classes, labelling))
    return time.perf_counter() - start, len(work)


def stage_seconds(data: str, seeds: str, out: str, actors: int, cfg: MakeMasksConfig, missing: int = 0) -> float:
    """Seconds of one masks stage run; ``missing`` images have no seeds and must come out as error rows."""
    start = time.perf_counter()
    summary = make_masks(MakeMasksConfig(**{**cfg.__dict__, "seeds": seeds, "data": data, "out": out,
                                            "num_actors": actors}))
    assert summary["errors"] == missing, summary
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=192)
    parser.add_argument("--size", type=int, default=256, help="synthetic image side range upper bound")
    args = parser.parse_args()

    import ray

    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)  # 2 CRF actors + the driver's Data tasks
    cfg = MakeMasksConfig(threshold=0.3, batch_size=4)
    with tempfile.TemporaryDirectory() as root:
        data, seeds, half = build(root, args.images, args.size)
        bare, n = bare_seconds(data, seeds, cfg)
        whole = {actors: stage_seconds(data, seeds, os.path.join(root, f"m{actors}"), actors, cfg) for actors in (1, 2)}
        # Same images and join, seeds for half: the other half become cheap "no seeds" error rows.
        halves = {actors: stage_seconds(data, half, os.path.join(root, f"h{actors}"), actors, cfg, missing=n - n // 2)
                  for actors in (1, 2)}
    # A stage run has a fixed cost (Ray Data start-up, the join, actor start, commit, contact sheet) that
    # a bare loop does not; the marginal cost of the second half of the images is the per-image cost.
    extra = n - n // 2
    marginal = {actors: (whole[actors] - halves[actors]) / extra for actors in (1, 2)}
    result = {
        "images": n, "bare_s": round(bare, 2),
        "stage_s": {f"{a}_actor": round(whole[a], 2) for a in (1, 2)},
        "stage_half_s": {f"{a}_actor": round(halves[a], 2) for a in (1, 2)},
        "per_image_ms": {"bare": round(1000 * bare / n, 1), "ray_1_marginal": round(1000 * marginal[1], 1),
                         "ray_2_marginal": round(1000 * marginal[2], 1)},
        "speedup_2_vs_1_marginal": round(marginal[1] / marginal[2], 3),
        "speedup_2_vs_1_whole_stage": round(whole[1] / whole[2], 3), "target_speedup": 1.8,
        "overhead_ray_1_vs_bare_marginal": round(marginal[1] / (bare / n), 3),
        "overhead_ray_1_vs_bare_whole_stage": round(whole[1] / bare, 3), "target_overhead": 1.10,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

"""Pseudo-mask (dense CRF) stage cost against bare pydensecrf, and 2 CRF actors against 1: whole-stage ratios.

    python bench/bench_crf.py [--images 800] [--size 256] [--rows-per-file 64]

Measured side by side in one run, on the same images and seeds:
  * bare:        a plain loop in this process, one thread: decode the image and the seeds, ``make_mask``
                 (softmax unary + pydensecrf), encode the mask: the stage's per-image work with nothing around it;
                 and ``dense_crf`` alone on the same probabilities;
  * stage x1:    the real masks stage (file-paired seeds and samples, an actor pool) with at most 1 actor;
  * stage x2:    the same with at most 2 actors.
Each stage figure is the WHOLE stage (Ray Data start, actor start, reading, writing, commit, contact sheet),
never a difference of two stage runs: ``--images`` should make the fixed cost small next to the work, and
the fixed cost is printed (a 2-image stage run) so you can see how small. CPU seconds are those of the whole
process tree (driver, Ray, actors; see ``_measure``): on a shared machine they hold still where wall seconds
do not. Targets (issue 16): stage CPU per image / bare dense_crf <= 1.3; 2 actors' wall speedup >= 1.8 on 2
free cores (wall speedups need a quiet machine: the load average is printed).
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _measure
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ray_wsss.core import codec, commit, schema, storage
from ray_wsss.core.refine.crf import dense_crf, label_scores, softmax
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


def build(root: str, name: str, images: int, size: int, rows_per_file: int) -> tuple[str, str]:
    """(data, seeds): sample shards and a seeds table of one file per samples file, as the stages pair them."""
    data, seeds = os.path.join(root, name, "data"), os.path.join(root, name, "seeds")
    prepare(PrepareConfig(out=data, num_train=images, num_val=0, split="train", min_size=size // 2, max_size=size,
                          rows_per_file=rows_per_file))
    rng = np.random.default_rng(0)
    for path in commit.table_files(data, "samples"):
        rows = []
        for row in pq.read_table(path).to_pylist():
            gt = codec.decode_mask(row["gt_mask"])
            rows.append({"image_id": row["image_id"], "height": row["height"], "width": row["width"],
                         "classes": row["labels"],
                         "scores": codec.encode_scores(blurred_seeds(gt, row["labels"], rng))})
        commit.write_staged_table(seeds, "seeds", pa.Table.from_pylist(rows, schema=schema.SEEDS),
                                  name=os.path.basename(path))
    meta = storage.read_json(storage.join(data, "dataset.json"))
    commit.commit_stage(seeds, ["seeds", "errors"], {**meta, "table": "seeds"},
                        file_splits=commit.file_splits(data, "samples"))
    return data, seeds


def bare_cpu(data: str, seeds: str, cfg: MakeMasksConfig) -> dict[str, float]:
    """CPU seconds of the per-image work in a plain loop (one thread), and of dense_crf alone."""
    samples = {r["image_id"]: r["image"] for r in commit.read_table(data, "samples").to_pylist()}
    labelling = cfg.labelling(cfg.threshold)
    work = [(samples[row["image_id"]], row["scores"], row["classes"])
            for row in commit.read_table(seeds, "seeds").to_pylist()]
    start = time.process_time()
    for image_png, scores_npy, classes in work:  # the stage's per-image work: decode, CRF, encode
        rgb, scores = codec.decode_image(image_png), codec.decode_scores(scores_npy)
        codec.encode_mask(make_mask(rgb, scores, classes, labelling))
    loop = time.process_time() - start
    crf = 0.0
    for image_png, scores_npy, classes in work:
        rgb, scores = codec.decode_image(image_png), codec.decode_scores(scores_npy)
        if len(classes):
            probs = softmax(label_scores(scores, labelling), labelling.crf_config.scale)
            start = time.process_time()
            dense_crf(rgb, probs, labelling.crf_config)
            crf += time.process_time() - start
    return {"loop_cpu_s": loop, "dense_crf_cpu_s": crf, "images": len(work)}


def stage(data: str, seeds: str, out: str, actors: int, cfg: MakeMasksConfig, cpu: _measure.CpuMonitor) -> dict:
    with _measure.measured(cpu) as m:
        summary = make_masks(MakeMasksConfig(**{**cfg.__dict__, "seeds": seeds, "data": data, "out": out,
                                                "num_actors": actors}))
    assert summary["errors"] == 0, summary
    return m


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=800)
    parser.add_argument("--size", type=int, default=256, help="synthetic image side range upper bound")
    parser.add_argument("--rows-per-file", type=int, default=64)
    parser.add_argument("--num-cpus", type=int, default=2, help="Ray's CPUs")
    args = parser.parse_args()

    import ray
    import ray.data

    from ray_wsss.harness.cluster import LOCAL_RUNTIME_ENV

    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False, runtime_env=LOCAL_RUNTIME_ENV)
    ray.data.DataContext.get_current().enable_progress_bars = False
    cpu = _measure.CpuMonitor()
    cfg = MakeMasksConfig(threshold=0.3)
    with tempfile.TemporaryDirectory() as root:
        data, seeds = build(root, "all", args.images, args.size, args.rows_per_file)
        tiny_data, tiny_seeds = build(root, "tiny", 2, args.size, args.rows_per_file)
        bare = bare_cpu(data, seeds, cfg)
        fixed = stage(tiny_data, tiny_seeds, os.path.join(root, "m_tiny"), 1, cfg, cpu)
        runs = {a: stage(data, seeds, os.path.join(root, f"m{a}"), a, cfg, cpu) for a in (1, 2)}
    cpu.stop()
    ray.shutdown()
    n = bare["images"]
    per_image = {"bare_loop": bare["loop_cpu_s"] / n, "dense_crf": bare["dense_crf_cpu_s"] / n,
                 **{f"stage_x{a}": runs[a]["cpu_s"]["total"] / n for a in (1, 2)}}
    result = {
        "images": n, "size": args.size, "rows_per_file": args.rows_per_file,
        "cpu_ms_per_image": {k: round(1000 * v, 2) for k, v in per_image.items()},
        "stage_fixed_cost_cpu_s (2-image run)": fixed["cpu_s"]["total"],
        "stage_cpu_s": {f"x{a}": runs[a]["cpu_s"] for a in (1, 2)},
        "stage_wall_s": {f"x{a}": runs[a]["wall_s"] for a in (1, 2)},
        "ratio_stage_x1_cpu_over_dense_crf": round(per_image["stage_x1"] / per_image["dense_crf"], 3),
        "ratio_stage_x1_cpu_over_bare_loop": round(per_image["stage_x1"] / per_image["bare_loop"], 3),
        "ratio_stage_x2_cpu_over_dense_crf": round(per_image["stage_x2"] / per_image["dense_crf"], 3),
        "target_cpu_ratio_over_dense_crf": 1.3,
        "speedup_x2_over_x1_wall": round(runs[1]["wall_s"] / runs[2]["wall_s"], 3), "target_speedup": 1.8,
        "load_average": {f"x{a}": [runs[a]["load_before"][0], runs[a]["load_after"][0]] for a in (1, 2)},
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

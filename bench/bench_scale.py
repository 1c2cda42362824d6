"""The batch stages at N and 4N images: fixed cost, cost per image, its ratio to the work's floor, memory.

    python bench/bench_scale.py [--n 100] [--factor 4] [--min-size 64] [--max-size 128] [--rows-per-file R]
                                [--num-cpus 2] [--no-segment] [--workdir DIR]

Runs prepare, seeds, evaluate seeds, masks (dense CRF), evaluate masks and segment on N and factor x N
synthetic images (a random-init ACR ViT and DeepLab: the cost does not depend on the weights), each stage
the real ``run`` on a local Ray of ``--num-cpus`` CPUs. For every stage and both sizes it prints:

* wall seconds and CPU seconds of the whole process tree (driver, Ray's processes, every task and actor;
  see ``_measure``), the actors' CPU inside the stage's worker (the UDF) and on the whole task;
* the fixed cost (intercept) and the cost per image (slope) of CPU seconds, from the two sizes;
* the ratio of that per-image cost to the floor of the stage's work, measured in this process on the
  first N images, one thread (the actors' thread count: Ray gives a 1-CPU actor one):
  seeds: a no-grad forward of the same model on the same view batches (the stage's own grouping, its
  flips); masks: bare ``dense_crf`` on the same images and probabilities, and the whole ``make_mask``;
* the object store's peak (from the raylet's own usage dumps) and the driver's peak RSS (kernel
  high-water mark), and their factor x N / N ratios;
* for the evaluations, when the first file's result reached the driver, as a share of the stage's wall time;
* the seeds table's bytes per class·pixel (every labelled class's map at image resolution).

``--rows-per-file`` defaults to ceil(N / num_cpus), so both sizes keep every actor busy (N: num_cpus files;
factor x N: factor x num_cpus) and the per-image slope is not a change of parallelism.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _measure
import numpy as np
import pyarrow.parquet as pq
import torch

from ray_wsss.core import checkpoints, codec, commit
from ray_wsss.core.data import synthetic
from ray_wsss.core.methods import MapOptions, get_method
from ray_wsss.core.models.deeplab import DeepLabConfig, create_deeplab
from ray_wsss.core.refine.crf import dense_crf, label_scores, make_mask, softmax
from ray_wsss.core.seeds.tta import TTAConfig, seed_scores_batch
from ray_wsss.harness import batch_stage
from ray_wsss.stages import evaluate, extract_seeds, make_masks, prepare_data, segment
from ray_wsss.stages.train_acr import TrainClassifierConfig

THRESHOLD = 0.3
FIRST_RESULT: list[float] = []
TASK_RESULTS: list[dict] = []


def _observed(map_tasks):
    """batch_stage.map_tasks, noting when the first result reaches the driver and each task's CPU figures."""
    def wrapper(*args, **kwargs) -> Iterator[dict]:
        for row in map_tasks(*args, **kwargs):
            if not FIRST_RESULT:
                FIRST_RESULT.append(time.time())
            TASK_RESULTS.append({k: row.get(k) for k in ("task_cpu_seconds", "worker_cpu_seconds", "task_started_at")})
            yield row
    return wrapper


def write_checkpoints(root: str) -> tuple[str, str]:
    """(classifier, DeepLab) checkpoint directories of random-init models, as the trainers write them."""
    torch.manual_seed(0)
    class_names = synthetic.class_names()
    vit = TrainClassifierConfig().vit_config()
    classifier = get_method("acr").build_model(vit, len(class_names) - 1)
    deeplab = create_deeplab(DeepLabConfig(), len(class_names))
    dirs = []
    for name, model, meta in (
            ("classifier", classifier, {"method": "acr", "model_config": dataclasses.asdict(vit)}),
            ("deeplab", deeplab, {"method": checkpoints.SEGMENTER_METHOD,
                                  "model_config": dataclasses.asdict(DeepLabConfig())})):
        path = os.path.join(root, name)
        os.makedirs(path)
        checkpoints.write_checkpoint_dir(path, model.state_dict(),
                                         {**meta, "class_names": class_names, "epoch": 0, "history": []})
        dirs.append(path)
    return dirs[0], dirs[1]


def run_stages(root: str, n: int, args, classifier: str, deeplab: str, cpu: _measure.CpuMonitor,
               store: _measure.ObjectStoreMonitor) -> dict[str, dict]:
    """Every stage on n images; -> {stage: measurements}."""
    d = os.path.join(root, f"n{n}")
    data, seeds, masks, seg = (os.path.join(d, s) for s in ("data", "seeds", "masks", "segment"))
    stages = [
        ("prepare", lambda: prepare_data.run(prepare_data.PrepareConfig(
            out=data, split="train", num_train=n, num_val=0, min_size=args.min_size, max_size=args.max_size,
            rows_per_file=args.rows_per_file))),
        ("seeds", lambda: extract_seeds.run(extract_seeds.ExtractSeedsConfig(
            checkpoint=classifier, data=data, out=seeds, refine=False))),
        ("eval_seeds", lambda: evaluate.run(evaluate.EvaluateConfig(pred=seeds, data=data, kind="seeds"))),
        ("masks", lambda: make_masks.run(make_masks.MakeMasksConfig(
            seeds=seeds, data=data, out=masks, threshold=THRESHOLD))),
        ("eval_masks", lambda: evaluate.run(evaluate.EvaluateConfig(pred=masks, data=data, kind="masks"))),
    ]
    if args.segment:
        stages.append(("segment", lambda: segment.run(segment.SegmentConfig(
            checkpoint=deeplab, data=data, out=seg, split="train"))))
    results = {}
    for name, thunk in stages:
        FIRST_RESULT.clear()
        TASK_RESULTS.clear()
        with _measure.measured(cpu, store) as m:
            summary = thunk()
        assert not summary.get("skipped") and not summary.get("errors"), summary
        m["first_result_share"] = round((FIRST_RESULT[0] - m["start"]) / m["wall_s"], 3) if FIRST_RESULT else None
        if FIRST_RESULT:  # the first result's wait: start-up (until a task began), then that task
            first_task = min(r["task_started_at"] for r in TASK_RESULTS)
            m["first_task_start_s"] = round(first_task - m["start"], 2)
            m["first_result_s"] = round(FIRST_RESULT[0] - m["start"], 2)
        m["actor_task_cpu_s"] = round(sum(r["task_cpu_seconds"] or 0 for r in TASK_RESULTS), 2)
        m["actor_worker_cpu_s"] = round(sum(r["worker_cpu_seconds"] or 0 for r in TASK_RESULTS), 2)
        m["files"] = len(TASK_RESULTS)
        results[name] = m
        print(f"[bench] n={n} {name}: wall {m['wall_s']} s, CPU {m['cpu_s']['total']} s, store peak "
              f"{m.get('store_peak_mb')} MB, driver peak {m['driver_peak_rss_mb']} MB", flush=True)
    results["seeds"]["bytes_per_class_pixel"] = seeds_bytes_per_class_pixel(seeds)
    for name, (uri, table) in {"prepare": (data, "samples"), "seeds": (seeds, "seeds"), "masks": (masks, "masks"),
                               "segment": (seg, "masks")}.items():
        if name in results:
            results[name]["table_bytes_per_image"] = table_bytes_per_image(uri, table)
    return results


def table_bytes_per_image(uri: str, table: str) -> dict[str, float]:
    """Bytes per row of a committed table: whole Parquet files, and per binary column before Parquet."""
    files = commit.table_files(uri, table)
    rows = sum(pq.read_metadata(p).num_rows for p in files)
    per_column = {}
    for column in ("image", "gt_mask", "scores", "mask"):
        if column in pq.read_schema(files[0]).names:
            per_column[column] = round(sum(sum(len(v) for v in pq.read_table(p, columns=[column])[column].to_pylist()
                                              if v is not None) for p in files) / rows)
    return {"file": round(sum(os.path.getsize(p) for p in files) / rows), **per_column}


def seeds_bytes_per_class_pixel(seeds: str) -> dict[str, float]:
    """Bytes of the seeds table (whole files, and the scores column alone) per labelled class·pixel."""
    files = commit.table_files(seeds, "seeds")
    class_pixels = scores_bytes = 0
    for path in files:
        table = pq.read_table(path, columns=["height", "width", "classes", "scores"])
        for h, w, classes, scores in zip(*(table[c].to_pylist() for c in ("height", "width", "classes", "scores"))):
            class_pixels += len(classes) * h * w
            scores_bytes += len(scores)
    file_bytes = sum(os.path.getsize(p) for p in files)
    return {"file": round(file_bytes / class_pixels, 4), "scores_column_raw": round(scores_bytes / class_pixels, 4)}


def _cpu_of(fn) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


def seeds_floor(data: str, classifier: str) -> dict[str, float]:
    """CPU ms per image in this process, one thread, on the stage's batches: a no-grad forward of every view
    batch the stage forms (the floor), and the whole seed maps (gradients, TTA, normalisation)."""
    cfg = extract_seeds.ExtractSeedsConfig(refine=False)
    model, method, _ = checkpoints.load_classifier(classifier, None, torch.device("cpu"))
    tta = TTAConfig(scales=cfg.scales, flip=cfg.flip, base_size=cfg.base_size)
    options = MapOptions(layers=cfg.layers, refine=cfg.refine, refine_layers=cfg.refine_layers)
    forward_cpu = [0.0]
    view_batches: list[int] = []

    def forward_only(model, images, classes):
        view_batches.append(len(images))
        with torch.no_grad():
            forward_cpu[0] += _cpu_of(lambda: model(images))
        grid = [s // p for s, p in zip(images.shape[-2:], model.patch_size)]
        return [images.new_zeros(len(c), *grid) for c in classes]

    maps_cpu = images = 0
    for path in commit.table_files(data, "samples"):
        for batch in batch_stage.iter_file_batches(path, ["image", "labels"], cfg.batch_size, None):
            rgbs = [codec.decode_image(b) for b in batch["image"].to_pylist()]
            labels = batch["labels"].to_pylist()
            seed_scores_batch(forward_only, model, rgbs, labels, tta)
            maps_cpu += _cpu_of(lambda rgbs=rgbs, labels=labels: method.seed_scores(model, rgbs, labels, options, tta))
            images += len(rgbs)
    return {"forward_ms": 1000 * forward_cpu[0] / images, "maps_ms": 1000 * maps_cpu / images,
            "mean_view_batch": float(np.mean(view_batches)), "images": images}


def crf_floor(data: str, seeds: str) -> dict[str, float]:
    """CPU ms per image in this process: bare dense_crf on the stage's probabilities, and make_mask whole."""
    labelling = make_masks.MakeMasksConfig(threshold=THRESHOLD).labelling(THRESHOLD)
    table = commit.read_table(data, "samples", columns=["image_id", "image"])
    samples = dict(zip(table["image_id"].to_pylist(), table["image"].to_pylist()))
    crf_cpu = mask_cpu = 0.0
    rows = commit.read_table(seeds, "seeds").to_pylist()
    for row in rows:
        rgb, scores = codec.decode_image(samples[row["image_id"]]), codec.decode_scores(row["scores"])
        if len(row["classes"]):
            probs = softmax(label_scores(scores, labelling), labelling.crf_config.scale)
            crf_cpu += _cpu_of(lambda rgb=rgb, probs=probs: dense_crf(rgb, probs, labelling.crf_config))
        mask_cpu += _cpu_of(lambda rgb=rgb, scores=scores, row=row: make_mask(rgb, scores, row["classes"], labelling))
    return {"dense_crf_ms": 1000 * crf_cpu / len(rows), "make_mask_ms": 1000 * mask_cpu / len(rows),
            "images": len(rows)}


def fit(sizes: list[int], values: list[float]) -> tuple[float, float]:
    """(intercept, slope) of the line through the two (size, value) points."""
    (n1, n2), (v1, v2) = sizes, values
    slope = (v2 - v1) / (n2 - n1)
    return v1 - slope * n1, slope


def report(sizes: list[int], runs: dict[int, dict], floors: dict[str, dict]) -> dict:
    small, large = sizes
    table = {}
    for stage in runs[small]:
        a, b = runs[small][stage], runs[large][stage]
        intercept, slope = fit(sizes, [a["cpu_s"]["total"], b["cpu_s"]["total"]])
        _, worker_slope = fit(sizes, [a["actor_worker_cpu_s"], b["actor_worker_cpu_s"]])
        _, wall_slope = fit(sizes, [a["wall_s"], b["wall_s"]])
        row = {"intercept_cpu_s": round(intercept, 2), "slope_cpu_ms": round(1000 * slope, 2),
               "slope_wall_ms": round(1000 * wall_slope, 2),
               "slope_worker_cpu_ms": round(1000 * worker_slope, 2),
               "store_peak_ratio": round(b["store_peak_mb"] / a["store_peak_mb"], 2) if a["store_peak_mb"] else None,
               "driver_rss_ratio": round(b["driver_peak_rss_mb"] / a["driver_peak_rss_mb"], 2)}
        if stage == "seeds":
            row["slope_over_forward_floor"] = round(slope * 1000 / floors["seeds"]["forward_ms"], 2)
            row["whole_stage_over_forward_floor"] = round(
                b["cpu_s"]["total"] * 1000 / large / floors["seeds"]["forward_ms"], 2)
            row["slope_over_inprocess_maps"] = round(slope * 1000 / floors["seeds"]["maps_ms"], 2)
        if stage == "masks":
            row["slope_over_dense_crf"] = round(slope * 1000 / floors["masks"]["dense_crf_ms"], 2)
            row["slope_over_make_mask"] = round(slope * 1000 / floors["masks"]["make_mask_ms"], 2)
            row["whole_stage_over_dense_crf"] = round(
                b["cpu_s"]["total"] * 1000 / large / floors["masks"]["dense_crf_ms"], 2)
        table[stage] = row
    return table


def print_report(sizes: list[int], runs: dict[int, dict], table: dict, floors: dict) -> None:
    small, large = sizes
    head = f"{'stage':<11}" + "".join(f"{h:>10}" for h in (
        f"wall@{small}", f"CPU@{small}", f"wall@{large}", f"CPU@{large}", "fixed s", "ms/img", "store@N",
        "store@4N", "store x", "rss@N", "rss@4N", "1st res"))
    print("\n" + head + "\n" + "-" * len(head))
    for stage, row in table.items():
        a, b = runs[small][stage], runs[large][stage]
        first = b.get("first_result_share")
        print(f"{stage:<11}" + "".join(f"{v:>10}" for v in (
            a["wall_s"], a["cpu_s"]["total"], b["wall_s"], b["cpu_s"]["total"], row["intercept_cpu_s"],
            row["slope_cpu_ms"], a["store_peak_mb"], b["store_peak_mb"], row["store_peak_ratio"],
            a["driver_peak_rss_mb"], b["driver_peak_rss_mb"], "" if first is None else f"{first:.0%}")))
    s, m = table["seeds"], table["masks"]
    print(f"\nseeds: {s['slope_cpu_ms']} CPU ms/image (UDF {s['slope_worker_cpu_ms']}) vs no-grad forward floor "
          f"{floors['seeds']['forward_ms']:.2f} ms -> {s['slope_over_forward_floor']}x (whole stage at {large}: "
          f"{s['whole_stage_over_forward_floor']}x); in-process seed maps {floors['seeds']['maps_ms']:.2f} ms "
          f"(stage {s['slope_over_inprocess_maps']}x them); mean view batch {floors['seeds']['mean_view_batch']:.2f}")
    print(f"masks: {m['slope_cpu_ms']} CPU ms/image (UDF {m['slope_worker_cpu_ms']}) vs bare dense_crf "
          f"{floors['masks']['dense_crf_ms']:.2f} ms -> {m['slope_over_dense_crf']}x (make_mask "
          f"{floors['masks']['make_mask_ms']:.2f} ms -> {m['slope_over_make_mask']}x; whole stage at {large}: "
          f"{m['whole_stage_over_dense_crf']}x dense_crf)")
    print(f"seeds table: {runs[large]['seeds']['bytes_per_class_pixel']} bytes per class·pixel")
    print("bytes per image: " + "; ".join(f"{stage} {runs[large][stage]['table_bytes_per_image']}"
                                          for stage in runs[large] if "table_bytes_per_image" in runs[large][stage]))
    for stage in ("eval_seeds", "eval_masks"):
        a, b = runs[small][stage], runs[large][stage]
        print(f"{stage}: first result at {a['first_result_share']:.0%} ({small}) / {b['first_result_share']:.0%} "
              f"({large}) of the stage's wall time; at {large}: {b['first_result_s']} s of {b['wall_s']} s, of which "
              f"{b['first_task_start_s']} s until the first task began (actor start-up), over {b['files']} files")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--factor", type=int, default=4)
    parser.add_argument("--min-size", type=int, default=64, help="synthetic image side, smallest")
    parser.add_argument("--max-size", type=int, default=128, help="synthetic image side, largest")
    parser.add_argument("--rows-per-file", type=int, help="sample rows per file (default: ceil(N / num_cpus))")
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--segment", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--workdir", help="where data and outputs go (default: a temporary directory, removed)")
    parser.add_argument("--json", help="also write every figure to this file")
    args = parser.parse_args()
    args.rows_per_file = args.rows_per_file or math.ceil(args.n / args.num_cpus)
    sizes = [args.n, args.n * args.factor]

    import ray
    import ray.data

    from ray_wsss.harness.cluster import LOCAL_RUNTIME_ENV

    torch.set_num_threads(1)  # the floors run at the actors' thread count
    batch_stage.map_tasks = _observed(batch_stage.map_tasks)
    _measure.ray_env()
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False, runtime_env=LOCAL_RUNTIME_ENV)
    ray.data.DataContext.get_current().enable_progress_bars = False
    store = _measure.ObjectStoreMonitor.for_current_ray()
    cpu = _measure.CpuMonitor()
    with tempfile.TemporaryDirectory() as tmp:
        root = os.path.join(args.workdir, time.strftime("scale_%Y%m%d_%H%M%S")) if args.workdir else tmp
        classifier, deeplab = write_checkpoints(os.path.join(root, "checkpoints"))
        runs = {n: run_stages(root, n, args, classifier, deeplab, cpu, store) for n in sizes}
        first = os.path.join(root, f"n{sizes[0]}")
        floors = {"seeds": seeds_floor(os.path.join(first, "data"), classifier),
                  "masks": crf_floor(os.path.join(first, "data"), os.path.join(first, "seeds"))}
    store.stop()
    cpu.stop()
    ray.shutdown()
    table = report(sizes, runs, floors)
    print_report(sizes, runs, table, floors)
    print(f"load average at the end: {os.getloadavg()}; rows per file {args.rows_per_file}; {args.num_cpus} CPUs")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "runs": runs, "floors": floors, "table": table}, f, indent=1, default=str)


if __name__ == "__main__":
    main()

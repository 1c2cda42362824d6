"""Seed quality per method, trained on one schedule: the table issues #3, #4 and #7 ask for.

For each method: train the classifier (held-out mAP), extract seeds on the train split with and
without patch-affinity refinement, and score both at their best background threshold. A trivial
reference is scored too: every labelled class uniform over its whole image. Finished steps are
skipped on a rerun (each writes a committed stage under --out), so a crashed sweep continues.

Run: python experiments/seed_ablation.py [--out runs/ablation]
         [--methods acr,baseline,acr-from-baseline,mct-v1,mct-v2,mct-v2+acr]
     [--epochs N]
Prints one JSON line per result, then a table; writes <out>/ablation.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import numpy as np
import ray

from ray_wsss.core import checkpoints, codec, commit, metrics, storage
from ray_wsss.core.methods import get_method
from ray_wsss.harness.cluster import LOCAL_RUNTIME_ENV
from ray_wsss.stages import evaluate, extract_seeds, prepare_data, train_acr

FROM_SCRATCH_WEIGHT = get_method("acr").default_consistency(pretrained=False)

# label -> (method, alpha, beta); None = the method's default weights
VARIANTS = {
    "acr": ("acr", None, None),
    "baseline": ("baseline", None, None),
    # The paper's setting: pretrained weights (here the baseline's) and alpha = beta = 125.
    "acr-from-baseline": ("acr", None, None),
    "mct-v1": ("mct-v1", None, None),
    "mct-v2": ("mct-v2", None, None),
    "mct-v2+acr": ("mct-v2", FROM_SCRATCH_WEIGHT, FROM_SCRATCH_WEIGHT),  # ACR's from-scratch weights
}


def train(data: str, out: str, label: str, epochs: int | None) -> dict:
    method, alpha, beta = VARIANTS[label]
    weights = None
    if label == "acr-from-baseline":
        baseline = train(data, out, "baseline", epochs)
        weights = os.path.join(baseline["checkpoint"], checkpoints.MODEL_FILE)
    cfg = train_acr.TrainClassifierConfig(data=data, out=os.path.join(out, label, "train"), method=method,
                                           alpha=alpha, beta=beta, name=label, weights=weights)
    if epochs is not None:
        cfg = dataclasses.replace(cfg, epochs=epochs)
    if commit.is_committed(cfg.out):
        return storage.read_json(os.path.join(cfg.out, "summary.json"))
    return train_acr.run(cfg)


def consistency_curve(train_out: str) -> dict:
    """Lact and Laff of the first and the last epoch (empty for single-view methods)."""
    lines = storage.read_bytes(os.path.join(train_out, "metrics.jsonl")).decode().splitlines()
    rows = [json.loads(line) for line in lines if line.strip()]
    return {f"{term}_epoch{row['epoch']}": row[f"loss_{term}"] for row in (rows[0], rows[-1])
            for term in ("act", "aff") if f"loss_{term}" in row}


def seed_miou(data: str, checkpoint: str, seeds_out: str, refine: bool, split: str) -> dict:
    extract_seeds.run(extract_seeds.ExtractSeedsConfig(checkpoint=checkpoint, data=data, out=seeds_out, refine=refine,
                                                       split=split))
    summary = os.path.join(seeds_out, "eval", "summary.json")
    if os.path.exists(summary):
        return storage.read_json(summary)
    return evaluate.run(evaluate.EvaluateConfig(pred=seeds_out, data=data, kind="seeds", split=split))


def uniform_reference(data: str, split: str) -> dict:
    """Each labelled class scored 1 over the whole image, swept like real seeds."""
    meta = storage.read_json(os.path.join(data, "dataset.json"))
    sweep = metrics.ThresholdSweep(len(meta["class_names"]))
    rows = commit.read_table(data, "samples", columns=["split", "labels", "gt_mask"]).to_pylist()
    for row in rows:
        if row["split"] != split or row["gt_mask"] is None:
            continue
        gt = codec.decode_mask(row["gt_mask"])
        classes = sorted(int(c) for c in row["labels"])
        sweep.add(np.ones((len(classes), *gt.shape), np.float32), classes, gt)
    return sweep.best(meta["class_names"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/ablation")
    parser.add_argument("--data", default=None, help="prepared sample shards (default: <out>/data, synthetic)")
    parser.add_argument("--methods", default=",".join(VARIANTS))
    parser.add_argument("--epochs", type=int, default=None, help="default: the training job's")
    parser.add_argument("--split", default="train", help="split the seeds are extracted for and scored on")
    args = parser.parse_args()
    labels = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(labels) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {sorted(VARIANTS)}")

    started = time.time()
    ray.init(runtime_env=LOCAL_RUNTIME_ENV)
    data = args.data or os.path.join(args.out, "data")
    if not args.data:
        prepare_data.run(prepare_data.PrepareConfig(out=data))

    results = []
    reference = uniform_reference(data, args.split)
    results.append({"method": "uniform reference", "seed_miou_refined": reference["miou"],
                    "threshold_refined": reference["threshold"]})
    print(json.dumps(results[-1]), flush=True)
    for label in labels:
        t0 = time.time()
        trained = train(data, args.out, label, args.epochs)
        checkpoint = os.path.join(args.out, label, "train")
        refined = seed_miou(data, checkpoint, os.path.join(args.out, label, "seeds"), True, args.split)
        raw = seed_miou(data, checkpoint, os.path.join(args.out, label, "seeds-norefine"), False, args.split)
        results.append({
            "method": label, "epochs": trained.get("epochs"), "val_map": (trained.get("val") or {}).get("map"),
            **consistency_curve(checkpoint),
            "seed_miou_refined": refined["miou"], "threshold_refined": refined["threshold"],
            "fp_refined": refined["fp"], "fn_refined": refined["fn"],
            "seed_miou_unrefined": raw["miou"], "threshold_unrefined": raw["threshold"],
            "seconds": round(time.time() - t0, 1)})
        print(json.dumps(results[-1]), flush=True)
    ray.shutdown()

    report = {"split": args.split, "data": data, "results": results, "seconds": round(time.time() - started, 1)}
    storage.write_json(os.path.join(args.out, "ablation.json"), report)
    print(format_table(results))


def format_table(results: list[dict]) -> str:
    def num(value) -> str:
        return "-" if value is None else f"{value:.3f}"

    lines = [f"{'method':<18}{'val mAP':>9}{'seed mIoU':>11}{'(thr)':>7}{'no refine':>11}{'(thr)':>7}"]
    for r in results:
        lines.append(f"{r['method']:<18}{num(r.get('val_map')):>9}{num(r.get('seed_miou_refined')):>11}"
                     f"{num(r.get('threshold_refined')):>7}{num(r.get('seed_miou_unrefined')):>11}"
                     f"{num(r.get('threshold_unrefined')):>7}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

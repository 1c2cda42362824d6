"""Does the pretrain stand-in change what helps? Issue 17's table, on one prepared data set.

For each start (from scratch; from a pretrain stage's backbone) and method (ACR, baseline): train the
classifier with the stage's defaults (which pick ACR's consistency weights and the seeds' refinement by
whether the classifier starts from weights), extract seeds on the train split with and without
patch-affinity refinement, score both at their best threshold, then make pseudo masks from the better of
the two with and without the dense CRF, and score those. Every step is a stage run under --out and is
skipped on a rerun once committed, so a stopped run continues.

Run: python experiments/pretrain_ablation.py --data RUN/data --pretrain RUN/pretrain [--out runs/pretrain_ablation]
         [--starts scratch,pretrain] [--methods acr,baseline] [--epochs N]
Prints one JSON line per (start, method), then a table; writes <out>/pretrain_ablation.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os

import ray

from ray_wsss.core import commit, storage
from ray_wsss.harness.cluster import LOCAL_RUNTIME_ENV
from ray_wsss.stages import evaluate, extract_seeds, make_masks, train_acr

SPLIT = "train"


def _done_or(out: str, summary_file: str, run) -> dict:
    path = os.path.join(out, summary_file)
    return storage.read_json(path) if commit.is_committed(out) and os.path.exists(path) else run()


def scored(pred: str, data: str, kind: str) -> dict:
    out = os.path.join(pred, "eval")
    return _done_or(out, "summary.json", lambda: evaluate.run(evaluate.EvaluateConfig(
        pred=pred, data=data, kind=kind, split=SPLIT, out=out)))


def one(args: argparse.Namespace, start: str, method: str) -> dict:
    root = os.path.join(args.out, start, method)
    weights = os.path.join(args.pretrain, "backbone.safetensors") if start == "pretrain" else None
    cfg = train_acr.TrainClassifierConfig(data=args.data, out=os.path.join(root, "train"), method=method,
                                          weights=weights, name=f"{start}-{method}")
    if args.epochs is not None:
        cfg = dataclasses.replace(cfg, epochs=args.epochs)
    trained = _done_or(cfg.out, "summary.json", lambda: train_acr.run(cfg))
    row = {"start": start, "method": method, "val_map": trained["val"].get("map"), "val_f1": trained["val"].get("f1")}
    seeds = {}
    for refine in (False, True):
        out = os.path.join(root, "seeds-refined" if refine else "seeds")
        _done_or(out, "summary.json", lambda out=out, refine=refine: extract_seeds.run(extract_seeds.ExtractSeedsConfig(
            checkpoint=cfg.out, data=args.data, out=out, refine=refine, split=SPLIT, allow_untrained=True)))
        seeds[refine] = (out, scored(out, args.data, "seeds"))
        row["seeds_refined" if refine else "seeds"] = round(seeds[refine][1]["miou"], 4)
    best_refine = seeds[True][1]["miou"] > seeds[False][1]["miou"]
    seeds_out, seeds_eval = seeds[best_refine]
    row["masks_from"] = "refined" if best_refine else "unrefined"
    for crf in (False, True):
        out = os.path.join(root, "masks-crf" if crf else "masks")
        _done_or(out, "summary.json", lambda out=out, crf=crf: make_masks.run(make_masks.MakeMasksConfig(
            seeds=seeds_out, data=args.data, out=out, split=SPLIT, crf=crf,
            threshold_from=os.path.join(seeds_out, "eval", "summary.json"))))
        row["masks_crf" if crf else "masks"] = round(scored(out, args.data, "masks")["miou"], 4)
    row["seed_threshold"] = seeds_eval["threshold"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="prepared sample shards (e.g. a pipeline run's data)")
    parser.add_argument("--pretrain", required=True, help="a committed pretrain stage's --out")
    parser.add_argument("--out", default="runs/pretrain_ablation")
    parser.add_argument("--starts", default="scratch,pretrain")
    parser.add_argument("--methods", default="acr,baseline")
    parser.add_argument("--epochs", type=int, default=None, help="default: the training job's")
    args = parser.parse_args()
    ray.init(runtime_env=LOCAL_RUNTIME_ENV)
    rows = []
    for start in args.starts.split(","):
        for method in args.methods.split(","):
            rows.append(one(args, start, method))
            print(json.dumps(rows[-1]), flush=True)
    storage.write_json(os.path.join(args.out, "pretrain_ablation.json"), {"args": vars(args), "rows": rows})
    print("| start | method | held-out F1 / mAP | seeds | seeds refined | masks (no CRF) | masks (CRF) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['start']} | {r['method']} | {r['val_f1']:.3f} / {r['val_map']:.3f} | {r['seeds']:.4f} | "
              f"{r['seeds_refined']:.4f} | {r['masks']:.4f} | {r['masks_crf']:.4f} |")


if __name__ == "__main__":
    main()

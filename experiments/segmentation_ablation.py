"""Pseudo-mask and segmentation figures on a finished pipeline run: the tables issues #5 and #6 ask for.

On top of `jobs/pipeline.py --out RUN` (its data, seeds, masks and DeepLab), this scores:
  * pseudo masks with and without the dense CRF, against the seeds' best-threshold mIoU;
  * the DeepLab on the eval split: single-scale, multi-scale + flip, multi-scale + flip + CRF;
  * the same DeepLab recipe trained on the ground-truth masks (the fully supervised upper reference).
Each step writes a committed stage under RUN/ablation/ and is skipped on a rerun.

Run: python experiments/segmentation_ablation.py [--run runs/default] [--scales 0.75 1.0 1.25]
Prints one JSON line per figure, then a table; writes RUN/ablation/segmentation.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import ray

from ray_wsss.core import commit, storage
from ray_wsss.core import config as config_lib
from ray_wsss.harness.cluster import LOCAL_RUNTIME_ENV
from ray_wsss.stages import evaluate, make_masks, segment, train_deeplab


def scored(pred: str, data: str, kind: str, split: str) -> dict:
    summary = os.path.join(pred, "eval", "summary.json")
    if os.path.exists(summary):
        return storage.read_json(summary)
    return evaluate.run(evaluate.EvaluateConfig(pred=pred, data=data, kind=kind, split=split))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/default", help="a finished jobs/pipeline.py --out (local)")
    parser.add_argument("--scales", type=float, nargs="+", default=[0.75, 1.0, 1.25])
    parser.add_argument("--train-split", default="train")
    parser.add_argument("--eval-split", default="val")
    args = parser.parse_args()
    run, out = args.run, os.path.join(args.run, "ablation")
    data = os.path.join(run, "data")
    started = time.time()
    ray.init(runtime_env=LOCAL_RUNTIME_ENV)
    rows = []

    def record(name: str, result: dict) -> None:
        rows.append({"what": name, "miou": result["miou"], **({"threshold": result["threshold"]}
                                                             if result.get("threshold") is not None else {})})
        print(json.dumps(rows[-1]), flush=True)

    record("seeds (best threshold)", scored(os.path.join(run, "seeds"), data, "seeds", args.train_split))
    record("pseudo masks, CRF", scored(os.path.join(run, "masks"), data, "masks", args.train_split))
    no_crf = os.path.join(out, "masks-nocrf")
    make_masks.run(make_masks.MakeMasksConfig(seeds=os.path.join(run, "seeds"), data=data, out=no_crf,
                                              split=args.train_split,
                                    crf=False))
    record("pseudo masks, no CRF", scored(no_crf, data, "masks", args.train_split))

    # The pipeline's DeepLab config, so the ground-truth reference trains on the same recipe.
    deeplab_cfg = config_lib.load(train_deeplab.TrainDeepLabConfig, os.path.join(run, "deeplab", "config.yaml"))
    variants = {
        "DeepLab single-scale": {"scales": (1.0,), "flip": False},
        "DeepLab multi-scale + flip": {"scales": tuple(args.scales), "flip": True},
        "DeepLab multi-scale + flip + CRF": {"scales": tuple(args.scales), "flip": True, "crf": True},
    }
    for name, options in variants.items():
        seg_out = os.path.join(out, "segment-" + name.split(" ", 1)[1].replace(" + ", "-").replace(" ", ""))
        segment.run(segment.SegmentConfig(checkpoint=os.path.join(run, "deeplab"), data=data, out=seg_out,
                                          split=args.eval_split, **options))
        record(name, scored(seg_out, data, "masks", args.eval_split))

    gt_run = os.path.join(out, "deeplab-gt")
    if not commit.is_committed(gt_run):
        train_deeplab.run(dataclasses.replace(deeplab_cfg, gt_masks=True, masks=None, out=gt_run, name="deeplab-gt"))
    gt_seg = os.path.join(out, "segment-gt-single-scale")
    segment.run(segment.SegmentConfig(checkpoint=gt_run, data=data, out=gt_seg, split=args.eval_split,
                                      scales=(1.0,), flip=False))
    record("DeepLab on ground-truth masks, single-scale (upper reference)",
           scored(gt_seg, data, "masks", args.eval_split))
    ray.shutdown()

    storage.write_json(os.path.join(out, "segmentation.json"), {"run": run, "rows": rows,
                                                                 "seconds": round(time.time() - started, 1)})
    width = max(len(r["what"]) for r in rows) + 2
    print(f"{'':<{width}}{'mIoU':>8}")
    for r in rows:
        print(f"{r['what']:<{width}}{r['miou']:>8.4f}")


if __name__ == "__main__":
    main()

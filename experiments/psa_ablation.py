"""PSA figures (issue 15): mIoU on the TRAIN split of the seeds at their best threshold, the CRF masks, PSA's
random-walk masks and the walk + CRF masks, all from the same classifier and the same seeds.

Runs ``jobs/pipeline.py``'s stages with ``masks: {method: psa}`` up to the masks' evaluation under --run
(prepare, classifier, seeds, their evaluation, affinity labels, AffinityNet, walk masks, evaluation; committed
stages are skipped, so a rerun continues), then, under RUN/ablation/, the CRF masks and the walk + CRF masks of
the same seeds (and, with --power-background, the walk from PSA's own background (1 - max)^16 instead of the
seeds' best threshold). Each step is a committed stage, skipped on a rerun.

Run: python experiments/psa_ablation.py [--run runs/psa-ablation] [--num-train 600 --num-val 120]
         [--affinity-epochs 8] [--power-background]
Prints one JSON line per figure, then a table; writes RUN/ablation/psa.json.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import ray
from segmentation_ablation import scored  # experiments/ is this script's directory

from ray_wsss.core import storage
from ray_wsss.harness.cluster import LOCAL_RUNTIME_ENV
from ray_wsss.stages import make_masks, pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/psa-ablation", help="the pipeline's --out (local)")
    parser.add_argument("--num-train", type=int, default=None, help="synthetic train images (default: 600)")
    parser.add_argument("--num-val", type=int, default=None, help="synthetic val images (default: 120)")
    parser.add_argument("--affinity-epochs", type=int, default=None, help="AffinityNet epochs (default: the stage's)")
    parser.add_argument("--power-background", action="store_true",
                        help="also the walk from PSA's background (1 - max)^16")
    args = parser.parse_args()
    run = os.path.abspath(args.run)  # Ray Train workers run in their own directories
    out = os.path.join(run, "ablation")
    started = time.time()
    ray.init(runtime_env=LOCAL_RUNTIME_ENV)

    prepare = {k: v for k, v in {"num_train": args.num_train, "num_val": args.num_val}.items() if v is not None}
    affinity = {"epochs": args.affinity_epochs} if args.affinity_epochs else {}
    cfg = pipeline.PipelineConfig(out=run, until="eval_masks", prepare=prepare, affinity=affinity,
                                  masks={"method": "psa"})
    pipeline.run(cfg)
    data, split = cfg.uri("data"), cfg.train_split()
    threshold_from = os.path.join(cfg.uri("seeds"), "eval", "summary.json")
    rows = []

    def record(name: str, result: dict) -> None:
        rows.append({"what": name, "miou": result["miou"], **({"threshold": result["threshold"]}
                                                             if result.get("threshold") is not None else {})})
        print(json.dumps(rows[-1]), flush=True)

    def masks(name: str, **options) -> dict:
        target = os.path.join(out, name)
        make_masks.run(make_masks.MakeMasksConfig(seeds=cfg.uri("seeds"), data=data, out=target, split=split,
                                                  threshold_from=threshold_from, **options))
        return scored(target, data, "masks", split)

    record("seeds (best threshold)", scored(cfg.uri("seeds"), data, "seeds", split))
    record("CRF masks", masks("masks-crf"))
    record("PSA masks", scored(cfg.uri("masks"), data, "masks", split))
    record("PSA + CRF masks", masks("masks-psa-crf", method="psa+crf", affinity=cfg.uri("affinity")))
    if args.power_background:
        record("PSA masks, background (1 - max)^16", masks("masks-psa-power16", method="psa", background="power",
                                                           power_alpha=16.0, affinity=cfg.uri("affinity")))
    affinity_summary = storage.read_json(os.path.join(cfg.uri("affinity"), "summary.json"))
    ray.shutdown()

    storage.write_json(os.path.join(out, "psa.json"), {"run": run, "rows": rows, "affinity": affinity_summary,
                                                       "seconds": round(time.time() - started, 1)})
    print(f"AffinityNet ({affinity_summary['backbone']}, {affinity_summary['epochs']} epochs): held-out "
          f"{json.dumps(affinity_summary['val'])}; losses {json.dumps(affinity_summary['losses'])}")
    width = max(len(r["what"]) for r in rows) + 2
    print(f"{'':<{width}}{'mIoU':>8}")
    for r in rows:
        print(f"{r['what']:<{width}}{r['miou']:>8.4f}")


if __name__ == "__main__":
    main()

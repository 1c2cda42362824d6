"""Score seeds (best background threshold by sweep) or masks (mIoU) against ground-truth masks.

    python jobs/evaluate.py --pred runs/default/seeds --data runs/default/data --kind seeds
    python jobs/evaluate.py --pred runs/default/masks --data runs/default/data --kind masks

Prints one JSON line last (miou, threshold, fp, fn, per_class) and writes summary.json.
"""
import _cli

from ray_wsss.stages import evaluate

if __name__ == "__main__":
    cfg = _cli.parse_config(evaluate.EvaluateConfig, __doc__)
    _cli.init_ray()
    _cli.print_summary(evaluate.run(cfg))

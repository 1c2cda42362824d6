"""Turn seeds into pixel pseudo masks: a dense CRF (CPU actor pool), or PSA's random walk (GPU or CPU actors).

    python jobs/make_masks.py --seeds runs/default/seeds --data runs/default/data --out runs/default/masks
    python jobs/make_masks.py ... --no-crf --threshold 0.35      # or --crf-iterations 5 ...; YAML: crf: {iterations: 5}
    python jobs/make_masks.py ... --method psa --affinity runs/default/affinity --use-gpu   # AffinityNet's walk
    python jobs/make_masks.py ... --method psa+crf --affinity runs/default/affinity        # the walk, then the CRF

The background threshold defaults to the best one found by `jobs/evaluate.py --kind seeds`.
On clusters, CRF actors ask for the `crf_pool` resource that only CPU nodes advertise.
"""
import _cli

from ray_wsss.stages import make_masks

if __name__ == "__main__":
    cfg = _cli.parse_config(make_masks.MakeMasksConfig, __doc__)
    _cli.init_ray()
    _cli.print_summary(make_masks.run(cfg))

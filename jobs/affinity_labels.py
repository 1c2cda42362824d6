"""Make PSA's affinity labels from seeds: what jobs/train_affinity.py trains AffinityNet on.

    python jobs/affinity_labels.py --seeds runs/default/seeds --data runs/default/data \
        --out runs/default/affinity_labels --split train
    python jobs/affinity_labels.py ... --low-alpha 4 --high-alpha 32  # PSA's own (default: MCTformer's 1 and 12)
    python jobs/affinity_labels.py ... --no-label-crf                 # without the dense CRF on each labelling

Confident foreground, confident background and ignored cells at stride 8, one row per image. On clusters the
actors ask for the `crf_pool` resource that only CPU nodes advertise. A rerun after a crash finishes the
missing files; a committed output is left as it is.
"""
import _cli

from ray_wsss.stages import affinity_labels

if __name__ == "__main__":
    cfg = _cli.parse_config(affinity_labels.AffinityLabelsConfig, __doc__)
    _cli.init_ray()
    _cli.print_summary(affinity_labels.run(cfg))

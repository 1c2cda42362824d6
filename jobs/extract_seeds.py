"""Extract seeds (class maps for each image's labelled classes) from a trained classifier.

    python jobs/extract_seeds.py --checkpoint runs/default/train --data runs/default/data --out runs/default/seeds
    python jobs/extract_seeds.py ... --no-refine          # ACR* (no patch-affinity refinement)
    python jobs/extract_seeds.py ... --scales 0.5 1.0 1.5 --use-gpu

The method (ACR/baseline gradient maps or MCTformer attention maps) is read from the checkpoint.
A rerun after a crash finishes the missing images; a committed output is left as it is.
"""
import _cli

from ray_wsss.stages import extract_seeds

if __name__ == "__main__":
    cfg = _cli.parse_config(extract_seeds.ExtractSeedsConfig, __doc__)
    _cli.init_ray()
    _cli.print_summary(extract_seeds.run(cfg))

"""Train AffinityNet (PSA) on affinity labels with Ray Train DDP: the model jobs/make_masks.py --method psa walks on.

    python jobs/train_affinity.py --labels runs/default/affinity_labels --data runs/default/data \
        --out runs/default/affinity
    python jobs/train_affinity.py ... --backbone resnet50 --backbone-weights s3://b/resnet50.safetensors --crop 448 \
        --lr 0.1 --num-workers 8 --use-gpu                                   # PSA's recipe, on GPUs

A rerun with the same --name resumes from its newest checkpoint; failed workers are restarted up to
--max-failures times.
"""
import _cli

from ray_wsss.stages import train_affinity

if __name__ == "__main__":
    cfg = _cli.parse_config(train_affinity.TrainAffinityConfig, __doc__)
    _cli.init_ray()
    _cli.print_summary(train_affinity.run(cfg))

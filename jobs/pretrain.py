"""Pretrain the classifier's backbone on the whole-object shapes task: a stand-in for ImageNet weights.

    python jobs/pretrain.py --out runs/pretrain --epochs 6     # renders the task into runs/pretrain/data
    python jobs/train_acr.py --weights runs/pretrain/backbone.safetensors   # the classifier starts from it

Give it the classifier's model flags (--model, --patch-size, --depth, ...) so the backbone fits. Rerunning
with the same --out and --name resumes; the rendered task is reused.
"""
import _cli

from ray_wsss.stages import pretrain

if __name__ == "__main__":
    cfg = _cli.parse_config(pretrain.PretrainConfig, __doc__)
    _cli.init_ray()
    _cli.print_summary(pretrain.run(cfg))

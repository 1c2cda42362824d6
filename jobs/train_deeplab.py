"""Train DeepLab-V2 on pseudo masks (or, for the upper reference, on the ground truth) with Ray Train.

    python jobs/train_deeplab.py --masks runs/default/masks --data runs/default/data --out runs/default/deeplab
    python jobs/train_deeplab.py --gt-masks --data runs/default/data --out runs/default/deeplab-gt --name gt
    python jobs/train_deeplab.py --masks s3://b/masks --data s3://b/voc --out s3://b/deeplab --backbone resnet101 \\
        --backbone-weights s3://b/weights/resnet101.pth --crop 321 --lr 2.5e-4 --warmup-epochs 0 \
        --num-workers 4 --use-gpu

Each epoch prints the loss and the single-scale mIoU on the ground truth of --val-split. Rerunning
with the same --out and --name resumes from the newest checkpoint.
"""
import _cli

from ray_wsss.stages import train_deeplab

if __name__ == "__main__":
    cfg = _cli.parse_config(train_deeplab.TrainDeepLabConfig, __doc__)
    _cli.init_ray()
    _cli.print_summary(train_deeplab.run(cfg))

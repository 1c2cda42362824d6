"""Segment a split with a trained DeepLab: multi-scale + flip softmax fusion, optional dense CRF.

    python jobs/segment.py --checkpoint runs/default/deeplab --data runs/default/data --out runs/default/segment
    python jobs/segment.py ... --scales 0.5 0.75 1.0 1.25 1.5 --flip --crf --use-gpu     # the paper's setting
    python jobs/evaluate.py --kind masks --pred runs/default/segment --data runs/default/data

--checkpoint takes train_deeplab's --out (its latest checkpoint) or one checkpoint directory.
Writes the masks table (PNG class ids at each image's size) and a contact sheet; a rerun after a
crash finishes the missing images.
"""
import _cli

from ray_wsss.stages import segment

if __name__ == "__main__":
    cfg = _cli.parse_config(segment.SegmentConfig, __doc__)
    _cli.init_ray()
    _cli.print_summary(segment.run(cfg))

"""Turn PASCAL VOC, MS COCO or the synthetic generator into sample shards (Parquet) on disk or S3.

    python jobs/prepare_data.py --format voc --src s3://bucket/VOCdevkit/VOC2012 --split train_aug,val --out s3://bucket/voc
    python jobs/prepare_data.py --format coco --src coco/train2017 \
        --annotations coco/annotations/instances_train2017.json --split train --out runs/coco
    python jobs/prepare_data.py            # synthetic default data under runs/default/data
"""
import _cli

from ray_wsss.stages import prepare_data

if __name__ == "__main__":
    cfg = _cli.parse_config(prepare_data.PrepareConfig, __doc__)
    _cli.init_ray()
    _cli.print_summary(prepare_data.run(cfg))

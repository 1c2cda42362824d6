"""Train the classifier (ACR, the classification-only baseline, or MCTformer) on Ray Train.

    python jobs/train_acr.py                                  # synthetic default data, CPU, a few minutes
                                                              # (prepared into runs/default/data if missing)
    python jobs/train_acr.py --data s3://b/voc --out s3://b/acr --num-workers 8 --use-gpu --name voc-acr
    python jobs/train_acr.py --method baseline --name baseline   # the ablation: Lcls only

Rerunning with the same --out and --name resumes from the newest checkpoint.
"""
import _cli

from ray_wsss.core import commit
from ray_wsss.stages import prepare_data, train_acr

if __name__ == "__main__":
    cfg = _cli.parse_config(train_acr.TrainClassifierConfig, __doc__)
    _cli.init_ray()
    default_data = train_acr.TrainClassifierConfig().data
    if cfg.data == default_data and not commit.is_committed(cfg.data, cfg.storage):
        print(f"[train] no data at {cfg.data}: preparing the synthetic default data set there first", flush=True)
        prepare_data.run(prepare_data.PrepareConfig(out=cfg.data, storage=cfg.storage))
    _cli.print_summary(train_acr.run(cfg))

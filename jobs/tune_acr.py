"""Sweep ACR's alpha, beta, learning rate and seed layers with Ray Tune; the objective is seed mIoU.

    python jobs/tune_acr.py --data runs/default/data --out runs/tune --num-samples 8 --epochs 6
    python jobs/tune_acr.py --config sweep.yaml --alpha 10 300 --alpha-sampling loguniform \
        --lr 1e-4 5e-4 1e-3 --lr-sampling grid
    python jobs/train_acr.py --config runs/tune/best_config.yaml --epochs 20 --out runs/acr-best

Each trial trains on Ray Train (ASHA stops weak trials on held-out mAP after each epoch), then
extracts seeds on --eval-split and reports their mIoU. Fixed training / seed settings go in the
YAML sections `train:` (TrainClassifierConfig fields, e.g. model, img_size, batch_size) and `seeds:`
(ExtractSeedsConfig fields, e.g. scales). The best trial's settings are written to
<out>/best_config.yaml (for train_acr.py) and <out>/best_seeds.yaml (for extract_seeds.py).
"""
import _cli

from ray_wsss.stages import tune_acr

if __name__ == "__main__":
    cfg = _cli.parse_config(tune_acr.TuneACRConfig, __doc__)
    _cli.init_ray()
    summary = tune_acr.run(cfg)
    best = summary["best"]
    print(f"[tune] best of {summary['trials']} trials ({summary['completed']} completed, "
          f"{summary['stopped_early']} stopped early): seed mIoU {best['seed_miou']:.4f} with "
          f"alpha={best['alpha']:g} beta={best['beta']:g} lr={best['lr']:.3g} layers={best['layers']}", flush=True)
    print(f"[tune] train with it: python jobs/train_acr.py --config {summary['best_config']}", flush=True)
    _cli.print_summary({k: v for k, v in summary.items() if k != "table"})

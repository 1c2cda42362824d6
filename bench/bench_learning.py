"""Does the default classifier recipe learn data it was not tuned on? Held-out F1 / mAP per epoch (issue 17).

Trains the classifier stage's defaults (``TrainClassifierConfig()``: model, input size, optimiser with
timm's weight-decay groups, schedule, method and its consistency weights, augmentation) in-process, with
``experiments/recipe_search.py``'s plain PyTorch loop (the stage's ``TrainStep``, no Ray), on synthetic
variants from ``synthetic.HELDOUT_VARIANTS`` (never used to choose the recipe). With ``--weights`` (e.g.
a pretrain stage's ``backbone.safetensors``) every variant also trains from those weights, so the table
shows both starts side by side. Prints one markdown table: held-out F1 / mAP at each epoch's end and
the first epoch whose F1 reaches --target (issue 17's acceptance: 0.8 within the default epochs).

Full size (the defaults: 12 epochs, 600-image variants, ViT-tiny at 96 px) takes hours of CPU; a
run that only shows the bench works:
    nice -n 15 python bench/bench_learning.py --epochs 1 --num-train 16 --num-val 8 --depth 2 --embed-dim 32 \\
        --num-heads 2 --img-size 32 --patch-size 8 --batch-size 8
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/ and ray_wsss from a checkout

from experiments.recipe_search import Recipe, render, train
from ray_wsss.core.data import synthetic
from ray_wsss.stages.train_acr import TrainClassifierConfig

MODEL_FLAGS = ("model", "img_size", "patch_size", "depth", "embed_dim", "num_heads")  # a smaller model to try it


def stage_recipe(args: argparse.Namespace, weights: str | None) -> Recipe:
    """The classifier stage's defaults, with the sizes given on the command line and ``weights``."""
    given = {k: getattr(args, k) for k in (*MODEL_FLAGS, "epochs", "batch_size") if getattr(args, k) is not None}
    cfg = dataclasses.replace(TrainClassifierConfig(), **given, weights=weights)
    return Recipe(train=cfg, decay_1d=False)  # decay_1d=False: timm's groups, as the stage's create_optimizer_v2


def table(rows: list[dict[str, Any]], target: float) -> str:
    epochs = max(len(r["history"]) for r in rows)
    lines = ["| variant | start | " + " | ".join(f"epoch {e} F1 / mAP" for e in range(1, epochs + 1))
             + f" | first epoch F1 >= {target} |", "|" + "---|" * (epochs + 3)]
    for row in rows:
        cells = [f"{h['val_f1']:.3f} / {h['val_map']:.3f}" for h in row["history"]]
        first = next((h["epoch"] for h in row["history"] if h["val_f1"] >= target), None)
        lines.append(f"| {row['variant']} | {row['start']} | " + " | ".join(cells) + f" | {first or '-'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(synthetic.HELDOUT_VARIANTS),
                        help=f"comma list of held-out variants {synthetic.HELDOUT_VARIANTS}")
    parser.add_argument("--weights", default=None, help="also train every variant from these initial weights")
    parser.add_argument("--starts", default="random,weights",
                        help="which starts to train: random, weights (with --weights), or both")
    parser.add_argument("--target", type=float, default=0.8, help="held-out F1 a variant should reach")
    parser.add_argument("--num-train", type=int, default=None, help="override each variant's train size")
    parser.add_argument("--num-val", type=int, default=None, help="override each variant's held-out size")
    parser.add_argument("--epochs", type=int, default=None, help="default: the stage's")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the stage's")
    parser.add_argument("--model", default=None, help="default: the stage's")
    for flag in ("img-size", "patch-size", "depth", "embed-dim", "num-heads"):
        parser.add_argument(f"--{flag}", type=int, default=None, help="default: the stage's")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    variants = args.variants.split(",")
    tuned_on = sorted(set(variants) - set(synthetic.HELDOUT_VARIANTS))
    if tuned_on:
        parser.error(f"{tuned_on} are not held-out variants; choose from {synthetic.HELDOUT_VARIANTS}")
    torch.set_num_threads(args.threads)

    starts = {"random": None, **({"weights": args.weights} if args.weights else {})}
    starts = {name: weights for name, weights in starts.items() if name in args.starts.split(",")}
    if not starts:
        parser.error(f"--starts {args.starts!r} leaves nothing to train (weights needs --weights)")
    rows = []
    for variant in variants:
        data = render(variant, args.num_train, args.num_val)
        for start, weights in starts.items():
            def log(line: str, variant: str = variant, start: str = start) -> None:
                print(f"[{variant} {start}] {line}", file=sys.stderr, flush=True)

            _, history = train(stage_recipe(args, weights), data, log=log)
            rows.append({"variant": variant, "start": start, "history": history})
    print(json.dumps({"args": vars(args)}))
    print(table(rows, args.target))


if __name__ == "__main__":
    main()

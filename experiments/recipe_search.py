"""Screen classifier training recipes fast: a plain single-process PyTorch loop (no Ray) on synthetic
variants rendered in memory.

The loop is the classifier stage's, minus Ray: the method's model (``get_method(...).build_model``),
``stages.train_acr.TrainStep`` (ACR's two views and losses, the baseline's, MCTformer's),
``build_optimizer`` and the poly schedule, ``ClassifierTransform``'s augmentation and the held-out
mAP / F1 of ``ray_wsss.core.metrics``, per epoch with its wall and CPU seconds. Data come from
``ray_wsss.core.data.synthetic.VARIANTS``: tune only on ``DEV_VARIANTS``; ``HELDOUT_VARIANTS`` check that
a choice generalises. After training, ``--seed-images N`` scores seeds (``Method.seed_scores``,
refined and not) on N train images against their masks, at the best background threshold, next to
the trivial reference (each labelled class uniform over its image).

Run (one thread, low priority; a result line per run is appended to --results):
    nice -n 15 python experiments/recipe_search.py --variants default --methods acr,baseline \\
        --model vit_tiny_r_s16_p8_224 --patch-size 8 --epochs 6 --results runs/recipe/results.jsonl
Prints one JSON line per epoch and one summary line per (variant, method).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from timm.optim import param_groups_weight_decay

from ray_wsss.core import metrics
from ray_wsss.core.data import shapes, synthetic
from ray_wsss.core.data.augment import ClassifierTransform, multi_hot, normalize
from ray_wsss.core.methods import get_method
from ray_wsss.core.methods.acr import ACRLossConfig, classification_loss
from ray_wsss.core.methods.views import draw_view
from ray_wsss.core.metrics import ThresholdSweep
from ray_wsss.core.optim import build_optimizer, poly_schedule
from ray_wsss.stages.extract_seeds import ExtractSeedsConfig
from ray_wsss.stages.train_acr import TrainClassifierConfig, TrainStep

# --variants names of the whole-object pretraining task: outline only, or outline and hue
SHAPES = {"shapes": shapes.ShapesConfig(), "shapes-hue": shapes.ShapesConfig(hue_cue=True)}


@dataclasses.dataclass
class Recipe:
    """What a run trains with: the stage's config (model, optimiser, schedule, method, batch size)
    plus the knobs the stage does not have yet."""

    train: TrainClassifierConfig
    label_smoothing: float = 0.0                 # multi-hot targets y -> y (1 - e) + e / 2
    crop_scale: tuple[float, float] = (0.35, 1.0)
    decay_1d: bool = True                        # False: no weight decay on norms, biases, pos/cls tokens (timm groups)
    aux_max_weight: float = 0.0                  # > 0: add the patch-max auxiliary loss (PatchMaxHead) with this weight
    aux_epochs: int | None = None                # epochs that use it (None: all)


class PatchMaxHead(torch.nn.Module):
    """A training-only auxiliary: a linear class score per patch token, max over patches (multiple-
    instance learning), on the tokens the final norm outputs. It sends each patch's gradient straight
    to the patch that holds the evidence, which the class token's near-uniform attention of a
    randomly initialised ViT does not. The class token, its attention and the logits are unchanged.
    """

    def __init__(self, model: torch.nn.Module, num_classes: int):
        super().__init__()
        self.linear = torch.nn.Linear(model.vit.embed_dim, num_classes)
        self.prefix = model.num_prefix_tokens
        self.captured: list[torch.Tensor] = []
        model.vit.norm.register_forward_hook(self._capture)

    def _capture(self, module: torch.nn.Module, args: Any, output: torch.Tensor) -> None:
        if module.training:  # the model's mode: evaluation forwards are not training evidence
            self.captured.append(output)

    def loss(self, labels: torch.Tensor) -> torch.Tensor:
        """Mean over the forwards since the last call (both views for ACR)."""
        losses = [classification_loss(self.linear(tokens[:, self.prefix:]).amax(dim=1), labels)
                  for tokens in self.captured]
        self.captured = []
        return torch.stack(losses).mean()


@dataclasses.dataclass
class VariantData:
    images: dict[str, list[np.ndarray]]          # split -> uint8 [H, W, 3]
    labels: dict[str, list[list[int]]]           # split -> foreground class ids
    masks: dict[str, list[np.ndarray]]
    num_classes: int                             # with background


def render(name: str, num_train: int | None = None, num_val: int | None = None) -> VariantData:
    """A synthetic WSSS variant, or ``shapes``: the whole-object pretraining task."""
    if name in SHAPES:
        cfg = SHAPES[name]
        names, scene = shapes.class_names(), shapes.render_scene
    else:
        cfg = synthetic.VARIANTS[name]
        names = synthetic.class_names(cfg)
        scene = _wsss_scene
    cfg = dataclasses.replace(cfg, num_train=num_train or cfg.num_train, num_val=num_val or cfg.num_val)
    data = VariantData({}, {}, {}, len(names))
    for split, count in {"train": cfg.num_train, "val": cfg.num_val}.items():
        images, masks = zip(*(scene(cfg, split, i) for i in range(count)))
        data.images[split], data.masks[split] = list(images), list(masks)
        data.labels[split] = [sorted(int(c) for c in np.unique(m) if c) for m in masks]
    return data


def _wsss_scene(cfg: synthetic.SyntheticConfig, split: str, index: int) -> tuple[np.ndarray, np.ndarray]:
    scene = synthetic.render_scene(cfg, split, index)
    return scene.image, scene.mask


def _targets(labels: list[list[int]], num_classes: int) -> torch.Tensor:
    return torch.from_numpy(np.stack([multi_hot(classes, num_classes) for classes in labels]))


def _eval_inputs(images: list[np.ndarray], img_size: int) -> torch.Tensor:
    """The stage's evaluation input: a plain resize to S x S (ClassifierTransform, train=False)."""
    return torch.stack([F.interpolate(normalize(rgb)[None], size=(img_size, img_size), mode="bilinear",
                                      antialias=True, align_corners=False)[0] for rgb in images])


@torch.no_grad()
def held_out(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, batch_size: int) -> dict[str, float]:
    model.eval()
    logits = torch.cat([model(inputs[i:i + batch_size]).logits for i in range(0, len(inputs), batch_size)])
    model.train()
    logits, targets_np = logits.numpy(), targets.numpy()
    return {"map": metrics.mean_average_precision(logits, targets_np), **metrics.f1_scores(logits, targets_np)}


def train(recipe: Recipe, data: VariantData, log: Any = print) -> tuple[torch.nn.Module, list[dict]]:
    """Trains one classifier; returns it and one row per epoch (held-out metrics, seconds)."""
    cfg = recipe.train
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    num_fg = data.num_classes - 1
    method = get_method(cfg.method)
    model = method.build_model(cfg.vit_config(), num_fg)
    alpha, beta = cfg.consistency_weights()
    two_views = alpha > 0 or beta > 0
    step_module = TrainStep(model, method, ACRLossConfig(alpha=alpha, beta=beta, layers=cfg.acr_layers)
                            if two_views else None, cfg.patch_size)
    aux = PatchMaxHead(model, num_fg) if recipe.aux_max_weight > 0 else None
    trained = torch.nn.ModuleList([model] + ([aux] if aux else []))
    vit = getattr(model, "vit", model)
    no_decay = [f"*{name}" for name in vit.no_weight_decay()]  # timm's names, under our module prefix
    params = (param_groups_weight_decay(trained, cfg.weight_decay, no_weight_decay_list=no_decay)
              if not recipe.decay_1d else trained.parameters())
    optimizer = build_optimizer(cfg.optimizer, params, cfg.lr, cfg.weight_decay, cfg.momentum)
    images, targets = data.images["train"], _targets(data.labels["train"], data.num_classes)
    steps_per_epoch = max(1, len(images) // cfg.batch_size)
    scheduler = poly_schedule(optimizer, steps_per_epoch * cfg.epochs,
                              warmup_steps=int(cfg.warmup_epochs * steps_per_epoch))
    augment = ClassifierTransform(cfg.img_size, data.num_classes, train=True, crop_scale=recipe.crop_scale).transform
    val_inputs = _eval_inputs(data.images["val"], cfg.img_size)
    val_targets = _targets(data.labels["val"], data.num_classes)
    view_rng = torch.Generator().manual_seed(cfg.seed * 1000)
    smoothing = recipe.label_smoothing
    history = []
    for epoch in range(cfg.epochs):
        wall, cpu = time.perf_counter(), time.process_time()
        order = rng.permutation(len(images))
        sums: dict[str, float] = {}
        for step in range(steps_per_epoch):
            index = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
            batch = torch.stack([augment(images[i]) for i in index])
            labels = targets[index] * (1 - smoothing) + smoothing / 2
            view = draw_view(cfg.view_set, view_rng, cfg.view_scales) if two_views else None
            losses = step_module(batch, labels, view)
            if aux is not None:
                aux_loss = aux.loss(labels)
                if recipe.aux_epochs is None or epoch < recipe.aux_epochs:
                    losses["aux"] = aux_loss
                    losses["total"] = losses["total"] + recipe.aux_max_weight * aux_loss
            optimizer.zero_grad(set_to_none=True)
            losses["total"].backward()
            optimizer.step()
            scheduler.step()
            for key, value in losses.items():
                sums[key] = sums.get(key, 0.0) + float(value.detach())
        train_wall = time.perf_counter() - wall
        row = {"epoch": epoch + 1, **{f"loss_{k}": round(v / steps_per_epoch, 4) for k, v in sums.items()},
               **{f"val_{k}": round(v, 4) for k, v in held_out(model, val_inputs, val_targets, 64).items()},
               "train_s": round(train_wall, 1), "epoch_s": round(time.perf_counter() - wall, 1),
               "epoch_cpu_s": round(time.process_time() - cpu, 1)}
        history.append(row)
        log(json.dumps(row))
    return model, history


def cnn_probe(data: VariantData, epochs: int, crop_scale: tuple[float, float], img_size: int = 96,
              log: Any = print) -> list[dict]:
    """A diagnostic, not a candidate: three conv layers and a global max pool, on the same inputs,
    augmentation and loss. If it learns a variant the ViT does not, the evidence is in the pixels."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 32, 5, 2, 2), torch.nn.ReLU(), torch.nn.Conv2d(32, 64, 3, 2, 1), torch.nn.ReLU(),
        torch.nn.Conv2d(64, 64, 3, 1, 1), torch.nn.ReLU(), torch.nn.AdaptiveMaxPool2d(1), torch.nn.Flatten(),
        torch.nn.Linear(64, data.num_classes - 1))
    optimizer = torch.optim.AdamW(net.parameters(), 1e-3, weight_decay=0.05)
    augment = ClassifierTransform(img_size, data.num_classes, train=True, crop_scale=crop_scale).transform
    images, targets = data.images["train"], _targets(data.labels["train"], data.num_classes)
    val_inputs, val_targets = _eval_inputs(data.images["val"], img_size), _targets(data.labels["val"], data.num_classes)
    history = []
    for epoch in range(epochs):
        cpu, order = time.process_time(), rng.permutation(len(images))
        for step in range(len(images) // 32):
            index = order[step * 32:(step + 1) * 32]
            loss = classification_loss(net(torch.stack([augment(images[i]) for i in index])), targets[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            logits = net(val_inputs).numpy()
        row = {"epoch": epoch + 1, "val_map": round(metrics.mean_average_precision(logits, val_targets.numpy()), 4),
               "val_f1": round(metrics.f1_scores(logits, val_targets.numpy())["f1"], 4),
               "epoch_cpu_s": round(time.process_time() - cpu, 1)}
        history.append(row)
        log(json.dumps(row))
    return history


def seed_quality(model: torch.nn.Module, method: str, data: VariantData, count: int) -> dict[str, float]:
    """Seed mIoU (best background threshold) on the first ``count`` train images: refined, not refined,
    and the trivial reference."""
    model.eval()
    scorer = get_method(method)
    images, classes, masks = (data.images["train"][:count], data.labels["train"][:count],
                              data.masks["train"][:count])
    result = {}
    for refine in (True, False):
        sweep = ThresholdSweep(data.num_classes)
        for start in range(0, count, 16):
            part = slice(start, start + 16)
            stage = ExtractSeedsConfig(refine=refine)  # the seeds stage's maps and test-time augmentation
            scores = scorer.seed_scores(model, images[part], classes[part], stage.map_options(), stage.tta_config())
            for score, labels, mask in zip(scores, classes[part], masks[part]):
                sweep.add(score, labels, mask)
        result["seed_miou" if refine else "seed_miou_unrefined"] = round(sweep.best()["miou"], 4)
    trivial = ThresholdSweep(data.num_classes)
    for labels, mask in zip(classes, masks):
        trivial.add(np.ones((len(labels), *mask.shape), np.float32), labels, mask)
    result["seed_miou_trivial"] = round(trivial.best()["miou"], 4)
    return result


def table(results: str) -> str:
    """A markdown table of the runs in a --results file."""
    lines = ["| variant | method | recipe | epochs | held-out F1 | mAP | first epoch F1 >= 0.8 | "
             "seed mIoU (refined / not / trivial) | s/epoch wall | CPU s/epoch |", "|" + "---|" * 10]
    for line in open(results):
        run = json.loads(line)
        final = run["final"]
        seeds = (" / ".join(f"{run[k]:.3f}" for k in ("seed_miou", "seed_miou_unrefined", "seed_miou_trivial"))
                 if "seed_miou" in run else "")
        lines.append(f"| {run['variant']} | {run['method']} | {run['tag']} | {final['epoch']} | "
                     f"{final['val_f1']:.3f} | {final['val_map']:.3f} | {run['first_epoch_f1_0.8'] or '-'} | {seeds} | "
                     f"{run['mean_epoch_s']} | {run['mean_epoch_cpu_s']} |")
    return "\n".join(lines)


def _log(prefix: str, line: str) -> None:
    print(prefix + line, flush=True)


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(","))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="default",
                        help=f"comma list of {sorted(synthetic.VARIANTS)} or {sorted(SHAPES)} (pretraining task)")
    parser.add_argument("--methods", default="acr", help="comma list of acr, baseline, mct-v1, mct-v2")
    parser.add_argument("--num-train", type=int, default=None, help="override the variant's train size")
    parser.add_argument("--num-val", type=int, default=None)
    parser.add_argument("--model", default="vit_tiny_patch16_224")
    parser.add_argument("--img-size", type=int, default=96)
    parser.add_argument("--patch-size", type=int, default=16)
    parser.add_argument("--depth", type=int, default=None)
    parser.add_argument("--embed-dim", type=int, default=None)
    parser.add_argument("--num-heads", type=int, default=None)
    parser.add_argument("--weights", default=None, help="initial weights (e.g. from --save-weights)")
    parser.add_argument("--alpha", type=float, default=None)
    parser.add_argument("--beta", type=float, default=None)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--warmup-epochs", type=float, default=1.0)
    parser.add_argument("--optimizer", default="adamw")
    parser.add_argument("--label-smoothing", type=float, default=0.0)
    parser.add_argument("--crop-scale", type=_floats, default=(0.35, 1.0))
    parser.add_argument("--view-scales", type=_floats, default=(1.0, 1.25))
    parser.add_argument("--no-decay-1d", action="store_true", help="timm param groups: no decay on norms/biases/tokens")
    parser.add_argument("--aux-max", type=float, default=0.0, help="weight of the patch-max auxiliary loss")
    parser.add_argument("--aux-epochs", type=int, default=None, help="epochs with the auxiliary loss (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seed-images", type=int, default=0, help="score seeds on this many train images")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--save-weights", default=None, help="save the last model's state dict here")
    parser.add_argument("--tag", default="", help="label stored with the results")
    parser.add_argument("--results", default=None, help="append one JSON line per run to this file")
    parser.add_argument("--cnn-probe", action="store_true", help="train the CNN diagnostic instead (cnn_probe)")
    parser.add_argument("--table", metavar="RESULTS", help="print the runs of a --results file as a table and exit")
    args = parser.parse_args()
    if args.table:
        print(table(args.table))
        return
    torch.set_num_threads(args.threads)

    for variant in args.variants.split(","):
        data = render(variant, args.num_train, args.num_val)
        if args.cnn_probe:
            cnn_probe(data, args.epochs, args.crop_scale, args.img_size, log=partial(_log, f"[{variant} cnn] "))
            continue
        for method in args.methods.split(","):
            recipe = Recipe(
                train=TrainClassifierConfig(
                    method=method, model=args.model, img_size=args.img_size, patch_size=args.patch_size,
                    depth=args.depth, embed_dim=args.embed_dim, num_heads=args.num_heads, weights=args.weights,
                    epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                    warmup_epochs=args.warmup_epochs, optimizer=args.optimizer, alpha=args.alpha, beta=args.beta,
                    view_scales=args.view_scales, seed=args.seed),
                label_smoothing=args.label_smoothing, crop_scale=args.crop_scale, decay_1d=not args.no_decay_1d,
                aux_max_weight=args.aux_max, aux_epochs=args.aux_epochs)
            prefix = f"[{variant} {method}{' ' + args.tag if args.tag else ''}] "
            model, history = train(recipe, data, log=partial(_log, prefix))
            summary = {"variant": variant, "method": method, "tag": args.tag, "args": vars(args),
                       "final": history[-1], "history": history,
                       "best_f1": max(r["val_f1"] for r in history),
                       "first_epoch_f1_0.8": next((r["epoch"] for r in history if r["val_f1"] >= 0.8), None),
                       "mean_epoch_s": round(float(np.mean([r["epoch_s"] for r in history])), 1),
                       "mean_epoch_cpu_s": round(float(np.mean([r["epoch_cpu_s"] for r in history])), 1)}
            if args.seed_images:
                summary.update(seed_quality(model, method, data, args.seed_images))
            if args.save_weights:
                torch.save(model.state_dict(), args.save_weights)
            print(prefix + "summary " + json.dumps({k: v for k, v in summary.items() if k not in ("args", "history")}),
                  flush=True)
            if args.results:
                os.makedirs(os.path.dirname(os.path.abspath(args.results)), exist_ok=True)
                with open(args.results, "a") as out:
                    out.write(json.dumps(summary) + "\n")


if __name__ == "__main__":
    main()

"""Throughput of the ACR class-map gradients on the batches the seeds stage really forms, at its thread count.

The seeds stage hands each actor (1 CPU, so 1 thread) ``batch_size`` records at a time; the test-time
augmentation groups them by exact view size and adds each view's flip, so on images of varied sizes a
forward batch holds only a few views. This bench decodes synthetic images (the generator's size range, or
``--size`` for all-equal sizes), cuts them into the stage's record batches, and runs every view batch the
stage would form (:func:`ray_wsss.core.seeds.tta.seed_scores_batch` with the strategy under test as the class
map function) through each strategy, interleaved over ``--repeats`` rounds (best CPU time kept):

  forward      no-grad forward of the same view batches: the floor
  naive        one forward per image, one backward per (image, class) (the authors' loop)
  pairs        each image repeated once per class; one forward, one backward of the sum
  slots_loop   one forward; one backward per class slot (slot s = every image's s-th class)
  slots_vmap   one forward; the slot selectors in one vmapped VJP (the library default)

Prints CPU ms per image, each strategy / forward (the floor ratio) and naive / strategy, the mean view
batch, and the maps' max |difference| from naive. CPU time (all threads of this process) barely depends on
other load; wall time is printed too.

Run: python bench/bench_seed_grad.py [--images 64] [--threads 1] [--record-batch 8] [--size S] [--no-refine]
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from functools import partial

import numpy as np
import torch

from ray_wsss.core import codec
from ray_wsss.core.data import synthetic
from ray_wsss.core.models.vit import AttentionViT, ViTConfig
from ray_wsss.core.seeds.acr_maps import ACRMapConfig, class_maps, naive_class_maps
from ray_wsss.core.seeds.tta import TTAConfig, seed_scores_batch


def forward_only(model: AttentionViT, images: torch.Tensor, classes) -> list[torch.Tensor]:
    """The floor: a no-grad forward of the view batch (zero maps, so the TTA around it still runs)."""
    with torch.no_grad():
        model(images)
    grid = [s // p for s, p in zip(images.shape[-2:], model.patch_size)]
    return [images.new_zeros(len(c), *grid) for c in classes]


def synthetic_images(count: int, size: int | None, seed: int = 0) -> tuple[list[np.ndarray], list[list[int]]]:
    """Decoded synthetic images and their labels (the generator's size range unless ``size`` fixes both sides)."""
    cfg = synthetic.SyntheticConfig(seed=seed, **({"min_size": size, "max_size": size} if size else {}))
    rows = [synthetic.generate_sample(cfg, "train", i) for i in range(count)]
    return [codec.decode_image(r["image"]) for r in rows], [list(r["labels"]) for r in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_tiny_patch16_224")
    parser.add_argument("--depth", type=int, default=12)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--size", type=int, default=None,
                        help="all images SIZE x SIZE (default: the generator's range)")
    parser.add_argument("--record-batch", type=int, default=8, help="records per UDF call (the stage's batch_size)")
    parser.add_argument("--flip", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--refine", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the stage's 1-CPU actors: 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    num_classes = len(synthetic.class_names()) - 1
    model = AttentionViT(ViTConfig(model_name=args.model, depth=args.depth), num_classes).eval()
    images, labels = synthetic_images(args.images, args.size)
    batches = [(images[i:i + args.record_batch], labels[i:i + args.record_batch])
               for i in range(0, len(images), args.record_batch)]
    tta = TTAConfig(flip=args.flip)
    cfg = ACRMapConfig(refine=args.refine)
    view_batches: list[int] = []

    def counting(images, classes):
        view_batches.append(len(images))
        return forward_only(model, images, classes)

    for imgs, labs in batches:
        seed_scores_batch(lambda m, x, c: counting(x, c), model, imgs, labs, tta)
    strategies: dict[str, Callable] = {
        "forward": lambda m, x, c: forward_only(m, x, c),
        "naive": lambda m, x, c: naive_class_maps(m, x, c, cfg),
        **{s: partial(lambda m, x, c, s: class_maps(m, x, c, cfg, strategy=s), s=s)
           for s in ("pairs", "slots_loop", "slots_vmap")},
    }

    def run(fn) -> list[np.ndarray]:
        return [m for imgs, labs in batches for m in seed_scores_batch(fn, model, imgs, labs, tta)]

    reference = run(strategies["naive"])
    for name, fn in strategies.items():
        if name != "forward":
            error = max(float(np.abs(a - b).max()) for a, b in zip(run(fn), reference))
            print(f"{name:>11}: max |diff| vs naive {error:.1e}")
    best = {name: (float("inf"), float("inf")) for name in strategies}
    for _ in range(args.repeats):  # interleaved rounds, best of each: robust to other load
        for name, fn in strategies.items():
            wall, cpu = time.perf_counter(), time.process_time()
            run(fn)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            best[name] = (min(best[name][0], wall), min(best[name][1], cpu))
    pairs = sum(len(row) for row in labels)
    sizes = f"{args.size}px" if args.size else "sizes of the generator"
    print(f"{args.model} depth {args.depth}, {len(images)} images ({sizes}), "
          f"{pairs / len(images):.2f} classes per image, record batches of {args.record_batch}, flip {args.flip}, "
          f"refine {args.refine}, {torch.get_num_threads()} thread(s); mean view batch {np.mean(view_batches):.2f} "
          f"({len(view_batches)} forwards)")
    floor = best["forward"][1]
    for name, (wall, cpu) in best.items():
        print(f"{name:>11}: {1000 * cpu / len(images):7.2f} CPU ms/image ({1000 * wall / len(images):7.2f} wall), "
              f"{cpu / floor:5.2f}x the forward floor" + ("" if name in ("forward", "naive") else
                                                          f", naive / {name}: {best['naive'][1] / cpu:4.2f}x"))


if __name__ == "__main__":
    main()

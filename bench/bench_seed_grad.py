"""Throughput of the ACR class-map gradients: the authors' per-image, per-class loop vs batched.

Same model, same multi-label batch for every strategy; prints images/s and the batched/naive
ratios. Strategies:
  naive        batch size 1: one forward per image, one backward per (image, class) (authors' code)
  pairs        (a) each image repeated once per class; one forward, one backward of the sum
  pairs_vmap   (b) one forward of the batch; one vmapped VJP with a one-hot [B, C] selector per pair
  slots_loop   one forward; one backward per class slot (slot s = every image's s-th class)
  slots_vmap   one forward; the slot selectors in one vmapped VJP (the library default)

Run: python bench/bench_seed_grad.py [--img-size 96] [--depth 12] [--batch 16] [--threads N]
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from ray_wsss.core.models.vit import AttentionViT, ViTConfig
from ray_wsss.core.seeds import acr_maps
from ray_wsss.core.seeds.acr_maps import ACRMapConfig, class_maps, naive_class_maps


def pairs_vmap_maps(model: AttentionViT, images: torch.Tensor, classes: list[list[int]],
                    cfg: ACRMapConfig) -> list[torch.Tensor]:
    """Strategy (b) as first specified: the vmap runs over pairs, each selector picks one (image, class)."""
    with torch.enable_grad():
        out = model(images.clone().requires_grad_(True))
        pairs = [(i, c - 1) for i, row in enumerate(classes) for c in row]
        slots = torch.full((len(pairs), len(classes)), -1, dtype=torch.long)
        for p, (i, logit) in enumerate(pairs):
            slots[p, i] = logit
        maps = acr_maps._slot_gradient_maps(out, slots, cfg, batched=True)  # [pairs, B, Np]
        per_pair = maps[torch.arange(len(pairs)), torch.tensor([i for i, _ in pairs])]
        if cfg.refine:
            affinity = acr_maps._patch_affinity(out, cfg)[torch.tensor([i for i, _ in pairs])]
            per_pair = acr_maps._refine(per_pair[:, None], affinity)[:, 0]
    return [m.reshape(len(m), *out.grid) for m in per_pair.split([len(r) for r in classes])]


def best_times(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, tuple[float, float]]:
    """Best (wall, process CPU) seconds per run over ``repeats`` rounds, the runs interleaved per round.

    Interleaving and the minimum make the ratios robust to other load on a shared machine; the CPU
    time (all threads of this process) is reported too because it barely depends on that load.
    """
    best = {name: (float("inf"), float("inf")) for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            best[name] = (min(best[name][0], wall), min(best[name][1], cpu))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_tiny_patch16_224")
    parser.add_argument("--img-size", type=int, default=96)
    parser.add_argument("--depth", type=int, default=12)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--num-classes", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = AttentionViT(ViTConfig(model_name=args.model, img_size=args.img_size, depth=args.depth),
                         args.num_classes).eval().to(device)
    images = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device)
    pattern = [[3], [1, 7], [2, 5, 9], [4, 11], [6, 12, 15, 18], [8, 10]]  # 14 classes / 6 images
    classes = [pattern[i % len(pattern)] for i in range(args.batch)]
    cfg = ACRMapConfig()

    reference = naive_class_maps(model, images, classes, cfg)
    runs = {
        "naive": lambda: naive_class_maps(model, images, classes, cfg),
        "pairs": lambda: class_maps(model, images, classes, cfg, strategy="pairs"),
        "pairs_vmap": lambda: pairs_vmap_maps(model, images, classes, cfg),
        "slots_loop": lambda: class_maps(model, images, classes, cfg, strategy="slots_loop"),
        "slots_vmap": lambda: class_maps(model, images, classes, cfg, strategy="slots_vmap"),
    }
    pair_count = sum(len(r) for r in classes)
    print(f"{args.model} depth {args.depth}, {args.img_size}px, batch {args.batch} images / {pair_count} "
          f"(image, class) pairs ({pair_count / args.batch:.2f} classes per image), {device}, "
          f"{torch.get_num_threads()} threads, grad_layers={cfg.grad_layers}, refine={cfg.refine}")
    for name, fn in runs.items():  # also the warm-up
        error = max(float((a - b).abs().max()) for a, b in zip(fn(), reference))
        print(f"{name:>11}: max |diff| vs naive {error:.1e}")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = best_times({name: (lambda fn=fn: (fn(), sync())) for name, fn in runs.items()}, args.repeats)
    for name, (wall, cpu) in times.items():
        print(f"{name:>11}: {args.batch / wall:8.1f} images/s wall ({wall * 1000:7.1f} ms/batch), "
              f"{args.batch / cpu:8.1f} images/CPU-s")
    for name, (wall, cpu) in times.items():
        if name != "naive":
            print(f"{name:>11} / naive: {times['naive'][0] / wall:5.2f}x wall, {times['naive'][1] / cpu:5.2f}x CPU time")


if __name__ == "__main__":
    main()

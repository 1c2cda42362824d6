"""PSA's random walk against the dense CRF, per image, and the walk's memory, on 500 x 375 images.

    python bench/bench_random_walk.py --images 4 --backbone resnet50

One CPU thread (one CPU actor), the same synthetic images and seeds for every method. Prints:
  * per-image seconds of the CRF masks' work (``refine.crf.make_mask``: softmax unaries + pydensecrf),
    of the random walk alone (``psa.random_walk`` on the pooled seeds), and of PSA's whole inference
    (``psa.infer_mask``: AffinityNet forward, pair affinities, walk, upsampling), and their ratios to the CRF;
  * in fresh processes, the peak resident memory added by the sparse walk and by PSA's dense N x N
    matrix power (infer_aff.py, float32), their seconds, and the peak of a whole ``infer_mask`` process.
The model is randomly initialised: its cost does not depend on its weights.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

HEIGHT, WIDTH = 375, 500  # a typical VOC image: a 47 x 63 grid at stride 8


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:  # Linux: "VmRSS:   1234 kB"
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def peak_rss_mb() -> float:
    """The process's peak resident memory since it started or since :func:`reset_peak`."""
    return _status_mb("VmHWM")


def reset_peak() -> float:
    """Reset the peak to the current resident memory (Linux >= 4.0) and return it. Without the reset, the
    transient peak of importing torch, larger than the walk's, would hide what the walk adds."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_mb("VmRSS")


def scenes(count: int) -> list[tuple[np.ndarray, np.ndarray, list[int]]]:
    """(image, seeds, classes) of synthetic scenes resized to 500 x 375, seeds = blurred ground truth."""
    from bench_crf import blurred_seeds  # bench/ is this script's directory; imported here: it imports Ray

    from ray_wsss.core.data.synthetic import SyntheticConfig, render_scene

    cfg = SyntheticConfig(num_train=count, min_size=320, max_size=512)
    rng = np.random.default_rng(0)
    out = []
    for index in range(count):
        scene = render_scene(cfg, "train", index)
        image = np.array(Image.fromarray(scene.image).resize((WIDTH, HEIGHT), Image.BILINEAR))  # writable
        mask = np.array(Image.fromarray(scene.mask).resize((WIDTH, HEIGHT), Image.NEAREST))
        classes = sorted(int(c) for c in np.unique(mask) if c != 0)
        out.append((image, blurred_seeds(mask, classes, rng).astype(np.float32), classes))
    return out


def _walk_inputs(logt: int):
    import torch

    from ray_wsss.core import affinity_pairs

    grid_h, grid_w = affinity_pairs.grid_size(HEIGHT, WIDTH)
    _, second = affinity_pairs.pair_indices(grid_h, grid_w, 5)
    generator = torch.Generator().manual_seed(0)
    return torch.rand(second.shape, generator=generator), torch.rand(3, grid_h, grid_w, generator=generator)


def measure_sparse_walk(logt: int) -> dict:
    """In a fresh process: the sparse walk's seconds and the peak memory it adds."""
    import torch

    from ray_wsss.core.refine import psa

    torch.set_num_threads(1)
    affinity, scores = _walk_inputs(logt)
    before = reset_peak()
    start = time.perf_counter()
    psa.random_walk(scores, affinity, 5, 8, logt)
    return {"seconds": time.perf_counter() - start, "added_peak_mb": peak_rss_mb() - before}


def measure_dense_walk(logt: int) -> dict:
    """In a fresh process: infer_aff.py's dense float32 walk (A, T = A / A.sum(0), logt squarings, cam @ T)."""
    import torch

    from ray_wsss.core import affinity_pairs

    torch.set_num_threads(1)
    affinity, scores = _walk_inputs(logt)
    grid_h, grid_w = scores.shape[1:]
    count = grid_h * grid_w
    before = reset_peak()
    start = time.perf_counter()
    first, second = (torch.from_numpy(i) for i in affinity_pairs.pair_indices(grid_h, grid_w, 5))
    first = first.expand_as(second)
    dense = torch.eye(count)
    dense[first.reshape(-1), second.reshape(-1)] = affinity.reshape(-1)
    dense[second.reshape(-1), first.reshape(-1)] = affinity.reshape(-1)
    dense = dense ** 8
    transition = dense / dense.sum(0, keepdim=True)
    for _ in range(logt):
        transition = transition @ transition
    scores.reshape(3, -1) @ transition
    return {"seconds": time.perf_counter() - start, "added_peak_mb": peak_rss_mb() - before}


def measure_infer_process(backbone: str, logt: int, image: np.ndarray, seeds: np.ndarray, classes: list) -> dict:
    """In a fresh process: the peak memory of a whole infer_mask on one image (model, forward, walk)."""
    import torch

    from ray_wsss.core.models.affinitynet import AffinityNet
    from ray_wsss.core.refine import psa

    torch.set_num_threads(1)
    model = AffinityNet(backbone).eval()
    start = time.perf_counter()
    psa.infer_mask(image, seeds, classes, model, psa.PSAConfig(logt=logt, backbone=backbone))
    return {"seconds": time.perf_counter() - start, "process_peak_mb": peak_rss_mb()}


def in_fresh_process(function, *args) -> dict:
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(function, args)


def per_image(images: list, backbone: str, logt: int) -> dict:
    """Seconds per image of the CRF masks, the walk alone and PSA's whole inference, same images, one thread."""
    import torch

    from ray_wsss.core.models.affinitynet import AffinityNet
    from ray_wsss.core.refine import psa
    from ray_wsss.core.refine.crf import LabellingConfig, make_mask

    torch.set_num_threads(1)
    cfg = psa.PSAConfig(logt=logt, backbone=backbone)
    model = AffinityNet(backbone).eval()
    seconds = {"crf": 0.0, "walk": 0.0, "psa_infer": 0.0}
    for image, seeds, classes in images:
        start = time.perf_counter()
        make_mask(image, seeds, classes, LabellingConfig())
        seconds["crf"] += time.perf_counter() - start

        start = time.perf_counter()
        psa.infer_mask(image, seeds, classes, model, cfg)
        seconds["psa_infer"] += time.perf_counter() - start

        affinity, start_scores = psa.image_affinities(image, model, cfg.radius), psa.walk_seeds(seeds, cfg)
        start = time.perf_counter()  # the walk alone, on this image's affinities and seeds
        psa.random_walk(start_scores, affinity, cfg.radius, cfg.beta, cfg.logt)
        seconds["walk"] += time.perf_counter() - start
    return {name: total / len(images) for name, total in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--logt", type=int, default=8)
    parser.add_argument("--no-dense", action="store_true", help="skip the dense N x N reference walk")
    args = parser.parse_args()

    images = scenes(args.images)
    sparse = in_fresh_process(measure_sparse_walk, args.logt)
    dense = None if args.no_dense else in_fresh_process(measure_dense_walk, args.logt)
    whole = in_fresh_process(measure_infer_process, args.backbone, args.logt, *images[0])
    seconds = per_image(images, args.backbone, args.logt)
    result = {
        "image": f"{WIDTH}x{HEIGHT}", "grid": "63x47", "backbone": args.backbone, "logt": args.logt,
        "images": args.images, "threads": 1,
        "per_image_s": {k: round(v, 3) for k, v in seconds.items()},
        "ratio_walk_vs_crf": round(seconds["walk"] / seconds["crf"], 3),
        "ratio_psa_infer_vs_crf": round(seconds["psa_infer"] / seconds["crf"], 3),
        "sparse_walk": {k: round(v, 3) for k, v in sparse.items()},
        "dense_walk": dense and {k: round(v, 3) for k, v in dense.items()},
        "ratio_sparse_vs_dense_walk_s": dense and round(sparse["seconds"] / dense["seconds"], 4),
        "infer_mask_process": {k: round(v, 1) for k, v in whole.items()},
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

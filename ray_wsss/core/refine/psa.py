"""PSA / AffinityNet (Ahn & Kwak, CVPR'18): from seeds to pseudo masks by a random walk on learned affinities.

Ray-free: affinity labels from seeds, the pairs' labels, the balanced affinity loss, the sparse
random walk and the whole inference for one image. The model is ``ray_wsss.core.models.affinitynet``.

Followed line by line (github.com/jiwoon-ahn/psa; MCTformer's ``psa/`` folder is a copy with other defaults):

- pair labels: ``voc12/data.py ExtractAffinityLabelInRadius``;
- affinity labels: ``infer_cls.py _crf_with_alpha`` and ``voc12/data.py VOC12AffDataset.__getitem__``;
- loss: ``train_aff.py``;
- random walk: ``infer_aff.py``.

The pair geometry (stride 8, the pairs within a radius, their affinities) is ``ray_wsss.core.affinity_pairs``,
shared with the model.
"""
from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from numbers import Real
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ray_wsss.core.affinity_pairs import STRIDE, grid_size, pair_affinities, pair_indices, pair_windows
from ray_wsss.core.data.augment import normalize
from ray_wsss.core.schema import IGNORE_INDEX

BACKGROUND_MODES = ("power", "threshold")
LOSS_EPS = 1e-5  # train_aff.py: inside the logs and added to each pair count


@dataclasses.dataclass
class PSAConfig:
    """Settings of the PSA step (defaults: the papers' values).

    radius: pairs are within this distance on the stride-8 grid (PSA: 5).
    beta: the affinities are raised to beta before normalising (PSA: 8).
    logt: the walk applies the transition matrix 2**logt times (PSA's paper and code: 8; MCTformer's run: 6).
    low_alpha, high_alpha: the background score (1 - max_c seed)**alpha of the two affinity labellings:
        confident foreground from the low one, confident background from the high one (MCTformer's run:
        1 and 12; PSA's own infer_cls.py: 4 and 32).
    label_crf: a dense CRF on each labelling's scores before they are pooled (both papers: on).
    infer_background: the background channel of the walk's seeds: "power" is PSA's infer_aff.py,
        (1 - max_c seed)**infer_alpha (default 16); "threshold" is MCTformer's psa/infer_aff.py, a
        constant infer_threshold (its default 0.39, "the optimal one obtained for seeds").
    backbone: timm name of the AffinityNet backbone (a ResNet; see ``ray_wsss.core.models.affinitynet``).
    """
    radius: int = 5
    beta: float = 8.0
    logt: int = 8
    low_alpha: float = 1.0
    high_alpha: float = 12.0
    label_crf: bool = True
    infer_background: str = "power"
    infer_alpha: float = 16.0
    infer_threshold: float = 0.39
    backbone: str = "resnet50"

    def __post_init__(self) -> None:
        _check_field("radius", self.radius, int, lambda v: v >= 2, "an int >= 2")
        _check_field("beta", self.beta, Real, lambda v: v > 0, "a number > 0")
        _check_field("logt", self.logt, int, lambda v: 0 <= v <= 16, "an int in [0, 16]")
        _check_field("low_alpha", self.low_alpha, Real, lambda v: v > 0, "a number > 0")
        _check_field("high_alpha", self.high_alpha, Real, lambda v: v > self.low_alpha,
                     f"a number > low_alpha ({self.low_alpha})")
        _check_field("label_crf", self.label_crf, bool, lambda v: True, "a bool")
        _check_field("infer_background", self.infer_background, str, lambda v: v in BACKGROUND_MODES,
                     f"one of {BACKGROUND_MODES}")
        _check_field("infer_alpha", self.infer_alpha, Real, lambda v: v > 0, "a number > 0")
        _check_field("infer_threshold", self.infer_threshold, Real, lambda v: 0 <= v <= 1, "a number in [0, 1]")
        _check_field("backbone", self.backbone, str, lambda v: bool(v.strip()), "a timm model name")


def _check_field(name: str, value: Any, kind: type, ok: Any, allowed: str) -> None:
    # bool is an int (and a Real) to Python; only a bool field takes one
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise TypeError(f"PSAConfig.{name} must be {allowed}, got {value!r} ({type(value).__name__})")
    if not ok(value):
        raise ValueError(f"PSAConfig.{name} must be {allowed}, got {value!r}")


# ---------------------------------------------------------------- pair labels

class PairLabels(NamedTuple):
    """Bool [..., n_displacements, M] masks of the three kinds of pairs (ExtractAffinityLabelInRadius)."""
    bg_pos: Tensor  # both background
    fg_pos: Tensor  # the same foreground class
    neg: Tensor     # different labels, neither ignored


def pair_labels(labels: Tensor, radius: int) -> PairLabels:
    """Affinity label maps [..., h, w] (0 background, class ids, 255 ignore) -> the pairs' labels.

    A pair with a 255 end is in none of the three sets.
    """
    start, ends = pair_windows(*labels.shape[-2:], radius)
    first = labels[..., start[0], start[1]].flatten(-2).unsqueeze(-2)
    second = torch.stack([labels[..., rows, cols].flatten(-2) for rows, cols in ends], dim=-2)
    valid = (first != IGNORE_INDEX) & (second != IGNORE_INDEX)
    same = first == second
    return PairLabels(bg_pos=same & (first == 0), fg_pos=same & (first != 0) & valid, neg=~same & valid)


# ---------------------------------------------------------------- the loss

class AffinityLoss(NamedTuple):
    total: Tensor   # bg_pos / 4 + fg_pos / 4 + neg / 2
    bg_pos: Tensor  # mean of -log(aff) over background-positive pairs
    fg_pos: Tensor  # mean of -log(aff) over foreground-positive pairs
    neg: Tensor     # mean of -log(1 - aff) over negative pairs


def affinity_loss(affinity: Tensor, labels: PairLabels) -> AffinityLoss:
    """PSA's balanced loss (train_aff.py), each term averaged over its own pairs in the whole batch.

    As in the code: ``-log(aff + 1e-5)``, ``-log(1 + 1e-5 - aff)`` and counts ``+ 1e-5``, so a term
    without pairs is 0; weights 1/4, 1/4, 1/2.
    """
    def mean_over(mask: Tensor, losses: Tensor) -> Tensor:
        weight = mask.to(losses.dtype)
        return (weight * losses).sum() / (weight.sum() + LOSS_EPS)

    positive = -torch.log(affinity + LOSS_EPS)
    bg = mean_over(labels.bg_pos, positive)
    fg = mean_over(labels.fg_pos, positive)
    neg = mean_over(labels.neg, -torch.log(1.0 + LOSS_EPS - affinity))
    return AffinityLoss(total=bg / 4 + fg / 4 + neg / 2, bg_pos=bg, fg_pos=fg, neg=neg)


# ---------------------------------------------------------------- seeds, backgrounds, stride 8

def _check_seeds(seeds: np.ndarray, classes: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(seeds)
    if scores.ndim != 3 or 0 in scores.shape[1:]:
        raise ValueError(f"seeds must be a [k, H, W] array, got shape {scores.shape}")
    ids = np.asarray(classes, np.int64).reshape(-1)
    if len(ids) != len(scores):
        raise ValueError(f"got {len(ids)} class ids for {len(scores)} seed maps")
    if ((ids < 1) | (ids >= IGNORE_INDEX)).any():
        raise ValueError(f"class ids must be foreground ids 1..{IGNORE_INDEX - 1}, got {ids.tolist()}")
    return scores.astype(np.float32, copy=False), ids


def _check_image(image: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
    if image.shape[:2] != shape:
        raise ValueError(f"image is {image.shape[:2]} but the seeds are {shape}")
    return image


def power_background(seeds: np.ndarray, alpha: float) -> np.ndarray:
    """PSA's background score (1 - max_c seeds)**alpha, float32 [H, W]; 1 where no class is labelled.

    The top score is clipped to [0, 1] (the seeds contract's range) so that float16 rounding above 1 cannot
    make a fractional power NaN."""
    top = np.clip(seeds.max(axis=0), 0, 1) if len(seeds) else np.zeros(seeds.shape[1:], np.float32)
    return (1 - top) ** np.float32(alpha)


def pool_to_stride(scores: Tensor) -> Tensor:
    """[C, H, W] -> [C, ceil(H/8), ceil(W/8)]: zero-padded bottom/right, then the mean of each 8x8 block.

    PSA does this to scores, never to labels: train_aff.py pools the CRF scores of the crop with
    ``imutils.AvgPool2d(8)`` (skimage block_reduce, mean, zero padding) before the argmax, and infer_aff.py
    pads the CAMs with zeros and applies ``F.avg_pool2d(cam, 8, 8)``.
    """
    height, width = scores.shape[-2:]
    grid_h, grid_w = grid_size(height, width)
    padded = F.pad(scores, (0, grid_w * STRIDE - width, 0, grid_h * STRIDE - height))
    return F.avg_pool2d(padded[None], STRIDE, STRIDE)[0]


def affinity_labels(seeds: np.ndarray, classes: Sequence[int], cfg: PSAConfig,
                    image: np.ndarray | None = None) -> np.ndarray:
    """Seeds [k, H, W] in [0, 1] of ``classes`` -> uint8 affinity labels [ceil(H/8), ceil(W/8)].

    Values: 0 confident background, a class id for confident foreground, 255 for the rest. As PSA:
    each of the two labellings is [background, seeds] with the background (1 - max)**alpha at
    ``low_alpha`` and at ``high_alpha``, through a dense CRF on ``image`` when ``cfg.label_crf`` (the raw
    scores are the CRF's probabilities, as infer_cls.py passes them, with its parameters, which are
    ``CRFConfig()``'s defaults), then pooled to stride 8 (:func:`pool_to_stride`) and argmax'd. The label is
    the low-alpha argmax where that is a class, 255 where it is the background, and 0 wherever the high-alpha
    argmax is the background (VOC12AffDataset's order of assignments; ties go to the background).

    PSA pools each random crop (train_aff.py: crop, flip, then AvgPool2d(8)); here the whole image is pooled
    once, so a training crop taken at multiples of 8 pixels sees exactly the blocks PSA's would (PSA's crops
    start anywhere, so its blocks shift by under a cell). PSA also sets 255 where every pooled score is below
    1e-5: the zero padding of its crop. Crops are the training stage's business here (it pads labels with
    255), so that rule has nothing to act on.
    """
    scores, ids = _check_seeds(seeds, classes)
    if cfg.label_crf:
        if image is None:
            raise ValueError("label_crf is on: pass the image the seeds belong to")
        # pydensecrf wants a writable buffer; np.asarray of a PIL image is read-only
        image = np.require(_check_image(image, scores.shape[1:]), requirements=["C", "W"])

    def labelling(alpha: float) -> np.ndarray:
        per_label = np.concatenate([power_background(scores, alpha)[None], scores])
        if cfg.label_crf and len(scores):  # with no class the CRF has one label and nothing to decide
            from ray_wsss.core.refine import crf  # lazily: pydensecrf only where a CRF runs
            per_label = crf.dense_crf(image, per_label, crf.CRFConfig())
        return pool_to_stride(torch.from_numpy(per_label)).argmax(0).numpy()

    low, high = labelling(cfg.low_alpha), labelling(cfg.high_alpha)
    label = np.concatenate([[0], ids]).astype(np.uint8)[low]
    label[low == 0] = IGNORE_INDEX
    label[high == 0] = 0
    return label


# ---------------------------------------------------------------- the random walk

def transition_matrix(affinity: Tensor, height: int, width: int, radius: int, beta: float) -> Tensor:
    """Affinities [n_displacements, M] of an h x w grid -> the row-stochastic P = D^-1 A^beta, sparse CSR [N, N].

    A holds each pair's affinity**beta at (i, j) and (j, i), and 1 on the diagonal (resnet38_aff.py's
    ``to_dense``: self-affinity 1, 1**beta = 1); D is its diagonal of row sums. infer_aff.py normalises
    the COLUMNS, ``T = A / A.sum(0)``, and multiplies row vectors, ``cam @ T``; A is symmetric, so that
    equals ``(P @ cam^T)^T``: P = T^T. Memory: N * (1 + 2 * n_displacements) entries, in affinity's dtype.
    """
    count = height * width
    first, second = (torch.from_numpy(index).to(affinity.device) for index in pair_indices(height, width, radius))
    if affinity.shape != second.shape:
        raise ValueError(f"affinities {tuple(affinity.shape)} do not fit the pairs {tuple(second.shape)} "
                         f"of a {height} x {width} grid at radius {radius}")
    first = first.expand_as(second).reshape(-1)
    second = second.reshape(-1)
    diagonal = torch.arange(count, device=affinity.device)
    weights = affinity.reshape(-1) ** beta
    rows = torch.cat([first, second, diagonal])
    cols = torch.cat([second, first, diagonal])
    values = torch.cat([weights, weights, torch.ones(count, dtype=affinity.dtype, device=affinity.device)])
    degree = torch.zeros(count, dtype=affinity.dtype, device=affinity.device).index_add_(0, rows, values)
    matrix = torch.sparse_coo_tensor(torch.stack([rows, cols]), values / degree[rows], (count, count),
                                     check_invariants=True)
    with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta": CSR @ dense is all this needs
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta", UserWarning)
        return matrix.coalesce().to_sparse_csr()


def random_walk(scores: Tensor, affinity: Tensor, radius: int, beta: float, logt: int) -> Tensor:
    """Scores [C, h, w] propagated by the walk: PSA's ``cam @ T^(2^logt)``, -> [C, h, w] in scores' dtype.

    infer_aff.py squares the dense N x N matrix ``logt`` times; a sparse matrix fills in when squared,
    so this applies the sparse P to the score vectors 2**logt times instead: the same product (matrix
    products associate), in time 2**logt * nnz * C and memory nnz + N * C, linear in pixels x radius².
    In float64: P's float32 row sums are 1 only to ~6e-8, and 2**logt steps compound that (1.5e-5 off
    the dense float64 power at logt 8); float64 keeps the walk within 1e-7 of it.
    """
    channels, height, width = scores.shape
    step = transition_matrix(affinity.double(), height, width, radius, beta)
    vectors = scores.double().reshape(channels, -1).T.contiguous()  # [N, C]
    for _ in range(2 ** logt):
        vectors = step @ vectors
    return vectors.T.reshape(channels, height, width).to(scores.dtype)


def _device_of(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")


def image_affinities(image: np.ndarray, model: nn.Module, radius: int) -> Tensor:
    """uint8 image [H, W, 3] -> the affinities [n_displacements, M] of its stride-8 grid, as infer_aff.py:
    the normalised image zero-padded to multiples of 8, embedded (``model(x)`` -> [1, D, H/8, W/8])."""
    height, width = image.shape[:2]
    grid_h, grid_w = grid_size(height, width)
    pixels = F.pad(normalize(image), (0, grid_w * STRIDE - width, 0, grid_h * STRIDE - height))
    with torch.no_grad():
        embedding = model(pixels[None].to(_device_of(model)))
        if tuple(embedding.shape[-2:]) != (grid_h, grid_w):
            raise ValueError(f"the model's embedding is {tuple(embedding.shape[-2:])} for a "
                             f"{grid_h * STRIDE} x {grid_w * STRIDE} input; expected stride 8: {(grid_h, grid_w)}")
        return pair_affinities(embedding, radius)[0]


def walk_seeds(seeds: np.ndarray, cfg: PSAConfig) -> Tensor:
    """Seeds [k, H, W] -> the walk's start [k + 1, ceil(H/8), ceil(W/8)]: the background channel
    (``cfg.infer_background``) at full resolution first, then zero-padded and pooled (:func:`pool_to_stride`)."""
    if cfg.infer_background == "power":
        background = power_background(seeds, cfg.infer_alpha)
    else:
        background = np.full(seeds.shape[1:], cfg.infer_threshold, np.float32)
    return pool_to_stride(torch.from_numpy(np.concatenate([background[None], seeds])))


def walk_scores(image: np.ndarray, seeds: np.ndarray, classes: Sequence[int], model: nn.Module,
                cfg: PSAConfig) -> np.ndarray:
    """uint8 image [H, W, 3], seeds [k, H, W] of ``classes`` and an AffinityNet -> float32 scores [k + 1, H, W]
    (background first): the walk's result at image size, before the argmax.

    infer_aff.py, step by step: the image's affinities (:func:`image_affinities`), the seeds with their
    background at stride 8 (:func:`walk_seeds`), the walk (:func:`random_walk`), then bilinear upsampling
    (align_corners=False, PyTorch >= 0.4's ``nn.Upsample`` default, the version PSA names) to the padded
    size, cropped to H x W. Without classes the background channel alone: every pixel is background.
    """
    scores, _ = _check_seeds(seeds, classes)
    image = _check_image(image, scores.shape[1:])
    height, width = scores.shape[1:]
    if len(scores) == 0:
        return np.ones((1, height, width), np.float32)
    affinity = image_affinities(image, model, cfg.radius)
    walked = random_walk(walk_seeds(scores, cfg).to(affinity.device), affinity, cfg.radius, cfg.beta, cfg.logt)
    grid_h, grid_w = walked.shape[1:]
    upsampled = F.interpolate(walked[None], size=(grid_h * STRIDE, grid_w * STRIDE), mode="bilinear",
                              align_corners=False)[0, :, :height, :width]
    return upsampled.float().cpu().numpy()


def infer_mask(image: np.ndarray, seeds: np.ndarray, classes: Sequence[int], model: nn.Module,
               cfg: PSAConfig) -> np.ndarray:
    """uint8 image [H, W, 3], seeds [k, H, W] of ``classes`` and an AffinityNet -> uint8 mask [H, W]: the argmax
    of :func:`walk_scores` (infer_aff.py). Values: 0 background or the ids in ``classes``."""
    _, ids = _check_seeds(seeds, classes)
    scores = walk_scores(image, seeds, classes, model, cfg)
    return np.concatenate([[0], ids]).astype(np.uint8)[scores.argmax(0)]


# ---------------------------------------------------------------- held-out check of an AffinityNet

def labels_at_stride(mask: np.ndarray) -> np.ndarray:
    """uint8 mask [H, W] (255 = ignore) -> uint8 labels [ceil(H/8), ceil(W/8)] of its pure 8 x 8 blocks.

    A block whose in-image pixels all carry one class (0 included) gets it; a block mixing classes or
    holding an ignored pixel gets 255. So the pairs of two labelled blocks have a known truth: this is how
    a ground-truth mask scores an AffinityNet (:func:`pair_accuracy_counts`), not how PSA trains one.
    """
    mask = np.asarray(mask)
    if mask.dtype != np.uint8 or mask.ndim != 2:
        raise ValueError(f"mask must be uint8 [H, W], got {mask.dtype} {mask.shape}")
    grid_h, grid_w = grid_size(*mask.shape)
    padded = np.full((grid_h * STRIDE, grid_w * STRIDE), -1, np.int16)  # -1: outside the image
    padded[:mask.shape[0], :mask.shape[1]] = mask
    blocks = padded.reshape(grid_h, STRIDE, grid_w, STRIDE).transpose(0, 2, 1, 3).reshape(grid_h, grid_w, -1)
    inside = blocks >= 0
    low = np.where(inside, blocks, IGNORE_INDEX + 1).min(-1)
    high = blocks.max(-1)
    return np.where(low == high, high, IGNORE_INDEX).astype(np.uint8)


def pair_accuracy_counts(affinity: Tensor, labels: Tensor, radius: int) -> np.ndarray:
    """Affinities [..., n_displacements, M] and their grid's labels [..., h, w] -> int64 counts
    [positive pairs with affinity > 0.5, positive pairs, negative pairs with affinity <= 0.5, negative pairs]."""
    pairs = pair_labels(labels, radius)
    positive = pairs.bg_pos | pairs.fg_pos
    close = affinity > 0.5
    return np.array([int((positive & close).sum()), int(positive.sum()),
                     int((pairs.neg & ~close).sum()), int(pairs.neg.sum())], np.int64)

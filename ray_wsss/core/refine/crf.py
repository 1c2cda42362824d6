"""From seed score maps to a pseudo mask: a background channel, a softmax, a dense CRF, an ignore band.

Labels are [background, present classes], so the CRF only chooses among what the image-level labels allow.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import pydensecrf.densecrf as dcrf
from pydensecrf.utils import unary_from_softmax

from ray_wsss.core.config import option
from ray_wsss.core.metrics import SCORE_DTYPE
from ray_wsss.core.schema import IGNORE_INDEX

BACKGROUND_MODES = ("threshold", "power")


@dataclasses.dataclass
class CRFConfig:
    """Dense CRF parameters (the values of PSA / IRN) and the softmax scale of the unaries.

    Seed scores lie in [0, 1], so a plain softmax of them is nearly flat (odds of at most e:1) and the
    unaries would be far weaker than the pairwise terms: the CRF would just cluster colours. `scale`
    multiplies the label scores first: at 10 a margin of 0.1 over the background gives odds e:1 and a
    margin of 0.5 gives e^5 (~150:1), so pixels near the threshold follow image edges while confident
    seeds need a clear colour cue to flip. (On a blurred square, 5-15 snap to the true edge; 25 and more
    start to keep the seed's blur; on an image without edges even 15 lets the CRF erase a small seed.)

    ``enabled`` says whether a stage runs it at all; a stage config holds this as its nested ``crf``
    section (YAML ``crf: {iterations: 5}``, flags ``--crf-iterations 5``, ``--no-crf``).
    """
    enabled: bool = option(True, "run the dense CRF (--no-crf: skip it)")
    gaussian_sxy: float = option(3.0, "Gaussian kernel spatial std", gt=0)
    gaussian_compat: float = option(3.0, "Gaussian kernel compatibility", min=0)
    bilateral_sxy: float = option(80.0, "bilateral kernel spatial std", gt=0)
    bilateral_srgb: float = option(13.0, "bilateral kernel colour std", gt=0)
    bilateral_compat: float = option(10.0, "bilateral kernel compatibility", min=0)
    iterations: int = option(10, "mean-field iterations", min=1)
    scale: float = option(10.0, "logit scale of seed scores before the softmax unary (seeds only)", gt=0)


def deeplab_crf() -> CRFConfig:
    """deeplab-pytorch's VOC values for a CRF on segmentation probabilities (ACR's segmentation step), off."""
    return CRFConfig(enabled=False, gaussian_sxy=1.0, bilateral_sxy=67.0, bilateral_srgb=3.0, bilateral_compat=4.0)


@dataclasses.dataclass
class LabellingConfig:
    """How seed scores become a mask.

    background: "threshold" (a constant `threshold` channel: background iff every score <= threshold,
        as in `evaluate.scores_to_labels`) or "power" (PSA's (1 - max_c score) ** power_alpha; at the
        default 8 foreground wins from a top score of about 0.19).
    ignore_low, ignore_high: pixels whose confidence (max probability after the CRF, or of the softmax
        without it) is in [ignore_low, ignore_high) become 255. Both or neither.
    """
    background: str = "threshold"
    threshold: float = 0.5
    power_alpha: float = 8.0
    crf: bool = True
    ignore_low: float | None = None
    ignore_high: float | None = None
    crf_config: CRFConfig = dataclasses.field(default_factory=CRFConfig)

    def __post_init__(self):
        if self.background not in BACKGROUND_MODES:
            raise ValueError(f"background must be one of {BACKGROUND_MODES}, got {self.background!r}")
        if self.power_alpha <= 0:
            raise ValueError(f"power_alpha must be positive, got {self.power_alpha}")
        if (self.ignore_low is None) != (self.ignore_high is None):
            raise ValueError("set both ignore_low and ignore_high, or neither")
        if self.ignore_low is not None and not 0.0 <= self.ignore_low < self.ignore_high <= 1.0:
            raise ValueError(f"need 0 <= ignore_low < ignore_high <= 1, got {self.ignore_low}, {self.ignore_high}")


def _check_seed_scores(seed_scores: np.ndarray) -> np.ndarray:
    seed_scores = np.asarray(seed_scores)
    if seed_scores.ndim != 3:
        raise ValueError(f"seed scores must be [k, H, W], got shape {seed_scores.shape}")
    return seed_scores.astype(SCORE_DTYPE, copy=False)  # the dtype the threshold sweep compares in


def _check_image(image: np.ndarray, height: int, width: int) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
    if image.shape[:2] != (height, width):
        raise ValueError(f"image is {image.shape[:2]} but the scores are {(height, width)}: resize the scores first")
    return np.ascontiguousarray(image)  # pydensecrf reads the raw buffer


def _check_classes(classes: Sequence[int], count: int) -> np.ndarray:
    ids = np.asarray(classes, np.int64).reshape(-1)
    if len(ids) != count:
        raise ValueError(f"got {len(ids)} class ids for {count} score maps")
    if ((ids < 1) | (ids >= IGNORE_INDEX)).any():
        raise ValueError(f"class ids must be foreground ids 1..{IGNORE_INDEX - 1}, got {ids.tolist()}")
    return ids


def label_scores(seed_scores: np.ndarray, cfg: LabellingConfig) -> np.ndarray:
    """Seed scores [k, H, W] -> float32 label scores [k + 1, H, W], background first."""
    scores = _check_seed_scores(seed_scores)
    if cfg.background == "threshold":
        background = np.full(scores.shape[1:], cfg.threshold, SCORE_DTYPE)
    else:
        top = scores.max(axis=0) if len(scores) else np.zeros(scores.shape[1:], SCORE_DTYPE)
        background = (1 - np.clip(top, 0, 1)) ** SCORE_DTYPE(cfg.power_alpha)
    return np.concatenate([background[None], scores])


def softmax(label_scores: np.ndarray, scale: float) -> np.ndarray:
    """Softmax over the first axis of `scale * label_scores`, float32."""
    logits = label_scores.astype(np.float32) * np.float32(scale)
    exp = np.exp(logits - logits.max(axis=0, keepdims=True))
    return exp / exp.sum(axis=0, keepdims=True)


def dense_crf(image: np.ndarray, probs: np.ndarray, cfg: CRFConfig) -> np.ndarray:
    """Refine probabilities [L, H, W] on uint8 image [H, W, 3] -> float32 probabilities [L, H, W]."""
    probs = np.asarray(probs, np.float32)
    if probs.ndim != 3 or len(probs) == 0:
        raise ValueError(f"probabilities must be [L, H, W] with L >= 1, got shape {probs.shape}")
    num_labels, height, width = probs.shape
    image = _check_image(image, height, width)
    crf = dcrf.DenseCRF2D(width, height, num_labels)
    crf.setUnaryEnergy(unary_from_softmax(probs))
    crf.addPairwiseGaussian(sxy=cfg.gaussian_sxy, compat=cfg.gaussian_compat)
    crf.addPairwiseBilateral(
        sxy=cfg.bilateral_sxy, srgb=cfg.bilateral_srgb, rgbim=image, compat=cfg.bilateral_compat)
    refined = crf.inference(cfg.iterations)
    return np.asarray(refined, np.float32).reshape(num_labels, height, width)


def make_mask(
        image: np.ndarray,
        seed_scores: np.ndarray,
        classes: Sequence[int],
        cfg: LabellingConfig,
) -> np.ndarray:
    """uint8 image [H, W, 3] and seed scores [k, H, W] of `classes` -> uint8 mask [H, W].

    Values: 0 background, the ids in `classes`, 255 in the ignore band. Scores must already be at the
    image's resolution.
    """
    scores = _check_seed_scores(seed_scores)
    if len(scores) == 0:  # nothing present: all background, nothing uncertain
        _check_image(image, *scores.shape[1:])
        _check_classes(classes, 0)
        return np.zeros(scores.shape[1:], np.uint8)
    return mask_from_label_scores(image, label_scores(scores, cfg), classes, cfg)


def mask_from_label_scores(
        image: np.ndarray,
        per_label: np.ndarray,
        classes: Sequence[int],
        cfg: LabellingConfig,
) -> np.ndarray:
    """uint8 image [H, W, 3] and label scores [k + 1, H, W] (background first, then `classes`) -> uint8 mask.

    With `cfg.crf`: the argmax of the dense CRF on softmax(`scale` * scores); without: the argmax of the
    scores. Then the ignore band on the confidence. `cfg.background` and `threshold` play no part here:
    they make the background row of seeds (:func:`label_scores`); PSA's random walk makes its own.
    """
    per_label = np.asarray(per_label)
    if per_label.ndim != 3 or len(per_label) == 0:
        raise ValueError(f"label scores must be [k + 1, H, W], got shape {per_label.shape}")
    image = _check_image(image, *per_label.shape[1:])
    ids = _check_classes(classes, len(per_label) - 1)
    probs = softmax(per_label, cfg.crf_config.scale)
    if cfg.crf:
        probs = dense_crf(image, probs, cfg.crf_config)
        best = probs.argmax(axis=0)
    else:
        best = per_label.argmax(axis=0)  # the exact threshold rule, free of softmax rounding
    mask = np.concatenate([[0], ids]).astype(np.uint8)[best]
    if cfg.ignore_low is not None:
        confidence = probs.max(axis=0)
        mask[(confidence >= cfg.ignore_low) & (confidence < cfg.ignore_high)] = IGNORE_INDEX
    return mask

"""ray_wsss.core.refine.crf: background modes, the dense CRF's edge snapping, the ignore band, class ids."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from ray_wsss.core.metrics import scores_to_labels
from ray_wsss.core.refine.crf import CRFConfig, LabellingConfig, dense_crf, label_scores, make_mask, softmax

NO_CRF = LabellingConfig(crf=False)


def blur(a: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur with zero padding."""
    radius = int(3 * sigma)
    kernel = np.exp(-np.arange(-radius, radius + 1) ** 2 / (2 * sigma ** 2))
    kernel /= kernel.sum()
    a = np.apply_along_axis(np.convolve, 0, a, kernel, "same")
    return np.apply_along_axis(np.convolve, 1, a, kernel, "same")


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return (a & b).sum() / (a | b).sum()


def square_scene(size: int = 64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A bright square on a dark noisy background, and seeds = the square shifted by (3, -4) and blurred."""
    square = np.zeros((size, size), bool)
    square[16:48, 20:52] = True
    rng = np.random.default_rng(0)
    image = np.where(square[..., None], 200.0, 40.0) + rng.normal(0, 5, (size, size, 3))
    image = np.clip(image, 0, 255).astype(np.uint8)
    seed = blur(np.roll(square.astype(np.float32), (3, -4), axis=(0, 1)), sigma=5)
    return image, (seed / seed.max())[None].astype(np.float32), square


def test_crf_snaps_a_blurred_seed_to_the_image_edge():
    image, seeds, square = square_scene()
    seed_mask = scores_to_labels(seeds, [3], 0.5) == 3
    mask = make_mask(image, seeds, [3], LabellingConfig())
    assert set(np.unique(mask).tolist()) == {0, 3}
    crf_iou, seed_iou = iou(mask == 3, square), iou(seed_mask, square)
    assert seed_iou < 0.75 and crf_iou > 0.97, (seed_iou, crf_iou)
    # the two-pixel ring around the true edge (one pixel each side) follows the image, not the seed
    grown = np.zeros_like(square)
    grown[15:49, 19:53] = True
    shrunk = np.zeros_like(square)
    shrunk[17:47, 21:51] = True
    ring = grown & ~shrunk
    assert np.array_equal(mask[ring] == 3, square[ring])
    assert (seed_mask[ring] == square[ring]).mean() < 0.8


def test_dense_crf_returns_probabilities():
    image, seeds, _ = square_scene(32)
    probs = softmax(label_scores(seeds, LabellingConfig()), scale=10)
    refined = dense_crf(image, probs, CRFConfig(iterations=3))
    assert refined.shape == probs.shape and refined.dtype == np.float32
    assert np.allclose(refined.sum(axis=0), 1, atol=1e-4) and (refined >= 0).all()


def test_threshold_and_power_backgrounds():
    # pixels: all low, class 7 strongest, a tie at 0.45 between the classes, class 3 strongest
    seeds = np.array([[[0.2, 0.6, 0.45, 0.9]], [[0.1, 0.7, 0.45, 0.3]]], np.float32)
    image = np.zeros((1, 4, 3), np.uint8)
    threshold = dataclasses.replace(NO_CRF, threshold=0.5)
    assert np.allclose(label_scores(seeds, threshold)[0], 0.5)
    assert make_mask(image, seeds, [3, 7], threshold).tolist() == [[0, 7, 0, 3]]
    power = dataclasses.replace(NO_CRF, background="power", power_alpha=2.0)
    assert np.allclose(label_scores(seeds, power)[0], [[0.64, 0.09, 0.3025, 0.01]])
    assert make_mask(image, seeds, [3, 7], power).tolist() == [[0, 7, 3, 3]]
    # at alpha 8, a top score of 0.15 stays background and 0.25 becomes foreground
    power8 = dataclasses.replace(NO_CRF, background="power")
    low_high = np.array([[[0.15, 0.25]]], np.float32)
    assert make_mask(np.zeros((1, 2, 3), np.uint8), low_high, [5], power8).tolist() == [[0, 5]]


def test_without_crf_the_threshold_rule_matches_evaluate():
    rng = np.random.default_rng(3)
    seeds = rng.random((3, 20, 24)).astype(np.float32)
    seeds[0, ::4] = 0.3  # exact ties with the threshold
    image = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
    cfg = dataclasses.replace(NO_CRF, threshold=0.3)
    assert np.array_equal(make_mask(image, seeds, [2, 9, 14], cfg), scores_to_labels(seeds, [2, 9, 14], 0.3))


def test_ignore_band_without_crf():
    # one class, threshold 0.5, scale 10: confidence is sigmoid(10 * |score - 0.5|)
    seeds = np.array([[[0.1, 0.5, 0.55, 0.9]]], np.float32)
    cfg = dataclasses.replace(NO_CRF, ignore_low=0.4, ignore_high=0.9)
    mask = make_mask(np.zeros((1, 4, 3), np.uint8), seeds, [4], cfg)
    assert mask.tolist() == [[0, 255, 255, 4]]  # confidences 0.98, 0.5, 0.62, 0.98


def test_ignore_band_uses_crf_confidence():
    image, seeds, _ = square_scene()
    cfg = LabellingConfig(ignore_low=0.0, ignore_high=0.9999)  # the CRF is sure of most pixels
    probs = dense_crf(image, softmax(label_scores(seeds, cfg), cfg.crf_config.scale), cfg.crf_config)
    uncertain = probs.max(axis=0) < 0.9999
    assert 0 < uncertain.sum() < uncertain.size  # the case is not trivial
    mask = make_mask(image, seeds, [3], cfg)
    assert np.array_equal(mask == 255, uncertain)
    plain = make_mask(image, seeds, [3], LabellingConfig())
    assert np.array_equal(mask[~uncertain], plain[~uncertain])


def test_no_present_class_gives_background():
    image = np.full((6, 5, 3), 128, np.uint8)
    for cfg in (LabellingConfig(), LabellingConfig(background="power", ignore_low=0.0, ignore_high=1.0)):
        mask = make_mask(image, np.zeros((0, 6, 5), np.float32), [], cfg)
        assert mask.dtype == np.uint8 and mask.shape == (6, 5) and (mask == 0).all()


def test_labels_map_back_to_class_ids():
    seeds = np.zeros((2, 8, 8), np.float32)
    seeds[0, :, :4] = 0.9  # left half: class 3
    seeds[1, :, 4:] = 0.8  # right half: class 7
    image = np.zeros((8, 8, 3), np.uint8)
    image[:, 4:] = 255
    for cfg in (LabellingConfig(), NO_CRF):
        mask = make_mask(image, seeds, [3, 7], cfg)
        assert (mask[:, :4] == 3).all() and (mask[:, 4:] == 7).all()


def test_bad_input_raises():
    seeds = np.zeros((1, 4, 4), np.float32)
    with pytest.raises(ValueError, match="resize"):
        make_mask(np.zeros((4, 5, 3), np.uint8), seeds, [1], NO_CRF)
    with pytest.raises(ValueError, match="uint8"):
        make_mask(np.zeros((4, 4, 3), np.float32), seeds, [1], NO_CRF)
    with pytest.raises(ValueError, match="class ids"):
        make_mask(np.zeros((4, 4, 3), np.uint8), seeds, [1, 2], NO_CRF)
    with pytest.raises(ValueError, match="foreground"):
        make_mask(np.zeros((4, 4, 3), np.uint8), seeds, [0], NO_CRF)
    with pytest.raises(ValueError, match="background"):
        LabellingConfig(background="mean")
    with pytest.raises(ValueError, match="both"):
        LabellingConfig(ignore_low=0.2)

"""ray_wsss.evaluate against plain per-class reference computations."""
from __future__ import annotations

import numpy as np
import pytest

from ray_wsss.core.metrics import (
    DEFAULT_THRESHOLD_GRID,
    DEFAULT_THRESHOLDS,
    ConfusionMatrix,
    ThresholdSweep,
    parse_threshold_grid,
    pick_threshold,
    scores_to_labels,
)


def reference_scores(pairs: list[tuple[np.ndarray, np.ndarray]], num_classes: int) -> dict:
    """Per-class loops, written from the definitions: pred 255 is in T_c, in no P_c; gt 255 is skipped."""
    tp = np.zeros(num_classes, np.int64)
    t = np.zeros(num_classes, np.int64)
    p = np.zeros(num_classes, np.int64)
    for pred, gt in pairs:
        labelled = gt != 255
        for c in range(num_classes):
            tp[c] += np.sum(labelled & (gt == c) & (pred == c))
            t[c] += np.sum(labelled & (gt == c))
            p[c] += np.sum(labelled & (pred == c))
    ious, fps, fns, per_class = [], [], [], {}
    for c in range(num_classes):
        union = t[c] + p[c] - tp[c]
        if union == 0:
            per_class[c] = None
            continue
        per_class[c] = tp[c] / union
        ious.append(tp[c] / union)
        fps.append((p[c] - tp[c]) / union)
        fns.append((t[c] - tp[c]) / union)
    return {"miou": np.mean(ious), "fp": np.mean(fps), "fn": np.mean(fns),
            "pixel_acc": tp.sum() / t.sum(), "per_class": per_class}


def random_pairs(rng: np.random.Generator, num_classes: int, count: int) -> list[tuple[np.ndarray, np.ndarray]]:
    pairs = []
    for _ in range(count):
        h, w = rng.integers(5, 20, size=2)
        values = np.r_[np.arange(num_classes), 255]
        gt = rng.choice(values, size=(h, w)).astype(np.uint8)
        pred = rng.choice(values, size=(h, w)).astype(np.uint8)
        agree = rng.random((h, w)) < 0.4  # so IoUs are not all near zero
        pred[agree] = gt[agree]
        pairs.append((pred, gt))
    return pairs


def assert_scores_equal(got: dict, want: dict) -> None:
    for key in ("miou", "fp", "fn", "pixel_acc"):
        assert got[key] == pytest.approx(want[key], abs=1e-12), key
    assert got["per_class"].keys() == want["per_class"].keys()
    for c, iou in want["per_class"].items():
        assert (got["per_class"][c] is None) == (iou is None), c
        if iou is not None:
            assert got["per_class"][c] == pytest.approx(iou, abs=1e-12)


@pytest.mark.parametrize("num_classes", [2, 5, 21])
def test_confusion_matrix_matches_reference(num_classes):
    rng = np.random.default_rng(num_classes)
    pairs = random_pairs(rng, num_classes, count=6)
    assert any((pred == 255).any() for pred, _ in pairs) and any((gt == 255).any() for _, gt in pairs)
    matrix = ConfusionMatrix(num_classes)
    for pred, gt in pairs:
        matrix.add(pred, gt)
    assert matrix.counts.dtype == np.int64
    got = matrix.scores()
    assert_scores_equal(got, reference_scores(pairs, num_classes))
    assert got["miou"] + got["fp"] + got["fn"] == pytest.approx(1.0)


def test_predicted_ignore_lowers_iou():
    gt = np.array([[1, 1, 0, 0]], np.uint8)
    matrix = ConfusionMatrix(2)
    matrix.add(np.array([[1, 255, 0, 0]], np.uint8), gt)
    scores = matrix.scores()
    assert scores["per_class"] == {0: 1.0, 1: 0.5}  # the ignored class-1 pixel is a miss, not skipped
    assert scores["fn"] == pytest.approx(0.25) and scores["fp"] == 0.0


def test_perfect_prediction():
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 4, size=(16, 16)).astype(np.uint8)
    gt[:2] = 255
    matrix = ConfusionMatrix(6)
    matrix.add(gt.copy(), gt)
    scores = matrix.scores(["bg", "a", "b", "c", "d", "e"])
    assert scores["miou"] == 1.0 and scores["fp"] == 0.0 and scores["fn"] == 0.0 and scores["pixel_acc"] == 1.0
    assert scores["per_class"] == {"bg": 1.0, "a": 1.0, "b": 1.0, "c": 1.0, "d": None, "e": None}


def test_absent_classes_are_left_out_of_the_mean():
    gt = np.array([[0, 0, 1, 1]], np.uint8)
    pred = np.array([[0, 1, 1, 1]], np.uint8)
    matrix = ConfusionMatrix(4)  # classes 2 and 3 appear nowhere
    matrix.add(pred, gt)
    scores = matrix.scores()
    assert scores["per_class"][2] is None and scores["per_class"][3] is None
    assert scores["miou"] == pytest.approx((1 / 2 + 2 / 3) / 2)  # counting absent classes as 0 would halve it
    # a class only predicted (a false positive) does count, with IoU 0
    matrix.add(np.array([[3]], np.uint8), np.array([[0]], np.uint8))
    assert matrix.scores()["per_class"][3] == 0.0


def test_merge_equals_one_accumulator():
    rng = np.random.default_rng(1)
    pairs = random_pairs(rng, 7, count=8)
    whole, first, second = ConfusionMatrix(7), ConfusionMatrix(7), ConfusionMatrix(7)
    for i, (pred, gt) in enumerate(pairs):
        whole.add(pred, gt)
        (first if i < 3 else second).add(pred, gt)
    merged = first.merge(second)
    assert np.array_equal(merged.counts, whole.counts)
    assert ConfusionMatrix.from_counts(whole.counts).scores() == whole.scores()


def test_bad_input_raises():
    matrix = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="shape"):
        matrix.add(np.zeros((2, 2), np.uint8), np.zeros((2, 3), np.uint8))
    with pytest.raises(ValueError, match="outside"):
        matrix.add(np.full((2, 2), 3, np.uint8), np.zeros((2, 2), np.uint8))
    with pytest.raises(ValueError, match="merge"):
        matrix.merge(ConfusionMatrix(4))


def naive_threshold_labels(scores: np.ndarray, classes: list[int], t: float) -> np.ndarray:
    """argmax over [t, s_1..s_k] with ties to the earlier entry, written as a pixel loop."""
    h, w = scores.shape[1:]
    labels = np.zeros((h, w), np.uint8)
    for y in range(h):
        for x in range(w):
            best_label, best_score = 0, np.float32(t)
            for score, c in zip(scores[:, y, x], classes):
                if score > best_score:
                    best_label, best_score = c, score
            labels[y, x] = best_label
    return labels


def random_seed_images(rng: np.random.Generator, num_classes: int, count: int) -> list:
    images = []
    for i in range(count):
        h, w = rng.integers(4, 12, size=2)
        k = i % 4  # includes images with no present class
        classes = sorted(rng.choice(np.arange(1, num_classes), size=min(k, num_classes - 1), replace=False).tolist())
        # a quarter of the scores sit exactly on a threshold (as float32), and some pixels tie between classes
        scores = rng.random((len(classes), h, w)).astype(np.float32)
        on_grid = rng.random(scores.shape) < 0.25
        scores[on_grid] = np.float32(rng.choice((*DEFAULT_THRESHOLDS, 0.5, 1.0), size=on_grid.sum()))
        if len(classes) > 1:
            scores[1, :, ::3] = scores[0, :, ::3]
        gt = rng.choice(np.r_[np.arange(num_classes), 255], size=(h, w)).astype(np.uint8)
        images.append((scores, classes, gt))
    return images


@pytest.mark.parametrize("num_classes", [2, 4, 21])
def test_threshold_sweep_matches_naive_loop_at_every_threshold(num_classes):
    rng = np.random.default_rng(10 + num_classes)
    images = random_seed_images(rng, num_classes, count=8)
    sweep = ThresholdSweep(num_classes)
    for scores, classes, gt in images:
        sweep.add(scores, classes, gt)
    assert len(sweep.thresholds) == 20 and sweep.thresholds[10] == 0.5
    for i, t in enumerate(sweep.thresholds):
        naive = ConfusionMatrix(num_classes)
        for scores, classes, gt in images:
            labels = naive_threshold_labels(scores, classes, t)
            assert np.array_equal(scores_to_labels(scores, classes, t), labels)
            naive.add(labels, gt)
        assert np.array_equal(sweep.confusion_at(i).counts, naive.counts), f"threshold {t}"
        assert sweep.curve()[i] == (t, naive.scores()["miou"])


def test_threshold_ties_go_to_background():
    scores = np.array([[[0.5, 0.5000001, 0.4999999, 0.0]]], np.float32)
    gt = np.array([[1, 1, 1, 0]], np.uint8)
    assert scores_to_labels(scores, [1], 0.5).tolist() == [[0, 1, 0, 0]]
    assert scores_to_labels(scores, [1], 0.0).tolist() == [[1, 1, 1, 0]]
    sweep = ThresholdSweep(2, thresholds=[0.0, 0.5, 0.6])
    sweep.add(scores, [1], gt)
    assert sweep.confusion_at(1).counts.tolist() == [[1, 0, 0], [2, 1, 0]]
    assert sweep.confusion_at(2).counts.tolist() == [[1, 0, 0], [3, 0, 0]]


def test_threshold_sweep_best_picks_argmax_and_merges():
    rng = np.random.default_rng(5)
    images = random_seed_images(rng, 5, count=10)
    whole, first, second = ThresholdSweep(5), ThresholdSweep(5), ThresholdSweep(5)
    for i, image in enumerate(images):
        whole.add(*image)
        (first if i % 2 else second).add(*image)
    assert np.array_equal(first.merge(second).counts, whole.counts)
    best = whole.best()
    mious = [miou for _, miou in best["curve"]]
    index = int(np.argmax(mious))
    assert best["miou"] == max(mious) and best["threshold"] == DEFAULT_THRESHOLDS[index]
    expected = {**whole.confusion_at(index).scores(), "threshold": DEFAULT_THRESHOLDS[index]}
    assert best == {**expected, "curve": best["curve"]}


def test_threshold_sweep_best_on_a_known_optimum():
    # class 1's true region scores 0.7, background scores 0.3: every threshold in [0.3, 0.7) is perfect
    scores = np.full((1, 4, 4), 0.3, np.float32)
    scores[0, :2] = 0.7
    gt = np.zeros((4, 4), np.uint8)
    gt[:2] = 1
    sweep = ThresholdSweep(2)
    sweep.add(scores, [1], gt)
    best = sweep.best(["background", "thing"])
    assert best["threshold"] == 0.3 and best["miou"] == 1.0 and best["per_class"] == {"background": 1.0, "thing": 1.0}
    assert dict(best["curve"])[0.25] == pytest.approx(0.5 * (0 + 0.5))  # all foreground below 0.3
    assert dict(best["curve"])[0.7] == pytest.approx(0.5 * (0.5 + 0))  # all background from 0.7


def test_threshold_sweep_rejects_bad_input():
    sweep = ThresholdSweep(3)
    with pytest.raises(ValueError, match="class ids"):
        sweep.add(np.zeros((1, 2, 2)), [3], np.zeros((2, 2), np.uint8))
    with pytest.raises(ValueError, match="differ"):
        sweep.add(np.zeros((1, 2, 2)), [1], np.zeros((3, 2), np.uint8))
    with pytest.raises(ValueError, match="NaN"):
        sweep.add(np.full((1, 2, 2), np.nan), [1], np.zeros((2, 2), np.uint8))
    with pytest.raises(ValueError, match="counted no"):
        sweep.best()
    with pytest.raises(ValueError, match="increasing"):
        ThresholdSweep(3, thresholds=[0.5, 0.1])


def test_threshold_grid_is_exactly_the_authors():
    assert parse_threshold_grid("0.00:0.59:0.01") == tuple(i / 100.0 for i in range(60))  # MCTformer's i / 100.0
    assert parse_threshold_grid("0:0.99:0.01") == tuple(i / 100.0 for i in range(100))
    every_5_percent = tuple(round(0.05 * i, 2) for i in range(20))
    assert parse_threshold_grid(DEFAULT_THRESHOLD_GRID) == DEFAULT_THRESHOLDS == every_5_percent
    assert parse_threshold_grid("0.3:0.3:0.1") == (0.3,)
    for bad in ("0:1", "a:b:c", "0:1:0", "1:0:0.1"):
        with pytest.raises(ValueError, match="threshold grid"):
            parse_threshold_grid(bad)


def test_pick_threshold_max_and_early_stop():
    curve = [0.2, 0.4, 0.4, 0.3, 0.9]
    assert pick_threshold(curve, "max") == (4, 5)
    assert pick_threshold(curve, "early-stop") == (1, 3)  # 0.4 at index 2 is not strictly higher: stop there
    assert pick_threshold([0.1, 0.2, 0.3], "early-stop") == (2, 3)
    assert pick_threshold([None, 0.5, 0.4], "max") == (1, 3)
    with pytest.raises(ValueError, match="pick"):
        pick_threshold(curve, "best")


def test_mean_over_all_classes_counts_absent_ones_as_zero():
    gt = np.array([[0, 0, 1, 1]], np.uint8)
    pred = np.array([[0, 1, 1, 1]], np.uint8)
    matrix = ConfusionMatrix(4)  # classes 2 and 3 appear nowhere
    matrix.add(pred, gt)
    scores = matrix.scores(mean_over="all")
    assert scores["per_class"] == {0: 0.5, 1: pytest.approx(2 / 3), 2: 0.0, 3: 0.0}
    assert scores["miou"] == pytest.approx((1 / 2 + 2 / 3) / 4)
    assert scores["fp"] == pytest.approx((0 + 1 / 3) / 4) and scores["fn"] == pytest.approx((1 / 2 + 0) / 4)
    assert matrix.scores(mean_over="present")["miou"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    with pytest.raises(ValueError, match="mean_over"):
        matrix.scores(mean_over="some")


def test_class_ties_go_to_the_lowest_class_id_whatever_the_order():
    scores = np.full((2, 1, 3), 0.7, np.float32)
    assert scores_to_labels(scores, [5, 2], 0.5).tolist() == [[2, 2, 2]]
    sweep = ThresholdSweep(6, (0.5,))
    sweep.add(scores, [5, 2], np.array([[2, 2, 5]], np.uint8))
    assert sweep.confusion_at(0).counts[2, 2] == 2 and sweep.confusion_at(0).counts[5, 2] == 1

"""Metrics: confusion-matrix mIoU for label maps, a background-threshold sweep for seeds, and mAP/F1
for the multi-label classifier.

The accumulators hold nothing but int64 counts, so each Ray worker can build one per batch and the
driver merges them (`a.merge(b)`, or `from_counts(summed_counts)` when the counts travel as columns).

Conventions (VOC protocol, as in the seed papers):
  * background (class 0) is a class like the others; ground truth 255 is skipped;
  * a predicted 255 (an ignore region of a pseudo mask) means "no class": the pixel counts in T_c of its
    ground-truth class and in no P_c, so ignoring a pixel lowers that class's IoU instead of being free;
  * ``mean_over="present"`` (default): a class absent from both ground truth and prediction (union 0) is
    left out of the mean and reported as None, not as an IoU of 0. ``mean_over="all"`` is the papers'
    evaluation code (MCTformer's and ACR's ``evaluation.py``): the mean is over every class of the data
    set and such a class counts as IoU 0 (and FP = FN = 0). On a subset that lacks some classes the two
    differ by a lot; on full VOC val every class is present and they agree. (Their +1e-10 in every
    denominator changes an IoU by at most 1e-10 / union, below any printed digit, so it is not modelled.)
  * FP_c = (P_c - TP_c) / union_c and FN_c = (T_c - TP_c) / union_c, averaged over the same classes as
    the mIoU (so IoU_c + FP_c + FN_c = 1 for every counted class).
  * a seed pixel is background when its top score is <= the threshold (a class wins only strictly above
    it); among classes, ties go to the lowest class id, as in the authors' argmax over class-indexed maps.
  * the threshold a sweep reports: ``pick="max"`` the highest mIoU (the lowest threshold on ties), or
    ``"early-stop"``, MCTformer's ``--curve`` loop: walk the thresholds upwards and stop at the first whose
    mIoU is not strictly above the best so far.

Score maps are compared in float32, the dtype `codec.decode_scores` returns: the sweep, `scores_to_labels`
and `refine.crf` all cast to it, so a threshold picked by the sweep gives the same labels everywhere.
"""
from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal, InvalidOperation

import numpy as np

from ray_wsss.core.schema import IGNORE_INDEX

SCORE_DTYPE = np.float32
MEAN_OVER = ("present", "all")
THRESHOLD_PICKS = ("max", "early-stop")


def parse_threshold_grid(grid: str) -> tuple[float, ...]:
    """``"start:stop:step"`` (stop included) -> the thresholds, each the double nearest its decimal value.

    ``"0.00:0.59:0.01"`` gives exactly MCTformer's ``i / 100.0`` for i = 0..59, so the float32 comparison
    with the scores is the same as theirs.
    """
    parts = grid.split(":")
    try:
        start, stop, step = (Decimal(p.strip()) for p in parts)
    except (ValueError, InvalidOperation, TypeError):
        raise ValueError(f"threshold grid {grid!r} is not start:stop:step (three numbers)") from None
    if not step > 0 or stop < start:
        raise ValueError(f"threshold grid {grid!r}: step must be positive and stop >= start")
    count = int((stop - start) / step) + 1
    return tuple(float(start + i * step) for i in range(count))


DEFAULT_THRESHOLD_GRID = "0.00:0.95:0.05"
DEFAULT_THRESHOLDS: tuple[float, ...] = parse_threshold_grid(DEFAULT_THRESHOLD_GRID)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def pick_threshold(mious: Sequence[float | None], pick: str = "max") -> tuple[int, int]:
    """(index of the reported threshold, how many thresholds the rule looked at) for a curve of mIoUs.

    ``"max"`` looks at all; ``"early-stop"`` (MCTformer's ``--curve``) stops at the first mIoU that is
    not strictly above the best so far. None (nothing counted) is below everything.
    """
    _check_choice("pick", pick, THRESHOLD_PICKS)
    values = [-np.inf if m is None else m for m in mious]
    if not values or not np.isfinite(values).any():
        raise ValueError("the threshold sweep has counted no ground-truth pixels")
    if pick == "max":
        return int(np.argmax(values)), len(values)
    best = 0
    for index in range(1, len(values)):
        if not values[index] > values[best]:
            return best, index + 1
        best = index
    return best, len(values)


def _class_names(class_names: Sequence[str] | None, num_classes: int) -> list:
    if class_names is None:
        return list(range(num_classes))
    if len(class_names) != num_classes:
        raise ValueError(f"got {len(class_names)} class names for {num_classes} classes")
    return list(class_names)


def _check_label_map(labels: np.ndarray, num_classes: int, what: str) -> None:
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{what} must hold integer class ids, got dtype {labels.dtype}")
    bad = ((labels < 0) | (labels >= num_classes)) & (labels != IGNORE_INDEX)
    if bad.any():
        values = np.unique(labels[bad])[:10].tolist()
        raise ValueError(f"{what} has class ids outside 0..{num_classes - 1} (and not {IGNORE_INDEX}): {values}")


def _check_scores(scores: np.ndarray, classes: Sequence[int], max_class: int) -> tuple[np.ndarray, np.ndarray]:
    """-> (float32 scores [k, H, W], int64 class ids [k]), or ValueError."""
    scores = np.asarray(scores)
    if scores.ndim != 3:
        raise ValueError(f"scores must be [k, H, W], got shape {scores.shape}")
    classes = np.asarray(classes, dtype=np.int64).reshape(-1)
    if len(classes) != scores.shape[0]:
        raise ValueError(f"got {len(classes)} class ids for {scores.shape[0]} score maps")
    if ((classes < 1) | (classes > max_class)).any():
        raise ValueError(f"score map class ids must be foreground ids 1..{max_class}, got {classes.tolist()}")
    return scores.astype(SCORE_DTYPE, copy=False), classes


def _top_class(scores: np.ndarray, classes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel of float32 scores [k, ...] (k >= 1): (best class id, its score); the lowest id wins ties."""
    if (np.diff(classes) < 0).any():
        order = np.argsort(classes, kind="stable")
        scores, classes = scores[order], classes[order]
    best = scores.argmax(axis=0)
    top = np.take_along_axis(scores, best[None], axis=0)[0]
    if not np.isfinite(top).all():
        raise ValueError("scores contain NaN or infinite values")
    return classes[best], top


def scores_to_labels(scores: np.ndarray, classes: Sequence[int], threshold: float) -> np.ndarray:
    """Score maps [k, H, W] of `classes` -> uint8 [H, W] labels.

    A pixel is background when its best score is <= threshold, else the class of its best score
    (argmax over [threshold, s_1..s_k] with ties to background). k = 0 gives all background.
    """
    scores, classes = _check_scores(scores, classes, IGNORE_INDEX - 1)
    if len(classes) == 0:
        return np.zeros(scores.shape[1:], np.uint8)
    fg_class, top = _top_class(scores, classes)
    return np.where(top > SCORE_DTYPE(threshold), fg_class, 0).astype(np.uint8)


class ConfusionMatrix:
    """Pixel counts [gt class, predicted class] over `num_classes` classes, background included.

    `counts` is int64 [K, K + 1]: the last column holds pixels predicted 255 ("no class").
    """

    def __init__(self, num_classes: int):
        if not 1 <= num_classes <= IGNORE_INDEX:
            raise ValueError(f"num_classes must be in 1..{IGNORE_INDEX} (255 is the ignore id), got {num_classes}")
        self.num_classes = num_classes
        self.counts = np.zeros((num_classes, num_classes + 1), np.int64)

    @classmethod
    def from_counts(cls, counts: np.ndarray) -> ConfusionMatrix:
        counts = np.asarray(counts, dtype=np.int64)
        if counts.ndim != 2 or counts.shape[1] != counts.shape[0] + 1:
            raise ValueError(f"confusion counts must be [K, K + 1], got shape {counts.shape}")
        matrix = cls(counts.shape[0])
        matrix.counts += counts
        return matrix

    def add(self, pred: np.ndarray, gt: np.ndarray) -> None:
        """Count one label map `pred` against its ground truth `gt` (same shape, class ids or 255)."""
        pred, gt = np.asarray(pred), np.asarray(gt)
        if pred.shape != gt.shape:
            raise ValueError(f"prediction shape {pred.shape} differs from ground truth shape {gt.shape}")
        k = self.num_classes
        _check_label_map(gt, k, "ground truth")
        _check_label_map(pred, k, "prediction")
        valid = gt != IGNORE_INDEX
        gt_ids = gt[valid].astype(np.int64)
        pred_ids = pred[valid].astype(np.int64)
        pred_ids[pred_ids == IGNORE_INDEX] = k  # the "no class" column
        self.counts += np.bincount(gt_ids * (k + 1) + pred_ids, minlength=k * (k + 1)).reshape(k, k + 1)

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """Add `other`'s counts into this one (in place) and return self."""
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge {other.num_classes}-class counts into {self.num_classes}-class counts")
        self.counts += other.counts
        return self

    def scores(self, class_names: Sequence[str] | None = None, mean_over: str = "present") -> dict:
        """{"miou", "fp", "fn", "pixel_acc", "per_class": {name: iou or None}}; None metrics when empty.

        ``mean_over``: "present" or "all" (module docstring); with "all" every class has an IoU.
        """
        _check_choice("mean_over", mean_over, MEAN_OVER)
        k = self.num_classes
        tp = np.diagonal(self.counts[:, :k]).astype(np.float64)
        gt_total = self.counts.sum(axis=1)
        pred_total = self.counts[:, :k].sum(axis=0)
        union = gt_total + pred_total - tp
        present = union > 0
        counted = present if mean_over == "present" or not present.any() else np.ones(k, bool)
        union = np.where(present, union, 1)  # absent classes: 0 / 1, as the authors' 0 / 1e-10
        iou = tp / union
        names = _class_names(class_names, k)
        per_class = {name: (float(iou[c]) if counted[c] else None) for c, name in enumerate(names)}
        if not counted.any():
            return {"miou": None, "fp": None, "fn": None, "pixel_acc": None, "per_class": per_class}
        return {
            "miou": float(iou[counted].mean()),
            "fp": float(((pred_total - tp)[counted] / union[counted]).mean()),
            "fn": float(((gt_total - tp)[counted] / union[counted]).mean()),
            "pixel_acc": float(tp.sum() / gt_total.sum()),
            "per_class": per_class,
        }


class ThresholdSweep:
    """mIoU of score maps at every background threshold, from one pass over the data.

    Each ground-truth pixel is counted once in a joint histogram [gt class, top class, bin], where bin is
    how many thresholds lie strictly below the pixel's top score; at threshold i the pixel is foreground
    iff bin > i. Cumulative sums over bins then give every threshold's confusion matrix, identical to
    running `scores_to_labels` at each threshold.
    """

    def __init__(self, num_classes: int, thresholds: Sequence[float] | None = None):
        if not 1 <= num_classes <= IGNORE_INDEX:
            raise ValueError(f"num_classes must be in 1..{IGNORE_INDEX} (255 is the ignore id), got {num_classes}")
        thresholds = np.asarray(DEFAULT_THRESHOLDS if thresholds is None else thresholds, np.float64)
        edges = thresholds.astype(SCORE_DTYPE)  # compare as scores_to_labels does
        if thresholds.ndim != 1 or len(thresholds) == 0 or not np.isfinite(thresholds).all():
            raise ValueError(f"thresholds must be a non-empty list of finite numbers, got {thresholds}")
        if (np.diff(edges) <= 0).any():
            raise ValueError(f"thresholds must be strictly increasing (in float32), got {thresholds.tolist()}")
        self.num_classes = num_classes
        self.thresholds = thresholds
        self._edges = edges
        self.counts = np.zeros((num_classes, num_classes, len(thresholds) + 1), np.int64)

    def add(self, scores: np.ndarray, classes: Sequence[int], gt: np.ndarray) -> None:
        """Count one image: score maps [k, H, W] of foreground `classes` (k may be 0), gt [H, W]."""
        k = self.num_classes
        gt = np.asarray(gt)
        scores, classes = _check_scores(scores, classes, k - 1)
        if scores.shape[1:] != gt.shape:
            raise ValueError(f"score maps {scores.shape[1:]} differ from ground truth shape {gt.shape}")
        _check_label_map(gt, k, "ground truth")
        valid = gt != IGNORE_INDEX
        gt_ids = gt[valid].astype(np.int64)
        if len(classes) == 0:  # bin 0: background at every threshold
            fg_class = bins = np.zeros_like(gt_ids)
        else:
            fg_class, top = _top_class(scores[:, valid], classes)
            bins = np.searchsorted(self._edges, top, side="left")  # thresholds strictly below top
        num_bins = self.counts.shape[2]
        index = (gt_ids * k + fg_class) * num_bins + bins
        self.counts += np.bincount(index, minlength=self.counts.size).reshape(self.counts.shape)

    def merge(self, other: ThresholdSweep) -> ThresholdSweep:
        """Add `other`'s counts into this one (in place) and return self."""
        if other.num_classes != self.num_classes or not np.array_equal(other.thresholds, self.thresholds):
            raise ValueError("cannot merge threshold sweeps with different classes or thresholds")
        self.counts += other.counts
        return self

    def confusion_at(self, index: int) -> ConfusionMatrix:
        """The confusion matrix at `thresholds[index]`."""
        k = self.num_classes
        matrix = ConfusionMatrix(k)
        matrix.counts[:, :k] = self.counts[:, :, index + 1:].sum(axis=2)  # foreground: bin > index
        matrix.counts[:, 0] += self.counts[:, :, :index + 1].sum(axis=(1, 2))  # the rest is background
        return matrix

    def curve(self, mean_over: str = "present") -> list[tuple[float, float | None]]:
        """[(threshold, mIoU), ...] for every threshold."""
        return [(float(t), self.confusion_at(i).scores(mean_over=mean_over)["miou"])
                for i, t in enumerate(self.thresholds)]

    def best(self, class_names: Sequence[str] | None = None, mean_over: str = "present", pick: str = "max") -> dict:
        """Scores at the threshold ``pick`` chooses (:func:`pick_threshold`) plus "threshold" and "curve"."""
        curve = self.curve(mean_over)
        index, _ = pick_threshold([miou for _, miou in curve], pick)
        result = self.confusion_at(index).scores(class_names, mean_over)
        result.update(threshold=curve[index][0], curve=curve)
        return result


# ---------------------------------------------------------------- multi-label classification (held-out split)


def average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """AP of one class: mean precision at the rank of each positive (VOC-style, no interpolation)."""
    order = np.argsort(-scores, kind="stable")
    hits = targets[order] > 0
    if not hits.any():
        return float("nan")
    precision_at_k = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float(precision_at_k[hits].mean())


def mean_average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """mAP over classes that have at least one positive. scores/targets: [N, K]."""
    aps = [average_precision(scores[:, k], targets[:, k]) for k in range(scores.shape[1])]
    aps = [a for a in aps if not np.isnan(a)]
    return float(np.mean(aps)) if aps else float("nan")


def chance_mean_average_precision(targets: np.ndarray) -> float:
    """The mAP a classifier that has learned nothing gets: each class's AP equals its positive rate.

    Over the same classes as :func:`mean_average_precision` (those with a positive).
    """
    rates = (targets > 0).mean(axis=0)
    rates = rates[rates > 0]
    return float(rates.mean()) if len(rates) else float("nan")


# A held-out mAP within this of chance counts as "learned nothing" (with F1 0, the other sign).
NO_LEARNING_MAP_MARGIN = 0.05


def no_learning(val: dict[str, float]) -> str | None:
    """Why held-out metrics (``map``, ``map_chance``, ``f1``) say a classifier learned nothing; None if it did."""
    reasons = []
    if val.get("f1") == 0:
        reasons.append("held-out F1 is 0 (no class is ever predicted)")
    chance, mean_ap = val.get("map_chance"), val.get("map")
    if chance is not None and mean_ap is not None and mean_ap < chance + NO_LEARNING_MAP_MARGIN:
        reasons.append(f"held-out mAP {mean_ap:.3f} is at the label-frequency level {chance:.3f} "
                       f"(what ranking images at random gives)")
    return "; ".join(reasons) or None


def f1_scores(logits: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    """Micro and macro F1 at probability 0.5 (logit 0)."""
    pred = logits > 0
    truth = targets > 0
    tp = (pred & truth).sum(0).astype(np.float64)
    fp = (pred & ~truth).sum(0)
    fn = (~pred & truth).sum(0)
    denom = 2 * tp + fp + fn
    per_class = np.divide(2 * tp, denom, out=np.full_like(tp, np.nan), where=denom > 0)
    micro = 2 * tp.sum() / max(1.0, (2 * tp + fp + fn).sum())
    macro = float(np.nanmean(per_class)) if np.isfinite(per_class).any() else float("nan")
    return {"f1": float(micro), "f1_macro": macro}

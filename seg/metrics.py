"""Segmentation metrics from one confusion matrix; pixels with the ignore index are left out."""

from __future__ import annotations

import numpy as np


class ConfusionMatrix:
    """Accumulates a (classes x classes) matrix: rows are the truth, columns the prediction."""

    def __init__(self, num_classes: int, ignore_index: int | None = 255):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)

    def update(self, pred: np.ndarray, target: np.ndarray) -> None:
        pred = np.asarray(pred).ravel().astype(np.int64)
        target = np.asarray(target).ravel().astype(np.int64)
        keep = (target >= 0) & (target < self.num_classes)
        if self.ignore_index is not None:
            keep &= target != self.ignore_index
        index = target[keep] * self.num_classes + pred[keep]
        self.matrix += np.bincount(index, minlength=self.num_classes**2).reshape(self.num_classes, -1)

    def compute(self) -> dict:
        return metrics_from_confusion(self.matrix)


def metrics_from_confusion(matrix: np.ndarray) -> dict:
    """Per-class IoU and Dice, their means over classes that occur (in truth or prediction), pixel
    accuracy and pixel error."""
    matrix = matrix.astype(np.float64)
    tp = np.diag(matrix)
    fp = matrix.sum(axis=0) - tp
    fn = matrix.sum(axis=1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = tp / (tp + fp + fn)
        dice = 2 * tp / (2 * tp + fp + fn)
    total = matrix.sum()
    accuracy = float(tp.sum() / total) if total else float("nan")
    return {
        "miou": float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan"),
        "dice": float(np.nanmean(dice)) if np.isfinite(dice).any() else float("nan"),
        "pixel_accuracy": accuracy,
        "pixel_error": 1.0 - accuracy,
        "iou": [None if np.isnan(v) else float(v) for v in iou],
        "dice_per_class": [None if np.isnan(v) else float(v) for v in dice],
        "pixels": int(total),
    }

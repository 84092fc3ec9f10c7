"""Training losses by name: the registry `train.loss` chooses from.

Each loss takes (N, K, H, W) logits and (N, H, W) class indices and leaves out pixels at the ignore index;
the cross-entropy part also takes class weights and (N, H, W) per-pixel weights (U-Net's border weight map,
which the data set yields with `train.border_weight`). `register` adds one under a new name: a factory of
(ignore_index, class_weights) (also add the name to `TrainConfig.loss` in `seg.config`).
"""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from seg.errors import ConfigError

LOSSES: dict[str, Callable[[int, list[float] | None], nn.Module]] = {}


def register(name: str):
    def wrap(factory: Callable[[int, list[float] | None], nn.Module]):
        LOSSES[name] = factory
        return factory

    return wrap


def build_loss(
    name: str, ignore_index: int, class_weights: list[float] | str | None = None,
    classes: list[str] | None = None, masks: Iterable[np.ndarray] = (), log: Callable[[str], None] | None = None,
) -> nn.Module:
    """The loss registered as `name`, leaving out pixels labelled `ignore_index`.

    `class_weights` weight the cross-entropy part by class: one per name in `classes`, or "auto" for
    median-frequency weights of `masks` (the training masks), logged once.
    """
    if name not in LOSSES:
        raise ConfigError(f"train.loss: unknown loss {name!r}; one of {', '.join(sorted(LOSSES))}")
    if class_weights == "auto":
        if classes is None:
            raise ValueError("class_weights auto needs the class names")
        class_weights = median_frequency_weights(masks, len(classes), ignore_index)
        if log is not None:
            named = ", ".join(f"{c} {w:.3g}" for c, w in zip(classes, class_weights))
            log(f"class weights (median frequency): {named}")
    return LOSSES[name](ignore_index, class_weights)


def median_frequency_weights(masks: Iterable[np.ndarray], num_classes: int, ignore_index: int) -> list[float]:
    """Median-frequency balancing (Eigen and Fergus 2015): a class's frequency is its pixels over the pixels of
    the masks it appears in; its weight is the median frequency over its own. Absent classes get 1."""
    pixels = np.zeros(num_classes, np.int64)
    present_in = np.zeros(num_classes, np.int64)
    for mask in masks:
        counts = np.bincount(mask[mask != ignore_index].ravel(), minlength=num_classes)[:num_classes]
        pixels += counts
        present_in += np.where(counts > 0, counts.sum(), 0)
    seen = pixels > 0
    if not seen.any():
        return [1.0] * num_classes
    freq = np.where(seen, pixels / np.maximum(present_in, 1), 0.0)
    median = float(np.median(freq[seen]))
    return [float(median / f) if s else 1.0 for f, s in zip(freq, seen)]


@register("ce")
@register("weighted_ce")  # the same, with U-Net's border weight map on by default (`train.border_weight`)
def cross_entropy(ignore_index: int, class_weights: list[float] | None = None) -> nn.Module:
    return WeightedCrossEntropy(ignore_index, class_weights)


@register("dice")
def dice(ignore_index: int, class_weights: list[float] | None = None) -> nn.Module:
    from segmentation_models_pytorch.losses import DiceLoss

    return DiceLoss("multiclass", ignore_index=ignore_index)


@register("focal")
def focal(ignore_index: int, class_weights: list[float] | None = None) -> nn.Module:
    from segmentation_models_pytorch.losses import FocalLoss

    return FocalLoss("multiclass", ignore_index=ignore_index)


@register("dice_ce")
def dice_ce(ignore_index: int, class_weights: list[float] | None = None) -> nn.Module:
    return Sum(dice(ignore_index), cross_entropy(ignore_index, class_weights))


class WeightedCrossEntropy(nn.Module):
    """Cross-entropy weighted per pixel: sum(w * ce) / sum(w) over the valid pixels, w the pixel weights
    (1 where none are given) times the class weight of each pixel's class. With neither, plain mean CE."""

    takes_pixel_weights = True

    def __init__(self, ignore_index: int, class_weights: list[float] | None = None):
        super().__init__()
        self.ignore_index = ignore_index
        weight = None if class_weights is None else torch.tensor(class_weights, dtype=torch.float32)
        self.register_buffer("class_weights", weight)

    def forward(self, logits, target, pixel_weights=None):
        if pixel_weights is None:
            return F.cross_entropy(logits, target, weight=self._class_weights(logits), ignore_index=self.ignore_index)
        ce = F.cross_entropy(logits.float(), target, ignore_index=self.ignore_index, reduction="none")
        valid = target != self.ignore_index
        w = torch.where(valid, pixel_weights.float(), 0.0)
        if self.class_weights is not None:
            w = w * self.class_weights.to(logits.device)[torch.where(valid, target, 0)]
        return (w * ce).sum() / w.sum().clamp_min(1e-12)

    def _class_weights(self, logits):
        return None if self.class_weights is None else self.class_weights.to(logits.device, logits.dtype)


class Sum(nn.Module):
    """The sum of several losses; per-pixel weights go to those that take them."""

    def __init__(self, *losses: nn.Module):
        super().__init__()
        self.losses = nn.ModuleList(losses)

    def forward(self, logits, target, *pixel_weights):
        total = 0
        for loss in self.losses:
            takes = getattr(loss, "takes_pixel_weights", False)
            total = total + (loss(logits, target, *pixel_weights) if takes else loss(logits, target))
        return total

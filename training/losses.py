"""Training losses by name: the registry `train.loss` chooses from.

Each loss takes (N, K, H, W) logits and (N, H, W) class indices and leaves out pixels at the ignore index.
`register` adds one under a new name (also add the name to `TrainConfig.loss` in `seg.config`).
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from seg.errors import ConfigError

LOSSES: dict[str, Callable[[int], nn.Module]] = {}


def register(name: str):
    def wrap(factory: Callable[[int], nn.Module]):
        LOSSES[name] = factory
        return factory

    return wrap


def build_loss(name: str, ignore_index: int) -> nn.Module:
    """The loss registered as `name`, leaving out pixels labelled `ignore_index`."""
    if name not in LOSSES:
        raise ConfigError(f"train.loss: unknown loss {name!r}; one of {', '.join(sorted(LOSSES))}")
    return LOSSES[name](ignore_index)


@register("ce")
def cross_entropy(ignore_index: int) -> nn.Module:
    return nn.CrossEntropyLoss(ignore_index=ignore_index)


@register("dice")
def dice(ignore_index: int) -> nn.Module:
    from segmentation_models_pytorch.losses import DiceLoss

    return DiceLoss("multiclass", ignore_index=ignore_index)


@register("focal")
def focal(ignore_index: int) -> nn.Module:
    from segmentation_models_pytorch.losses import FocalLoss

    return FocalLoss("multiclass", ignore_index=ignore_index)


@register("dice_ce")
def dice_ce(ignore_index: int) -> nn.Module:
    return Sum(dice(ignore_index), cross_entropy(ignore_index))


class Sum(nn.Module):
    """The sum of several losses."""

    def __init__(self, *losses: nn.Module):
        super().__init__()
        self.losses = nn.ModuleList(losses)

    def forward(self, logits, target):
        return sum(loss(logits, target) for loss in self.losses)

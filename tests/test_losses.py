"""The loss registry: every name the config takes builds a loss that leaves out the ignore index."""

import math
from typing import get_args

import pytest
import torch

from seg.config import TrainConfig
from seg.errors import ConfigError
from training.losses import LOSSES, build_loss

CONFIG_NAMES = get_args(TrainConfig.model_fields["loss"].annotation)
IGNORE = 255


def batch(classes: int = 3):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, classes, 16, 16, generator=generator, requires_grad=True)
    target = torch.randint(0, classes, (2, 16, 16), generator=generator)
    target[:, :4] = IGNORE  # a band of ignored pixels, as VOC borders are
    return logits, target


def test_the_registry_holds_exactly_the_config_names():
    assert set(CONFIG_NAMES) == set(LOSSES)


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_each_config_loss_is_finite_and_ignores_the_ignore_index(name):
    loss_fn = build_loss(name, IGNORE)
    logits, target = batch()
    loss = loss_fn(logits, target)
    assert loss.ndim == 0 and math.isfinite(loss.item()) and loss.item() > 0
    loss.backward()
    ignored = target == IGNORE
    grad = logits.grad.abs().sum(1)
    assert float(grad[ignored].max()) == 0.0 and float(grad[~ignored].max()) > 0  # ignored pixels teach nothing


def test_dice_ce_is_the_sum_of_dice_and_ce():
    logits, target = batch()
    total = build_loss("dice_ce", IGNORE)(logits, target)
    parts = build_loss("dice", IGNORE)(logits, target) + build_loss("ce", IGNORE)(logits, target)
    assert torch.allclose(total, parts)


def test_an_unknown_name_is_a_config_error():
    with pytest.raises(ConfigError, match="train.loss: unknown loss 'lovasz'; one of ce, dice, dice_ce, focal"):
        build_loss("lovasz", IGNORE)

"""What a run's steps are made of: the optimiser and its learning-rate schedule, when to validate, the
seeded order of training samples, and the training meter."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, Sampler

from seg.config import Config
from training.data import SegmentationDataset


def build_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    t = cfg.train
    if t.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    cls = torch.optim.AdamW if t.optimizer == "adamw" else torch.optim.Adam
    return cls(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)


def lr_factor(cfg: Config, progress: float, epoch_float: float) -> float:
    """The learning-rate multiplier at `progress` in [0, 1] of the run (by steps, or by time with a budget)."""
    t = cfg.train
    if t.warmup_epochs and epoch_float < t.warmup_epochs:
        return (epoch_float + 1e-3) / t.warmup_epochs
    progress = min(max(progress, 0.0), 1.0)
    if t.scheduler == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    if t.scheduler == "poly":
        return (1 - progress) ** 0.9
    return 1.0


# A validation pixel costs about 2/3 of a training pixel: a forward pass is about a third of forward and
# backward, and tiles with 0.25 overlap (and a mirrored margin) see each pixel about twice (an image that
# fits one batch of tiles is one tile, seen about 1.3 times with its margin: there, an upper bound). Validations
# at least VAL_COST x (validation pixels) / (training pixels a step) steps apart cost at most a tenth of
# the training between them (9 x 2/3 = 6).
VAL_COST = 6


def validation_interval(cfg: Config, steps_per_epoch: int, total_steps: int, val_pixels: int = 0, world: int = 1) -> int:
    """Optimiser steps between validations: `val_every_steps`, `val_every` epochs, or by default
    max(1 epoch, min(200 steps, a tenth of the run)), and never so often that validation would cost more
    than about a tenth of the training time (`VAL_COST`)."""
    t = cfg.train
    if t.val_every_steps:
        return t.val_every_steps
    if t.val_every:
        return t.val_every * steps_per_epoch
    per_step = t.batch_size * t.accumulate * world * cfg.data.crop_size**2
    return max(steps_per_epoch, min(200, total_steps // 10), math.ceil(VAL_COST * val_pixels / per_step))


class SeededSampler(Sampler):
    """This process's training samples from optimiser step `start` on, as (index, seed) pairs.

    A step takes `batch * accumulate * world` samples of epoch e's order (reshuffled passes over the data),
    each with an augmentation seed, both drawn from (seed, e): so the same step sees the same crops whether
    or not the run was resumed in between. Of each batch of `batch * world`, rank r takes the r-th `batch`,
    so N ranks together see what one process with N times the batch sees.
    """

    def __init__(self, size: int, batch: int, accumulate: int, steps_per_epoch: int, total_steps: int, seed: int,
                 start: int = 0, rank: int = 0, world: int = 1):  # fmt: skip
        self.size, self.batch, self.accumulate, self.steps_per_epoch = size, batch, accumulate, steps_per_epoch
        self.total_steps, self.seed, self.start = total_steps, seed % 2**32, start
        self.rank, self.world = rank, world

    def __len__(self) -> int:
        return max(self.total_steps - self.start, 0) * self.batch * self.accumulate

    def __iter__(self):
        per_step = self.batch * self.accumulate * self.world
        epoch, count = -1, self.steps_per_epoch * per_step
        for step in range(self.start, self.total_steps):
            if step // self.steps_per_epoch != epoch:
                epoch = step // self.steps_per_epoch
                rng = np.random.default_rng([self.seed, epoch])
                order = np.concatenate([rng.permutation(self.size) for _ in range(-(-count // self.size))])
                seeds = rng.integers(0, 2**32, count)
            for micro in range(self.accumulate):
                first = step % self.steps_per_epoch * per_step + (micro * self.world + self.rank) * self.batch
                for i in range(first, first + self.batch):
                    yield int(order[i]), int(seeds[i])


class SeededSamples(Dataset):
    """`dataset[index]` with its augmentation seeded first; items are `SeededSampler`'s (index, seed) pairs,
    so loader processes need no seeding of their own."""

    def __init__(self, dataset: SegmentationDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]):
        index, seed = item
        self.dataset.set_random_seed(seed)
        return self.dataset[index]


class Meter:
    """Training loss, images and seconds summed since the last `take`."""

    def __init__(self):
        self.loss, self.steps, self.images, self.seconds = 0.0, 0, 0, 0.0

    def add(self, loss: float, images: int, seconds: float) -> None:
        self.loss, self.steps = self.loss + loss, self.steps + 1
        self.images, self.seconds = self.images + images, self.seconds + seconds

    def take(self) -> tuple[float, float]:
        """(mean loss, images/s), and start over."""
        figures = self.loss / max(self.steps, 1), self.images / max(self.seconds, 1e-9)
        self.__init__()
        return figures

"""The Trainer's set-up, step by step: the config's names checked against their registries, the data found
and read once, the model built on its device, and the run's length planned."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from seg.config import Config, DataConfig
from seg.data.samples import Sample, check_samples, find_samples, load_pair
from seg.models import build_model
from training.checkpoint import saved_layout
from training.data import SegmentationDataset, build_augmentation
from training.distributed import Dist, sync_batchnorm
from training.plan import foreground_crops
from training.schedule import validation_interval


def check_names(cfg: Config) -> None:
    """ConfigError unless the config's architecture and loss are in their registries (`seg.models.ARCHS`,
    `training.losses.LOSSES`): the one list of each, checked before any data is read."""
    from seg.errors import ConfigError
    from seg.models import ARCHS
    from training.losses import LOSSES

    if cfg.model.arch not in ARCHS:
        raise ConfigError(f"model.arch: unknown architecture {cfg.model.arch!r}; one of {', '.join(sorted(ARCHS))}")
    if cfg.train.loss not in LOSSES:
        raise ConfigError(f"train.loss: unknown loss {cfg.train.loss!r}; one of {', '.join(sorted(LOSSES))}")


def load_data(cfg: Config, log: Callable[[str], None]) -> tuple[list[Sample], list[Sample], SegmentationDataset, SegmentationDataset]:
    """The train and val samples, every one read and checked once (kept in memory with `data.cache`), and
    their data sets: augmented training crops, whole validation images."""
    data = cfg.data
    train_samples, val_samples = find_samples(data)
    log(f"data: {len(train_samples)} training and {len(val_samples)} validation images; checking them")
    cache = check_samples(train_samples + val_samples, data)
    if data.foreground_crops == "auto":
        data.foreground_crops, why = foreground_crops(data.classes, class_fractions(train_samples, data, cache))
        log(f"data.foreground_crops auto: {data.foreground_crops:g} ({why})")
    augment = build_augmentation(data, cfg.train.seed)
    train_set = SegmentationDataset(train_samples, data, augment, cache, cfg.train.border_weight)
    return train_samples, val_samples, train_set, SegmentationDataset(val_samples, data, None, cache)


def build_model_on(
    cfg: Config, device: torch.device, dist: Dist, channels_last: bool, saved: dict[str, Any] | None = None
) -> tuple[dict[str, Any], nn.Module]:
    """The model's keyword arguments (as checkpoints record them) and the model, seeded, on `device`;
    laid out as the `saved` checkpoint's weights when a run resumes."""
    torch.manual_seed(cfg.train.seed)
    kwargs = {k: (str(v) if isinstance(v, Path) else v) for k, v in cfg.model_kwargs().items()}
    if saved is not None:
        kwargs = saved_layout(kwargs, saved.get("raw_model", saved["model"]))
    model = sync_batchnorm(build_model(**kwargs), device, dist).to(device)
    return kwargs, model.to(memory_format=torch.channels_last) if channels_last else model


def plan_length(cfg: Config, train_set: SegmentationDataset, val_set: SegmentationDataset, world: int) -> tuple[int, int, int]:
    """(steps per epoch, total optimiser steps, steps between validations)."""
    t = cfg.train
    per_step = t.batch_size * t.accumulate * world
    steps_per_epoch = t.steps_per_epoch or max(1, len(train_set) // per_step)
    total_steps = t.steps or t.epochs * steps_per_epoch
    val_pixels = sum(val_set.load(i)[1].size for i in range(len(val_set)))
    return steps_per_epoch, total_steps, validation_interval(cfg, steps_per_epoch, total_steps, val_pixels, world)


def class_fractions(samples: list[Sample], data: DataConfig, cache: dict) -> list[float]:
    """Each class's share of the labelled pixels of `samples` (read from `cache`, else from disk)."""
    counts = np.zeros(data.num_classes, np.int64)
    for sample in samples:
        mask = cache[sample.name][1] if sample.name in cache else load_pair(sample, data)[1]
        counts += np.bincount(mask[mask != data.ignore_index].ravel(), minlength=data.num_classes)[: data.num_classes]
    return (counts / max(int(counts.sum()), 1)).tolist()

"""The Trainer's set-up, step by step: the config's names checked against their registries, the data found
and read once, the model built on its device, and the run's length planned."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np
import torch
from torch import nn

from seg.config import Config
from seg.data.samples import Sample, Survey, checked_survey, find_samples
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


class Data(NamedTuple):
    """The samples and data sets a run trains and validates on, and what reading them once found."""

    train_samples: list[Sample]
    val_samples: list[Sample]
    train_set: SegmentationDataset
    val_set: SegmentationDataset
    survey: Survey


def load_data(cfg: Config, log: Callable[[str], None]) -> Data:
    """The train and val samples, every one read and checked once (kept in memory with `data.cache`), and
    their data sets: augmented training crops, whole validation images."""
    data = cfg.data
    train_samples, val_samples = find_samples(data)
    log(f"data: {len(train_samples)} training and {len(val_samples)} validation images; checking them")
    report = checked_survey({"train": train_samples, "val": val_samples}, data)
    if data.foreground_crops == "auto":
        counts = np.array(list(report.splits["train"]["pixels"].values()), np.float64)
        data.foreground_crops, why = foreground_crops(data.classes, (counts / max(counts.sum(), 1)).tolist())
        log(f"data.foreground_crops auto: {data.foreground_crops:g} ({why})")
    augment = build_augmentation(data, cfg.train.seed)
    train_set = SegmentationDataset(train_samples, data, augment, report.cache, cfg.train.border_weight)
    val_set = SegmentationDataset(val_samples, data, None, report.cache)
    return Data(train_samples, val_samples, train_set, val_set, report)


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


def plan_length(cfg: Config, train_set: SegmentationDataset, val_pixels: int, world: int) -> tuple[int, int, int]:
    """(steps per epoch, total optimiser steps, steps between validations)."""
    t = cfg.train
    per_step = t.batch_size * t.accumulate * world
    steps_per_epoch = t.steps_per_epoch or max(1, len(train_set) // per_step)
    total_steps = t.steps or t.epochs * steps_per_epoch
    return steps_per_epoch, total_steps, validation_interval(cfg, steps_per_epoch, total_steps, val_pixels, world)

"""Pictures of a run: the metrics plot and image | truth | prediction overlays."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from seg.config import DataConfig
from seg.data.samples import Sample, load_pair
from seg.io.images import atomic_path, colorize, overlay, to_display_rgb


def plot_metrics(history: list[dict[str, Any]], path: Path) -> None:
    """Loss (left) and validation metrics (right) against optimiser steps (epochs for older runs), as a PNG."""
    if not history:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    unit = "step" if all("step" in row for row in history) else "epoch"
    epochs = [row[unit] for row in history]
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("train_loss", "train loss"), ("val_loss", "val loss (NLL)")):
        xs = [e for e, row in zip(epochs, history) if row.get(key) is not None]
        if xs:
            ax_loss.plot(xs, [row[key] for row in history if row.get(key) is not None], label=label)
    ax_loss.set_xlabel(unit)
    ax_loss.set_yscale("log")
    ax_loss.legend()
    for key in ("val_miou", "val_dice", "val_pixel_accuracy"):
        xs = [e for e, row in zip(epochs, history) if row.get(key) is not None]
        if xs:
            ax_metric.plot(xs, [row[key] for row in history if row.get(key) is not None], label=key[4:])
    ax_metric.set_xlabel(unit)
    ax_metric.set_ylim(0, 1)
    ax_metric.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def write_overlays(
    samples: list[Sample], data: DataConfig, predict: Callable[[np.ndarray], np.ndarray], folder: Path, count: int
) -> None:
    """For the first `count` samples: image | truth overlay | prediction overlay, as folder/NAME.png.

    `predict` maps an image as read, (H, W, C), to its (H, W) class indices."""
    folder.mkdir(parents=True, exist_ok=True)
    palette = data.class_palette
    for sample in samples[:count]:
        raw, mask = load_pair(sample, data)
        pred = predict(raw)
        truth = np.where(mask == data.ignore_index, 0, mask)
        panels = [to_display_rgb(raw), overlay(raw, truth, palette), overlay(raw, pred, palette)]
        if data.num_classes == 2:
            panels[1:] = [colorize(truth, palette), colorize(pred, palette)]
        name = sample.name.replace("/", "_")
        with atomic_path(folder / f"{name}.png") as tmp:
            Image.fromarray(np.concatenate(panels, axis=1)).save(tmp, format="PNG")

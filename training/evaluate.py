"""`seg eval`: metrics of a model on labelled images, from one confusion matrix."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from seg.config import DataConfig, load_config
from seg.data import find_samples, load_pair
from seg.errors import SegError
from seg.metrics import ConfusionMatrix
from seg.predictor import Predictor


def load_predictor(model: Path, device: str = "auto") -> Predictor:
    """The predictor of an exported model (.onnx, ONNX Runtime) or of a checkpoint or run folder (PyTorch)."""
    if model.suffix == ".onnx":
        return Predictor.from_onnx(model, device=device)
    from training.torch_runner import checkpoint_predictor

    return checkpoint_predictor(model, device)


def evaluate(model: str | Path, data: str | Path, split: str = "val", device: str = "auto") -> dict[str, Any]:
    """Evaluate a run folder, checkpoint or ONNX model on a config's split or a folder of images/masks."""
    model, data = Path(model), Path(data)
    if not model.exists():
        raise SegError(f"{model}: no such model, checkpoint or run folder")
    predictor = load_predictor(model, device)
    info = predictor.info
    if data.is_file():
        cfg = load_config(data)
        data_cfg = cfg.data
        train, val = find_samples(data_cfg)
        if split not in ("train", "val"):
            raise SegError(f"--split must be 'train' or 'val', not {split!r}")
        samples = val if split == "val" else train
        if data_cfg.classes != info.classes:
            raise SegError(f"{data}: classes {data_cfg.classes} differ from the model's {info.classes}")
    elif data.is_dir():
        masks = "masks" if (data / "masks").is_dir() else "labels"
        data_cfg = DataConfig(
            root=data, masks=masks, classes=info.classes, in_channels=info.in_channels,
            ignore_index=info.ignore_index, normalize=info.normalize, val_fraction=0.0,
        )
        samples, _ = find_samples(data_cfg)
    else:
        raise SegError(f"{data}: no such config file or folder")
    if not samples:
        raise SegError(f"{data}: the {split} split is empty")

    conf = ConfusionMatrix(info.num_classes, data_cfg.ignore_index)
    per_image = []
    start = time.perf_counter()
    for sample in samples:
        image, mask = load_pair(sample, data_cfg)
        pred = predictor.predict(image, name=str(sample.image)).mask
        single = ConfusionMatrix(info.num_classes, data_cfg.ignore_index)
        single.update(pred, mask)
        conf.matrix += single.matrix
        m = single.compute()
        per_image.append({"name": sample.name, "miou": m["miou"], "pixel_error": m["pixel_error"]})
    metrics = conf.compute()
    return {
        "model": str(predictor.path),
        "data": str(data),
        "split": split if data.is_file() else "folder",
        "images": len(samples),
        "seconds": round(time.perf_counter() - start, 2),
        "classes": info.classes,
        **metrics,
        "confusion": conf.matrix.tolist(),
        "per_image": per_image,
    }


def print_table(result: dict[str, Any], console: Console) -> None:
    table = Table(title=f"{result['images']} images, {result['split']}")
    table.add_column("class")
    table.add_column("IoU", justify="right")
    table.add_column("Dice", justify="right")
    for name, iou, dice in zip(result["classes"], result["iou"], result["dice_per_class"]):
        table.add_row(name, _fmt(iou), _fmt(dice))
    table.add_section()
    table.add_row("mean", _fmt(result["miou"]), _fmt(result["dice"]))
    console.print(table)
    console.print(f"pixel accuracy {result['pixel_accuracy']:.4f}   pixel error {result['pixel_error']:.4f}")


def _fmt(value: float | None) -> str:
    return "-" if value is None or np.isnan(value) else f"{value:.4f}"

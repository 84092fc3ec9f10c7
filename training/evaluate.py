"""`seg eval`: metrics of a model on labelled images, from one confusion matrix."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
from rich.console import Console
from rich.table import Table

from seg.config import DataConfig, load_config
from seg.data import find_samples, load_pair
from seg.errors import SegError
from seg.metrics import ConfusionMatrix
from seg.preprocess import Normalization, normalize
from seg.tiling import predict_array


def _checkpoint_model(path: Path, device: str) -> tuple[dict[str, Any], Callable[[np.ndarray], np.ndarray]]:
    """Model facts and an `image (H, W, C) -> class indices (H, W)` function for a checkpoint."""
    from training.checkpoint import load_checkpoint, model_from_checkpoint, torch_runner
    from training.train import pick_device

    ckpt = load_checkpoint(path)
    dev = pick_device(device)
    model = model_from_checkpoint(ckpt).to(dev)
    run = torch_runner(model, dev)
    norm = Normalization(**ckpt["normalize"])
    info = {key: ckpt[key] for key in ("classes", "in_channels", "ignore_index")}
    info["normalize"] = norm
    info["name"] = ckpt["path"]

    def predict_mask(image: np.ndarray) -> np.ndarray:
        x = normalize(image, norm)
        probs = predict_array(x, run, tile=ckpt["tile_size"], overlap=ckpt["overlap"], multiple=ckpt["stride"])
        return probs.argmax(0)

    return info, predict_mask


def _onnx_model(path: Path, device: str) -> tuple[dict[str, Any], Callable[[np.ndarray], np.ndarray]]:
    from seg.predictor import Predictor

    predictor = Predictor(path, device=device)
    meta = predictor.info
    info = {
        "classes": list(meta.classes),
        "in_channels": meta.in_channels,
        "ignore_index": meta.ignore_index,
        "normalize": meta.normalize,
        "name": str(path),
    }
    return info, lambda image: predictor.predict(image).mask


def evaluate(model: str | Path, data: str | Path, split: str = "val", device: str = "auto") -> dict[str, Any]:
    """Evaluate a run folder, checkpoint or ONNX model on a config's split or a folder of images/masks."""
    model, data = Path(model), Path(data)
    if not model.exists():
        raise SegError(f"{model}: no such model, checkpoint or run folder")
    info, predict_mask = (_onnx_model if model.suffix == ".onnx" else _checkpoint_model)(model, device)
    if data.is_file():
        cfg = load_config(data)
        data_cfg = cfg.data
        train, val = find_samples(data_cfg)
        if split not in ("train", "val"):
            raise SegError(f"--split must be 'train' or 'val', not {split!r}")
        samples = val if split == "val" else train
        if data_cfg.classes != info["classes"]:
            raise SegError(f"{data}: classes {data_cfg.classes} differ from the model's {info['classes']}")
    elif data.is_dir():
        masks = "masks" if (data / "masks").is_dir() else "labels"
        data_cfg = DataConfig(
            root=data, masks=masks, classes=info["classes"], in_channels=info["in_channels"],
            ignore_index=info["ignore_index"], normalize=info["normalize"], val_fraction=0.0,
        )
        samples, _ = find_samples(data_cfg)
    else:
        raise SegError(f"{data}: no such config file or folder")
    if not samples:
        raise SegError(f"{data}: the {split} split is empty")

    conf = ConfusionMatrix(len(info["classes"]), data_cfg.ignore_index)
    per_image = []
    start = time.perf_counter()
    for sample in samples:
        image, mask = load_pair(sample, data_cfg)
        pred = predict_mask(image)
        single = ConfusionMatrix(len(info["classes"]), data_cfg.ignore_index)
        single.update(pred, mask)
        conf.matrix += single.matrix
        m = single.compute()
        per_image.append({"name": sample.name, "miou": m["miou"], "pixel_error": m["pixel_error"]})
    metrics = conf.compute()
    return {
        "model": info["name"],
        "data": str(data),
        "split": split if data.is_file() else "folder",
        "images": len(samples),
        "seconds": round(time.perf_counter() - start, 2),
        "classes": info["classes"],
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

"""`seg eval`: metrics of a model on labelled images, from one confusion matrix; on two-class EM data also
the ISBI 2012 challenge's Rand error and variation of information of the cell regions."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
from rich.console import Console
from rich.table import Table

from seg.config import DataConfig, load_config
from seg.data.samples import find_samples, load_pair
from seg.errors import SegError
from seg.inference.predictor import Predictor
from seg.inference.tiling import TilingOptions
from seg.metrics import ConfusionMatrix


def load_predictor(model: Path, device: str = "auto", precision: str = "auto") -> Predictor:
    """The predictor of an exported model (.onnx, ONNX Runtime; `precision` as `Predictor.from_onnx`) or of
    a checkpoint or run folder (PyTorch)."""
    if model.suffix == ".onnx":
        return Predictor.from_onnx(model, device=device, precision=precision)
    from training.torch_runner import checkpoint_predictor

    return checkpoint_predictor(model, device)


def em_metrics(pred: np.ndarray, mask: np.ndarray, cell: int = 1) -> dict[str, float]:
    """The ISBI 2012 challenge's figures of one image: the cells are the connected components (4-connected)
    of class `cell`; the Rand error is foreground-restricted (true non-cell pixels are left out), as is the
    variation of information (in bits), the sum of its split (over-segmentation, H(pred | truth)) and merge
    (under-segmentation, H(truth | pred)) parts."""
    from skimage.measure import label
    from skimage.metrics import adapted_rand_error, variation_of_information

    truth = label(np.asarray(mask) == cell, connectivity=1)
    cells = label(np.asarray(pred) == cell, connectivity=1)
    if not truth.any():
        return {"rand_error": float("nan"), "vi": float("nan"), "vi_split": float("nan"), "vi_merge": float("nan")}
    error = adapted_rand_error(truth, cells, ignore_labels=(0,))[0]
    split, merge = variation_of_information(truth, cells, ignore_labels=(0,))
    return {"rand_error": float(error), "vi": float(split + merge), "vi_split": float(split), "vi_merge": float(merge)}


@dataclass
class Scores:
    """What `score_images` gathers: one confusion matrix over every image; the summed negative log-likelihood
    of the true classes and the pixels it covers (with `loss`); each image's own figures (with `per_image`)."""

    confusion: ConfusionMatrix
    nll: float = 0.0
    pixels: int = 0
    per_image: list[dict[str, Any]] = field(default_factory=list)


def score_images(
    predictor: Predictor, pairs: Iterable[tuple[str, np.ndarray, np.ndarray]], num_classes: int, ignore_index: int,
    options: TilingOptions | None = None, loss: bool = False,
    per_image: Callable[[np.ndarray, np.ndarray], dict[str, Any]] | None = None,
) -> Scores:
    """The one evaluation loop, of validation during training and of `seg eval`: each (name, image, mask)
    through the tiled predictor, scored against its mask."""
    scores = Scores(ConfusionMatrix(num_classes, ignore_index))
    for name, image, mask in pairs:
        result = predictor.predict(image, options, probabilities=loss, name=name)
        pred = result.probabilities.argmax(0) if loss else result.mask
        if loss:
            valid = mask != ignore_index
            picked = np.take_along_axis(result.probabilities, np.where(valid, mask, 0)[None], 0)[0][valid]
            scores.nll -= float(np.log(np.maximum(picked, 1e-8)).sum())
            scores.pixels += int(valid.sum())
        if per_image is None:
            scores.confusion.update(pred, mask)
            continue
        single = ConfusionMatrix(num_classes, ignore_index)
        single.update(pred, mask)
        scores.confusion.matrix += single.matrix
        scores.per_image.append({"name": name, **per_image(pred, mask), **_image_figures(single)})
    return scores


def _image_figures(conf: ConfusionMatrix) -> dict[str, float]:
    m = conf.compute()
    return {"miou": m["miou"], "pixel_error": m["pixel_error"]}


EM_TTA = "d4"  # what `tta="auto"` means on two-class EM data: it lowered the held-out pixel error (bench/README.md)


def evaluate(
    model: str | Path, data: str | Path, split: str = "val", device: str = "auto", tta: str | bool = "auto",
    precision: str = "auto",
) -> dict[str, Any]:
    """Evaluate a run folder, checkpoint or ONNX model on a config's split or a folder of images/masks.

    `tta` is the test-time augmentation level ("none", "flips" or "d4", see `TilingOptions`), or "auto":
    `EM_TTA` on two-class EM data, else none (the result's "tta" says which ran). On two-class
    EM data the result also has the challenge's `rand_error`, `vi`, `vi_split` and `vi_merge` (see
    `em_metrics`), averaged over images.
    """
    model, data = Path(model), Path(data)
    if not model.exists():
        raise SegError(f"{model}: no such model, checkpoint or run folder")
    predictor = load_predictor(model, device, precision)
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

    em = data_cfg.kind == "em" and info.num_classes == 2
    options = predictor.options.replace(tta=(EM_TTA if em else "none") if tta == "auto" else tta)
    start = time.perf_counter()
    pairs = ((sample.name, *load_pair(sample, data_cfg)) for sample in samples)
    figures = em_metrics if em else (lambda pred, mask: {})
    scores = score_images(predictor, pairs, info.num_classes, data_cfg.ignore_index, options, per_image=figures)
    conf, per_image = scores.confusion, scores.per_image
    metrics = conf.compute()
    if em:
        for key in ("rand_error", "vi", "vi_split", "vi_merge"):
            values = [entry[key] for entry in per_image]
            metrics[key] = float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")
    return {
        "model": str(predictor.path),
        "precision": predictor.info.precision,
        "data": str(data),
        "split": split if data.is_file() else "folder",
        "images": len(samples),
        "tta": options.tta,
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
    if "rand_error" in result:
        console.print(
            f"ISBI cells (mean of {result['images']} images): Rand error {_fmt(result['rand_error'])}   VI"
            f" {_fmt(result['vi'])} (split {_fmt(result['vi_split'])}, merge {_fmt(result['vi_merge'])}) bits",
            highlight=False, soft_wrap=True,
        )


def _fmt(value: float | None) -> str:
    return "-" if value is None or np.isnan(value) else f"{value:.4f}"

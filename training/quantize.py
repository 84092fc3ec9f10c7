"""`seg export --int8`: an INT8 model for CPUs, by ONNX Runtime's static quantization, behind an accuracy gate.

    fp32 ONNX -> quant_pre_process (shape inference, graph optimisation)
              -> quantize_static: QDQ, per-channel int8 weights, uint8 activations, MinMax ranges from
                 calibration tiles (normalised as the predictor normalises them)
              -> the gate: fp32 and int8 evaluated on the config's validation split through the tiled
                 predictor (no TTA); mIoU may fall by at most `margin` points
              -> NAME.int8.onnx beside NAME.onnx, written atomically, with the figures in its metadata

Calibration tiles come from `CALIBRATION_IMAGES` images of the training split (evenly spaced through it),
or from a folder of images: `TILES_PER_IMAGE` tiles of the model's tile size from each, at seeded random
places (an image smaller than a tile is padded by reflection, as the predictor pads it).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from seg.errors import DataError, SegError
from seg.inference.modelinfo import ModelInfo
from seg.inference.preprocess import normalize
from seg.inference.runtime import int8_variant
from seg.io.headers import is_image_file
from seg.io.images import atomic_path, read_image, to_channels

CALIBRATION_IMAGES = 16
TILES_PER_IMAGE = 2
DEFAULT_MARGIN = 0.5  # mIoU points the int8 model may lose on the validation split
METHOD = "onnxruntime quantize_static: QDQ, per-channel int8 weights, uint8 activations, MinMax calibration"


class GateFailed(SegError):
    """The int8 model lost more validation mIoU than the margin allows."""


def calibration_tiles(images: list[np.ndarray], info: ModelInfo, per_image: int = TILES_PER_IMAGE, seed: int = 0) -> list[np.ndarray]:
    """(1, C, tile, tile) float32 tiles of the images, normalised as the predictor does."""
    rng = np.random.default_rng(seed)
    tile, tiles = info.tile_size, []
    for image in images:
        x = normalize(to_channels(image, info.in_channels), info.normalize)  # (C, H, W)
        pad = [(0, 0)] + [(0, max(0, tile - side)) for side in x.shape[1:]]
        if any(after for _, after in pad):
            x = np.pad(x, pad, mode="reflect" if min(x.shape[1:]) > 1 else "edge")
        height, width = x.shape[1:]
        for _ in range(per_image):
            y0, x0 = rng.integers(0, height - tile + 1), rng.integers(0, width - tile + 1)
            tiles.append(np.ascontiguousarray(x[None, :, y0 : y0 + tile, x0 : x0 + tile], np.float32))
    return tiles


def calibration_images(config, folder: Path | None, count: int) -> list[np.ndarray]:
    """`count` images: from `folder` (sorted, evenly spaced), else from the config's training split."""
    if folder is not None:
        if not folder.is_dir():
            raise SegError(f"--calibration: no such folder {folder}")
        files = sorted(p for p in folder.rglob("*") if is_image_file(p))
        if not files:
            raise SegError(f"--calibration: no images in {folder}")
        return [read_image(files[i]) for i in _spaced(len(files), count)]
    from seg.data.samples import find_samples, load_pair

    train, _ = find_samples(config.data)
    try:
        return [load_pair(train[i], config.data)[0] for i in _spaced(len(train), count)]
    except DataError as err:
        raise SegError(str(err)) from None


def _spaced(total: int, count: int) -> list[int]:
    return sorted({int(i) for i in np.linspace(0, total - 1, min(total, count))})


def quantize(fp32: Path, out: Path, tiles: list[np.ndarray]) -> None:
    """The static INT8 (QDQ) model of `fp32`, calibrated on `tiles`, written to `out` (metadata not set)."""
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Tiles(CalibrationDataReader):
        def __init__(self, name: str):
            self.items = iter({name: t} for t in tiles)

        def get_next(self):
            return next(self.items, None)

    import logging

    import onnx

    # Its symbolic shape inference warns about every dynamic pad it cannot compare; the shapes are dynamic.
    logging.getLogger("onnxruntime.tools.symbolic_shape_infer").setLevel(logging.ERROR)
    name = onnx.load(str(fp32), load_external_data=False).graph.input[0].name
    with tempfile.TemporaryDirectory(prefix="seg-int8-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        try:
            quant_pre_process(str(fp32), str(pre))
            quantize_static(
                str(pre), str(out), Tiles(name), quant_format=QuantFormat.QDQ, per_channel=True,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,  # collects per-tensor minima and maxima only
            )  # fmt: skip
        except SegError:
            raise
        except Exception as err:  # onnxruntime.quantization raises many types
            raise SegError(f"{fp32}: INT8 quantization failed: {str(err).splitlines()[0]}") from None


def export_int8(
    fp32: str | Path,
    config_path: str | Path,
    calibration: Path | None = None,
    count: int = CALIBRATION_IMAGES,
    margin: float = DEFAULT_MARGIN,
) -> dict[str, Any]:
    """Quantize an exported fp32 model; write NAME.int8.onnx beside it when the gate holds.

    Args:
        fp32: the .onnx file written by `seg export` (float32).
        config_path: the training config whose splits calibrate (train) and gate (val) the model.
        calibration: a folder of calibration images instead of the training split.
        count: calibration images (each gives `TILES_PER_IMAGE` tiles).
        margin: the mIoU points (0-100) the int8 model may lose against fp32 on the validation split.

    Returns:
        A report: path, bytes, seconds, and the `quantization` figures stored in the file's metadata.

    Raises:
        GateFailed: the int8 model lost more than `margin` points (nothing is written).
        SegError: no validation split, no calibration images, or a model ONNX Runtime cannot quantize.
    """
    import onnx

    from seg.config import load_config
    from seg.inference.runtime import create_session, read_model_info
    from training.evaluate import evaluate
    from training.export import set_metadata

    start = time.perf_counter()
    fp32 = Path(fp32)
    if count < 1:
        raise SegError(f"--calibration-images {count}: needs at least 1")
    info = read_model_info(create_session(fp32, "cpu")[0], fp32)
    if info.precision != "fp32":
        raise SegError(f"{fp32}: --int8 quantizes a float32 model; this one is {info.precision}")
    config = load_config(config_path)
    if config.data.classes != info.classes:
        raise SegError(f"{config_path}: classes {config.data.classes} differ from the model's {info.classes}")
    tiles = calibration_tiles(calibration_images(config, calibration, count), info)
    out = int8_variant(fp32)
    figures: dict[str, Any] = {
        "method": METHOD,
        "calibration_images": len(tiles) // TILES_PER_IMAGE,
        "calibration_tiles": len(tiles),
        "calibration_source": str(calibration) if calibration else f"{config_path}: train split",
        "margin_points": margin,
    }
    with tempfile.TemporaryDirectory(prefix="seg-int8-") as tmp:
        candidate = Path(tmp) / "model.int8.onnx"
        quantize(fp32, candidate, tiles)
        proto = onnx.load(str(candidate))
        set_metadata(proto, info.model_copy(update={"quantization": figures}))
        onnx.save(proto, str(candidate))
        try:
            before = evaluate(fp32, config_path, "val", device="cpu", tta="none", precision="fp32")
        except SegError as err:
            raise SegError(f"--int8 checks the int8 model on the validation split: {err}") from None
        after = evaluate(candidate, config_path, "val", device="cpu", tta="none", precision="int8")
        drop = 100 * (before["miou"] - after["miou"])
        figures.update({
            "val_images": before["images"],
            "fp32": {"miou": before["miou"], "pixel_error": before["pixel_error"]},
            "int8": {"miou": after["miou"], "pixel_error": after["pixel_error"]},
            "miou_drop_points": round(drop, 4),
        })  # fmt: skip
        if not drop <= margin:
            raise GateFailed(
                f"{out}: not written: the int8 model's validation mIoU is {after['miou']:.4f} against fp32's "
                f"{before['miou']:.4f}, {drop:.2f} points lower (allowed: {margin:g}; --int8-margin)"
            )
        set_metadata(proto, info.model_copy(update={"quantization": figures}))
        with atomic_path(out) as target:
            onnx.save(proto, str(target))
    return {"path": str(out), "bytes": out.stat().st_size, "seconds": round(time.perf_counter() - start, 2), "quantization": figures}

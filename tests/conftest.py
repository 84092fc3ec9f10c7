"""Shared fixtures: small models (a checkpoint, its ONNX export, a hand-built 1x1-conv ONNX model) and images.

Models are untrained (nothing is downloaded and training takes too long for tests); the untrained U-Net's
output bias is shifted so that both classes occur on the EM slices, which makes masks non-trivial for the
seam and parity tests.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "data" / "samples"
EM_IMAGES = ROOT / "data" / "isbi2012" / "train" / "images"
ISBI = ROOT / "data" / "isbi2012" / "train"


def em_crops(root: Path, count: int, rows: slice, cols: slice) -> Path:
    """A folder `root` with images/ and masks/: `count` crops of the real ISBI slices and their 0/255
    membrane masks, as sliceN.png."""
    from PIL import Image

    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(count):
        for kind, folder in (("images", "images"), ("labels", "masks")):
            crop = np.asarray(Image.open(ISBI / kind / f"{i:02d}.png"))[rows, cols]
            Image.fromarray(crop).save(root / folder / f"slice{i}.png")
    return root


def build_checkpoint(
    path: Path,
    arch: str = "unet",
    encoder: str = "mobilenet_v2",
    classes: tuple[str, ...] = ("membrane", "cell"),
    in_channels: int = 1,
    normalize: dict[str, Any] | None = None,
    tile_size: int = 256,
    overlap: float = 0.25,
    seed: int = 0,
    **options: Any,
) -> Path:
    """Save a checkpoint like `Trainer.state()` for an untrained model, with balanced classes on EM images."""
    import torch

    from seg.inference.preprocess import Normalization, normalize as normalize_image
    from seg.io.images import default_palette, read_image, to_channels
    from seg.models import build_model
    from training.checkpoint import save_checkpoint

    torch.manual_seed(seed)
    options = options or {"decoder_channels": [32, 16, 16, 8, 8]}
    kwargs = dict(arch=arch, encoder=encoder, classes=len(classes), in_channels=in_channels, encoder_weights=None, **options)
    model = build_model(**kwargs).eval()
    norm = Normalization(**(normalize or {"mode": "fixed", "mean": [0.5], "std": [0.25]}))
    # Shift the output biases so that every class wins on some pixels of a real image.
    image = to_channels(read_image(SAMPLES / "isbi_test_00.png"), in_channels)
    x = torch.from_numpy(normalize_image(image, norm))[None]
    with torch.no_grad():
        logits = model(x)[0].flatten(1)
        head = model.net.segmentation_head[0]
        head.bias -= logits.median(dim=1).values - logits.median()
    save_checkpoint(
        path,
        {
            "model": model.state_dict(),
            "model_kwargs": kwargs,
            "stride": model.stride,
            "classes": list(classes),
            "palette": default_palette(len(classes)),
            "normalize": norm.model_dump(),
            "in_channels": in_channels,
            "ignore_index": 255,
            "tile_size": tile_size,
            "overlap": overlap,
            "config": {},
            "epoch": 1,
            "elapsed": 0.0,
            "best": None,
            "history": [],
        },
    )
    return path


def build_conv_onnx(
    path: Path,
    in_channels: int = 1,
    classes: int = 2,
    normalize: dict[str, Any] | None = None,
    tile_size: int = 256,
    overlap: float = 0.25,
    stride: int = 32,
) -> Path:
    """A tiny ONNX model with seg metadata: a 3x3 convolution, then a 1x1 one to `classes` logits.

    It runs in microseconds, so tests of reading, writing and memory can use large images.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from seg import __version__
    from seg.io.images import default_palette

    rng = np.random.default_rng(0)
    w1 = rng.normal(0, 0.5, (4, in_channels, 3, 3)).astype(np.float32)
    w2 = rng.normal(0, 1.0, (classes, 4, 1, 1)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["image", "w1"], ["h"], pads=[1, 1, 1, 1]),
            helper.make_node("Tanh", ["h"], ["t"]),
            helper.make_node("Conv", ["t", "w2"], ["logits"]),
        ],
        "conv",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", in_channels, "height", "width"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes, "height", "width"])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    names = ["background"] + [f"class{i}" for i in range(1, classes)]
    meta = {
        "format": "seg-onnx/1", "name": path.stem, "arch": "conv", "encoder": "none", "classes": names,
        "palette": default_palette(classes), "in_channels": in_channels,
        "normalize": normalize or {"mode": "fixed", "mean": [0.5], "std": [0.25]},
        "stride": stride, "tile_size": tile_size, "overlap": overlap, "version": __version__,
    }  # fmt: skip
    entry = model.metadata_props.add()
    entry.key, entry.value = "seg", json.dumps(meta)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="session")
def unet_checkpoint(tmp_path_factory) -> Path:
    """An untrained U-Net (mobilenet_v2, narrow decoder), 1 channel, 2 classes, tile 256."""
    return build_checkpoint(tmp_path_factory.mktemp("ckpt") / "unet.pt")


@pytest.fixture(scope="session")
def unet_onnx(unet_checkpoint, tmp_path_factory) -> Path:
    """`unet_checkpoint` exported to ONNX (float32) with `training.export.export_onnx`."""
    from training.export import export_onnx

    out = tmp_path_factory.mktemp("onnx") / "unet.onnx"
    export_onnx(unet_checkpoint, out)
    return out


@pytest.fixture(scope="session")
def conv_onnx_factory(tmp_path_factory) -> Callable[..., Path]:
    """Factory for the tiny 1x1-conv ONNX model (see `build_conv_onnx`), cached per argument set."""
    folder = tmp_path_factory.mktemp("conv")
    cache: dict[str, Path] = {}

    def make(**kwargs: Any) -> Path:
        key = json.dumps(kwargs, sort_keys=True)
        if key not in cache:
            cache[key] = build_conv_onnx(folder / f"conv{len(cache)}.onnx", **kwargs)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def conv_onnx(conv_onnx_factory) -> Path:
    """The tiny conv model: 1 input channel, 2 classes, tile 256."""
    return conv_onnx_factory()


@pytest.fixture(scope="session")
def em_image() -> np.ndarray:
    """A real 512x512 8-bit EM slice (ISBI 2012 test set)."""
    from seg.io.images import read_image

    return read_image(SAMPLES / "isbi_test_00.png")


@pytest.fixture(scope="session")
def em_mosaic() -> np.ndarray:
    """A real-content 1024x1024 8-bit image: four ISBI 2012 slices side by side."""
    from seg.io.images import read_image

    tiles = [read_image(EM_IMAGES / f"{i:02d}.png") for i in range(4)]
    return np.block([[tiles[0], tiles[1]], [tiles[2], tiles[3]]])

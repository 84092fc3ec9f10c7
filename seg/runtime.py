"""ONNX Runtime sessions and the metadata of seg's ONNX models.

This is the inference path's only contact with the model: it imports onnxruntime and numpy, never torch
(the serving container ships without it).

    session, provider = create_session("model.onnx", device="auto", threads=None)
    info = read_model_info(session, "model.onnx")
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from seg.errors import SegError
from seg.preprocess import Normalization

DEVICES = ("auto", "cpu", "cuda")
BUNDLED_MODEL = Path(__file__).resolve().parent / "assets" / "model.onnx"
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


def default_model() -> Path:
    """The model used when none is named: $SEG_MODEL, else the bundled one."""
    return Path(os.environ.get("SEG_MODEL") or BUNDLED_MODEL)


@dataclass(frozen=True)
class ModelInfo:
    """What a predictor needs to know about an exported model (metadata key "seg" of the ONNX file)."""

    name: str
    arch: str
    encoder: str
    classes: list[str]
    palette: list[list[int]]
    in_channels: int
    normalize: Normalization
    stride: int = 32
    tile_size: int = 512
    overlap: float = 0.25
    version: str = ""
    ignore_index: int = 255
    fp16: bool = False
    input_name: str = "image"
    output_name: str = "logits"
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @classmethod
    def from_metadata(cls, meta: dict[str, Any]) -> "ModelInfo":
        """From the "seg" JSON object written by `training.export`."""
        known = {
            "name", "arch", "encoder", "classes", "palette", "in_channels", "stride", "tile_size", "overlap",
            "version", "ignore_index", "fp16",
        }  # fmt: skip
        values = {k: meta[k] for k in known if k in meta}
        values["normalize"] = Normalization(**meta.get("normalize", {}))
        values["input_name"] = meta.get("input", "image")
        values["output_name"] = meta.get("output", "logits")
        values["extra"] = {k: v for k, v in meta.items() if k not in known | {"normalize", "input", "output"}}
        return cls(**values)


def read_model_info(session: Any, path: str | Path = "model") -> ModelInfo:
    """The ModelInfo of a session's model; SegError when the file was not written by `seg export`."""
    custom = session.get_modelmeta().custom_metadata_map
    if "seg" not in custom:
        raise SegError(f"{path}: this ONNX file has no seg metadata; export it with `seg export`")
    try:
        meta = json.loads(custom["seg"])
        info = ModelInfo.from_metadata(meta)
    except (ValueError, TypeError, KeyError) as err:
        raise SegError(f"{path}: unreadable seg metadata ({err})") from None
    if info.in_channels < 1 or len(info.classes) < 1 or info.stride < 1:
        raise SegError(f"{path}: inconsistent seg metadata (channels, classes or stride)")
    return info


def cuda_usable() -> bool:
    """True when ONNX Runtime has its CUDA provider and the CUDA driver sees at least one GPU."""
    import onnxruntime as ort

    if CUDA not in ort.get_available_providers():
        return False
    name = "nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1"
    try:
        driver = ctypes.CDLL(name)
    except OSError:
        return False
    count = ctypes.c_int(0)
    if driver.cuInit(0) != 0 or driver.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return False
    return count.value > 0


def create_session(path: str | Path, device: str = "auto", threads: int | None = None) -> tuple[Any, str]:
    """An ONNX Runtime InferenceSession on the requested device.

    Args:
        path: the .onnx file.
        device: "auto" (CUDA when a GPU is usable, else CPU), "cuda" (an error without one) or "cpu".
        threads: intra-op threads for the CPU provider (None: ONNX Runtime's default, the physical cores).

    Returns:
        (session, provider): provider is the execution provider really obtained, read back from the
        session ("CUDAExecutionProvider" or "CPUExecutionProvider").

    Raises:
        SegError: unknown device, missing or unreadable model file, or CUDA asked for but unusable.
    """
    import onnxruntime as ort

    path = Path(path)
    if device not in DEVICES:
        raise SegError(f"--device {device!r}: choose one of {', '.join(DEVICES)}")
    if not path.is_file():
        raise SegError(f"{path}: no such ONNX model")
    if threads is not None and threads < 1:
        raise SegError(f"threads must be at least 1, not {threads}")
    want_cuda = device == "cuda" or (device == "auto" and cuda_usable())
    if device == "cuda" and not cuda_usable():
        raise SegError(f"{path}: --device cuda, but no CUDA GPU is usable by ONNX Runtime; use --device cpu")

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only; we report the provider we got ourselves
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    providers: list[Any] = [CPU]
    # A memory pattern is planned per input shape (full and last batches differ): on the CPU it costs
    # about 350 MB more for a U-Net resnet18 at 4 x 512² tiles and gains no speed.
    options.enable_mem_pattern = want_cuda
    if want_cuda:
        if hasattr(ort, "preload_dlls") and "torch" not in sys.modules:
            ort.preload_dlls()  # CUDA and cuDNN from the nvidia-* wheels (torch, if imported, brought its own)
        providers = [(CUDA, {"cudnn_conv_algo_search": "HEURISTIC"}), CPU]
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as err:  # onnxruntime raises its own exception types (Fail, InvalidGraph, ...)
        raise SegError(f"{path}: not a usable ONNX model ({str(err).splitlines()[0]})") from None
    provider = session.get_providers()[0]
    if device == "cuda" and provider != CUDA:
        raise SegError(f"{path}: ONNX Runtime could not start its CUDA provider; use --device cpu")
    return session, provider


def describe_provider(provider: str) -> str:
    """ "cuda" or "cpu", for messages."""
    return "cuda" if provider == CUDA else "cpu"

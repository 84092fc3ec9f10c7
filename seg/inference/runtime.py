"""ONNX Runtime sessions of seg's ONNX models: the session, its runner and its `ModelInfo`.

This is the inference path's only contact with the model: it imports onnxruntime and numpy, never torch
(the serving container ships without it).

    session, provider = create_session("model.onnx", device="auto", threads=None)
    info = read_model_info(session, "model.onnx")
    run = onnx_runner(session)
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np

from seg.errors import SegError
from seg.inference.modelinfo import ModelInfo

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "int8")
BUNDLED_MODEL = Path(__file__).resolve().parents[1] / "assets" / "model.onnx"
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


def default_model() -> Path:
    """The model used when none is named: $SEG_MODEL, else the bundled one."""
    return Path(os.environ.get("SEG_MODEL") or BUNDLED_MODEL)


def int8_variant(path: str | Path) -> Path:
    """Where the int8 model of `path` lives: NAME.int8.onnx beside NAME.onnx (`seg export --int8`)."""
    path = Path(path)
    return path if path.name.endswith(".int8.onnx") else path.with_name(f"{path.name.removesuffix('.onnx')}.int8.onnx")


def choose_model(path: str | Path, precision: str = "auto", device: str = "auto") -> Path:
    """The file to run for `precision`: "auto" takes the int8 variant on the CPU (`device` cpu, or auto
    without a usable GPU) when there is one, else `path`; "int8" the int8 variant (or `path` itself);
    "fp32" `path` as it is."""
    path = Path(path)
    if precision not in PRECISIONS:
        raise SegError(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    variant = int8_variant(path)
    if precision == "int8" or (precision == "auto" and variant.is_file() and (device == "cpu" or (device == "auto" and not cuda_usable()))):
        return variant if variant.is_file() else path
    return path


def read_model_info(session: Any, path: str | Path = "model") -> ModelInfo:
    """The ModelInfo of a session's model; SegError when the file was not written by `seg export`."""
    return ModelInfo.from_onnx_props(session.get_modelmeta().custom_metadata_map, str(path))


def _dtype(value: Any) -> type:
    return np.float16 if value.type == "tensor(float16)" else np.float32


def onnx_runner(session: Any, bound: bool | None = None, gpu: int = 0) -> Callable[[np.ndarray], np.ndarray]:
    """The session as a predictor's runner: (N, C, h, w) float32 -> (N, K, h, w) float32 logits.

    `bound` (default: on CUDA) runs through `BoundRunner`'s I/O binding instead of `session.run`."""
    if bound if bound is not None else session.get_providers()[0] == CUDA:
        return BoundRunner(session, "cuda" if session.get_providers()[0] == CUDA else "cpu", gpu)
    model_input = session.get_inputs()[0]
    input_name, output_name = model_input.name, session.get_outputs()[0].name
    dtype = _dtype(model_input)

    def run(batch: np.ndarray) -> np.ndarray:
        (logits,) = session.run([output_name], {input_name: batch.astype(dtype, copy=False)})
        return logits.astype(np.float32, copy=False)

    return run


class BoundRunner:
    """A runner through ONNX Runtime's I/O binding: the input and output tensors live on the device
    (`device`: "cuda" or "cpu") and are kept from batch to batch while the batch's shape stays the same,
    so each batch costs one copy in (`update_inplace`) and one out, and no allocation on the device."""

    def __init__(self, session: Any, device: str = "cuda", gpu: int = 0):
        self.session, self.device, self.gpu = session, device, gpu
        model_input, model_output = session.get_inputs()[0], session.get_outputs()[0]
        self.input_name, self.output_name = model_input.name, model_output.name
        self.input_dtype, self.output_dtype = _dtype(model_input), _dtype(model_output)
        classes = model_output.shape[1]
        self.classes = classes if isinstance(classes, int) else None
        self.shape: tuple[int, ...] | None = None

    def _bind(self, shape: tuple[int, ...], classes: int) -> None:
        import onnxruntime as ort

        self.input = ort.OrtValue.ortvalue_from_shape_and_type(shape, self.input_dtype, self.device, self.gpu)
        out_shape = (shape[0], classes, shape[2], shape[3])  # the model crops back to its input's size
        self.output = ort.OrtValue.ortvalue_from_shape_and_type(out_shape, self.output_dtype, self.device, self.gpu)
        self.binding = self.session.io_binding()
        self.binding.bind_ortvalue_input(self.input_name, self.input)
        self.binding.bind_ortvalue_output(self.output_name, self.output)
        self.shape = shape

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(batch, dtype=self.input_dtype)
        if batch.shape != self.shape:
            if self.classes is None:  # a symbolic class axis: learn it from one plain run
                (probe,) = self.session.run([self.output_name], {self.input_name: batch[:1]})
                self.classes = probe.shape[1]
            self._bind(batch.shape, self.classes)
        self.input.update_inplace(batch)
        self.session.run_with_iobinding(self.binding)
        return self.output.numpy().astype(np.float32, copy=False)


GPU_BYTES_PER_TILE_PIXEL = 1024  # budget per tile pixel for activations, inputs and outputs (a U-Net resnet34
# in fp32 needs about a third of it); batches fill at most half of the free memory


def gpu_batch_size(tile: int, gpu: int = 0, most: int = 32, free: int | None = None) -> int | None:
    """Tiles per batch for a GPU's free memory (`free` bytes, default from NVML), or None where NVML cannot say."""
    free = gpu_free_bytes(gpu) if free is None else free
    if free is None:
        return None
    return max(1, min(most, int(free // 2 // (tile * tile * GPU_BYTES_PER_TILE_PIXEL))))


def gpu_free_bytes(gpu: int = 0) -> int | None:
    """Free memory of CUDA device `gpu` from NVML (the driver's libnvidia-ml), or None without it."""

    class Memory(ctypes.Structure):
        _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]

    try:
        nvml = ctypes.CDLL("nvml.dll" if sys.platform == "win32" else "libnvidia-ml.so.1")
    except OSError:
        return None
    handle, memory = ctypes.c_void_p(), Memory()
    if nvml.nvmlInit_v2() != 0:
        return None
    try:
        if nvml.nvmlDeviceGetHandleByIndex_v2(gpu, ctypes.byref(handle)) != 0:
            return None
        if nvml.nvmlDeviceGetMemoryInfo(handle, ctypes.byref(memory)) != 0:
            return None
        return int(memory.free)
    finally:
        nvml.nvmlShutdown()


def cuda_usable() -> bool:
    """True when ONNX Runtime has its CUDA provider and the CUDA driver sees at least one GPU."""
    return gpu_count() > 0


def gpu_count() -> int:
    """GPUs that ONNX Runtime's CUDA provider can use (0 without the provider or a driver)."""
    import onnxruntime as ort

    if CUDA not in ort.get_available_providers():
        return 0
    name = "nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1"
    try:
        driver = ctypes.CDLL(name)
    except OSError:
        return 0
    count = ctypes.c_int(0)
    if driver.cuInit(0) != 0 or driver.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value


def create_session(
    path: str | Path, device: str = "auto", threads: int | None = None, gpu: int = 0
) -> tuple[Any, str]:
    """An ONNX Runtime InferenceSession on the requested device.

    Args:
        path: the .onnx file.
        device: "auto" (CUDA when a GPU is usable, else CPU), "cuda" (an error without one) or "cpu".
        threads: intra-op threads for the CPU provider (None: ONNX Runtime's default, the physical cores).
        gpu: the CUDA device id, on CUDA.

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
        providers = [(CUDA, {"cudnn_conv_algo_search": "HEURISTIC", "device_id": gpu}), CPU]
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

"""`seg export`: a checkpoint to one self-describing ONNX file, checked against PyTorch.

The file takes `image` (N, C, H, W) float32 with any batch, height and width and returns `logits`
(N, K, H, W) float32 (the model pads to its stride multiple inside and crops back). Everything a
predictor needs travels in the file's metadata_props: key "seg" holds one JSON object, the model's
`seg.inference.modelinfo.ModelInfo`, and the main facts appear as readable single keys (arch, encoder, classes, ...;
lists and mappings JSON-encoded).

The file is written atomically, and only after the parity check passed: ONNX Runtime against PyTorch
on two input sizes (one not a stride multiple), max abs difference of the logits at most
`FP32_TOLERANCE`, or `FP32_RELATIVE` x max |logit| where that is larger; for --fp16, at most `FP16_TOLERANCE` x max(1, max |logit|) (float16 keeps about
3 significant digits, and the error grows with the logits' scale and the network's depth).
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from seg import __version__
from seg.errors import SegError
from seg.inference.modelinfo import ModelInfo
from seg.io.images import atomic_path
from training.checkpoint import checkpoint_name, load_checkpoint, model_from_checkpoint

MIN_OPSET = 11  # dynamic Pad sizes
MAX_OPSET = 20  # torch.onnx's classic (TorchScript) exporter
FP32_TOLERANCE = 1e-3
FP32_RELATIVE = 1e-4  # of max |logit|: deep dense decoders (U-Net++) sum many float32 terms
FP16_TOLERANCE = 2e-2
INPUT_NAME = "image"
OUTPUT_NAME = "logits"


def export_onnx(run_or_ckpt: str | Path, out: str | Path, opset: int = 18, fp16: bool = False) -> dict[str, Any]:
    """Export a run folder's best checkpoint (or a .pt file) to ONNX, with metadata and a parity check.

    Args:
        run_or_ckpt: a run folder (its checkpoints/best.pt, else last.pt) or a checkpoint file.
        out: the .onnx file to write (atomically; nothing is written if the parity check fails).
        opset: ONNX opset version for the classic (TorchScript) exporter.
        fp16: store weights and compute in float16; inputs and outputs stay float32.

    Returns:
        A report: path, bytes, opset, fp16, metadata, the parity rows (shape, max_abs_diff, bound)
        and the ONNX Runtime provider used for the check.

    Raises:
        SegError: unreadable checkpoint, unsupported opset, fp16 converter missing, or failed parity.
    """
    import onnx

    start = time.perf_counter()
    out = Path(out)
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise SegError(
            f"--opset {opset}: choose {MIN_OPSET}..{MAX_OPSET} (the classic exporter's range;"
            " the model's dynamic padding needs at least 11)"
        )
    ckpt = load_checkpoint(run_or_ckpt)
    model = model_from_checkpoint(ckpt)
    source = Path(ckpt["path"])
    info = ModelInfo.from_checkpoint(ckpt, checkpoint_name(source)).model_copy(
        update={"version": __version__, "fp16": fp16, "opset": opset, "input": INPUT_NAME, "output": OUTPUT_NAME}
    )
    channels, stride = info.in_channels, info.stride

    # Trace at a size that is not a stride multiple, so the padding is recorded from the input's shape.
    dummy = torch.randn(1, channels, 3 * stride + 5, 4 * stride + 3)
    dynamic = {0: "batch", 2: "height", 3: "width"}
    with atomic_path(out) as tmp:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # tracer warnings about shape arithmetic are expected
                torch.onnx.export(
                    model,
                    (dummy,),
                    str(tmp),
                    dynamo=False,
                    opset_version=opset,
                    input_names=[INPUT_NAME],
                    output_names=[OUTPUT_NAME],
                    dynamic_axes={INPUT_NAME: dynamic, OUTPUT_NAME: dynamic},
                )
        except (ValueError, RuntimeError) as err:
            raise SegError(f"{out}: ONNX export at opset {opset} failed: {str(err).splitlines()[0]}") from None
        proto = onnx.load(str(tmp))
        if fp16:
            proto = _to_float16(proto)
        set_metadata(proto, info)
        proto.doc_string = f"seg {info.arch}/{info.encoder} segmentation model; metadata key 'seg'"
        proto.producer_name = "seg"
        proto.producer_version = __version__
        onnx.save(proto, str(tmp))
        parity, provider = check_parity(model, tmp, info, fp16, name=str(out))
    return {
        "path": str(out),
        "bytes": out.stat().st_size,
        "checkpoint": str(source),
        "opset": opset,
        "fp16": fp16,
        "metadata": info.to_metadata(),
        "parity": parity,
        "provider": provider,
        "seconds": round(time.perf_counter() - start, 2),
    }


def set_metadata(proto, info: ModelInfo) -> None:
    """metadata_props: "seg" holds the whole JSON object; single keys repeat it readably."""
    del proto.metadata_props[:]
    for key, value in info.readable_metadata().items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value


def _to_float16(proto):
    """Float16 weights and compute, float32 inputs and outputs (onnxruntime's converter)."""
    try:
        from onnxruntime.transformers.float16 import convert_float_to_float16
    except ImportError:
        raise SegError("--fp16 needs onnxruntime.transformers.float16, which this installation lacks") from None
    # Resize's scales/roi must stay float32 in ONNX; the converter's default block list covers it.
    return convert_float_to_float16(proto, keep_io_types=True)


def parity_bound(fp16: bool, logits: np.ndarray) -> float:
    """The largest allowed max abs difference between ONNX Runtime's and PyTorch's logits."""
    scale = max(1.0, float(np.abs(logits).max()))
    if fp16:
        return FP16_TOLERANCE * scale
    return max(FP32_TOLERANCE, FP32_RELATIVE * scale)


def check_parity(
    model: torch.nn.Module, path: Path, info: ModelInfo, fp16: bool, name: str | None = None
) -> tuple[list[dict[str, Any]], str]:
    """Run ONNX Runtime and PyTorch on two random inputs; raise SegError when they differ too much.

    Sizes: (2, C, 4s, 5s) and (1, C, 3s + 7, 2s + 11) for stride s, the second not a stride multiple.
    float16 runs on CUDA when usable (ONNX Runtime's CPU provider lacks float16 kernels for most ops).
    """
    from seg.inference.runtime import create_session

    name = name or str(path)
    c, s = info.in_channels, info.stride
    session, provider = create_session(path, device="auto" if fp16 else "cpu")
    generator = torch.Generator().manual_seed(0)
    rows = []
    for shape in ((2, c, 4 * s, 5 * s), (1, c, 3 * s + 7, 2 * s + 11)):
        x = torch.randn(shape, generator=generator)
        with torch.inference_mode():
            expected = model(x).numpy()
        try:
            (got,) = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})
        except Exception as err:  # onnxruntime raises its own exception types
            raise SegError(f"{name}: ONNX Runtime ({provider}) cannot run the export: {err}") from None
        diff = float(np.abs(got.astype(np.float32) - expected).max())
        bound = parity_bound(fp16, expected)
        rows.append({"shape": list(shape), "max_abs_diff": diff, "bound": bound})
        if got.shape != expected.shape or not diff <= bound:
            raise SegError(
                f"{name}: parity check failed at input {tuple(shape)}: ONNX Runtime and PyTorch differ by {diff:.3g}"
                f" (allowed {bound:.3g}, output shapes {got.shape} and {expected.shape})"
            )
    return rows, provider

"""PyTorch behind the one predictor: `seg.inference.predictor.Predictor`s of checkpoints and of live models.

Training's validation and overlays and `seg eval` of checkpoints predict through these, so a checkpoint
and its ONNX export are normalised, tiled and blended by the same code.

    predictor = checkpoint_predictor("runs/unet", device="cpu")      # or torch_predictor(model, info, device)
    mask = predictor.predict(image).mask
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from seg.inference.modelinfo import ModelInfo
from seg.inference.predictor import Predictor
from seg.inference.tiling import Runner, TilingOptions
from training.checkpoint import checkpoint_name, load_checkpoint, model_from_checkpoint


def torch_runner(model: torch.nn.Module, device: torch.device, amp_dtype: torch.dtype | None = None) -> Runner:
    """The model as a predictor's runner: NCHW float32 numpy -> logits numpy."""

    @torch.inference_mode()
    def run(batch: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(batch).to(device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(x)
        return logits.float().cpu().numpy()

    return run


def torch_predictor(
    model: torch.nn.Module,
    info: ModelInfo,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    options: TilingOptions | None = None,
) -> Predictor:
    """A predictor of a model in evaluation mode on `device` (its weights as they are when it runs)."""
    return Predictor(torch_runner(model, device, amp_dtype), info, options, provider="torch", device=device.type)


def checkpoint_predictor(path: str | Path, device: str = "auto", options: TilingOptions | None = None) -> Predictor:
    """A predictor of a checkpoint file or run folder (its best checkpoint, else its last).

    Raises:
        SegError: unreadable checkpoint, or CUDA asked for but not usable.
    """
    from training.device import pick_device

    ckpt = load_checkpoint(path)
    dev = pick_device(device)
    model = model_from_checkpoint(ckpt).to(dev)
    info = ModelInfo.from_checkpoint(ckpt, checkpoint_name(ckpt["path"]))
    predictor = torch_predictor(model, info, dev, options=options)
    predictor.path = Path(ckpt["path"])
    return predictor

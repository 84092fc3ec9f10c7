"""Image normalisation, shared by training and every predictor.

A `Normalization` is plain data (it travels inside checkpoints and ONNX metadata):
- mode "fixed": scale by the dtype's range (255 for 8-bit, 65535 for 16-bit) to [0, 1], then
  (x - mean) / std per channel;
- mode "percentile": map the image's own `low`..`high` percentiles to 0..1 (clipped), then the same
  mean/std. For a huge image the percentiles come from a subsample, so the map stays pointwise;
- mode "auto": fixed for 8-bit images (photographs, most EM), percentile for 16-bit and float ones
  (microscopy, whose used range is rarely the dtype's).
"""

from __future__ import annotations

from typing import Literal, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from seg.io.sources import sample_step


class Normalization(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mode: Literal["fixed", "percentile", "auto"] = "fixed"
    mean: list[float] = Field(default_factory=lambda: [0.5])
    std: list[float] = Field(default_factory=lambda: [0.25])
    low: float = Field(1.0, ge=0, le=100, description="lower percentile (percentile mode)")
    high: float = Field(99.0, ge=0, le=100, description="upper percentile (percentile mode)")


def dtype_scale(dtype: np.dtype) -> float:
    """The value that maps to 1.0 in fixed mode."""
    if np.issubdtype(dtype, np.integer):
        return float(np.iinfo(dtype).max)
    return 1.0


def effective_mode(norm: Normalization, dtype: np.dtype) -> str:
    """"fixed" or "percentile": what `norm` does to an image of `dtype`."""
    if norm.mode != "auto":
        return norm.mode
    return "fixed" if np.dtype(dtype).itemsize == 1 else "percentile"


def intensity_range(image: np.ndarray, norm: Normalization, max_samples: int = 4_000_000) -> tuple[float, float]:
    """The (low, high) input values that map to 0 and 1, before mean/std."""
    if effective_mode(norm, image.dtype) == "fixed":
        return 0.0, dtype_scale(image.dtype)
    step = sample_step(image.shape[0], image.shape[1], max_samples)
    sample = np.asarray(image[::step, ::step], dtype=np.float32)
    lo, hi = np.percentile(sample, (norm.low, norm.high))
    return float(lo), float(max(hi, lo + 1e-6))


def normalize(
    image: np.ndarray, norm: Normalization, value_range: tuple[float, float] | None = None,
    channels_first: bool = True,
) -> np.ndarray:
    """(H, W, C) image in its own dtype -> (C, H, W) float32, ready for the model; (H, W, C) with
    `channels_first=False`, as augmentation takes it (no transposed copy)."""
    lo, hi = value_range if value_range is not None else intensity_range(image, norm)
    x = image.astype(np.float32)  # a copy: the steps below work in place
    x -= lo
    x *= 1.0 / (hi - lo)
    if effective_mode(norm, image.dtype) == "percentile":
        np.clip(x, 0.0, 1.0, out=x)
    channels = x.shape[2]
    mean = _per_channel(norm.mean, channels)
    std = _per_channel(norm.std, channels)
    x -= mean
    x /= std
    return np.ascontiguousarray(x.transpose(2, 0, 1)) if channels_first else x


def _per_channel(values: Sequence[float], channels: int) -> np.ndarray:
    values = list(values)
    if len(values) == 1:
        values = values * channels
    if len(values) != channels:
        raise ValueError(f"normalisation has {len(values)} values for {channels} channels")
    return np.asarray(values, dtype=np.float32)

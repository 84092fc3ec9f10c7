"""How the service answers: the overlay made and encoded by row bands (no whole-image copy), the mask as PNG
bytes or run lengths, and the Server-Timing header."""

from __future__ import annotations

import io
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from PIL import Image

from seg.inference.predictor import Prediction
from seg.io import images as imageio
from seg.io.sources import ArraySource
from seg.io.writers import band_writer

BAND_PIXELS = 1 << 20  # pixels of an overlay made at a time


def display_bands(image: np.ndarray, check: Callable[[], None]) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, 8-bit RGB band) of about BAND_PIXELS pixels each, every band stretched by one display
    range (from the same sample as `Predictor.predict_file`'s), so that no whole-image copy is made."""
    shown = imageio.display_range(ArraySource(image).sample())
    rows = max(1, BAND_PIXELS // image.shape[1])
    for y in range(0, image.shape[0], rows):
        check()
        yield y, imageio.to_display_rgb(image[y : y + rows], shown)


def overlay_bands(
    image: np.ndarray, mask: np.ndarray, palette: list, alpha: float, check: Callable[[], None]
) -> Iterator[np.ndarray]:
    """The overlay as 8-bit RGB row bands (`display_bands`) with the mask's classes blended in."""
    for y, rgb in display_bands(image, check):
        yield imageio.overlay(rgb, mask[y : y + len(rgb)], palette, alpha)


def encode_bands(bands: Iterator[np.ndarray], height: int, width: int, format: str) -> bytes:
    """A PNG encoded as the bands come (through a temporary file), or a JPEG (Pillow holds the whole picture)."""
    if format == "png":
        with tempfile.TemporaryDirectory(prefix="seg-overlay-") as folder:
            path = Path(folder) / "overlay.png"
            with band_writer(path, height, width, np.uint8, 3) as writer:
                for band in bands:
                    writer.write(band)
            return path.read_bytes()
    picture, y = Image.new("RGB", (width, height)), 0
    for band in bands:
        picture.paste(Image.fromarray(band), (0, y))
        y += band.shape[0]
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def timing(result: Prediction) -> dict[str, str]:
    """The predictor's share of the request time, as a standard Server-Timing header."""
    return {"Server-Timing": f"predict;dur={result.seconds * 1000:.1f}"}


def png_bytes(picture: Image.Image) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def run_lengths(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(values, counts) of the runs of equal values in the row-major flattened mask."""
    flat = mask.ravel()
    starts = np.flatnonzero(np.concatenate(([True], flat[1:] != flat[:-1])))
    return flat[starts], np.diff(np.append(starts, flat.size))

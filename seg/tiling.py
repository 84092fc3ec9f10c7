"""Tiled prediction with seamless blending: the one place where an image is cut into tiles.

The image is read band by band (`read_rows`), so an image of any height costs memory for about one tile
row only. Around the image, a margin of half the overlap is filled by reflection, so that no image pixel
lies on a tile's outer edge. Tiles run in batches; their class probabilities are weighted by a Gaussian
(sigma = tile / 8, as nnU-Net) and averaged; finished rows are yielded as soon as no later tile touches
them.

    read_rows(y0, y1) -> (C, y1 - y0, W) float32      normalised image rows
    run(batch NCHW float32) -> (N, K, h, w) logits    the model
    yields (y0, probs (K, rows, W) float32)           finished rows, top to bottom
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np

RowReader = Callable[[int, int], np.ndarray]
Runner = Callable[[np.ndarray], np.ndarray]


def tile_starts(length: int, tile: int, step: int) -> list[int]:
    """Tile origins that cover [0, length): evenly spaced by `step`, the last one flush with the end."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, step))
    starts.append(length - tile)
    return starts


def blend_weights(height: int, width: int, mode: str = "gaussian", sigma_scale: float = 1 / 8) -> np.ndarray:
    """A (height, width) weight map: a Gaussian centred on the tile, or constant."""
    if mode == "constant":
        return np.ones((height, width), dtype=np.float32)
    if mode != "gaussian":
        raise ValueError(f"blend mode must be 'gaussian' or 'constant', not {mode!r}")

    def bell(n: int) -> np.ndarray:
        x = np.arange(n, dtype=np.float64) - (n - 1) / 2
        return np.exp(-0.5 * (x / (n * sigma_scale)) ** 2)

    w = np.outer(bell(height), bell(width))
    w /= w.max()
    return np.maximum(w, 1e-4).astype(np.float32)


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def reflect_index(index: np.ndarray, length: int) -> np.ndarray:
    """Map any integer positions into [0, length) by mirror reflection (edge pixel not repeated)."""
    if length == 1:
        return np.zeros_like(index)
    period = 2 * (length - 1)
    index = np.abs(index) % period
    return np.where(index >= length, period - index, index)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Class probabilities from (N, K, h, w) logits; one channel means a sigmoid (background, foreground)."""
    if logits.shape[1] == 1:
        p = 1.0 / (1.0 + np.exp(-logits))
        return np.concatenate([1.0 - p, p], axis=1)
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    e /= e.sum(axis=1, keepdims=True)
    return e


def flip_tta(run: Runner) -> Runner:
    """Average the probabilities over the four flips (none, horizontal, vertical, both)."""

    def run_tta(batch: np.ndarray) -> np.ndarray:
        total = None
        for axes in ((), (3,), (2,), (2, 3)):
            x = np.ascontiguousarray(np.flip(batch, axes)) if axes else batch
            p = softmax(run(x))
            p = np.flip(p, axes) if axes else p
            total = p if total is None else total + p
        return total / 4.0

    return run_tta


def tile_grid(height: int, width: int, tile: int, overlap: float, multiple: int) -> dict:
    """The geometry of a tiling: tile size per axis, margin, canvas size and tile origins."""
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    tile = round_up(max(tile, multiple), multiple)
    step = max(multiple, int(round(tile * (1.0 - overlap))))
    margin = (tile - step) // 2
    grid = {"margin": margin}
    for axis, length in (("y", height), ("x", width)):
        size = min(tile, round_up(length + 2 * margin, multiple))
        canvas = max(length + 2 * margin, size)
        grid[f"tile_{axis}"] = size
        grid[f"canvas_{axis}"] = canvas
        grid[f"starts_{axis}"] = tile_starts(canvas, size, step)
    grid["tiles"] = len(grid["starts_y"]) * len(grid["starts_x"])
    return grid


def predict_tiled(
    read_rows: RowReader,
    height: int,
    width: int,
    run: Runner,
    tile: int = 512,
    overlap: float = 0.25,
    batch_size: int = 4,
    multiple: int = 32,
    tta: bool = False,
    blend: str = "gaussian",
    on_tiles: Callable[[int], None] | None = None,
) -> Iterator[tuple[int, np.ndarray]]:
    """Predict an image of `height` x `width` by overlapping tiles; see the module docstring.

    Args:
        read_rows: returns normalised rows [y0, y1) of the image, (C, rows, width) float32.
        run: the model, NCHW float32 -> (N, K, h, w) logits; h, w are multiples of `multiple`.
        tile: tile side in pixels (rounded up to `multiple`; smaller for a small image).
        overlap: fraction of a tile shared with its neighbour, in [0, 1).
        batch_size: tiles per call of `run`.
        multiple: the model's stride; every tile side is a multiple of it.
        tta: average over flips.
        blend: "gaussian" (no seams) or "constant" (plain average).
        on_tiles: called with the number of tiles just finished (for progress bars).

    Yields:
        (y0, probabilities of shape (K, rows, width)) for finished rows, top to bottom.
    """
    grid = tile_grid(height, width, tile, overlap, multiple)
    th, tw, margin = grid["tile_y"], grid["tile_x"], grid["margin"]
    ys, xs = grid["starts_y"], grid["starts_x"]
    canvas_w = grid["canvas_x"]
    weights = blend_weights(th, tw, blend)
    predict = flip_tta(run) if tta else (lambda batch: softmax(run(batch)))
    cols = reflect_index(np.arange(canvas_w) - margin, width)

    acc = wsum = None
    top = 0  # canvas row of acc[:, 0]; each tile row starts there
    for i, y in enumerate(ys):
        band = _read_canvas_rows(read_rows, y, y + th, margin, height)[:, :, cols]
        for b in range(0, len(xs), batch_size):
            chunk = xs[b : b + batch_size]
            probs = predict(np.stack([band[:, :, x : x + tw] for x in chunk]))
            if acc is None:
                acc = np.zeros((probs.shape[1], th, canvas_w), dtype=np.float32)
                wsum = np.zeros((th, canvas_w), dtype=np.float32)
            for p, x in zip(probs, chunk):
                acc[:, :, x : x + tw] += p * weights
                wsum[:, x : x + tw] += weights
            if on_tiles:
                on_tiles(len(chunk))
        done = ys[i + 1] if i + 1 < len(ys) else grid["canvas_y"]
        lo, hi = max(top, margin), min(done, margin + height)
        if hi > lo:
            rows = slice(lo - top, hi - top)
            out = acc[:, rows, margin : margin + width] / wsum[rows, margin : margin + width]
            yield lo - margin, out
        keep = top + th - done
        acc[:, :keep] = acc[:, done - top : done - top + keep]
        wsum[:keep] = wsum[done - top : done - top + keep]
        acc[:, keep:] = 0
        wsum[keep:] = 0
        top = done


def _read_canvas_rows(read_rows: RowReader, y0: int, y1: int, margin: int, height: int) -> np.ndarray:
    """Canvas rows [y0, y1): image rows shifted by `margin`, mirrored beyond the image's edges."""
    rows = reflect_index(np.arange(y0, y1) - margin, height)
    lo, hi = int(rows.min()), int(rows.max()) + 1
    return read_rows(lo, hi)[:, rows - lo]


def predict_array(image: np.ndarray, run: Runner, **options) -> np.ndarray:
    """Tiled prediction of a whole normalised (C, H, W) array; returns (K, H, W) probabilities."""
    _, height, width = image.shape
    bands = predict_tiled(lambda y0, y1: image[:, y0:y1], height, width, run, **options)
    return np.concatenate([probs for _, probs in bands], axis=1)

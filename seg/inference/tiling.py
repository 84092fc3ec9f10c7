"""Tiled prediction with seamless blending: the one place where an image is cut into tiles.

The image is read band by band (`read_rows`), and the blended sums cover the image's pixels only, so an
image of any shape costs memory for about one tile row of it plus one batch of tiles. With edges "mirror"
(U-Net's overlap-tile strategy), a margin of half the overlap (at most the image's own side) around the
image is filled by reflection, so that no image pixel lies on a tile's outer edge; with "inside" (MONAI's
and nnU-Net's sliding window) the tiles lie within the image, whose edges the network then sees as it saw
the edges of its training crops (photographs, where the layout of a scene matters). Tiles run in batches;
their class probabilities are weighted by a Gaussian (sigma = tile / 8, as nnU-Net) and averaged;
finished rows are yielded as soon as no later tile touches them.

    read_rows(y0, y1) -> (C, y1 - y0, W) float32      normalised image rows
    run(batch NCHW float32) -> (N, K, h, w) logits    the model
    yields (y0, probs (K, rows, W) float32)           finished rows, top to bottom
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from numbers import Integral, Real
from typing import Any, Callable, Iterator

import numpy as np

from seg.errors import SegError
from seg.io.sources import round_up

RowReader = Callable[[int, int], np.ndarray]
Runner = Callable[[np.ndarray], np.ndarray]
MIN_TILE = 32  # the smallest tile side anyone may ask for (a model's stride is at most this)
MAX_TILE = 8192  # the largest (the service narrows it with SEG_MAX_TILE)
MAX_BATCH = 256
BLENDS = ("gaussian", "constant")
EDGES = ("mirror", "inside")
TTA_LEVELS = ("none", "flips", "d4")


@dataclass(frozen=True)
class TilingOptions:
    """How an image is cut into tiles and put together again; checked once, when made.

    Attributes:
        tile: tile side in pixels (rounded up to the model's stride; see `tile_grid` for thin images).
        overlap: fraction of a tile shared with its neighbour, in [0, 1).
        batch_size: tiles per model call.
        tta: test-time augmentation, "none", "flips" (the four flips: 4 runs per tile) or "d4" (the eight
            rotations by 90 degrees and flips: 8 runs); the probabilities are averaged. True and False
            mean "flips" and "none".
        blend: "gaussian" (no seams) or "constant" (plain average).
        edges: "mirror" (tiles reach past the image's edges into a reflected margin) or "inside" (tiles
            lie within the image; a side shorter than a tile is padded to the model's stride only).
    """

    tile: int = 512
    overlap: float = 0.25
    batch_size: int = 4
    tta: str = "none"
    blend: str = "gaussian"
    edges: str = "mirror"

    def __post_init__(self) -> None:
        if not _whole(self.tile) or not MIN_TILE <= self.tile <= MAX_TILE:
            raise SegError(f"tile {self.tile}: must be a whole number in {MIN_TILE}..{MAX_TILE}")
        if not isinstance(self.overlap, Real) or isinstance(self.overlap, bool) or not 0.0 <= self.overlap < 1.0:
            raise SegError(f"overlap {self.overlap}: must be in [0, 1)")
        if not _whole(self.batch_size) or not 1 <= self.batch_size <= MAX_BATCH:
            raise SegError(f"batch size {self.batch_size}: must be a whole number in 1..{MAX_BATCH}")
        if self.blend not in BLENDS:
            raise SegError(f"blend {self.blend!r}: choose {' or '.join(BLENDS)}")
        if self.edges not in EDGES:
            raise SegError(f"edges {self.edges!r}: choose {' or '.join(EDGES)}")
        if isinstance(self.tta, (bool, np.bool_)):
            object.__setattr__(self, "tta", "flips" if self.tta else "none")
        if not isinstance(self.tta, str) or self.tta not in TTA_LEVELS:
            raise SegError(f"tta {self.tta!r}: choose none, flips or d4")
        for key, kind in (("tile", int), ("overlap", float), ("batch_size", int)):
            object.__setattr__(self, key, kind(getattr(self, key)))

    def grid(self, height: int, width: int, multiple: int) -> "TileGrid":
        """The tiling of an image of `height` x `width` with these options (see `tile_grid`)."""
        return tile_grid(height, width, self.tile, self.overlap, multiple, self.edges, self.batch_size)

    def replace(self, **changes: Any) -> "TilingOptions":
        """A copy with the changes given (None keeps a value), checked again."""
        return replace(self, **{key: value for key, value in changes.items() if value is not None})


def _whole(value: Any) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


@dataclass(frozen=True)
class TileGrid:
    """The geometry of a tiling (see `tile_grid`): per axis y and x, the reflected margin, the tile side,
    the canvas (image plus margins) and the tile origins on the canvas."""

    margin: int
    margin_y: int
    margin_x: int
    tile_y: int
    tile_x: int
    canvas_y: int
    canvas_x: int
    starts_y: list[int]
    starts_x: list[int]

    @property
    def tiles(self) -> int:
        return len(self.starts_y) * len(self.starts_x)


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
        total = 0.0
        for axes in ((), (3,), (2,), (2, 3)):
            x = np.ascontiguousarray(np.flip(batch, axes)) if axes else batch
            p = softmax(run(x))
            total = total + (np.flip(p, axes) if axes else p).astype(np.float64)
        return (total / 4.0).astype(np.float32)  # summed in float64: equal runs give their value exactly

    return run_tta


def d4_tta(run: Runner) -> Runner:
    """Average the probabilities over the eight rotations by 90 degrees and flips (the dihedral group D4).

    A rotation swaps a tile's height and width, so non-square tiles run as their transposes too; every
    transform is inverted exactly on the probabilities before they are averaged.
    """

    def run_tta(batch: np.ndarray) -> np.ndarray:
        total = 0.0
        for k in range(4):
            for flip in (False, True):
                x = np.rot90(batch, k, axes=(2, 3))
                x = np.ascontiguousarray(np.flip(x, 3) if flip else x)
                p = softmax(run(x))
                total = total + np.rot90(np.flip(p, 3) if flip else p, -k, axes=(2, 3)).astype(np.float64)
        return (total / 8.0).astype(np.float32)

    return run_tta


def tta_runner(run: Runner, level: str) -> Runner:
    """The model's probabilities (N, K, h, w) at a TTA level of `TilingOptions`."""
    if level == "flips":
        return flip_tta(run)
    if level == "d4":
        return d4_tta(run)
    return lambda batch: softmax(run(batch))


def tile_grid(
    height: int, width: int, tile: int, overlap: float, multiple: int, edges: str = "mirror", batch_size: int = 1
) -> TileGrid:
    """The geometry of a tiling: tile size, margin, canvas size and tile origins, per axis.

    An image whose canvas (with its margin, rounded up to `multiple`) holds no more pixels than a batch
    of `batch_size` tiles is one tile: the same memory as a batch, and none of the overlap's repeated work
    (a 512 x 512 image with its margin is 640 x 640, which four 512 x 512 tiles would cover 2.6 times).

    With edges "inside" there is no margin: the canvas is the image, padded at its far end to the stride
    where a side is shorter than a tile. A side shorter than a tile gets one tile of its padded length (a
    reflected margin of at most its own length, rounded up to `multiple`), and the other side's tiles grow to keep about `tile` x `tile` pixels
    (at the same overlap in pixels): a 1 x 1,000,000 line is cut into 32 x 8192 tiles, not 160 x 512.
    """
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    tile = round_up(max(tile, multiple), multiple)
    step = max(multiple, int(round(tile * (1.0 - overlap))))
    margin = (tile - step) // 2
    grid: dict = {"margin": margin}  # the fields of the TileGrid
    lengths = {"y": height, "x": width}
    margins = {axis: 0 if edges == "inside" else min(margin, length) for axis, length in lengths.items()}
    whole = {axis: round_up(n + 2 * margins[axis], multiple) for axis, n in lengths.items()}
    sizes = {axis: min(tile, n) for axis, n in whole.items()}
    if whole["y"] * whole["x"] <= batch_size * tile * tile:
        sizes = whole
    for axis, other in (("y", "x"), ("x", "y")):
        if sizes[axis] == tile and sizes[other] < tile:  # a thin image: longer tiles along its long side
            longest = max(tile, (tile * tile // sizes[other]) // multiple * multiple)
            sizes[axis] = min(longest, whole[axis])
    for axis, length in lengths.items():
        size = sizes[axis]
        canvas = max(length + 2 * margins[axis], size)
        grid[f"margin_{axis}"] = margins[axis]
        grid[f"tile_{axis}"] = size
        grid[f"canvas_{axis}"] = canvas
        grid[f"starts_{axis}"] = tile_starts(canvas, size, max(multiple, size - (tile - step)))
    return TileGrid(**grid)


def predict_tiled(
    read_rows: RowReader,
    height: int,
    width: int,
    run: Runner,
    options: TilingOptions = TilingOptions(),
    multiple: int = 32,
    on_tiles: Callable[[int], None] | None = None,
    check: Callable[[], None] | None = None,
) -> Iterator[tuple[int, np.ndarray]]:
    """Predict an image of `height` x `width` by overlapping tiles; see the module docstring.

    Args:
        read_rows: returns normalised rows [y0, y1) of the image, (C, rows, width) float32.
        run: the model, NCHW float32 -> (N, K, h, w) logits; h, w are multiples of `multiple`.
        options: tile side, overlap, tiles per call of `run`, TTA level, blending (see `TilingOptions`).
        multiple: the model's stride; every tile side is a multiple of it.
        on_tiles: called with the number of tiles just finished (for progress bars).
        check: called before each batch of tiles; it may raise to stop the prediction (a deadline, a
            shutdown).

    Yields:
        (y0, probabilities of shape (K, rows, width)) for finished rows, top to bottom.
    """
    grid = options.grid(height, width, multiple)
    th, tw = grid.tile_y, grid.tile_x
    my, mx = grid.margin_y, grid.margin_x
    ys, xs = grid.starts_y, grid.starts_x
    weights = blend_weights(th, tw, options.blend)
    predict = tta_runner(run, options.tta)
    cols = reflect_index(np.arange(grid.canvas_x) - mx, width)
    batch_size = options.batch_size

    # Narrow images have fewer tiles per row than a batch: their batches take several tile rows.
    group = max(1, -(-batch_size // len(xs)))
    # The sums cover image pixels only: the rows of one group of tile rows, the image's width.
    rows_held = min(height, th + (ys[min(group, len(ys)) - 1] - ys[0]))
    acc = None
    wsum = np.zeros((rows_held, width), dtype=np.float32)
    top = 0  # image row of acc[:, 0]
    for g in range(0, len(ys), group):
        tile_rows = ys[g : g + group]
        rows = {y: _tile_rows(y, th, my, height) for y in tile_rows}
        first = min(int(r.min()) for r in rows.values())
        band = read_rows(first, max(int(r.max()) for r in rows.values()) + 1)
        tiles = [(y, x) for y in tile_rows for x in xs]
        for b in range(0, len(tiles), batch_size):
            if check is not None:
                check()
            chunk = tiles[b : b + batch_size]
            inputs = [_take(_take(band, cols[x : x + tw], 2), rows[y] - first, 1) for y, x in chunk]
            probs = predict(np.stack(inputs))
            if acc is None:
                acc = np.zeros((probs.shape[1], rows_held, width), dtype=np.float32)
            for p, (y, x) in zip(probs, chunk):
                ty0, ty1 = max(y, my) - y, min(y + th, my + height) - y  # tile rows that are image rows
                tx0, tx1 = max(x, mx) - x, min(x + tw, mx + width) - x
                iy0, ix0 = y + ty0 - my - top, x + tx0 - mx
                w = weights[ty0:ty1, tx0:tx1]
                acc[:, iy0 : iy0 + ty1 - ty0, ix0 : ix0 + tx1 - tx0] += p[:, ty0:ty1, tx0:tx1] * w
                wsum[iy0 : iy0 + ty1 - ty0, ix0 : ix0 + tx1 - tx0] += w
            if on_tiles:
                on_tiles(len(chunk))
        done = min(height, max(0, ys[g + group] - my)) if g + group < len(ys) else height
        if done > top:
            yield top, acc[:, : done - top] / wsum[: done - top]
            shift = done - top
            acc[:, : rows_held - shift] = acc[:, shift:]
            wsum[: rows_held - shift] = wsum[shift:]
            acc[:, rows_held - shift :] = 0
            wsum[rows_held - shift :] = 0
            top = done


def _tile_rows(y: int, th: int, margin: int, height: int) -> np.ndarray:
    """Image rows of canvas rows [y, y + th): shifted by the margin, mirrored beyond the image's edges."""
    return reflect_index(np.arange(y, y + th) - margin, height)


def _take(array: np.ndarray, index: np.ndarray, axis: int) -> np.ndarray:
    """`array` at `index` along `axis`: a view when the index is a plain ascending range."""
    first = int(index[0])
    if index[-1] - first == len(index) - 1 and (len(index) < 3 or np.all(np.diff(index) == 1)):
        return array[(slice(None),) * axis + (slice(first, first + len(index)),)]
    return np.take(array, index, axis=axis)

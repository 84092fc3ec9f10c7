"""The predictor: an exported ONNX model applied to images of any size by seamless tiles.

Every caller (the `seg predict` command, the service, evaluation of ONNX models) goes through `Predictor`.
The data path:

    file -> ImageSource (row bands in the image's own dtype) -> to_channels + normalize (per band)
         -> seg.tiling.predict_tiled (tiles, batches, ONNX Runtime, Gaussian blending; finished row bands)
         -> argmax / confidence per band -> band writers (tiled TIFF or PNG, written as rows arrive)

Memory: `predict_file` holds about one tile row of the image and of the probabilities at a time, so its
peak does not grow with the image's area for TIFFs (striped, tiled or uncompressed). PNG, JPEG and BMP
cannot be decoded by rows with the libraries at hand, so they are decoded whole (H x W x C bytes, e.g.
1.2 GB for a 20000 x 20000 RGB PNG; Pillow's decompression-bomb limit is bypassed for local files by
decoding with imagecodecs); everything after the decoding streams as for TIFFs.

This module imports onnxruntime, numpy and image libraries only, never torch.
"""

from __future__ import annotations

import math
import os
import queue
import struct
import threading
import time
import warnings
import zlib
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from seg.errors import ImageError, SegError
from seg.imageio import (
    PIL_FORMATS, TIFF_SUFFIXES, atomic_path, check_tiff_chunks, default_palette, display_range, exif_orientation,
    is_tiff, orient, overlay, read_image, stack_message, tiff_colours, tiff_layout, to_channels, to_display_rgb,
)  # fmt: skip
from seg.preprocess import intensity_range, normalize
from seg.runtime import ModelInfo, create_session, describe_provider, read_model_info
from seg.tiling import predict_tiled, round_up, tile_grid

SAMPLE_PIXELS = 4_000_000  # pixels read for percentile normalisation and display ranges
LARGE_PIXELS = 64_000_000  # beyond this, a TIFF's percentile sample comes from 32 bands, not a full pass
MAX_CHUNK_ROWS = 2048  # a TIFF stored in taller compressed chunks is decoded whole (see TiffSource)
WRITE_TILE = 256  # tile side of the TIFFs we write
BLOCK = 2048  # column block for pointwise work on wide bands


@dataclass
class Prediction:
    """The result of `Predictor.predict`.

    Attributes:
        mask: (H, W) class indices, uint8 (uint16 for more than 256 classes).
        probabilities: (K, H, W) float32 class probabilities, when asked for.
        confidence: (H, W) float32 probability of the chosen class, when asked for.
        seconds: wall time of the prediction.
    """

    mask: np.ndarray
    probabilities: np.ndarray | None = None
    confidence: np.ndarray | None = None
    seconds: float = 0.0

    def pixels_per_class(self, classes: Sequence[str]) -> dict[str, int]:
        counts = np.bincount(self.mask.ravel(), minlength=len(classes))
        return {name: int(n) for name, n in zip(classes, counts)}


class Predictor:
    """Segment images with an exported ONNX model by overlapping tiles, blended without seams.

    Args:
        model: an ONNX file written by `seg export` (its metadata gives classes, channels, normalisation,
            stride and the default tile size and overlap).
        device: "auto" (CUDA when usable, else CPU), "cuda" or "cpu"; `provider` says what was obtained.
        threads: ONNX Runtime intra-op threads on the CPU (None: its default, the physical cores).
        tile: tile side in pixels (default: the model's recommendation; rounded up to the stride).
        overlap: fraction of a tile shared with its neighbour, in [0, 1) (default: the model's).
        batch_size: tiles per ONNX Runtime call.
        tta: average the probabilities over horizontal and vertical flips (4 runs per tile).
        blend: "gaussian" (no seams) or "constant".

    Example:
        >>> predictor = Predictor("model.onnx", device="cpu")
        >>> result = predictor.predict(image, probabilities=True)
        >>> predictor.predict_file("huge.tif", "out/huge.tif")
    """

    def __init__(
        self,
        model: str | Path,
        device: str = "auto",
        threads: int | None = None,
        tile: int | None = None,
        overlap: float | None = None,
        batch_size: int = 4,
        tta: bool = False,
        blend: str = "gaussian",
    ):
        self.path = Path(model)
        self.session, self.provider = create_session(self.path, device=device, threads=threads)
        self.info: ModelInfo = read_model_info(self.session, self.path)
        self.tile = int(tile or self.info.tile_size)
        self.overlap = float(self.info.overlap if overlap is None else overlap)
        self.batch_size = int(batch_size)
        self.tta = tta
        self.blend = blend
        if self.tile < 1:
            raise SegError(f"tile size must be positive, not {self.tile}")
        if not 0.0 <= self.overlap < 1.0:
            raise SegError(f"overlap must be in [0, 1), not {self.overlap}")
        if self.batch_size < 1:
            raise SegError(f"batch size must be at least 1, not {self.batch_size}")
        if blend not in ("gaussian", "constant"):
            raise SegError(f"blend must be 'gaussian' or 'constant', not {blend!r}")
        model_input = self.session.get_inputs()[0]
        self._input_name = model_input.name
        self._input_dtype = np.float16 if model_input.type == "tensor(float16)" else np.float32
        self._output_name = self.session.get_outputs()[0].name
        palette = [list(c) for c in self.info.palette]
        self.palette = palette + default_palette(self.num_classes)[len(palette) :]

    # -- model ---------------------------------------------------------------------------------------
    @property
    def device(self) -> str:
        """ "cuda" or "cpu": where the model really runs."""
        return describe_provider(self.provider)

    @property
    def classes(self) -> list[str]:
        return list(self.info.classes)

    @property
    def num_classes(self) -> int:
        """Classes in the output (a one-channel sigmoid model has two: background and foreground)."""
        return max(2, self.info.num_classes)

    @property
    def mask_dtype(self) -> np.dtype:
        return np.dtype(np.uint8 if self.num_classes <= 256 else np.uint16)

    def run(self, batch: np.ndarray) -> np.ndarray:
        """The bare model: (N, C, h, w) float32 -> (N, K, h, w) float32 logits."""
        feed = {self._input_name: batch.astype(self._input_dtype, copy=False)}
        (logits,) = self.session.run([self._output_name], feed)
        return logits.astype(np.float32, copy=False)

    def tile_count(self, height: int, width: int) -> int:
        """Tiles that an image of this size is cut into (for progress bars)."""
        return tile_grid(height, width, self.tile, self.overlap, self.info.stride)["tiles"]

    def bands(
        self,
        read_rows: Callable[[int, int], np.ndarray],
        height: int,
        width: int,
        on_tiles: Callable[[int], None] | None = None,
        check: Callable[[], None] | None = None,
    ) -> Iterator[tuple[int, np.ndarray]]:
        """Finished (y0, probabilities (K, rows, width)) bands, top to bottom; see `seg.tiling.predict_tiled`.

        Args:
            read_rows: returns normalised rows [y0, y1) as (C, rows, width) float32.
            height: image height.
            width: image width.
            on_tiles: called with the number of tiles just run.
            check: called before each batch of tiles; raise in it to stop (a deadline, a shutdown).
        """
        return predict_tiled(
            read_rows, height, width, self.run, tile=self.tile, overlap=self.overlap,
            batch_size=self.batch_size, multiple=self.info.stride, tta=self.tta, blend=self.blend,
            on_tiles=on_tiles, check=check,
        )  # fmt: skip

    # -- in memory -----------------------------------------------------------------------------------
    def predict(
        self,
        image: np.ndarray,
        probabilities: bool = False,
        confidence: bool = False,
        on_tiles: Callable[[int], None] | None = None,
        name: str = "image",
        check: Callable[[], None] | None = None,
    ) -> Prediction:
        """Segment an image held in memory.

        Args:
            image: (H, W) or (H, W, C) in its own dtype (uint8, uint16, float...); grey, RGB(A) and
                multi-channel images are converted to the model's channels as in training.
            probabilities: also return the (K, H, W) class probabilities.
            confidence: also return the (H, W) probability of the chosen class.
            on_tiles: called with the number of tiles just run.
            name: the image's name in error messages.
            check: called before each batch of tiles; raise in it to stop (a deadline, a shutdown).

        Returns:
            A `Prediction`.

        Raises:
            ImageError: an empty image, or channels that cannot be converted to the model's.
        """
        start = time.perf_counter()
        source = ArraySource(image, name)
        self._check_channels(source)
        height, width = source.height, source.width
        mask = np.empty((height, width), dtype=self.mask_dtype)
        probs = np.empty((self.num_classes, height, width), np.float32) if probabilities else None
        conf = np.empty((height, width), np.float32) if confidence else None
        for y0, p in self.bands(self._row_reader(source), height, width, on_tiles, check):
            rows = slice(y0, y0 + p.shape[1])
            mask[rows] = self._argmax(p)
            if probs is not None:
                probs[:, rows] = p
            if conf is not None:
                conf[rows] = p.max(0)
        return Prediction(mask, probs, conf, time.perf_counter() - start)

    # -- file to file --------------------------------------------------------------------------------
    def predict_file(
        self,
        path: str | Path,
        out_path: str | Path,
        probabilities_path: str | Path | None = None,
        confidence_path: str | Path | None = None,
        overlay_path: str | Path | None = None,
        on_tiles: Callable[[int], None] | None = None,
        check: Callable[[], None] | None = None,
    ) -> dict[str, Any]:
        """Segment an image file band by band and write the results as the bands are finished.

        Each output is written atomically (a temporary file renamed when complete); the mask is renamed
        last, so an existing mask means a finished prediction.

        Args:
            path: the image (PNG, JPEG, BMP, TIFF; 8/16-bit, grey, RGB(A) or multi-channel).
            out_path: the mask: a palette PNG (.png) or a tiled, zlib-compressed TIFF (.tif).
            probabilities_path: a tiled float32 TIFF (H, W, K) of class probabilities.
            confidence_path: a tiled float32 TIFF (H, W) of the chosen class's probability.
            overlay_path: the image with the coloured mask blended in (.png or .tif).
            on_tiles: called with the number of tiles just run.
            check: called before each batch of tiles; raise in it to stop.

        Returns:
            A summary: height, width, channels, dtype, tiles, seconds, pixels_per_class, outputs.

        Raises:
            ImageError: the image cannot be read or does not fit the model.
        """
        start = time.perf_counter()
        k = self.num_classes
        targets = {  # kind: (path, dtype, values per pixel); the mask first, so it is renamed last
            "mask": (out_path, self.mask_dtype, 1),
            "probabilities": (probabilities_path, np.float32, k),
            "confidence": (confidence_path, np.float32, 1),
            "overlay": (overlay_path, np.uint8, 3),
        }
        targets = {kind: spec for kind, spec in targets.items() if spec[0]}
        with open_image(path) as source, ExitStack() as stack:
            self._check_channels(source)
            height, width = source.height, source.width
            writers = {
                kind: stack.enter_context(
                    band_writer(target, height, width, dtype, samples, palette=self.palette if kind == "mask" else None)
                )
                for kind, (target, dtype, samples) in targets.items()
            }
            display = display_range(source.sample()) if "overlay" in writers else None
            counts = np.zeros(k, dtype=np.int64)
            for y0, p in self.bands(self._row_reader(source), height, width, on_tiles, check):
                mask = self._argmax(p)
                counts += np.bincount(mask.ravel(), minlength=k)[:k]
                writers["mask"].write(mask)
                if "probabilities" in writers:
                    writers["probabilities"].write(p.transpose(1, 2, 0))
                if "confidence" in writers:
                    writers["confidence"].write(p.max(0))
                if display is not None:
                    rgb = to_display_rgb(source.read(y0, y0 + p.shape[1]), display)
                    writers["overlay"].write(overlay(rgb, mask, self.palette))
        return {
            "height": height,
            "width": width,
            "channels": source.channels,
            "dtype": str(source.dtype),
            "tiles": self.tile_count(height, width),
            "seconds": round(time.perf_counter() - start, 3),
            "pixels_per_class": {name: int(n) for name, n in zip(self.class_names, counts)},
            "outputs": {kind: str(target) for kind, (target, _, _) in targets.items()},
        }

    def predict_stack(
        self,
        path: str | Path,
        out_path: str | Path,
        probabilities_path: str | Path | None = None,
        confidence_path: str | Path | None = None,
        overlay_path: str | Path | None = None,
        on_tiles: Callable[[int], None] | None = None,
        check: Callable[[], None] | None = None,
    ) -> dict[str, Any]:
        """Segment a TIFF stack slice by slice into multi-page TIFFs, one page per slice.

        Slices are read one at a time (pages, unless the file says they are channels: see
        `seg.imageio.TiffLayout`) and segmented as images of their own; memory holds about one slice.
        Outputs as `predict_file`, each a zlib-compressed multi-page TIFF whatever its suffix says: the
        mask (H, W) pages, probabilities (H, W, K), confidence (H, W), overlay (H, W, 3).

        Returns:
            A summary as `predict_file`'s, with `slices`; pixels per class are summed over the slices.

        Raises:
            ImageError: the file cannot be read, is not a TIFF or does not fit the model.
        """
        start = time.perf_counter()
        path = Path(path)
        if not path.is_file():
            raise ImageError(f"{path}: no such file")
        if not is_tiff(path):
            raise ImageError(f"{path}: not a TIFF; stacks are multi-page TIFFs")
        targets = {"mask": out_path, "probabilities": probabilities_path, "confidence": confidence_path, "overlay": overlay_path}
        targets = {kind: Path(target) for kind, target in targets.items() if target}  # the mask first: renamed last
        k = self.num_classes
        with TiffSource(path) as source, ExitStack() as stack:
            self._check_channels(source)
            size = source.height * source.width * source.slices
            per_pixel = {"mask": self.mask_dtype.itemsize, "probabilities": 4 * k, "confidence": 4, "overlay": 3}
            writers = {kind: stack.enter_context(page_writer(target, size * per_pixel[kind])) for kind, target in targets.items()}
            counts = np.zeros(k, dtype=np.int64)
            for number in range(source.slices):
                source.select(number)
                image = source.read(0, source.height)
                name = f"{path} (slice {number})"
                result = self.predict(
                    image, probabilities="probabilities" in writers, confidence="confidence" in writers,
                    on_tiles=on_tiles, name=name, check=check,
                )  # fmt: skip
                counts += np.bincount(result.mask.ravel(), minlength=k)[:k]
                writers["mask"](result.mask)
                if "probabilities" in writers:
                    writers["probabilities"](result.probabilities.transpose(1, 2, 0))
                if "confidence" in writers:
                    writers["confidence"](result.confidence)
                if "overlay" in writers:
                    writers["overlay"](overlay(image, result.mask, self.palette))
        return {
            "height": source.height,
            "width": source.width,
            "slices": source.slices,
            "channels": source.channels,
            "dtype": str(source.dtype),
            "tiles": self.tile_count(source.height, source.width) * source.slices,
            "seconds": round(time.perf_counter() - start, 3),
            "pixels_per_class": {name: int(n) for name, n in zip(self.class_names, counts)},
            "outputs": {kind: str(target) for kind, target in targets.items()},
        }

    @property
    def class_names(self) -> list[str]:
        """One name per output class (a sigmoid model's two are background and the one given)."""
        names = list(self.info.classes)
        if len(names) < self.num_classes:
            names = ["background", *names][: self.num_classes]
        return names + [f"class_{i}" for i in range(len(names), self.num_classes)]

    # -- helpers -------------------------------------------------------------------------------------
    def _argmax(self, probs: np.ndarray) -> np.ndarray:
        """(K, rows, W) -> (rows, W) class indices; ties go to the lower class, as with argmax.

        One vectorised comparison per class: numpy's argmax over the first axis is ~50x slower.
        """
        if probs.shape[0] == 2:  # the common binary case
            return np.greater(probs[1], probs[0]).view(np.uint8)
        mask = np.zeros(probs.shape[1:], self.mask_dtype)
        best = probs[0].copy()
        for c in range(1, probs.shape[0]):
            better = probs[c] > best
            np.copyto(mask, c, where=better)
            np.maximum(best, probs[c], out=best)
        return mask

    def _check_channels(self, source: "ImageSource") -> None:
        try:
            to_channels(np.zeros((1, 1, source.channels), source.dtype), self.info.in_channels)
        except ImageError as err:
            raise ImageError(f"{source.name}: {err}") from None

    def _row_reader(self, source: "ImageSource") -> Callable[[int, int], np.ndarray]:
        """Normalised (C, rows, W) float32 rows of `source`, with one value range for the whole image."""
        norm, channels = self.info.normalize, self.info.in_channels
        if norm.mode == "fixed":
            value_range = intensity_range(np.zeros((1, 1), source.dtype), norm)
        else:
            value_range = intensity_range(to_channels(source.sample(), channels), norm)

        def read_rows(y0: int, y1: int) -> np.ndarray:
            rows = source.read(y0, y1)
            out = np.empty((channels, rows.shape[0], source.width), np.float32)
            for x in range(0, source.width, BLOCK):  # pointwise, so by column blocks: small temporaries
                out[:, :, x : x + BLOCK] = normalize(to_channels(rows[:, x : x + BLOCK], channels), norm, value_range)
            return out

        return read_rows


# ---------------------------------------------------------------------------------------------------
# Reading images by row bands
# ---------------------------------------------------------------------------------------------------
class ImageSource:
    """An image readable by row bands: `read(y0, y1)` -> (rows, W, C) in the image's own dtype."""

    name: str
    height: int
    width: int
    channels: int
    dtype: np.dtype

    def read(self, y0: int, y1: int) -> np.ndarray:
        raise NotImplementedError

    def sample(self, max_pixels: int = SAMPLE_PIXELS) -> np.ndarray:
        """Every step-th row and column (h, w, C), about `max_pixels` pixels, for percentiles.

        Reads the image once, band by band; `ArraySource` gives the same pixels by plain slicing.
        """
        step = _sample_step(self.height, self.width, max_pixels)
        band = round_up(1024, step)
        return np.concatenate([self.read(y, y + band)[::step, ::step] for y in range(0, self.height, band)])

    def close(self) -> None:
        pass

    def __enter__(self) -> "ImageSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ArraySource(ImageSource):
    """An image already in memory."""

    def __init__(self, image: np.ndarray, name: str = "image"):
        image = np.asarray(image)
        if image.dtype == bool:
            image = image.astype(np.uint8)
        if image.ndim == 2:
            image = image[..., None]
        if image.ndim != 3 or image.shape[0] == 0 or image.shape[1] == 0 or image.shape[2] == 0:
            raise ImageError(f"{name}: expected an (H, W) or (H, W, C) image, got shape {image.shape}")
        self.image, self.name = image, name
        self.height, self.width, self.channels = image.shape
        self.dtype = image.dtype

    def read(self, y0: int, y1: int) -> np.ndarray:
        return self.image[y0:y1]

    def sample(self, max_pixels: int = SAMPLE_PIXELS) -> np.ndarray:
        step = _sample_step(self.height, self.width, max_pixels)
        return self.image[::step, ::step]


class TiffSource(ImageSource):
    """A TIFF read by row bands: strips or tiles through tifffile's zarr store, and uncompressed
    contiguous data (as tifffile writes by default) by plain file reads at row offsets.

    A compressed TIFF in chunks taller than `MAX_CHUNK_ROWS` rows (e.g. one compressed strip) cannot be read
    by bands without decoding each chunk again for every band, so its slice is decoded whole once.
    Layouts by `seg.imageio.tiff_layout`: a stack has `slices` slices (pages, unless the file says they are
    channels), read one at a time (`select`); colours by `seg.imageio.tiff_colours`, per band.
    """

    def __init__(self, path: Path):
        import tifffile

        self.name = str(path)
        self._array: Any = None
        self._whole: np.ndarray | None = None
        self._offset: int | None = None
        self._decode_whole = False
        self.slice = 0
        try:
            self.tif = tifffile.TiffFile(path)
            series = self.tif.series[0]
            shape, page = tuple(series.shape), series.keyframe
        except Exception as err:  # tifffile raises many types for broken files
            raise ImageError(f"{path}: cannot read TIFF ({err})") from None
        try:
            self.layout = tiff_layout(shape, series.axes)
            self._convert = tiff_colours(page, self.layout.channels)
            check_tiff_chunks(page)
        except ImageError as err:
            self.tif.close()
            raise ImageError(f"{path}: {err}") from None
        self.height, self.width, self.slices = self.layout.height, self.layout.width, self.layout.slices
        self._stored = np.dtype(series.dtype).newbyteorder(self.tif.byteorder)
        probe = self._convert(np.zeros((1, 1, self.layout.channels), np.dtype(series.dtype)))
        self.channels, self.dtype = probe.shape[2], probe.dtype
        contiguous = page.compression == 1 and page.bitspersample % 8 == 0 and page.fillorder == 1
        if contiguous and series.dataoffset is not None and series.dtype != bool:
            self._offset = int(series.dataoffset)
        else:
            self._open_zarr()

    def select(self, number: int) -> None:
        """Read slice `number` (0 .. slices - 1) from now on."""
        if not 0 <= number < self.slices:
            raise ImageError(f"{self.name}: no slice {number} in {self.slices}")
        self.slice, self._whole = number, None

    def _open_zarr(self) -> None:
        import zarr

        try:
            array = zarr.open(self.tif.aszarr(series=0, level=0), mode="r")
        except Exception as err:  # tifffile or zarr, on files they cannot map
            raise ImageError(f"{self.name}: cannot read TIFF ({err})") from None
        self._decode_whole = array.chunks[self.layout.y] > MAX_CHUNK_ROWS
        self._array = array

    def _read_stored(self, y0: int, y1: int) -> np.ndarray:
        """Rows [y0, y1) of the slice as stored: (rows, W, stored channels)."""
        if self._offset is not None:
            return self._read_contiguous(y0, y1)
        return self.layout.to_image(np.asarray(self._array[self.layout.index(self.slice, y0, y1)]))

    def read(self, y0: int, y1: int) -> np.ndarray:
        y0, y1 = max(0, y0), min(self.height, y1)
        try:
            if self._decode_whole:
                if self._whole is None:
                    self._whole = self._read_stored(0, self.height)
                rows = self._whole[y0:y1]
            else:
                rows = self._read_stored(y0, y1)
        except ImageError:
            raise
        except Exception as err:  # truncated or corrupt strips surface only when read
            raise ImageError(f"{self.name}: cannot read rows {y0}..{y1} ({err})") from None
        return self._convert(rows.reshape(y1 - y0, self.width, self.layout.channels))

    def _read_contiguous(self, y0: int, y1: int) -> np.ndarray:
        """Rows of uncompressed contiguous data, read at their offsets (no memory map: RSS stays flat)."""
        fh, itemsize, n, layout = self.tif.filehandle, self._stored.itemsize, y1 - y0, self.layout
        strides = [math.prod(layout.shape[i + 1 :]) for i in range(len(layout.shape))]  # in items, C order
        index = layout.index(self.slice, y0, y1)
        start = sum(i * strides[a] for a, i in enumerate(index) if isinstance(i, int)) + y0 * strides[layout.y]
        if layout.channel is not None and layout.channel < layout.y:  # planes: one read per channel
            planes = [
                _read_exact(fh, self._offset + (start + c * strides[layout.channel]) * itemsize, self._stored, n * self.width, self.name)
                for c in range(layout.channels)
            ]
            rows = np.stack(planes, axis=-1)
        else:
            row_items = self.width * layout.channels
            rows = _read_exact(fh, self._offset + start * itemsize, self._stored, n * row_items, self.name)
        return rows.reshape(n, self.width, layout.channels).astype(self._stored.newbyteorder("="), copy=False)

    def sample(self, max_pixels: int = SAMPLE_PIXELS) -> np.ndarray:
        """Up to `LARGE_PIXELS`: every step-th row and column, as for an array in memory. Beyond: 32 evenly
        spaced bands of up to 64 rows, columns strided, so a huge file is not read twice."""
        if self._decode_whole:
            return ArraySource(self.read(0, self.height), self.name).sample(max_pixels)
        if self.height * self.width <= LARGE_PIXELS:
            return super().sample(max_pixels)
        bands = min(32, self.height)
        rows = max(1, min(self.height // bands, 64))
        step = max(1, int(np.ceil(bands * rows * self.width / max_pixels)))
        starts = np.unique(np.linspace(0, self.height - rows, bands).astype(int))
        return np.concatenate([self.read(y, y + rows)[:, ::step] for y in starts])

    def close(self) -> None:
        self.tif.close()


def _sample_step(height: int, width: int, max_pixels: int) -> int:
    return max(1, int(np.ceil(np.sqrt(height * width / max_pixels))))


def _read_exact(fh, offset: int, dtype: np.dtype, count: int, name: str) -> np.ndarray:
    fh.seek(offset)
    data = fh.read(count * dtype.itemsize)
    if len(data) != count * dtype.itemsize:
        raise ImageError(f"{name}: file is truncated (image data ends early)")
    return np.frombuffer(data, dtype=dtype)


def open_image(path: str | Path) -> ImageSource:
    """An `ImageSource` for a file: TIFFs by bands, other formats decoded whole.

    Raises:
        ImageError: missing, unreadable or unsupported file, or a TIFF stack (see `Predictor.predict_stack`).
    """
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: no such file")
    if is_tiff(path):
        source = TiffSource(path)
        if source.slices > 1:
            source.close()
            raise ImageError(f"{path}: {stack_message(source.layout)}")
        return source
    return ArraySource(_read_whole(path), str(path))


def stack_size(path: str | Path) -> int:
    """Slices in a TIFF stack (see `seg.imageio.TiffLayout`); 1 for one image and for anything unreadable."""
    import tifffile

    try:
        if is_tiff(path):
            with tifffile.TiffFile(path) as tif:
                return tiff_layout(tif.series[0].shape, tif.series[0].axes).slices
    except Exception:  # unreadable: the prediction will report it
        pass
    return 1


def image_size(path: str | Path) -> tuple[int, int] | None:
    """(height, width) from the file's header without decoding it, as the image is shown (EXIF orientation;
    a slice of a stack); None when unknown or unreadable."""
    path = Path(path)
    try:
        if is_tiff(path):
            with TiffSource(path) as source:
                return source.height, source.width
        with open(path, "rb") as f:
            size = _png_size(f.read(24))
        if size is None:
            from PIL import Image

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(path, formats=PIL_FORMATS) as im:
                    size = im.height, im.width
        return size[::-1] if exif_orientation(path) in (5, 6, 7, 8) else size
    except Exception:  # unreadable: the prediction will report it
        return None


def _png_size(head: bytes) -> tuple[int, int] | None:
    """(height, width) from a PNG's first 24 bytes (signature and IHDR); None for anything else."""
    if len(head) < 24 or head[:8] != b"\x89PNG\r\n\x1a\n":
        return None
    width, height = struct.unpack(">II", head[16:24])
    return height, width


def _read_whole(path: Path) -> np.ndarray:
    """Pillow for ordinary images; imagecodecs past Pillow's decompression-bomb limit (local files only)."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return read_image(path)
    except Image.DecompressionBombError:
        pass
    _check_plausible_size(path)
    import imagecodecs

    try:
        image = imagecodecs.imread(str(path))
    except Exception as err:  # imagecodecs raises one error type per codec
        raise ImageError(f"{path}: cannot read image ({err})") from None
    if image.ndim == 3 and image.shape[2] == 2:  # grey + alpha
        image = image[..., :1]
    return orient(image, exif_orientation(path))  # as Pillow's path turns it


# The most pixels one byte of a file can hold: deflate expands at most 1032:1 (x 8 pixels for 1-bit PNG);
# a JPEG spends at least 2 bits on each 8 x 8 block; BMP (RLE8) about 128:1.
PIXELS_PER_BYTE = {"png": 8 * 1032, "jpeg": 256, "bmp": 128}


def _check_plausible_size(path: Path) -> None:
    """ImageError when the header claims more pixels than the file's bytes can hold (a corrupt header
    would otherwise have a huge image allocated and predicted)."""
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    kind, size = _header_size(head)
    if size is None:
        return
    nbytes = os.path.getsize(path)
    if size[0] * size[1] > PIXELS_PER_BYTE[kind] * nbytes:
        raise ImageError(
            f"{path}: its header says {size[1]} x {size[0]} pixels, more than its {nbytes} bytes can hold "
            "(a corrupt or truncated file)"
        )


def _header_size(head: bytes) -> tuple[str, tuple[int, int] | None]:
    """(format, (height, width)) from the first bytes of a PNG, JPEG or BMP; (format, None) when unknown."""
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return "png", _png_size(head)
    if head[:2] == b"BM" and len(head) >= 26:
        width, height = struct.unpack("<ii", head[18:26])
        return "bmp", (abs(height), abs(width))
    if head[:2] == b"\xff\xd8":
        i = 2
        while i + 9 <= len(head) and head[i] == 0xFF:
            marker = head[i + 1]
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # a start of frame
                height, width = struct.unpack(">HH", head[i + 5 : i + 9])
                return "jpeg", (height, width)
            i += 2 + struct.unpack(">H", head[i + 2 : i + 4])[0]
        return "jpeg", None
    return "", None


# ---------------------------------------------------------------------------------------------------
# Writing images by row bands
# ---------------------------------------------------------------------------------------------------
class BandWriter:
    """Receives an image's rows top to bottom (`write`), then completes the file (`close`)."""

    def write(self, rows: np.ndarray) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        pass


@contextmanager
def band_writer(
    path: str | Path, height: int, width: int, dtype: Any, samples: int = 1, palette: Sequence | None = None
) -> Iterator[BandWriter]:
    """A BandWriter into a temporary file beside `path`, renamed onto `path` when complete and removed on
    error: a PNG for .png, a tiled zlib TIFF for .tif/.tiff.

    Args:
        path: the output file.
        height: image height.
        width: image width.
        dtype: uint8 or uint16 (PNG, TIFF) or float32 (TIFF only).
        samples: values per pixel (1 for a mask, 3 for RGB, K for probabilities).
        palette: RGB colours for a PNG mask (a palette PNG).
    """
    path, dtype = Path(path), np.dtype(dtype)
    suffix = path.suffix.lower()
    if suffix not in (*TIFF_SUFFIXES, ".png"):
        raise SegError(f"{path}: write .png or .tif, not {path.suffix!r}")
    with atomic_path(path) as tmp:
        if suffix == ".png":
            writer: BandWriter = PngBandWriter(tmp, height, width, dtype, samples, palette)
        else:
            writer = TiffBandWriter(tmp, height, width, dtype, samples)
        try:
            yield writer
        except BaseException:
            writer.abort()
            raise
        writer.close()


@contextmanager
def page_writer(path: str | Path, size: int = 0) -> Iterator[Callable[[np.ndarray], None]]:
    """A function that appends one page, (H, W) or (H, W, S), to a multi-page zlib TIFF written into a
    temporary file beside `path` and renamed onto it when complete (removed on error).

    Pages are striped (readable by ImageJ and Fiji as a stack) and carry no shape metadata, so tifffile
    reads them back as one (pages, H, W[, S]) series; BigTIFF when `size` (uncompressed bytes) passes 2 GB.
    """
    import tifffile

    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=size > 2**31) as tif:

        def write(page: np.ndarray) -> None:
            rgb = page.ndim == 3 and page.shape[2] == 3 and page.dtype == np.uint8
            tif.write(
                page, compression="zlib", photometric="rgb" if rgb else "minisblack", metadata=None,
                planarconfig="contig" if page.ndim == 3 else None, rowsperstrip=64,
            )  # fmt: skip

        yield write


class PngBandWriter(BandWriter):
    """A PNG encoded as rows arrive (Pillow needs the whole image): IHDR, PLTE, zlib-streamed IDAT, IEND.

    Rows use PNG's "Sub" filter (difference to the pixel on the left), which suits masks and photos.
    """

    def __init__(self, path: Path, height: int, width: int, dtype: np.dtype, samples: int = 1, palette=None):
        if dtype not in (np.uint8, np.uint16) or samples not in (1, 2, 3, 4):
            raise SegError(f"{path}: PNG holds 8/16-bit images with 1-4 channels, not {dtype} x {samples}")
        self.file = open(path, "wb")
        self.height, self.width, self.samples = height, width, samples
        self.dtype = np.dtype(">u2") if dtype == np.uint16 else np.dtype(np.uint8)
        self.rows = 0
        use_palette = palette is not None and samples == 1 and dtype == np.uint8
        colour = 3 if use_palette else {1: 0, 2: 4, 3: 2, 4: 6}[samples]
        self.file.write(b"\x89PNG\r\n\x1a\n")
        self._chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8 * self.dtype.itemsize, colour, 0, 0, 0))
        if use_palette:
            colours = [int(v) for rgb in list(palette)[:256] for v in rgb[:3]]
            self._chunk(b"PLTE", bytes(colours))
        self.zip = zlib.compressobj(6)
        self.pending = b""

    def _chunk(self, kind: bytes, data: bytes) -> None:
        self.file.write(struct.pack(">I", len(data)) + kind + data)
        self.file.write(struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    def write(self, rows: np.ndarray) -> None:
        n = rows.shape[0]
        raw = np.ascontiguousarray(rows, dtype=self.dtype).view(np.uint8).reshape(n, -1)
        bpp = self.samples * self.dtype.itemsize
        filtered = np.empty((n, raw.shape[1] + 1), np.uint8)
        filtered[:, 0] = 1  # Sub
        filtered[:, 1 : 1 + bpp] = raw[:, :bpp]
        np.subtract(raw[:, bpp:], raw[:, :-bpp], out=filtered[:, 1 + bpp :])
        self.pending += self.zip.compress(filtered.tobytes())
        if len(self.pending) >= 1 << 20:
            self._chunk(b"IDAT", self.pending)
            self.pending = b""
        self.rows += n

    def close(self) -> None:
        try:
            if self.rows != self.height:
                raise RuntimeError(f"PNG got {self.rows} of {self.height} rows")
            self._chunk(b"IDAT", self.pending + self.zip.flush())
            self._chunk(b"IEND", b"")
        finally:
            self.file.close()

    def abort(self) -> None:
        self.file.close()


_END = object()


class TiffBandWriter(BandWriter):
    """A tiled, zlib-compressed TIFF written while rows arrive.

    tifffile writes a tiled image from an iterator of tiles in one call; that call runs in a thread that
    takes bands from a small queue, so the producer pushes rows and memory stays at a few bands.
    """

    def __init__(self, path: Path, height: int, width: int, dtype: np.dtype, samples: int = 1):
        self.height, self.width, self.samples, self.dtype = height, width, samples, np.dtype(dtype)
        self.tile = (min(WRITE_TILE, round_up(height, 16)), min(WRITE_TILE, round_up(width, 16)))
        self.queue: queue.Queue = queue.Queue(maxsize=2)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(path,), name="tiff-writer", daemon=True)
        self.thread.start()

    def _run(self, path: Path) -> None:
        import tifffile

        shape = (self.height, self.width) if self.samples == 1 else (self.height, self.width, self.samples)
        photometric = "rgb" if self.samples == 3 and self.dtype == np.uint8 else "minisblack"
        try:
            tifffile.imwrite(
                path, data=self._tiles(), shape=shape, dtype=self.dtype, tile=self.tile,
                compression="zlib", photometric=photometric, planarconfig="contig" if self.samples > 1 else None,
                maxworkers=2, buffersize=4 << 20,  # tifffile would read ahead 512 MB of tiles
            )  # fmt: skip
        except BaseException as err:  # handed to the producer on its next write or close
            self.error = err
            while True:  # unblock a producer waiting on a full queue
                try:
                    self.queue.get_nowait()
                except queue.Empty:
                    break

    def _tiles(self) -> Iterator[np.ndarray]:
        th, tw = self.tile
        pending: list[np.ndarray] = []
        have = done = 0
        while done < self.height:
            take = min(th, self.height - done)
            while have < take:
                rows = self.queue.get()
                if rows is _END:
                    raise RuntimeError(f"TIFF writer got {done + have} of {self.height} rows")
                pending.append(rows)
                have += rows.shape[0]
            band = pending[0] if len(pending) == 1 else np.concatenate(pending)
            rows, rest = band[:take], band[take:]
            pending, have = ([rest], rest.shape[0]) if rest.shape[0] else ([], 0)
            for x in range(0, self.width, tw):
                yield rows[:, x : x + tw]  # tifffile pads edge tiles
            done += take

    def _put(self, item: Any) -> None:
        while True:
            if self.error is not None:
                raise self.error
            try:
                self.queue.put(item, timeout=0.2)
                return
            except queue.Full:
                if not self.thread.is_alive():
                    raise self.error or RuntimeError("TIFF writer stopped")

    def write(self, rows: np.ndarray) -> None:
        self._put(np.ascontiguousarray(rows, dtype=self.dtype))

    def close(self) -> None:
        if self.thread.is_alive():
            self._put(_END)
        self.thread.join()
        if self.error is not None:
            raise self.error

    def abort(self) -> None:
        if self.thread.is_alive():
            self.error = self.error or RuntimeError("aborted")
            try:
                self.queue.put(_END, timeout=5)
            except queue.Full:
                pass
        self.thread.join(timeout=10)


def output_is_whole(path: str | Path, height: int, width: int) -> bool:
    """True when `path` is a complete PNG or TIFF of the given size (written by us, or otherwise whole)."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        if path.suffix.lower() in TIFF_SUFFIXES:
            import tifffile

            with tifffile.TiffFile(path) as tif:
                page = tif.pages.first
                size = os.path.getsize(path)
                ends = [o + n for o, n in zip(page.dataoffsets, page.databytecounts)]
                return page.shape[:2] == (height, width) and max(ends, default=0) <= size and all(page.databytecounts)
        with open(path, "rb") as f:
            head = f.read(24)
            f.seek(-12, os.SEEK_END)
            tail = f.read(12)
        return _png_size(head) == (height, width) and tail[4:8] == b"IEND"
    except Exception:  # anything unreadable is not whole
        return False

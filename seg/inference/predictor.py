"""The predictor: a segmentation network applied to images of any size by seamless tiles.

Every caller (the `seg predict` command, the service, `seg eval`, training's validation and overlays) goes
through `Predictor`, whatever runs the network: `Predictor.from_onnx` for an exported model (ONNX Runtime),
`training.torch_runner` for a checkpoint or a live PyTorch model. The data path:

    file -> seg.io.sources.ImageSource (row bands in the image's own dtype) -> to_channels + normalize (per band)
         -> seg.inference.tiling.predict_tiled (tiles, batches, the runner, Gaussian blending; finished row bands)
         -> argmax / confidence per band -> seg.io.writers (tiled TIFF or PNG, written as rows arrive)

Memory: `predict_file` holds about one tile row of the image and of the probabilities at a time, so its
peak does not grow with the image's area for TIFFs (striped, tiled or uncompressed). PNG, JPEG and BMP
cannot be decoded by rows with the libraries at hand, so they are decoded whole (H x W x C bytes, e.g.
1.2 GB for a 20000 x 20000 RGB PNG; Pillow's decompression-bomb limit is bypassed for local files by
decoding with imagecodecs); everything after the decoding streams as for TIFFs.

This module imports onnxruntime, numpy and image libraries only, never torch.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from seg.errors import ImageError, SegError
from seg.inference.modelinfo import ModelInfo
from seg.inference.preprocess import effective_mode, intensity_range, normalize
from seg.io.headers import TIFF_SUFFIXES, stack_size
from seg.io.images import display_range, overlay, to_channels, to_display_rgb
from seg.inference.runtime import (
    CUDA, choose_model, create_session, describe_provider, gpu_batch_size, onnx_runner, read_model_info,
)  # fmt: skip
from seg.inference.tiling import Runner, TilingOptions, predict_tiled
from seg.io.sources import ArraySource, ImageSource, TiffSource, open_image
from seg.io.writers import band_writer, page_writer

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
    """Segment images by overlapping tiles, blended without seams, with any runner of the network.

    Args:
        runner: the network, (N, C, h, w) float32 normalised tiles -> (N, K, h, w) float32 logits (one
            channel: a sigmoid's); h and w are multiples of the model's stride.
        info: the model's description (classes, palette, channels, normalisation, stride, tiling).
        options: the tiling of calls that give none (default: the model's recommended tile and overlap).
        provider: what runs the network ("CPUExecutionProvider", "CUDAExecutionProvider", "torch").
        device: "cuda" or "cpu": where it runs.
        path: the model file, if any.

    Example:
        >>> predictor = Predictor.from_onnx("model.onnx", device="cpu")
        >>> result = predictor.predict(image, TilingOptions(tile=256, tta="d4"), probabilities=True)
        >>> predictor.predict_file("huge.tif", "out/huge.tif")
    """

    def __init__(
        self,
        runner: Runner,
        info: ModelInfo,
        options: TilingOptions | None = None,
        provider: str = "",
        device: str = "cpu",
        path: str | Path | None = None,
    ):
        self.run, self.info = runner, info
        self.options = options or info.tiling()
        self.provider, self.device = provider, device
        self.path = Path(path) if path is not None else None
        self.mask_dtype = np.dtype(np.uint8 if info.num_classes <= 256 else np.uint16)

    @classmethod
    def from_onnx(
        cls, path: str | Path, device: str = "auto", threads: int | None = None, options: TilingOptions | None = None,
        gpu: int = 0,
        precision: str = "auto",
    ) -> "Predictor":
        """A predictor of an ONNX file written by `seg export`.

        Args:
            path: the .onnx file (its metadata gives the `ModelInfo`).
            device: "auto" (CUDA when usable, else CPU), "cuda" or "cpu"; `provider` says what was obtained.
            threads: ONNX Runtime intra-op threads on the CPU (None: its default, the physical cores).
            options: the default tiling (None: the model's).
            gpu: the CUDA device id, on CUDA.
            precision: "auto" runs NAME.int8.onnx instead of NAME.onnx on the CPU when it is there
                (`seg export --int8`); "fp32" the file as named; "int8" its int8 variant. `path` and
                `info.precision` say what runs.
        """
        named = Path(path)
        path = choose_model(named, precision, device)
        session, provider = create_session(path, device=device, threads=threads, gpu=gpu)
        info = read_model_info(session, path)
        if options is None and provider == CUDA:  # tiles per batch for the GPU's free memory
            options = info.tiling(batch_size=gpu_batch_size(info.tile_size, gpu))
        if precision == "int8" and info.precision != "int8":
            raise SegError(f"{named}: --precision int8, but there is no {path.name.removesuffix('.onnx')}.int8.onnx beside it (seg export --int8)")
        if precision == "fp32" and info.precision == "int8":
            raise SegError(f"{named}: --precision fp32, but this is an int8 model; name its float model")
        device = describe_provider(provider)
        return cls(onnx_runner(session, gpu=gpu), info, options, provider=provider, device=device, path=path)

    def tile_count(self, height: int, width: int, options: TilingOptions | None = None) -> int:
        """Tiles that an image of this size is cut into (for progress bars)."""
        options = options or self.options
        return options.grid(height, width, self.info.stride).tiles

    def bands(
        self,
        read_rows: Callable[[int, int], np.ndarray],
        height: int,
        width: int,
        options: TilingOptions | None = None,
        on_tiles: Callable[[int], None] | None = None,
        check: Callable[[], None] | None = None,
    ) -> Iterator[tuple[int, np.ndarray]]:
        """Finished (y0, probabilities (K, rows, width)) bands, top to bottom; see `seg.inference.tiling.predict_tiled`.

        Args:
            read_rows: returns normalised rows [y0, y1) as (C, rows, width) float32.
            height: image height.
            width: image width.
            options: the tiling (None: `self.options`).
            on_tiles: called with the number of tiles just run.
            check: called before each batch of tiles; raise in it to stop (a deadline, a shutdown).
        """
        return predict_tiled(
            read_rows, height, width, self.run, options or self.options, multiple=self.info.stride,
            on_tiles=on_tiles, check=check,
        )  # fmt: skip

    # -- in memory -----------------------------------------------------------------------------------
    def predict(
        self,
        image: np.ndarray,
        options: TilingOptions | None = None,
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
            options: the tiling (None: `self.options`).
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
        probs = np.empty((self.info.num_classes, height, width), np.float32) if probabilities else None
        conf = np.empty((height, width), np.float32) if confidence else None
        for y0, p in self.bands(self._row_reader(source), height, width, options, on_tiles, check):
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
        options: TilingOptions | None = None,
        probabilities_path: str | Path | None = None,
        confidence_path: str | Path | None = None,
        overlay_path: str | Path | None = None,
        on_tiles: Callable[[int], None] | None = None,
        check: Callable[[], None] | None = None,
    ) -> dict[str, Any]:
        """Segment an image file band by band and write the results as the bands are finished; a TIFF
        stack slice by slice, into multi-page TIFFs with one page per slice (its outputs must be .tif).

        Each output is written atomically (a temporary file renamed when complete); the mask is renamed
        last, so an existing mask means a finished prediction.

        Args:
            path: the image (PNG, JPEG, BMP, TIFF; 8/16-bit, grey, RGB(A) or multi-channel).
            out_path: the mask: a palette PNG (.png) or a tiled, zlib-compressed TIFF (.tif).
            options: the tiling (None: `self.options`).
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
        options = options or self.options
        k, palette = self.info.num_classes, self.info.palette
        targets = _targets(out_path, probabilities_path, confidence_path, overlay_path)
        slices = stack_size(path)
        if slices > 1:
            named = [str(target) for target in targets.values() if target.suffix.lower() not in TIFF_SUFFIXES]
            if named:
                raise ImageError(f"{path}: a stack of {slices} slices, segmented into multi-page TIFFs; name {named[0]} .tif")
            return self._predict_stack(Path(path), targets, options, on_tiles, check, start)
        shapes = {"mask": (self.mask_dtype, 1), "probabilities": (np.float32, k), "confidence": (np.float32, 1), "overlay": (np.uint8, 3)}
        with open_image(path) as source, ExitStack() as stack:
            self._check_channels(source)
            height, width = source.height, source.width
            writers = {
                kind: stack.enter_context(
                    band_writer(target, height, width, *shapes[kind], palette=palette if kind == "mask" else None,
                                pixel_size=source.pixel_size, classes=self.info.classes,
                                source=source if kind == "mask" else None)  # fmt: skip
                ).write
                for kind, target in targets.items()
            }
            display = display_range(source.sample()) if "overlay" in writers else None
            counts = np.zeros(k, dtype=np.int64)
            for y0, p in self.bands(self._row_reader(source), height, width, options, on_tiles, check):
                rows = (lambda: to_display_rgb(source.read(y0, y0 + p.shape[1]), display)) if display is not None else None
                self._write(writers, counts, self._argmax(p), p, p.max(0) if "confidence" in writers else None, rows)
        return self._summary(source, options, start, counts, targets)

    def _predict_stack(
        self, path: Path, targets: dict[str, Path], options: TilingOptions, on_tiles: Callable[[int], None] | None,
        check: Callable[[], None] | None, start: float,
    ) -> dict[str, Any]:  # fmt: skip
        """`predict_file` of a TIFF stack: slice by slice (pages, unless the file says they are channels: see
        `seg.io.tiff.TiffLayout`), each segmented as an image of its own, into zlib-compressed multi-page
        TIFFs (one page per slice); memory holds about one slice. The summary has `slices`, and pixels per
        class summed over them."""
        k = self.info.num_classes
        with TiffSource(path) as source, ExitStack() as stack:
            self._check_channels(source)
            size = source.height * source.width * source.slices
            per_pixel = {"mask": self.mask_dtype.itemsize, "probabilities": 4 * k, "confidence": 4, "overlay": 3}
            writers = {kind: stack.enter_context(page_writer(target, size * per_pixel[kind])) for kind, target in targets.items()}
            counts = np.zeros(k, dtype=np.int64)
            for number in range(source.slices):
                source.select(number)
                image = source.read(0, source.height)
                result = self.predict(
                    image, options, probabilities="probabilities" in writers, confidence="confidence" in writers,
                    on_tiles=on_tiles, name=f"{path} (slice {number})", check=check,
                )  # fmt: skip
                self._write(writers, counts, result.mask, result.probabilities, result.confidence, lambda: image)
        return self._summary(source, options, start, counts, targets, slices=source.slices)

    # -- helpers -------------------------------------------------------------------------------------
    def _write(
        self, writers: dict[str, Callable[[np.ndarray], None]], counts: np.ndarray, mask: np.ndarray,
        probs: np.ndarray | None, confidence: np.ndarray | None, image: Callable[[], np.ndarray] | None,
    ) -> None:  # fmt: skip
        """One band of an image, or one slice of a stack, into every output asked for; counts its classes."""
        counts += np.bincount(mask.ravel(), minlength=len(counts))[: len(counts)]
        writers["mask"](mask)
        if "probabilities" in writers:
            writers["probabilities"](probs.transpose(1, 2, 0))
        if "confidence" in writers:
            writers["confidence"](confidence)
        if "overlay" in writers:
            writers["overlay"](overlay(image(), mask, self.info.palette))

    def _summary(self, source: "ImageSource", options: TilingOptions, start: float, counts: np.ndarray,
                 targets: dict[str, Path], slices: int = 0) -> dict[str, Any]:  # fmt: skip
        """What `predict_file` and `predict_stack` return."""
        return {
            "height": source.height,
            "width": source.width,
            **({"slices": slices} if slices else {}),
            "channels": source.channels,
            "dtype": str(source.dtype),
            "tiles": self.tile_count(source.height, source.width, options) * max(slices, 1),
            "seconds": round(time.perf_counter() - start, 3),
            "pixels_per_class": {name: int(n) for name, n in zip(self.info.classes, counts)},
            "outputs": {kind: str(target) for kind, target in targets.items()},
        }

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
        if effective_mode(norm, source.dtype) == "fixed":
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


def _targets(mask: str | Path, probabilities: str | Path | None, confidence: str | Path | None,
             overlay: str | Path | None) -> dict[str, Path]:  # fmt: skip
    """The outputs asked for, by kind; the mask first, so that it is renamed last."""
    given = {"mask": mask, "probabilities": probabilities, "confidence": confidence, "overlay": overlay}
    return {kind: Path(target) for kind, target in given.items() if target}

"""Images read by row bands (`ImageSource`), and what a file's header says before any pixel is decoded.

`open_image` gives an `ImageSource` for a file: whole-slide images are read by row bands through OpenSlide
(`SlideSource`, see `seg.io.slides`), TIFFs by row bands (striped, tiled or uncompressed), PNG, JPEG and
BMP are decoded whole (past Pillow's decompression-bomb limit by imagecodecs, after checking that the
header's size fits the file's bytes). `header_shape` reads the size, channels and
decoded bytes per pixel of a file or upload from its header alone; `image_size` and the service use it.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from seg.errors import ImageError
from seg.io.headers import check_plausible_size, exif_orientation, is_tiff
from seg.io.images import orient, read_image
from seg.io.slides import is_slide, openslide_module, slide_vendor
from seg.io.tiff import check_tiff_chunks, pixel_size, stack_message, tiff_colours, tiff_layout

SAMPLE_PIXELS = 4_000_000  # pixels read for percentile normalisation and display ranges
LARGE_PIXELS = 64_000_000  # beyond this, a TIFF's percentile sample comes from 32 bands, not a full pass
MAX_CHUNK_ROWS = 2048  # a TIFF stored in taller compressed chunks is decoded whole (see TiffSource)
READ_COLUMNS = 8192  # columns per OpenSlide read: bounds the RGBA buffers of a band of a wide slide


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def sample_step(height: int, width: int, max_pixels: int = 4_000_000) -> int:
    """The row and column step of a percentile sample of about `max_pixels` pixels (every predictor and
    training take their samples with it, so a checkpoint and its export normalise an image alike)."""
    return max(1, int(np.ceil(np.sqrt(height * width / max_pixels))))


class ImageSource:
    """An image readable by row bands: `read(y0, y1)` -> (rows, W, C) in the image's own dtype."""

    name: str
    height: int
    width: int
    channels: int
    dtype: np.dtype
    pixel_size: tuple[float, float] | None = None  # (y, x) in micrometres, when the file says

    def read(self, y0: int, y1: int) -> np.ndarray:
        raise NotImplementedError

    def sample(self, max_pixels: int = SAMPLE_PIXELS) -> np.ndarray:
        """About `max_pixels` pixels (h, w, C), for percentiles. Up to `LARGE_PIXELS`: every step-th row and
        column, read once band by band (`ArraySource` gives the same pixels by plain slicing). Beyond: 32
        evenly spaced bands of up to 64 rows, columns strided, so a huge file is not read twice."""
        if self.height * self.width > LARGE_PIXELS:
            bands = min(32, self.height)
            rows = max(1, min(self.height // bands, 64))
            step = max(1, int(np.ceil(bands * rows * self.width / max_pixels)))
            starts = np.unique(np.linspace(0, self.height - rows, bands).astype(int))
            return np.concatenate([self.read(y, y + rows)[:, ::step] for y in starts])
        step = sample_step(self.height, self.width, max_pixels)
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
        step = sample_step(self.height, self.width, max_pixels)
        return self.image[::step, ::step]


class TiffSource(ImageSource):
    """A TIFF read by row bands: strips or tiles through tifffile's zarr store, and uncompressed
    contiguous data (as tifffile writes by default) by plain file reads at row offsets.

    A compressed TIFF in chunks taller than `MAX_CHUNK_ROWS` rows (e.g. one compressed strip) cannot be read
    by bands without decoding each chunk again for every band, so its slice is decoded whole once.
    Layouts by `seg.io.tiff.tiff_layout`: a stack has `slices` slices (pages, unless the file says they are
    channels), read one at a time (`select`); colours by `seg.io.tiff.tiff_colours`, per band.
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
        self.pixel_size = pixel_size(self.tif, page)
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
        """As `ImageSource.sample`, but from the slice in memory when it is decoded whole."""
        if self._decode_whole:
            return ArraySource(self.read(0, self.height), self.name).sample(max_pixels)
        return super().sample(max_pixels)

    def close(self) -> None:
        self.tif.close()


class SlideSource(ImageSource):
    """A whole-slide image's full-resolution level through OpenSlide, as 8-bit RGB.

    Areas the scanner did not image (transparent in OpenSlide) take the slide's background colour.
    """

    def __init__(self, path: str | Path):
        openslide = openslide_module()
        if openslide is None:
            raise ImageError(f"{path}: slides are read through OpenSlide; install it with pip install 'seg[slide]'")
        self.name = str(path)
        try:
            self.slide = openslide.OpenSlide(str(path))
        except Exception as err:  # OpenSlideError, OpenSlideUnsupportedFormatError
            raise ImageError(f"{path}: cannot read slide ({err})") from None
        self.width, self.height = self.slide.dimensions
        self.channels, self.dtype = 3, np.dtype(np.uint8)
        props = self.slide.properties
        colour = props.get(openslide.PROPERTY_NAME_BACKGROUND_COLOR, "FFFFFF")
        try:
            self.background = np.array([int(colour[i : i + 2], 16) for i in (0, 2, 4)], np.float32)
        except ValueError:
            self.background = np.full(3, 255, np.float32)
        try:
            y, x = float(props[openslide.PROPERTY_NAME_MPP_Y]), float(props[openslide.PROPERTY_NAME_MPP_X])
            self.pixel_size = (y, x) if y > 0 and x > 0 else None
        except (KeyError, ValueError):
            self.pixel_size = None

    def read(self, y0: int, y1: int) -> np.ndarray:
        y0, y1 = max(0, y0), min(self.height, y1)
        rows = np.empty((max(0, y1 - y0), self.width, 3), np.uint8)
        if y1 <= y0:
            return rows
        for x in range(0, self.width, READ_COLUMNS):
            w = min(READ_COLUMNS, self.width - x)
            try:
                rgba = np.asarray(self.slide.read_region((x, y0), 0, (w, y1 - y0)))
            except Exception as err:  # a corrupt tile surfaces when read
                raise ImageError(f"{self.name}: cannot read rows {y0}..{y1} ({err})") from None
            rows[:, x : x + w] = _over(rgba, self.background)
        return rows

    def close(self) -> None:
        self.slide.close()


def _over(rgba: np.ndarray, background: np.ndarray) -> np.ndarray:
    """RGBA (not premultiplied) over an opaque background colour, as 8-bit RGB."""
    alpha = rgba[..., 3:]
    if alpha.min() == 255:
        return rgba[..., :3]
    a = alpha.astype(np.float32) / 255
    return np.rint(rgba[..., :3] * a + background * (1 - a)).astype(np.uint8)


def _read_exact(fh, offset: int, dtype: np.dtype, count: int, name: str) -> np.ndarray:
    fh.seek(offset)
    data = fh.read(count * dtype.itemsize)
    if len(data) != count * dtype.itemsize:
        raise ImageError(f"{name}: file is truncated (image data ends early)")
    return np.frombuffer(data, dtype=dtype)


def open_image(path: str | Path) -> ImageSource:
    """An `ImageSource` for a file: whole-slide images through OpenSlide and TIFFs by bands (see
    `seg.io.slides`), other formats decoded whole.

    Raises:
        ImageError: missing, unreadable or unsupported file, or a TIFF stack (`Predictor.predict_file` segments stacks slice by slice).
    """
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: no such file")
    if is_slide(path):
        if slide_vendor(path):
            return SlideSource(path)
        if not is_tiff(path):
            raise ImageError(f"{path}: not a slide OpenSlide can read")
    if is_tiff(path):
        source = TiffSource(path)
        if source.slices > 1:
            source.close()
            raise ImageError(f"{path}: {stack_message(source.layout)}")
        return source
    return ArraySource(_read_whole(path), str(path))


def _read_whole(path: Path) -> np.ndarray:
    """Pillow for ordinary images; imagecodecs past Pillow's decompression-bomb limit (local files only)."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return read_image(path)
    except Image.DecompressionBombError:
        pass
    check_plausible_size(path)
    import imagecodecs

    try:
        image = imagecodecs.imread(str(path))
    except Exception as err:  # imagecodecs raises one error type per codec
        raise ImageError(f"{path}: cannot read image ({err})") from None
    if image.ndim == 3 and image.shape[2] == 2:  # grey + alpha
        image = image[..., :1]
    return orient(image, exif_orientation(path))  # as Pillow's path turns it

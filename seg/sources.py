"""Images read by row bands (`ImageSource`), and what a file's header says before any pixel is decoded.

`open_image` gives an `ImageSource` for a file: TIFFs are read by row bands (striped, tiled or
uncompressed), PNG, JPEG and BMP are decoded whole (past Pillow's decompression-bomb limit by imagecodecs,
after checking that the header's size fits the file's bytes). `header_shape` reads the size, channels and
decoded bytes per pixel of a file or upload from its header alone; `image_size` and the service use it.
"""

from __future__ import annotations

import io
import math
import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from seg.errors import ImageError
from seg.imageio import PIL_FORMATS, TIFF_MAGIC, exif_orientation, is_tiff, orient, read_image, unsupported_format
from seg.tiff import check_tiff_chunks, stack_message, tiff_colours, tiff_layout
from seg.preprocess import sample_step
from seg.tiling import round_up

SAMPLE_PIXELS = 4_000_000  # pixels read for percentile normalisation and display ranges
LARGE_PIXELS = 64_000_000  # beyond this, a TIFF's percentile sample comes from 32 bands, not a full pass
MAX_CHUNK_ROWS = 2048  # a TIFF stored in taller compressed chunks is decoded whole (see TiffSource)


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
    Layouts by `seg.tiff.tiff_layout`: a stack has `slices` slices (pages, unless the file says they are
    channels), read one at a time (`select`); colours by `seg.tiff.tiff_colours`, per band.
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
    """Slices in a TIFF stack (see `seg.tiff.TiffLayout`); 1 for one image and for anything unreadable."""
    import tifffile

    try:
        if is_tiff(path):
            with tifffile.TiffFile(path) as tif:
                return tiff_layout(tif.series[0].shape, tif.series[0].axes).slices
    except Exception:  # unreadable: the prediction will report it
        pass
    return 1


@dataclass(frozen=True)
class HeaderShape:
    """An image's size as stored (before EXIF orientation), its channels, and its bytes per pixel once decoded."""

    height: int
    width: int
    channels: int
    bytes_per_pixel: int


def header_shape(file: str | Path | bytes, name: str = "image") -> HeaderShape:
    """What a file's header (or an upload's) says about its image, without decoding any pixel.

    TIFF layouts by `seg.tiff.tiff_layout`, as the readers take them (a slice of a stack); other formats
    by Pillow, with its decompression-bomb warning silenced (`Image.DecompressionBombError` passes through:
    over twice `Image.MAX_IMAGE_PIXELS`).

    Raises:
        ImageError: empty, unsupported or unreadable (messages without reprs or paths beyond `name`).
    """
    from PIL import Image, UnidentifiedImageError

    data = file if isinstance(file, bytes) else None
    opened: Any = io.BytesIO(data) if data is not None else Path(file)
    head = data[:4] if data is not None else _head(opened, 4)
    if not head:
        raise ImageError(f"{name}: empty file")
    if head in TIFF_MAGIC:
        import tifffile

        try:
            with tifffile.TiffFile(opened) as tif:
                if not tif.series:
                    raise ImageError(f"{name}: TIFF file without an image")
                series = tif.series[0]
                shape, axes, dtype = tuple(series.shape), series.axes, np.dtype(series.dtype)
                palette = int(series.keyframe.photometric) == 3
        except ImageError:
            raise
        except Exception as err:  # tifffile raises many types for broken files
            raise ImageError(f"{name}: cannot read TIFF{reason(err)}") from None
        try:
            height, width, channels = tiff_layout(shape, axes).image_shape
        except ImageError as err:
            raise ImageError(f"{name}: {err}") from None
        if palette:  # indices become 8-bit RGB colours
            return HeaderShape(height, width, 3, 3)
        return HeaderShape(height, width, channels, channels * dtype.itemsize)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(opened, formats=PIL_FORMATS) as im:
                return HeaderShape(im.height, im.width, len(im.getbands()), pixel_bytes(im.mode))
    except Image.DecompressionBombError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"{name}: {unsupported_format(data if data is not None else opened)}") from None
    except Exception as err:  # Pillow raises many types for broken headers
        raise ImageError(f"{name}: not a readable image{reason(err)}") from None


def _head(path: Path, size: int) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(size)
    except OSError as err:
        raise ImageError(f"{path}: cannot read ({err.strerror or err})") from None


def pixel_bytes(mode: str) -> int:
    """Bytes per pixel of a Pillow image of `mode` once decoded by seg.imageio (palette and LA become RGB(A))."""
    from PIL import ImageMode

    if mode in ("P", "PA", "LA"):
        return 4
    described = ImageMode.getmode(mode)
    return len(described.bands) * np.dtype(described.typestr).itemsize


def reason(err: Exception) -> str:
    """' (message)' of a decoder's error when it reads as plain words, else '' (no reprs, paths or addresses)."""
    text = str(err).strip()
    if not text or type(err) in (IndexError, KeyError, TypeError, AttributeError) or any(
        mark in text for mark in ("<", ">", "0x", "/", "\\", "\n")
    ):
        return ""
    return f" ({text[:200]})"


def image_size(path: str | Path) -> tuple[int, int] | None:
    """(height, width) from the file's header without decoding it, as the image is shown (EXIF orientation;
    a slice of a stack); None when unknown or unreadable. Past Pillow's decompression-bomb limit, which it
    refuses to open, a PNG's, JPEG's or BMP's size is read from its first bytes (`_header_size`)."""
    from PIL import Image

    path = Path(path)
    try:
        try:
            shape = header_shape(path, str(path))
            size: tuple[int, int] | None = (shape.height, shape.width)
        except Image.DecompressionBombError:
            size = _header_size(_head(path, 1 << 16))[1]
        if size is None:
            return None
        return size[::-1] if exif_orientation(path) in (5, 6, 7, 8) else size
    except Exception:  # unreadable: the prediction will report it
        return None


def png_size(head: bytes) -> tuple[int, int] | None:
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
    kind, size = _header_size(_head(path, 1 << 16))
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
        return "png", png_size(head)
    if head[:2] == b"BM" and len(head) >= 26:
        core = struct.unpack("<I", head[14:18])[0] == 12  # OS/2 1.x header: 16-bit sides
        width, height = struct.unpack("<HH", head[18:22]) if core else struct.unpack("<ii", head[18:26])
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

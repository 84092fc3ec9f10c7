"""TIFF layouts and colours: which axes of a TIFF are slices, rows, columns and channels, how stored values
become the colours a TIFF shows (photometric interpretation), and reading a TIFF's one image whole.

`seg.io.images` reads TIFF files and uploads through `read_tiff`; `seg.io.sources.TiffSource` reads them by row
bands with the same layout (`tiff_layout`), colours (`tiff_colours`) and checks (`check_tiff_chunks`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from seg.errors import ImageError

MAX_PAGE_CHANNELS = 8  # an unlabelled TIFF "stack" of pages this narrow is one (H, W, C) image


def read_tiff(path: Path, colours: bool = True) -> np.ndarray:
    """A TIFF file's one image; see `read_tiff_file`."""
    return read_tiff_file(path, str(path), colours)


def read_tiff_file(file: Any, name: str, colours: bool = True) -> np.ndarray:
    """A TIFF's one image as (H, W) or (H, W, C), by `tiff_layout` and `tiff_colours` (palette TIFFs give
    their indices with `colours=False`)."""
    import tifffile

    try:
        with tifffile.TiffFile(file) as tif:
            series = tif.series[0]
            layout = tiff_layout(series.shape, series.axes)
            if layout.slices > 1:
                raise ImageError(stack_message(layout))
            convert = tiff_colours(series.keyframe, layout.channels) if colours else _stored_values
            check_tiff_chunks(series.keyframe)
            data = series.asarray()
            if data.shape != tuple(series.shape):
                raise ImageError("cannot read TIFF (its pixel data does not fit its header)")
    except ImageError as err:
        raise ImageError(f"{name}: {err}") from None
    except Exception as err:  # tifffile raises many types for broken files
        raise ImageError(f"{name}: cannot read TIFF ({err})") from None
    arr = convert(layout.to_image(data[layout.index(0, 0, layout.height)]))
    return arr[..., 0] if arr.shape[2] == 1 else arr


MICROMETRES = {"pm": 1e-6, "nm": 1e-3, "µm": 1.0, "um": 1.0, "mm": 1e3, "cm": 1e4, "m": 1e6}
RESOLUTION_UNIT_MICROMETRES = {2: 25400.0, 3: 10000.0}  # TIFF ResolutionUnit: inch, centimetre


def pixel_size(tif: Any, page: Any) -> tuple[float, float] | None:
    """The (y, x) size of a pixel in micrometres: OME-XML's PhysicalSizeY/X, an Aperio SVS description's
    MPP, else the resolution tags when they name a unit; None when the file does not say (or says nonsense)."""
    try:
        description = page.description or ""
        if description.startswith("Aperio"):
            mpp = re.search(r"\|\s*MPP\s*=\s*([0-9.eE+-]+)", description)
            if mpp:
                return _positive(float(mpp.group(1)), float(mpp.group(1)))
        if tif.is_ome:
            import xml.etree.ElementTree as ET

            pixels = next(e for e in ET.fromstring(tif.ome_metadata).iter() if e.tag.endswith("}Pixels"))
            sizes = []
            for axis in ("Y", "X"):
                value = pixels.get(f"PhysicalSize{axis}")
                unit = MICROMETRES.get(pixels.get(f"PhysicalSize{axis}Unit", "µm"))
                sizes.append(float(value) * unit if value is not None and unit else None)
            if None not in sizes:
                return _positive(sizes[0], sizes[1])
        unit = RESOLUTION_UNIT_MICROMETRES.get(int(page.tags.valueof("ResolutionUnit", 2)))
        x, y = page.tags.valueof("XResolution"), page.tags.valueof("YResolution")
        if unit and x and y:  # pixels per unit, as (numerator, denominator)
            return _positive(unit * y[1] / y[0], unit * x[1] / x[0])
    except Exception:  # metadata only: an unreadable value is no value
        return None
    return None


def _positive(y: float, x: float) -> tuple[float, float] | None:
    return (y, x) if all(math.isfinite(v) and v > 0 for v in (y, x)) else None


def check_tiff_chunks(page: Any) -> None:
    """ImageError unless a TIFF page lists every strip or tile its size calls for (tifffile would read the
    missing ones as zeros: a corrupt header would give a wrong, or a huge, image)."""
    try:
        needed = math.prod(page.chunked)
    except Exception:  # tifffile, on zero or missing strip and tile sizes
        raise ImageError("cannot read TIFF (its strip or tile size is corrupt)") from None
    if len(page.dataoffsets) < needed:
        raise ImageError(
            f"its header says {page.imagewidth} x {page.imagelength} pixels in {needed} strips or tiles, but it "
            f"lists {len(page.dataoffsets)} (a corrupt or truncated file)"
        )


def stack_message(layout: "TiffLayout") -> str:
    return (
        f"a stack of {layout.slices} slices (axes {layout.axes}); one image was expected: "
        "segment stacks with `seg predict` (one mask page per slice)"
    )


@dataclass(frozen=True)
class TiffLayout:
    """Where the axes of a TIFF series go: slices (z, t, ...; the pages), rows, columns and channels.

    The rule: pages are slices, unless the file says they are channels: an axis 'C' (ImageJ hyperstack
    channels, OME-XML SizeC, tifffile's own metadata) or 'S' (samples per pixel: RGB, planar or not).
    Unlabelled pages at most `MAX_PAGE_CHANNELS` pixels wide are the rows of one (H, W, C) image (tifffile
    writes an H x W x C array that way). Length-1 axes are ignored.
    """

    shape: tuple[int, ...]
    axes: str
    y: int  # axis of rows (columns follow it)
    channel: int | None  # axis of channels, None for one channel
    slice_axes: tuple[int, ...]

    @property
    def height(self) -> int:
        return self.shape[self.y]

    @property
    def width(self) -> int:
        return self.shape[self.y + 1]

    @property
    def channels(self) -> int:
        return 1 if self.channel is None else self.shape[self.channel]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of one slice, channels as stored."""
        return self.height, self.width, self.channels

    @property
    def slices(self) -> int:
        return math.prod(self.shape[a] for a in self.slice_axes)

    def index(self, number: int, y0: int, y1: int) -> tuple:
        """The index of rows [y0, y1) of slice `number` into the series."""
        index: list[Any] = [slice(None)] * len(self.shape)
        where = np.unravel_index(number, [self.shape[a] for a in self.slice_axes]) if self.slice_axes else ()
        for axis, i in zip(self.slice_axes, where):
            index[axis] = int(i)
        index[self.y] = slice(y0, y1)
        return tuple(index)

    def to_image(self, rows: np.ndarray) -> np.ndarray:
        """Indexed rows (by `index`) as (rows, W, C)."""
        if self.channel is None:
            return rows[..., None]
        return np.moveaxis(rows, 0, -1) if self.channel < self.y else rows


def tiff_layout(shape: Sequence[int], axes: str | None = None) -> TiffLayout:
    """How seg reads a TIFF series of `shape` and tifffile `axes` (see `TiffLayout`); ImageError when
    there is no image in it."""
    shape = tuple(int(n) for n in shape)
    axes = (axes or "").upper()
    if len(axes) != len(shape):
        axes = "Q" * (len(shape) - 2) + "YX"
    y = axes.find("YX")
    if len(shape) < 2 or 0 in shape or y < 0:
        raise ImageError(f"unsupported TIFF layout with shape {shape}")
    if len(shape) >= 3 and axes.endswith("YX") and axes[-3] in "QI" and shape[-1] <= MAX_PAGE_CHANNELS:
        axes, y = axes[:-3] + "YXS", len(shape) - 3
    channels = [i for i, a in enumerate(axes) if a in "CS" and shape[i] > 1]
    if len(channels) > 1:
        raise ImageError(f"unsupported TIFF layout with shape {shape} (axes {axes}): two channel axes")
    slice_axes = tuple(i for i in range(len(shape)) if i not in (y, y + 1, *channels))
    return TiffLayout(shape, axes, y, channels[0] if channels else None, slice_axes)


def _stored_values(rows: np.ndarray) -> np.ndarray:
    return rows.astype(np.uint8) if rows.dtype == bool else rows


def tiff_colours(page: Any, samples: int) -> Callable[[np.ndarray], np.ndarray]:
    """A function from a TIFF's stored values (rows, W, samples) to the image's channels, by the page's
    photometric interpretation: palette indices become colours, MinIsWhite is inverted to MinIsBlack,
    CMYK and YCbCr become RGB. ImageError for interpretations seg does not read."""
    photometric = int(page.photometric)
    name = getattr(page.photometric, "name", str(photometric))
    if photometric in (0, 1) and int(page.bitspersample) == 1:  # bilevel: 0 and 255, as Pillow reads 1-bit images
        white = photometric == 1
        return lambda rows: np.where(rows.astype(bool) == white, 255, 0).astype(np.uint8)
    if photometric in (1, 2):  # MinIsBlack, RGB
        return _stored_values
    if photometric == 0:  # MinIsWhite
        if np.dtype(page.dtype).kind == "f":
            raise ImageError("MinIsWhite float TIFF is not supported; save it as MinIsBlack")
        top = (1 << int(page.bitspersample)) - 1

        def invert(rows: np.ndarray) -> np.ndarray:
            rows = _stored_values(rows)
            return ~rows if rows.dtype.kind == "i" else (top - rows).astype(rows.dtype)

        return invert
    if photometric == 3:  # palette
        colours = np.asarray(page.colormap, dtype=np.uint16)
        table = (colours >> 8 if colours.max(initial=0) > 255 else colours).astype(np.uint8).T  # (N, 3)
        if samples != 1:
            raise ImageError(f"palette TIFF with {samples} samples per pixel is not supported")
        return lambda rows: table[np.minimum(rows[..., 0], len(table) - 1)]
    if photometric == 5:  # separated
        extra = len(page.extrasamples or ())
        inks = samples - extra
        inks = int(page.tags.valueof(334, default=inks))  # NumberOfInks
        if inks != 4 or page.tags.valueof(332, default=1) != 1:  # InkSet 1: CMYK
            raise ImageError(f"separated TIFF with {inks} inks is not supported; only CMYK (4 inks) is")
        if np.dtype(page.dtype).kind != "u":
            raise ImageError("CMYK TIFF with non-integer samples is not supported")
        return _cmyk_to_rgb
    if photometric == 6:  # YCbCr
        if int(page.compression) in (7, 34892):  # JPEG: decoded to RGB already
            return _stored_values
        if tuple(page.subsampling or (1, 1)) != (1, 1) or np.dtype(page.dtype) != np.uint8 or samples != 3:
            raise ImageError("YCbCr TIFF with chroma subsampling or other than 8-bit samples is not supported")
        return _ycbcr_converter(page)
    raise ImageError(f"TIFF photometric interpretation {name} is not supported; use grey, RGB, palette, CMYK or YCbCr")


def _cmyk_to_rgb(rows: np.ndarray) -> np.ndarray:
    """CMYK (plus extra samples, dropped) to RGB, as Pillow converts: R = (max - C)(max - K) / max."""
    top = np.iinfo(rows.dtype).max
    white = top - rows[..., 3:4].astype(np.float32)
    rgb = (top - rows[..., :3].astype(np.float32)) * white / top
    return np.rint(rgb).astype(rows.dtype)


def _ycbcr_converter(page: Any) -> Callable[[np.ndarray], np.ndarray]:
    """YCbCr to RGB with the page's coefficients and reference black and white (TIFF 6.0, section 21)."""
    tags = page.tags
    coefficients = tags.valueof(529, default=(0.299, 0.587, 0.114))
    reference = tags.valueof(532, default=(0, 255, 128, 255, 128, 255))
    red, green, blue = (float(c) for c in _rationals(coefficients, 3))
    ref = _rationals(reference, 6)

    def convert(rows: np.ndarray) -> np.ndarray:
        v = rows.astype(np.float32)
        luma = (v[..., 0] - ref[0]) * 255 / (ref[1] - ref[0])
        cb = (v[..., 1] - ref[2]) * 127 / (ref[3] - ref[2])
        cr = (v[..., 2] - ref[4]) * 127 / (ref[5] - ref[4])
        r = cr * (2 - 2 * red) + luma
        b = cb * (2 - 2 * blue) + luma
        g = (luma - blue * b - red * r) / green
        return np.rint(np.stack([r, g, b], axis=-1)).clip(0, 255).astype(np.uint8)

    return convert


def _rationals(values: Sequence, count: int) -> list[float]:
    """TIFF RATIONAL values as floats: tifffile gives (numerator, denominator) pairs flattened."""
    values = [float(v) for v in values]
    if len(values) == 2 * count:
        return [values[i] / (values[i + 1] or 1) for i in range(0, 2 * count, 2)]
    return values[:count]

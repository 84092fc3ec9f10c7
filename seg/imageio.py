"""Reading images and masks, converting channels, writing results atomically.

Images come back as numpy arrays in their own dtype (uint8, uint16, float32), shaped (H, W) for grey and
(H, W, C) otherwise, as they are shown: turned by their EXIF orientation, TIFF colours by their photometric
interpretation. Pillow opens PNG, JPEG and BMP only (TIFFs go to tifffile). Nothing here normalises: that
is `seg.preprocess`.
"""

from __future__ import annotations

import io
import math
import os
import struct
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from seg.errors import ImageError

_UMASK = os.umask(0)
os.umask(_UMASK)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
TIFF_SUFFIXES = (".tif", ".tiff")
TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF, both byte orders
PIL_FORMATS = ("PNG", "JPEG", "BMP", "TIFF")  # the only formats Pillow may open
# Formats people send that seg does not read, by their first bytes (for a clear error).
OTHER_FORMATS = (
    (b"GIF87a", "GIF"), (b"GIF89a", "GIF"), (b"8BPS", "PSD"), (b"\x00\x00\x01\x00", "ICO"), (b"\x00\x00\x02\x00", "CUR"),
    (b"%!PS", "EPS"), (b"\xc5\xd0\xd3\xc6", "EPS"), (b"%PDF", "PDF"), (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
    (b"\xff\x4f\xff\x51", "JPEG 2000"), (b"qoif", "QOI"), (b"DDS ", "DDS"), (b"icns", "ICNS"), (b"\x76\x2f\x31\x01", "OpenEXR"),
    (b"<svg", "SVG"), (b"<?xml", "SVG"),
)  # fmt: skip
MAX_PAGE_CHANNELS = 8  # an unlabelled TIFF "stack" of pages this narrow is one (H, W, C) image


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def read_image(path: str | Path) -> np.ndarray:
    """Read a PNG, JPEG, BMP or TIFF (8/16-bit, grey, RGB(A) or multi-channel) as an array.

    JPEG and PNG are turned as their EXIF orientation says (as they are shown); TIFF colours by their
    photometric interpretation (palette, MinIsWhite, CMYK, YCbCr). A TIFF stack of slices is refused.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: no such file")
    if is_tiff(path):
        return _read_tiff(path)
    try:
        with Image.open(path, formats=PIL_FORMATS) as im:
            return pil_to_array(im)
    except UnidentifiedImageError:  # its message holds the file's name
        raise ImageError(f"{path}: {unsupported_format(path)}") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageError(f"{path}: cannot read image ({err})") from None


def is_tiff(path: str | Path) -> bool:
    """A TIFF by its first bytes (else by its suffix, for files too short to tell)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        head = b""
    return head in TIFF_MAGIC if len(head) == 4 else Path(path).suffix.lower() in TIFF_SUFFIXES


def unsupported_format(source: str | Path | bytes) -> str:
    """The error for a file Pillow may not open: its format when known."""
    if isinstance(source, bytes):
        head = source[:16]
    else:
        try:
            with open(source, "rb") as f:
                head = f.read(16)
        except OSError:
            head = b""
    name = next((fmt for magic, fmt in OTHER_FORMATS if head.startswith(magic)), None)
    if name is None and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        name = "WebP"
    elif name is None and head[4:8] == b"ftyp":
        name = "AVIF" if head[8:12] in (b"avif", b"avis") else "HEIF"
    elif name is None and len(head) > 2 and head[:1] == b"P" and head[1:2] in b"123456" and head[2:3].isspace():
        name = "PNM"
    if name is None:
        known = {b"\x89PNG": "PNG", b"\xff\xd8": "JPEG", b"BM": "BMP"}
        seen = next((fmt for magic, fmt in known.items() if head.startswith(magic)), None)
        return f"cannot read this {seen} file (its header is corrupt)" if seen else "not a PNG, JPEG, BMP or TIFF image"
    return f"unsupported format {name}; use PNG, JPEG, BMP or TIFF"


def decode_image(data: bytes, name: str = "upload") -> np.ndarray:
    """Decode image bytes (any format `read_image` takes)."""
    if not data:
        raise ImageError(f"{name}: empty file")
    if data[:4] in TIFF_MAGIC:
        return _read_tiff_file(io.BytesIO(data), name)
    try:
        with Image.open(io.BytesIO(data), formats=PIL_FORMATS) as im:
            return pil_to_array(im)
    except UnidentifiedImageError:  # its message holds the buffer's repr
        raise ImageError(f"{name}: {unsupported_format(data)}") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageError(f"{name}: cannot read image ({err})") from None


def exif_orientation(path: str | Path) -> int:
    """The EXIF orientation (1..8) of a JPEG or PNG from its EXIF block alone, without decoding; 1 when
    there is none."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if head[:2] == b"\xff\xd8":
                f.seek(2)
                block = _jpeg_exif(f)
            else:
                block = _png_exif(f) if head == b"\x89PNG\r\n\x1a\n" else None
        if block is None:
            return 1
        exif = Image.Exif()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            exif.load(block)
        orientation = int(exif.get(0x0112, 1))
    except (OSError, ValueError, SyntaxError, struct.error):  # an unreadable block: as if there were none
        return 1
    return orientation if 1 <= orientation <= 8 else 1


def _jpeg_exif(f) -> bytes | None:
    while True:
        marker = f.read(2)
        if len(marker) < 2 or marker[0] != 0xFF or marker[1] in (0xD9, 0xDA):  # end, or the scan begins
            return None
        if marker[1] == 0x01 or 0xD0 <= marker[1] <= 0xD8:  # markers without a length
            continue
        (length,) = struct.unpack(">H", f.read(2))
        if marker[1] == 0xE1:
            data = f.read(length - 2)
            if data.startswith(b"Exif\x00\x00"):
                return data
        else:
            f.seek(length - 2, os.SEEK_CUR)


def _png_exif(f) -> bytes | None:
    while True:
        head = f.read(8)
        if len(head) < 8:
            return None
        length, kind = struct.unpack(">I", head[:4])[0], head[4:]
        if kind == b"eXIf":
            return f.read(length)
        if kind == b"IEND":
            return None
        f.seek(length + 4, os.SEEK_CUR)


def orient(image: np.ndarray, orientation: int) -> np.ndarray:
    """An (H, W[, C]) array turned by an EXIF orientation, as `PIL.ImageOps.exif_transpose` turns images."""
    if orientation in (5, 6, 7, 8):
        image = np.swapaxes(image, 0, 1)
    flips = {2: (1,), 3: (0, 1), 4: (0,), 6: (1,), 7: (0, 1), 8: (0,)}.get(orientation, ())
    return np.flip(image, flips) if flips else image


def exif_transpose(im: Image.Image) -> None:
    """Turn a loaded image in place as its EXIF orientation says; unreadable EXIF is left alone."""
    try:
        with warnings.catch_warnings():  # and warns of corrupt ones
            warnings.simplefilter("ignore")
            ImageOps.exif_transpose(im, in_place=True)
    except Exception:  # Pillow raises many types for malformed EXIF blocks; the pixels are still good
        pass


def pil_to_array(im: Image.Image) -> np.ndarray:
    """A loaded PIL image as an array, turned by its EXIF orientation; palette images become RGB, 16-bit
    stays 16-bit."""
    im.load()
    exif_transpose(im)
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif im.mode in ("1", "CMYK", "YCbCr", "LAB", "HSV"):
        im = im.convert("L" if im.mode == "1" else "RGB")
    elif im.mode == "LA":
        im = im.convert("RGBA")
    arr = np.asarray(im)
    if im.mode in ("I;16", "I;16B", "I;16L"):
        arr = arr.astype(np.uint16)
    elif im.mode == "I":
        arr = arr.astype(np.int64).clip(0, 65535).astype(np.uint16)
    return arr


def _read_tiff(path: Path, colours: bool = True) -> np.ndarray:
    return _read_tiff_file(path, str(path), colours)


def _read_tiff_file(file: Any, name: str, colours: bool = True) -> np.ndarray:
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


def read_mask(path: str | Path) -> np.ndarray:
    """Read a label mask as (H, W) integers; palette PNGs give their indices, not colours."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: no such mask file")
    if is_tiff(path):
        arr = _read_tiff(path, colours=False)  # labels as stored: palette indices, MinIsWhite not inverted
    else:
        try:
            with Image.open(path, formats=PIL_FORMATS) as im:
                im.load()
                exif_transpose(im)  # as its image is turned
                arr = np.asarray(im) if im.mode in ("P", "L", "I;16", "I", "1") else pil_to_array(im)
        except UnidentifiedImageError:  # its message holds the file's name
            raise ImageError(f"{path}: {unsupported_format(path)}") from None
        except (OSError, SyntaxError, ValueError) as err:
            raise ImageError(f"{path}: cannot read mask ({err})") from None
    if arr.ndim == 3:
        if not np.all(arr == arr[..., :1]):
            raise ImageError(f"{path}: mask has {arr.shape[2]} different channels; expected class indices")
        arr = arr[..., 0]
    return np.asarray(arr)


def to_channels(image: np.ndarray, channels: int) -> np.ndarray:
    """Convert (H, W) or (H, W, C) to (H, W, channels): grey is repeated, RGB(A) to grey by luminance,
    alpha dropped. Anything else must already have `channels` channels."""
    if image.ndim == 2:
        image = image[..., None]
    have = image.shape[2]
    if have == channels:
        return image
    if have == 1:
        return np.repeat(image, channels, axis=2)
    if channels == 1 and have in (3, 4):
        rgb = image[..., :3].astype(np.float32)
        grey = rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        return grey.astype(image.dtype)[..., None] if image.dtype != np.float32 else grey[..., None]
    if channels == 3 and have == 4:
        return image[..., :3]
    raise ImageError(f"image has {have} channels; the model takes {channels}")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed onto `path`, else removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix + ".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the result the usual permissions
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_mask(path: str | Path, mask: np.ndarray, palette: Sequence[Sequence[int]] | None = None) -> None:
    """Write a label mask atomically: a palette PNG when a palette is given, else grey PNG or TIFF."""
    path = Path(path)
    with atomic_path(path) as tmp:
        if path.suffix.lower() in TIFF_SUFFIXES:
            import tifffile

            tifffile.imwrite(tmp, mask, compression="zlib")
        else:
            mask_image(mask, palette).save(tmp, format="PNG")


def mask_image(mask: np.ndarray, palette: Sequence[Sequence[int]] | None = None) -> Image.Image:
    """A PIL image of a mask: palette mode ('P') when a palette is given."""
    if mask.max(initial=0) > 255:
        return Image.fromarray(mask.astype(np.uint16))
    im = Image.fromarray(mask.astype(np.uint8), mode="L")
    if palette:
        im = im.convert("P")
        flat = [c for rgb in palette for c in rgb][: 256 * 3]
        im.putpalette(flat + [0] * (256 * 3 - len(flat)))
    return im


def colorize(mask: np.ndarray, palette: Sequence[Sequence[int]]) -> np.ndarray:
    """An RGB picture of a mask; values outside the palette are black."""
    table = np.zeros((256, 3), dtype=np.uint8)
    table[: len(palette)] = np.asarray(palette, dtype=np.uint8)[:256]
    return table[np.clip(mask, 0, 255).astype(np.uint8)]


def overlay(image: np.ndarray, mask: np.ndarray, palette: Sequence[Sequence[int]], alpha: float = 0.5) -> np.ndarray:
    """Blend the coloured mask into the image (as 8-bit RGB); class 0 is left uncoloured."""
    rgb = to_display_rgb(image)
    colours = colorize(mask, palette).astype(np.float32)
    out = rgb.astype(np.float32)
    sel = mask > 0
    out[sel] = (1 - alpha) * out[sel] + alpha * colours[sel]
    return out.clip(0, 255).astype(np.uint8)


def _display_channels(image: np.ndarray) -> np.ndarray:
    """RGB in the image's dtype; images with other than 1, 3 or 4 channels show their first channel."""
    if image.ndim == 3 and image.shape[2] not in (1, 3, 4):
        image = image[..., 0]
    return to_channels(image, 3)


def display_range(image: np.ndarray) -> tuple[float, float]:
    """The values shown as black and white: 0..255 for 8-bit, else the 0.5..99.5 percentiles."""
    img = _display_channels(image)
    if img.dtype == np.uint8:
        return 0.0, 255.0
    lo, hi = np.percentile(img.astype(np.float32), (0.5, 99.5))
    return float(lo), float(max(hi, lo + 1e-6))


def to_display_rgb(image: np.ndarray, value_range: tuple[float, float] | None = None) -> np.ndarray:
    """An 8-bit RGB view of any image, stretched from `value_range` (default: `display_range(image)`);
    pass one range to show the bands of a large image alike."""
    img = _display_channels(image)
    lo, hi = value_range or display_range(img)
    if img.dtype == np.uint8 and (lo, hi) == (0.0, 255.0):
        return np.ascontiguousarray(img)
    return ((img.astype(np.float32) - lo) * (255.0 / (hi - lo))).clip(0, 255).astype(np.uint8)


def default_palette(n: int) -> list[list[int]]:
    """The PASCAL VOC colour map, which extends to any number of classes."""
    palette = []
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette.append([r, g, b])
    return palette

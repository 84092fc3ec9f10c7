"""What a file is before any pixel is decoded: image files by suffix, formats by their first bytes (with a
clear error for the formats seg does not read), and what a header says (`header_shape`, `image_size`),
with the sizes a corrupt header may not claim."""

from __future__ import annotations

import io
import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from seg.errors import ImageError
from seg.io.slides import SLIDE_SUFFIXES, slide_size
from seg.io.tiff import tiff_layout

# Folders are searched for these.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", *SLIDE_SUFFIXES)

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


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


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


def stack_size(path: str | Path) -> int:
    """Slices in a TIFF stack (see `seg.io.tiff.TiffLayout`); 1 for one image, a slide and anything unreadable."""
    import tifffile

    try:
        if is_tiff(path) and Path(path).suffix.lower() not in SLIDE_SUFFIXES:
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

    TIFF layouts by `seg.io.tiff.tiff_layout`, as the readers take them (a slice of a stack); other formats
    by Pillow, with its decompression-bomb warning silenced (`Image.DecompressionBombError` passes through:
    over twice `Image.MAX_IMAGE_PIXELS`).

    Raises:
        ImageError: empty, unsupported or unreadable (messages without reprs or paths beyond `name`).
    """
    from PIL import Image, UnidentifiedImageError

    data = file if isinstance(file, bytes) else None
    opened: Any = io.BytesIO(data) if data is not None else Path(file)
    head = data[:4] if data is not None else read_head(opened, 4)
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


def read_head(path: Path, size: int) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(size)
    except OSError as err:
        raise ImageError(f"{path}: cannot read ({err.strerror or err})") from None


def pixel_bytes(mode: str) -> int:
    """Bytes per pixel of a Pillow image of `mode` once decoded by seg.io.images (palette and LA become RGB(A))."""
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
    size = slide_size(path)
    if size is not None:
        return size
    try:
        try:
            shape = header_shape(path, str(path))
            size: tuple[int, int] | None = (shape.height, shape.width)
        except Image.DecompressionBombError:
            size = header_size(read_head(path, 1 << 16))[1]
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


# The most pixels one byte of a file can hold: deflate expands at most 1032:1 (x 8 pixels for 1-bit PNG);
# a JPEG spends at least 2 bits on each 8 x 8 block; BMP (RLE8) about 128:1.
PIXELS_PER_BYTE = {"png": 8 * 1032, "jpeg": 256, "bmp": 128}


def check_plausible_size(path: Path) -> None:
    """ImageError when the header claims more pixels than the file's bytes can hold (a corrupt header
    would otherwise have a huge image allocated and predicted)."""
    kind, size = header_size(read_head(path, 1 << 16))
    if size is None:
        return
    nbytes = os.path.getsize(path)
    if size[0] * size[1] > PIXELS_PER_BYTE[kind] * nbytes:
        raise ImageError(
            f"{path}: its header says {size[1]} x {size[0]} pixels, more than its {nbytes} bytes can hold "
            "(a corrupt or truncated file)"
        )


def header_size(head: bytes) -> tuple[str, tuple[int, int] | None]:
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
        from PIL import Image

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

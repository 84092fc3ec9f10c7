"""Reading images and masks, converting channels, writing results atomically.

Images come back as numpy arrays in their own dtype (uint8, uint16, float32), shaped (H, W) for grey and
(H, W, C) otherwise, as they are shown: turned by their EXIF orientation, TIFF colours by their photometric
interpretation. Pillow opens PNG, JPEG and BMP only (TIFFs go to tifffile). Nothing here normalises: that
is `seg.inference.preprocess`.
"""

from __future__ import annotations

import io
import os
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from seg.errors import ImageError
from seg.io.headers import PIL_FORMATS, TIFF_MAGIC, TIFF_SUFFIXES, is_tiff, unsupported_format
from seg.io.tiff import read_tiff_file

_UMASK = os.umask(0)
os.umask(_UMASK)


def read_image(path: str | Path) -> np.ndarray:
    """Read a PNG, JPEG, BMP or TIFF (8/16-bit, grey, RGB(A) or multi-channel) as an array.

    JPEG and PNG are turned as their EXIF orientation says (as they are shown); TIFF colours by their
    photometric interpretation (palette, MinIsWhite, CMYK, YCbCr). A TIFF stack of slices is refused.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: no such file")
    return _decode(path, str(path), is_tiff(path))


def decode_image(data: bytes, name: str = "upload") -> np.ndarray:
    """Decode image bytes (any format `read_image` takes)."""
    if not data:
        raise ImageError(f"{name}: empty file")
    return _decode(data, name, data[:4] in TIFF_MAGIC)


def _decode(source: Path | bytes, name: str, tiff: bool) -> np.ndarray:
    """The one decoder dispatch: TIFFs to tifffile, the rest to Pillow (PNG, JPEG and BMP only)."""
    file = io.BytesIO(source) if isinstance(source, bytes) else source
    if tiff:
        return read_tiff_file(file, name)
    try:
        with Image.open(file, formats=PIL_FORMATS) as im:
            return pil_to_array(im)
    except UnidentifiedImageError:  # its message holds the file's name or the buffer's repr
        raise ImageError(f"{name}: {unsupported_format(source)}") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageError(f"{name}: cannot read image ({err})") from None


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


def read_mask(path: str | Path) -> np.ndarray:
    """Read a label mask as (H, W) integers; palette PNGs give their indices, not colours."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: no such mask file")
    if is_tiff(path):
        arr = read_tiff_file(path, str(path), colours=False)  # labels as stored: palette indices, MinIsWhite not inverted
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

"""Whole-slide images through OpenSlide (`pip install 'seg[slide]'`): which files it reads and their size.
`seg.io.sources.SlideSource` reads them by row bands, at full resolution.

OpenSlide knows each scanner's layout: which image in the file is the slide, where its tiles lie, its
background colour and pixel size. Without it, Aperio .svs and Hamamatsu .ndpi files are read as TIFFs
(their first series, the full-resolution level); the other slide formats need it.
"""

from __future__ import annotations

import configparser
import functools
from pathlib import Path
from typing import Iterable

from seg.errors import ImageError

# Slide formats by suffix; MIRAX (.mrxs) and Hamamatsu VMS/VMU keep their data in files beside this one.
SLIDE_SUFFIXES = (".svs", ".ndpi", ".mrxs", ".vms", ".vmu", ".scn", ".bif", ".svslide")
TIFF_SLIDES = (".svs", ".ndpi", ".scn", ".bif")  # TIFFs inside
TIFF_READABLE = (".svs", ".ndpi")  # their first series is the slide: read as TIFFs when OpenSlide is not installed


def is_slide(path: str | Path) -> bool:
    return Path(path).suffix.lower() in SLIDE_SUFFIXES


def slide_parts(files: Iterable[Path]) -> set[Path]:
    """The files (resolved) in which the Hamamatsu VMS slides among `files` keep their pixels: the JPEG
    tiles and map named in each .vms. A folder of such a slide is one image, not hundreds."""
    parts: set[Path] = set()
    for path in files:
        if path.suffix.lower() != ".vms":
            continue
        ini = configparser.ConfigParser(interpolation=None, strict=False)
        try:
            ini.read_string(path.read_text(encoding="latin-1"))
        except (OSError, configparser.Error):  # not a VMS: reading it will say so
            continue
        for section in ini.sections():
            for key, value in ini.items(section):
                if key.startswith(("imagefile", "mapfile")) and value.strip():
                    parts.add((path.parent / value.strip()).resolve())
    return parts


def openslide_module():
    """The openslide module, or None when seg[slide] is not installed."""
    try:
        import openslide
    except (ImportError, OSError):  # OSError: the binding without its library
        return None
    return openslide


def slide_vendor(path: str | Path) -> str | None:
    """OpenSlide's name for the file's format ('aperio', 'mirax', ...), None when OpenSlide is not installed
    or does not know the file.

    Raises:
        ImageError: a slide format that only OpenSlide reads, and it is not installed.
    """
    suffix = Path(path).suffix.lower()
    if openslide_module() is None:
        if suffix in SLIDE_SUFFIXES and suffix not in TIFF_READABLE:
            raise ImageError(f"{path}: {suffix} slides are read through OpenSlide; install it with pip install 'seg[slide]'")
        return None
    return _probe(path)[0]


def slide_size(path: str | Path) -> tuple[int, int] | None:
    """(height, width) of a slide OpenSlide reads; None for any other file."""
    if not is_slide(path) or openslide_module() is None:
        return None
    return _probe(path)[1]


def _probe(path: str | Path) -> tuple[str | None, tuple[int, int] | None]:
    """The vendor and (height, width), opened once per version of the file: a run asks for both several
    times per image (format, size for the resume check and the progress bar), and a MIRAX open can take a
    second."""
    try:
        stat = Path(path).stat()
    except OSError:
        return None, None
    return _probe_file(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=64)
def _probe_file(path: str, mtime_ns: int, size: int) -> tuple[str | None, tuple[int, int] | None]:
    openslide = openslide_module()
    try:
        vendor = openslide.OpenSlide.detect_format(path)
    except Exception:  # OpenSlide raises for files it cannot open at all
        return None, None
    if vendor in (None, "generic-tiff"):
        return None, None
    try:
        with openslide.OpenSlide(path) as slide:
            return vendor, slide.dimensions[::-1]
    except Exception:  # unreadable: the prediction will report it
        return vendor, None

"""Whole-slide images through OpenSlide (`pip install 'seg[slide]'`): which files it reads and their size.
`seg.io.sources.SlideSource` reads them by row bands, at full resolution.

OpenSlide knows each scanner's layout: which image in the file is the slide, where its tiles lie, its
background colour and pixel size. Without it, Aperio .svs and Hamamatsu .ndpi files are read as TIFFs
(their first series, the full-resolution level); the other slide formats need it.
"""

from __future__ import annotations

from pathlib import Path

from seg.errors import ImageError

# Slide formats by suffix; MIRAX (.mrxs) and Hamamatsu VMS/VMU keep their data in files beside this one.
SLIDE_SUFFIXES = (".svs", ".ndpi", ".mrxs", ".vms", ".vmu", ".scn", ".bif", ".svslide")
TIFF_SLIDES = (".svs", ".ndpi", ".scn", ".bif")  # TIFFs inside
TIFF_READABLE = (".svs", ".ndpi")  # their first series is the slide: read as TIFFs when OpenSlide is not installed


def is_slide(path: str | Path) -> bool:
    return Path(path).suffix.lower() in SLIDE_SUFFIXES


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
    openslide = openslide_module()
    suffix = Path(path).suffix.lower()
    if openslide is None:
        if suffix in SLIDE_SUFFIXES and suffix not in TIFF_READABLE:
            raise ImageError(f"{path}: {suffix} slides are read through OpenSlide; install it with pip install 'seg[slide]'")
        return None
    try:
        vendor = openslide.OpenSlide.detect_format(str(path))
    except Exception:  # OpenSlide raises for files it cannot open at all
        vendor = None
    return vendor if vendor != "generic-tiff" else None


def slide_size(path: str | Path) -> tuple[int, int] | None:
    """(height, width) of a slide OpenSlide reads; None for any other file."""
    try:
        if not is_slide(path) or not slide_vendor(path):
            return None
        openslide = openslide_module()
        with openslide.OpenSlide(str(path)) as slide:
            return slide.dimensions[::-1]
    except Exception:  # unreadable: the prediction will report it
        return None

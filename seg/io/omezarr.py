"""OME-Zarr (NGFF 0.4) output, written by row bands: the input image as a multiscale image at the root and
the mask as its label image `labels/mask` (`OmeZarrBandWriter`), and the class probabilities as a multiscale
image of their own, one uint8 channel per class (`OmeZarrProbabilitiesWriter`), as napari
(napari-ome-zarr) and ome-zarr-py read them.

Each level takes every other row and column of the one above (a mask's classes stay classes), down to a
longest side of 1024, as the OME-TIFF writer does (`seg.io.writers.pyramid_sizes`). Bands go straight into
the Zarr arrays (chunks of CHUNK x CHUNK), so memory stays at a band of each level. The NGFF metadata is
written by ome-zarr-py (the optional `seg[ome]`: `pip install "seg[ome]"`).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from seg.errors import SegError

CHUNK = 1024


def check_library() -> None:
    """SegError naming the extra when ome-zarr-py is not installed."""
    try:
        import ome_zarr.writer  # noqa: F401
    except ImportError:
        raise SegError('--format ome-zarr needs ome-zarr-py: pip install "seg[ome]"') from None


def is_whole(path: str | Path, height: int, width: int) -> bool:
    """True when `path` is an OME-Zarr we finished (its metadata is written last) of the given size: a mask's
    label image, or else a probabilities image."""
    import zarr

    try:
        root = zarr.open_group(str(path), mode="r")
        if "labels" in root:
            mask = root["labels"]["mask"]
            return "image-label" in mask.attrs.asdict() and mask["0"].shape == (height, width)
        return "multiscales" in root.attrs.asdict() and root["0"].shape[-2:] == (height, width)
    except Exception:
        return False


def _create_levels(group: Any, sizes: list[tuple[int, int]], channels: int, dtype: Any) -> list[Any]:
    """One array a level: (C, h, w) for several channels, else (h, w)."""
    shape = (lambda h, w: (channels, h, w)) if channels > 1 else (lambda h, w: (h, w))
    chunks = (1, CHUNK, CHUNK) if channels > 1 else (CHUNK, CHUNK)
    return [group.create_array(str(k), shape=shape(h, w), chunks=chunks, dtype=dtype) for k, (h, w) in enumerate(sizes)]


def _write_levels(levels: list[Any], y0: int, rows: np.ndarray) -> None:
    """Rows [y0, y0 + n) of level 0, (C, n, W), into every level (each keeps every other row and column)."""
    y1 = y0 + rows.shape[1]
    for k, array in enumerate(levels):
        step = 1 << k
        first = -(-y0 // step) * step  # the first row of this band that level k keeps
        if first >= y1:
            continue
        at, part = first // step, rows[:, first - y0 :: step, ::step]
        if array.ndim == 2:
            array[at : at + part.shape[1]] = part[0]
        else:
            array[:, at : at + part.shape[1]] = part


def _axes(channels: bool, unit: str | None) -> list[dict]:
    space = [{"name": a, "type": "space", **({"unit": unit} if unit else {})} for a in "yx"]
    return ([{"name": "c", "type": "channel"}] if channels else []) + space


def _datasets(levels: int, channels: bool, size: tuple[float, float]) -> list[dict]:
    return [{"path": str(k), "coordinateTransformations": [{"type": "scale", "scale": ([1.0] if channels else [])
             + [size[0] * 2**k, size[1] * 2**k]}]} for k in range(levels)]  # fmt: skip


class OmeZarrBandWriter:
    """See the module docstring. `write(mask_rows)` takes the mask's next rows; the image's same rows come from
    `source` (an `ImageSource`)."""

    def __init__(self, path: Path, sizes: list[tuple[int, int]], dtype: np.dtype, source: Any,
                 classes: Sequence[str] = (), palette: Sequence | None = None,
                 pixel_size: tuple[float, float] | None = None):  # fmt: skip
        """`sizes`: (height, width) of each level, the image's first."""
        import zarr

        check_library()
        self.path, self.source, self.y = Path(path), source, 0
        self.classes, self.palette, self.pixel_size = list(classes), palette, pixel_size
        self.sizes = sizes
        self.root = zarr.open_group(str(path), mode="w", zarr_format=2)
        self.image = _create_levels(self.root, sizes, source.channels, source.dtype)
        self.labels = self.root.create_group("labels")
        self.mask_group = self.labels.create_group("mask")
        self.mask = _create_levels(self.mask_group, sizes, 1, dtype)

    def write(self, rows: np.ndarray) -> None:
        y0, y1 = self.y, self.y + rows.shape[0]
        image = np.asarray(self.source.read(y0, y1))
        _write_levels(self.image, y0, image.reshape(image.shape[:2] + (-1,)).transpose(2, 0, 1))
        _write_levels(self.mask, y0, rows[None])
        self.y = y1

    def close(self) -> None:
        from ome_zarr.format import FormatV04
        from ome_zarr.writer import write_label_metadata, write_multiscales_metadata

        if self.y != self.sizes[0][0]:
            raise SegError(f"{self.path}: {self.y} of {self.sizes[0][0]} rows written")
        fmt, unit, size = FormatV04(), "micrometer" if self.pixel_size else None, self.pixel_size or (1.0, 1.0)
        channels = self.image[0].ndim == 3
        write_multiscales_metadata(self.root, _datasets(len(self.sizes), channels, size), fmt=fmt,
                                   axes=_axes(channels, unit), name="image")  # fmt: skip
        colours = [{"label-value": i, "rgba": [*map(int, rgb), 255]} for i, rgb in enumerate(self.palette or [])]
        properties = [{"label-value": i, "class": name} for i, name in enumerate(self.classes)]
        write_multiscales_metadata(self.mask_group, _datasets(len(self.sizes), False, size), fmt=fmt,
                                   axes=_axes(False, unit), name="mask")  # fmt: skip
        write_label_metadata(self.labels, "mask", colors=colours or None, properties=properties or None, fmt=fmt,
                             source={"image": "../../"})  # last: is_whole reads it

    def abort(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


class OmeZarrProbabilitiesWriter:
    """The class probabilities as a multiscale image (c, y, x) of uint8, 255 for a probability of 1, one
    channel per class, named in the `omero` metadata as napari shows them. `write(rows)` takes (rows, W, K)
    probabilities in [0, 1]."""

    def __init__(self, path: Path, sizes: list[tuple[int, int]], samples: int, classes: Sequence[str] = (),
                 pixel_size: tuple[float, float] | None = None):  # fmt: skip
        import zarr

        check_library()
        self.path, self.sizes, self.pixel_size, self.y = Path(path), sizes, pixel_size, 0
        self.classes = list(classes) if len(classes) == samples else [f"class {i}" for i in range(samples)]
        self.root = zarr.open_group(str(path), mode="w", zarr_format=2)
        self.levels = _create_levels(self.root, sizes, samples, np.uint8)

    def write(self, rows: np.ndarray) -> None:
        scaled = np.rint(np.clip(rows, 0, 1) * 255).astype(np.uint8)
        _write_levels(self.levels, self.y, scaled.transpose(2, 0, 1))
        self.y += rows.shape[0]

    def close(self) -> None:
        from ome_zarr.format import FormatV04
        from ome_zarr.writer import write_multiscales_metadata

        if self.y != self.sizes[0][0]:
            raise SegError(f"{self.path}: {self.y} of {self.sizes[0][0]} rows written")
        unit, size = "micrometer" if self.pixel_size else None, self.pixel_size or (1.0, 1.0)
        omero = {"channels": [{"label": name, "active": True, "window": {"min": 0, "max": 255, "start": 0, "end": 255}}
                              for name in self.classes]}  # fmt: skip
        write_multiscales_metadata(self.root, _datasets(len(self.sizes), True, size), fmt=FormatV04(),
                                   axes=_axes(True, unit), name="probabilities", metadata={"omero": omero})  # last

    def abort(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

"""OME-Zarr (NGFF 0.4) output, written by row bands: the input image as a multiscale image at the root and
the mask as its label image `labels/mask`, as napari (napari-ome-zarr) and ome-zarr-py read them.

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
    """True when `path` is an OME-Zarr we finished (its metadata is written last) of the given size."""
    import zarr

    try:
        mask = zarr.open_group(str(Path(path) / "labels" / "mask"), mode="r")
        return "image-label" in mask.attrs.asdict() and mask["0"].shape == (height, width)
    except Exception:
        return False


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
        channels = source.channels
        image_shape = (lambda h, w: (channels, h, w)) if channels > 1 else (lambda h, w: (h, w))
        image_chunks = (1, CHUNK, CHUNK) if channels > 1 else (CHUNK, CHUNK)
        self.image = [self.root.create_array(str(k), shape=image_shape(h, w), chunks=image_chunks, dtype=source.dtype)
                      for k, (h, w) in enumerate(self.sizes)]  # fmt: skip
        self.labels = self.root.create_group("labels")
        self.mask_group = self.labels.create_group("mask")
        self.mask = [self.mask_group.create_array(str(k), shape=(h, w), chunks=(CHUNK, CHUNK), dtype=dtype)
                     for k, (h, w) in enumerate(self.sizes)]  # fmt: skip

    def write(self, rows: np.ndarray) -> None:
        y0, y1 = self.y, self.y + rows.shape[0]
        image = np.asarray(self.source.read(y0, y1))
        image = image.reshape(image.shape[:2] + (-1,)).transpose(2, 0, 1)  # (C, rows, W)
        for k in range(len(self.sizes)):
            step = 1 << k
            first = -(-y0 // step) * step  # the first row of this band that level k keeps
            if first >= y1:
                continue
            at = first // step
            level_mask = rows[first - y0 :: step, ::step]
            self.mask[k][at : at + level_mask.shape[0]] = level_mask
            level_image = image[:, first - y0 :: step, ::step]
            if level_image.shape[0] == 1:
                self.image[k][at : at + level_image.shape[1]] = level_image[0]
            else:
                self.image[k][:, at : at + level_image.shape[1]] = level_image
        self.y = y1

    def close(self) -> None:
        from ome_zarr.format import FormatV04
        from ome_zarr.writer import write_label_metadata, write_multiscales_metadata

        if self.y != self.sizes[0][0]:
            raise SegError(f"{self.path}: {self.y} of {self.sizes[0][0]} rows written")
        fmt = FormatV04()
        unit = {"y": "micrometer", "x": "micrometer"} if self.pixel_size else None
        size = self.pixel_size or (1.0, 1.0)

        def datasets(channels: bool) -> list[dict]:
            return [{"path": str(k), "coordinateTransformations": [{"type": "scale", "scale": ([1.0] if channels else [])
                     + [size[0] * 2**k, size[1] * 2**k]}]} for k in range(len(self.sizes))]  # fmt: skip

        channels = self.image[0].ndim == 3
        axes = ([{"name": "c", "type": "channel"}] if channels else []) + [
            {"name": a, "type": "space", **({"unit": unit[a]} if unit else {})} for a in "yx"]  # fmt: skip
        write_multiscales_metadata(self.root, datasets(channels), fmt=fmt, axes=axes, name="image")
        colours = [{"label-value": i, "rgba": [*map(int, rgb), 255]} for i, rgb in enumerate(self.palette or [])]
        properties = [{"label-value": i, "class": name} for i, name in enumerate(self.classes)]
        mask_axes = [{"name": a, "type": "space", **({"unit": unit[a]} if unit else {})} for a in "yx"]
        write_multiscales_metadata(self.mask_group, datasets(False), fmt=fmt, axes=mask_axes, name="mask")
        write_label_metadata(self.labels, "mask", colors=colours or None, properties=properties or None, fmt=fmt,
                             source={"image": "../../"})  # last: is_whole reads it

    def abort(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

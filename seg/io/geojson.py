"""A mask as GeoJSON polygons, written by row bands: one Feature per connected region of a class (4-connected,
holes kept), in pixel coordinates (x right, y down), with the class's name and colour as QuPath imports them.

Each band is traced by GDAL's polygonizer (`rasterio.features.shapes`); a region that reaches the band's
last row stays open, and is joined (shapely's `unary_union`) with the regions of the next band that reach
its first row, so a region cut by band edges comes out as one polygon. Memory holds one band and the
open regions.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from seg.errors import SegError

GEO_EXTRA = "GeoJSON masks need rasterio and shapely: pip install 'seg[geo]'"


def check_libraries() -> None:
    """SegError (one line, naming the extra) unless rasterio and shapely are installed."""
    _libraries()


def _libraries() -> tuple[Any, Any, Any]:
    try:
        import shapely
        import shapely.geometry
        from rasterio.features import shapes
        from rasterio.transform import Affine
    except ImportError:
        raise SegError(GEO_EXTRA) from None
    return shapes, shapely, Affine


class GeoJsonBandWriter:
    """Receives mask rows top to bottom (`write`), then completes the FeatureCollection (`close`)."""

    def __init__(self, path: Path, height: int, width: int, classes: Sequence[str], palette: Sequence | None = None):
        self.shapes, self.shapely, self.affine = _libraries()
        self.height = height
        self.classes = list(classes)
        self.colours = [list(map(int, c)) for c in palette] if palette is not None else None
        self.y = 0
        self.open: dict[int, list[Any]] = {}  # class -> regions that reach the last row written
        self.count = 0
        self.file = open(path, "w", encoding="utf-8")
        self.file.write('{"type": "FeatureCollection", "features": [\n')

    def write(self, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows)
        if rows.dtype not in (np.uint8, np.uint16):
            rows = rows.astype(np.uint16)
        y0, y1 = self.y, self.y + rows.shape[0]
        self.y = y1
        new: dict[int, list[Any]] = {}
        shift = self.affine(1.0, 0.0, 0.0, 0.0, 1.0, float(y0))  # pixel (col, row) -> (x, y0 + row)
        for geometry, value in self.shapes(rows, mask=rows > 0, connectivity=4, transform=shift):
            new.setdefault(int(value), []).append(self.shapely.geometry.shape(geometry))
        more = y1 < self.height
        for c in sorted(set(self.open) | set(new)):
            regions, carried = new.get(c, []), self.open.get(c, [])
            top = [r for r in regions if r.bounds[1] <= y0]  # reach the band's first row
            if carried and top:
                joined = self.shapely.unary_union(carried + top)
                regions = list(getattr(joined, "geoms", [joined])) + [r for r in regions if r.bounds[1] > y0]
            else:
                regions = carried + regions
            self.open[c] = [r for r in regions if more and r.bounds[3] >= y1]
            for region in regions:
                if not (more and region.bounds[3] >= y1):
                    self._emit(c, region)

    def _emit(self, c: int, region: Any) -> None:
        name = self.classes[c] if c < len(self.classes) else f"class_{c}"
        classification: dict[str, Any] = {"name": name}
        if self.colours is not None and c < len(self.colours):
            classification["color"] = self.colours[c][:3]
        feature = {"type": "Feature", "geometry": self.shapely.geometry.mapping(region),
                   "properties": {"objectType": "annotation", "classification": classification}}  # fmt: skip
        self.file.write((",\n" if self.count else "") + json.dumps(feature, separators=(",", ":")))
        self.count += 1

    def close(self) -> None:
        for c, regions in sorted(self.open.items()):
            for region in regions:
                self._emit(c, region)
        self.open = {}
        self.file.write("\n]}\n")
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()

    def abort(self) -> None:
        self.file.close()


def geojson_is_whole(path: Path) -> bool:
    """True when the file ends as `GeoJsonBandWriter.close` ends it."""
    with open(path, "rb") as f:
        f.seek(max(0, os.path.getsize(path) - 8))
        return f.read().endswith(b"]}\n")

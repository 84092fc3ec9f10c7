"""labelme exports: one JSON per image, shapes painted in the file's order (later ones on top), as
labelme's `shapes_to_label` does."""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from seg.data.common import IGNORE_LABEL, Sample, check_size, get_field, read_json
from seg.errors import DataError

LABELME_BACKGROUND = "_background_"  # labelme's name for class 0
LABELME_POINTS = {"polygon": 3, "rectangle": 2, "circle": 2, "line": 2, "linestrip": 2, "point": 1}
LINE_WIDTH, POINT_RADIUS = 10, 5  # labelme's `shape_to_mask` defaults


def labelme_files(data, root: Path) -> list[Path]:
    folder = root / (get_field(data, "annotations") or ".")
    if not folder.is_dir():
        raise DataError(f"data.annotations: no such folder {folder} (labelme's JSON files)")
    files = sorted(p for p in folder.rglob("*.json") if not p.name.startswith("."))
    if not files:
        raise DataError(f"{folder}: no labelme JSON files")
    return files


def shapes(path: Path) -> list[dict]:
    doc = read_json(path)
    if not isinstance(doc, dict) or not isinstance(doc.get("shapes"), list):
        raise DataError(f"{path}: not a labelme file (no shapes list)")
    return doc["shapes"]


@dataclass(frozen=True)
class LabelmeTarget:
    """The mask of one labelme JSON: its shapes drawn with Pillow as labelme's `shape_to_mask` draws them."""

    source: Path
    classes: tuple[str, ...]

    def image(self) -> np.ndarray | None:
        """The image embedded as `imageData` (None without one); read when the file beside the JSON is missing."""
        doc = read_json(self.source)
        if not doc.get("imageData"):
            return None
        from seg.io.images import decode_image

        try:
            return decode_image(base64.b64decode(doc["imageData"]), f"{self.source}: imageData")
        except ValueError as err:
            raise DataError(f"{self.source}: imageData is not base64 ({err})") from None

    def draw(self, height: int, width: int, ignore_index: int) -> np.ndarray:
        doc = read_json(self.source)
        check_size((doc.get("imageHeight"), doc.get("imageWidth")), height, width, str(self.source))
        index = {name: i for i, name in enumerate(self.classes)}
        index.setdefault(LABELME_BACKGROUND, 0)
        index[IGNORE_LABEL] = ignore_index
        mask = np.zeros((height, width), np.int64)
        for number, shape in enumerate(shapes(self.source)):
            label = shape.get("label")
            where = f"{self.source}: shape {number} (label {label!r})"
            if label not in index:
                raise DataError(f"{where}: label is not in data.classes")
            mask[labelme_shape(shape, height, width, where)] = index[label]
        return mask


def labelme_shape(shape: dict, height: int, width: int, where: str = "shape") -> np.ndarray:
    """One labelme shape as an (H, W) bool array: polygon, rectangle, circle (centre and a point on it),
    line and linestrip (10 px wide), point (a disc of radius 5) or mask (a PNG over its two-point box)."""
    from PIL import Image, ImageDraw

    kind = shape.get("shape_type") or "polygon"
    try:
        xy = [(float(x), float(y)) for x, y in shape.get("points") or []]
    except (TypeError, ValueError):
        raise DataError(f"{where}: points are not [x, y] pairs") from None
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    if kind == "mask":
        if len(xy) != 2 or not shape.get("mask"):
            raise DataError(f"{where}: a mask shape needs its two corner points and a base64 PNG")
        try:
            patch = Image.open(io.BytesIO(base64.b64decode(shape["mask"]))).convert("L")
        except Exception as err:  # Pillow and base64 raise several types
            raise DataError(f"{where}: cannot read the shape's mask ({err})") from None
        canvas.paste(patch.point(lambda v: 1 if v else 0), (round(xy[0][0]), round(xy[0][1])))
        return np.asarray(canvas, bool)
    need = LABELME_POINTS.get(kind)
    if need is None:
        raise DataError(f"{where}: unknown shape_type {kind!r}")
    if (len(xy) < need) if kind in ("polygon", "linestrip") else (len(xy) != need):
        more = " or more" if kind in ("polygon", "linestrip") else ""
        raise DataError(f"{where}: a {kind} needs {need}{more} points, this one has {len(xy)}")
    if kind == "circle":
        (cx, cy), (px, py) = xy
        r = float(np.hypot(cx - px, cy - py))
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=1, fill=1)
    elif kind == "rectangle":
        (x0, y0), (x1, y1) = xy
        draw.rectangle([min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)], outline=1, fill=1)
    elif kind in ("line", "linestrip"):
        draw.line(xy, fill=1, width=LINE_WIDTH)
    elif kind == "point":
        (cx, cy), r = xy[0], POINT_RADIUS
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=1, fill=1)
    else:
        draw.polygon(xy, outline=1, fill=1)
    return np.asarray(canvas, bool)


def labelme_samples(data, root: Path) -> dict[str, Any]:
    """name -> Sample for every labelme JSON; the image is `imagePath` beside the JSON, else `imageData`."""
    folder = root / (data.annotations or ".")
    samples = {}
    for path in labelme_files(data, root):
        doc = read_json(path)
        image = path.parent / str(doc.get("imagePath") or path.with_suffix(".png").name)
        name = str(path.relative_to(folder).with_suffix(""))
        samples[name] = Sample(name, image, None, LabelmeTarget(path, tuple(data.classes)))
    return samples

"""Masks from what annotation tools export: COCO (instances and panoptic), labelme, CVAT and colour masks.

Each `data.format` gives `seg.data.Sample`s; an annotation format's samples carry a `target` that draws
the (H, W) class-index mask when the image is read (`Target.draw`), so nothing is converted on disk.
Classes come from `data.classes` (matched by name) or, when it is unset, from the export itself
(`class_names`). Every bad annotation raises a DataError that names its file and the annotation.

Overlaps, by format:
- COCO instances: crowd regions (`iscrowd: 1`) are the ignore index, then the other instances are painted
  largest first, so where two overlap the smaller one is kept (and an instance covers a crowd region).
  Pixels of no annotation are class 0.
- COCO panoptic: segments do not overlap; crowd segments and the unlabelled id 0 are the ignore index.
- labelme: shapes are painted in the file's order, later ones on top, as labelme's `shapes_to_label` does.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from seg.errors import DataError

IGNORE_LABEL = "__ignore__"  # labelme's and our CVAT label for pixels to leave out of the loss
LABELME_BACKGROUND = "_background_"  # labelme's name for class 0
LABELME_POINTS = {"polygon": 3, "rectangle": 2, "circle": 2, "line": 2, "linestrip": 2, "point": 1}
LINE_WIDTH, POINT_RADIUS = 10, 5  # labelme's `shape_to_mask` defaults


def read_json(path: Path) -> Any:
    if not path.is_file():
        raise DataError(f"{path}: no such annotation file")
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: not valid JSON ({err})") from None


# ---- colour masks ---------------------------------------------------------------------------------


def colour_keys(colours: np.ndarray) -> np.ndarray:
    colours = colours.astype(np.int64)
    return (colours[..., 0] << 16) | (colours[..., 1] << 8) | colours[..., 2]


def colours_to_index(rgb: np.ndarray, palette: list[list[int]], path: Path | str, ignore: dict | None = None) -> np.ndarray:
    """Class indices (int64) of an (H, W, 3) colour mask: a pixel of palette colour i is class i.

    `ignore` maps extra colours to their value (e.g. CVAT's `__ignore__` label). A colour found in neither
    raises a DataError naming the file, the colour and one pixel where it occurs."""
    colours = [tuple(c) for c in palette] + [tuple(c) for c in (ignore or {})]
    values = list(range(len(palette))) + list((ignore or {}).values())
    keys = colour_keys(np.array(colours, np.int64).reshape(-1, 3))
    order = np.argsort(keys)
    pixels = colour_keys(rgb[..., :3])
    pos = np.clip(np.searchsorted(keys[order], pixels), 0, len(keys) - 1)
    found = keys[order][pos] == pixels
    if not found.all():
        y, x = (int(v) for v in np.argwhere(~found)[0])
        colour = [int(c) for c in rgb[y, x, :3]]
        raise DataError(f"{path}: colour {colour} at pixel (x={x}, y={y}) is not in the palette (data.palette)")
    return np.asarray(values, np.int64)[order][pos]


# ---- class names from an export ------------------------------------------------------------------------


def class_names(data: dict[str, Any], root: Path) -> list[str]:
    """The classes of an export, for a config that leaves `classes` out.

    COCO instances: background, then the categories in the JSON's order; panoptic: the categories alone
    (unlabelled pixels are ignored). labelme: `labels.txt` in the root if there is one (labelme's own
    convention, `__ignore__` and `_background_` first), else background and every label found, sorted.
    CVAT: labelmap.txt's labels in its order."""
    fmt = data.get("format")
    if fmt == "coco":
        doc = read_json(annotation_path(data, root))
        names = [str(c.get("name")) for c in doc.get("categories", [])]
        return names if is_panoptic(doc) else ["background", *names]
    if fmt == "labelme":
        labels = root / "labels.txt"
        if labels.is_file():
            found = [line.strip() for line in labels.read_text().splitlines() if line.strip()]
        else:
            found = sorted({str(s.get("label")) for path in labelme_files(data, root) for s in _shapes(path)})
        names = [n for n in found if n not in (IGNORE_LABEL, LABELME_BACKGROUND, "background")]
        return ["background", *names]
    if fmt == "cvat":
        return [n for n in labelmap(root) if n != IGNORE_LABEL]
    return []


def annotation_path(data: dict[str, Any] | Any, root: Path, key: str = "annotations") -> Path:
    value = _get(data, key)
    if value is None:
        raise DataError(f"data.{key}: format {_get(data, 'format')} needs the annotation JSON (relative to data.root)")
    path = Path(value)
    return path if path.is_absolute() else root / path


def _get(data, key: str):
    return data.get(key) if isinstance(data, dict) else getattr(data, key)


# ---- COCO -------------------------------------------------------------------------------------


def is_panoptic(doc: dict) -> bool:
    annotations = doc.get("annotations") or []
    return bool(annotations) and "segments_info" in annotations[0]


@dataclass(frozen=True)
class CocoTarget:
    """The mask of one image of a COCO instances JSON: its annotations drawn with pycocotools."""

    source: Path
    file_name: str
    size: tuple[int | None, int | None]  # (height, width) as the JSON says
    annotations: tuple[dict, ...] = field(repr=False)
    category_class: dict[int, int | None] = field(repr=False)  # category id -> class index (None: not in classes)
    category_name: dict[int, str] = field(repr=False)

    def where(self, ann: dict) -> str:
        return f"{self.source}: annotation {ann.get('id')} (image {self.file_name})"

    def draw(self, height: int, width: int, ignore_index: int) -> np.ndarray:
        _check_size(self.size, height, width, f"{self.source}: image {self.file_name}")
        from pycocotools import mask as mask_utils

        crowds, instances = [], []
        for ann in self.annotations:
            cls = self.category_class.get(ann.get("category_id"))
            if cls is None:
                name = self.category_name.get(ann.get("category_id"), "?")
                raise DataError(
                    f"{self.where(ann)}: category {ann.get('category_id')} ({name!r}) is not in data.classes"
                )
            pixels = _coco_mask(mask_utils, ann.get("segmentation"), height, width, self.where(ann))
            (crowds if ann.get("iscrowd") else instances).append((pixels, cls))
        mask = np.zeros((height, width), np.int64)
        for pixels, _ in crowds:
            mask[pixels] = ignore_index
        for pixels, cls in sorted(instances, key=lambda item: -int(item[0].sum())):
            mask[pixels] = cls
        return mask


def _coco_mask(mask_utils, segmentation: Any, height: int, width: int, where: str) -> np.ndarray:
    """A COCO segmentation (polygons, RLE or compressed RLE) as an (H, W) bool array."""
    try:
        if isinstance(segmentation, list):
            if not segmentation:
                raise DataError(f"{where}: empty segmentation")
            for polygon in segmentation:
                if not isinstance(polygon, list) or len(polygon) % 2 or len(polygon) < 6:
                    points = len(polygon) // 2 if isinstance(polygon, list) else 0
                    raise DataError(f"{where}: a polygon needs 3 or more (x, y) points, this one has {points}")
            rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
        elif isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
            size = [int(v) for v in segmentation["size"]]
            if size != [height, width]:
                raise DataError(f"{where}: RLE size {size[1]}x{size[0]} (w x h) but the image is {width}x{height}")
            counts = segmentation["counts"]
            if isinstance(counts, list):
                if sum(counts) != height * width:
                    raise DataError(f"{where}: RLE counts add up to {sum(counts)}, not {height} x {width} pixels")
                rle = mask_utils.frPyObjects(segmentation, height, width)
            else:
                rle = {"size": size, "counts": counts.encode() if isinstance(counts, str) else counts}
        else:
            raise DataError(f"{where}: segmentation is neither polygons nor RLE")
        return mask_utils.decode(rle).astype(bool)
    except DataError:
        raise
    except Exception as err:  # pycocotools raises bare Exceptions and ValueErrors for broken RLE
        raise DataError(f"{where}: cannot decode the segmentation ({err})") from None


@dataclass(frozen=True)
class PanopticTarget:
    """The mask of one image of COCO panoptic: its segment PNG (id = R + 256 G + 256² B) by segments_info."""

    source: Path
    png: Path
    size: tuple[int | None, int | None]
    segments: tuple[dict, ...] = field(repr=False)
    category_class: dict[int, int | None] = field(repr=False)
    category_name: dict[int, str] = field(repr=False)

    def draw(self, height: int, width: int, ignore_index: int) -> np.ndarray:
        from seg.errors import ImageError
        from seg.imageio import read_image

        where = f"{self.source}: image {self.png.name}"
        _check_size(self.size, height, width, where)
        try:
            rgb = read_image(self.png)
        except ImageError as err:
            raise DataError(f"{where}: {err}") from None
        if rgb.ndim != 3 or rgb.shape[2] < 3 or rgb.shape[:2] != (height, width):
            raise DataError(f"{self.png}: expected an RGB segment PNG of {width}x{height}, got shape {rgb.shape}")
        ids = colour_keys(rgb[..., 2::-1])  # R + 256 G + 256^2 B: B is the high byte
        mask = np.full((height, width), ignore_index, np.int64)
        known = np.zeros((height, width), bool)
        for segment in self.segments:
            pixels = ids == segment.get("id")
            known |= pixels
            if segment.get("iscrowd"):
                continue
            cls = self.category_class.get(segment.get("category_id"))
            if cls is None:
                name = self.category_name.get(segment.get("category_id"), "?")
                raise DataError(
                    f"{where}: segment {segment.get('id')}: category {segment.get('category_id')} ({name!r}) "
                    "is not in data.classes"
                )
            mask[pixels] = cls
        stray = ~known & (ids != 0)
        if stray.any():
            y, x = (int(v) for v in np.argwhere(stray)[0])
            raise DataError(f"{where}: segment id {int(ids[y, x])} at pixel (x={x}, y={y}) is not in segments_info")
        return mask


def _check_size(size: tuple[int | None, int | None], height: int, width: int, where: str) -> None:
    if None not in size and tuple(size) != (height, width):
        raise DataError(f"{where}: the JSON says {size[1]}x{size[0]} but the image file is {width}x{height}")


def coco_samples(json_path: Path, images: Path, classes: list[str], masks: Path | None = None) -> list:
    """Samples of one COCO JSON (instances or panoptic) with images under `images`."""
    from seg.data import Sample

    doc = read_json(json_path)
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise DataError(f"{json_path}: not a COCO JSON (no images list)")
    index = {name: i for i, name in enumerate(classes)}
    categories = doc.get("categories") or []
    category_class = {c.get("id"): index.get(c.get("name")) for c in categories}
    category_name = {c.get("id"): str(c.get("name")) for c in categories}
    panoptic = is_panoptic(doc)
    by_image: dict[Any, list[dict]] = {}
    for ann in doc.get("annotations") or []:
        if not isinstance(ann, dict) or "image_id" not in ann:
            raise DataError(f"{json_path}: annotation {ann.get('id') if isinstance(ann, dict) else ann!r} has no image_id")
        by_image.setdefault(ann["image_id"], []).append(ann)
    if panoptic:
        masks = masks if masks is not None and masks.is_dir() else json_path.with_suffix("")
        if not masks.is_dir():
            raise DataError(f"{json_path}: panoptic segment PNGs go in {masks}, which is missing (data.masks)")
    samples = []
    for image in doc["images"]:
        file_name = str(image.get("file_name"))
        size = (image.get("height"), image.get("width"))
        anns = by_image.get(image.get("id"), [])
        if panoptic:
            if len(anns) != 1:
                raise DataError(f"{json_path}: image {file_name} has {len(anns)} panoptic annotations, expected 1")
            target: Any = PanopticTarget(
                json_path, masks / anns[0].get("file_name", ""), size, tuple(anns[0].get("segments_info") or ()),
                category_class, category_name,
            )  # fmt: skip
        else:
            target = CocoTarget(json_path, file_name, size, tuple(anns), category_class, category_name)
        samples.append(Sample(str(Path(file_name).with_suffix("")), images / file_name, None, target))
    if not samples:
        raise DataError(f"{json_path}: no images")
    return samples


# ---- labelme -------------------------------------------------------------------------------------


def labelme_files(data, root: Path) -> list[Path]:
    folder = root / (_get(data, "annotations") or ".")
    if not folder.is_dir():
        raise DataError(f"data.annotations: no such folder {folder} (labelme's JSON files)")
    files = sorted(p for p in folder.rglob("*.json") if not p.name.startswith("."))
    if not files:
        raise DataError(f"{folder}: no labelme JSON files")
    return files


def _shapes(path: Path) -> list[dict]:
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
        from seg.imageio import decode_image

        try:
            return decode_image(base64.b64decode(doc["imageData"]), f"{self.source}: imageData")
        except ValueError as err:
            raise DataError(f"{self.source}: imageData is not base64 ({err})") from None

    def draw(self, height: int, width: int, ignore_index: int) -> np.ndarray:
        doc = read_json(self.source)
        _check_size((doc.get("imageHeight"), doc.get("imageWidth")), height, width, str(self.source))
        index = {name: i for i, name in enumerate(self.classes)}
        index.setdefault(LABELME_BACKGROUND, 0)
        index[IGNORE_LABEL] = ignore_index
        mask = np.zeros((height, width), np.int64)
        for number, shape in enumerate(_shapes(self.source)):
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
    from seg.data import Sample

    folder = root / (data.annotations or ".")
    samples = {}
    for path in labelme_files(data, root):
        doc = read_json(path)
        image = path.parent / str(doc.get("imagePath") or path.with_suffix(".png").name)
        name = str(path.relative_to(folder).with_suffix(""))
        samples[name] = Sample(name, image, None, LabelmeTarget(path, tuple(data.classes)))
    return samples


# ---- CVAT ----------------------------------------------------------------------------------------


def labelmap(root: Path) -> dict[str, list[int]]:
    """label -> [r, g, b] from CVAT's labelmap.txt (`name:r,g,b:parts:actions`, # for comments)."""
    path = root / "labelmap.txt"
    if not path.is_file():
        raise DataError(f"{root}: no labelmap.txt (CVAT's Segmentation mask 1.1 export has one)")
    labels = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, _, rest = line.partition(":")
        try:
            colour = [int(v) for v in rest.split(":")[0].split(",")]
        except ValueError:
            colour = []
        if len(colour) != 3 or not all(0 <= v <= 255 for v in colour):
            raise DataError(f"{path}: line {number}: expected name:r,g,b, got {line.strip()!r}")
        labels[name.strip()] = colour
    if not labels:
        raise DataError(f"{path}: no labels")
    return labels


def unpack_zip(path: Path) -> Path:
    """The folder an export zip is unpacked to, beside it (`task.zip` -> `task.unpacked/`): unpacked once
    into a temporary folder, then renamed; unpacked again when the zip is newer."""
    folder = path.parent / f"{path.stem}.unpacked"
    if folder.is_dir() and folder.stat().st_mtime >= path.stat().st_mtime:
        return folder
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{folder.name}."))
    try:
        with zipfile.ZipFile(path) as archive:
            archive.extractall(tmp)  # zipfile drops absolute and ".." parts of member names
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except (OSError, zipfile.BadZipFile) as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataError(f"{path}: cannot unpack ({err})") from None
    return folder


def cvat_root(root: Path) -> Path:
    """The export's folder: `root`, or its one subfolder that holds labelmap.txt (a zip with a top folder)."""
    if (root / "labelmap.txt").is_file():
        return root
    inner = [p for p in root.iterdir() if (p / "labelmap.txt").is_file()] if root.is_dir() else []
    return inner[0] if len(inner) == 1 else root

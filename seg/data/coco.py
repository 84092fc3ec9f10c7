"""COCO exports (instances and panoptic): masks drawn from the JSON when an image is read.

Crowd regions (`iscrowd: 1`) are the ignore index, then the other instances are painted largest first, so
where two overlap the smaller one is kept (and an instance covers a crowd region); pixels of no annotation
are class 0. Panoptic segments do not overlap; crowd segments and the unlabelled id 0 are the ignore index.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from seg.data.common import Sample, check_size, colour_keys, read_json
from seg.errors import DataError


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
        check_size(self.size, height, width, f"{self.source}: image {self.file_name}")
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
        from seg.io.images import read_image

        where = f"{self.source}: image {self.png.name}"
        check_size(self.size, height, width, where)
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


def coco_samples(json_path: Path, images: Path, classes: list[str], masks: Path | None = None) -> list:
    """Samples of one COCO JSON (instances or panoptic) with images under `images`."""
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

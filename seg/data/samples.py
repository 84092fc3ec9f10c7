"""Samples for training and evaluation: a folder of images and masks (index or colour masks), a PASCAL
VOC tree, or an annotation tool's export (COCO, labelme, CVAT: `seg.data.annotations`).

`find_samples` lists the samples and splits them; `load_pair` reads one and checks image and mask against
each other; `survey` reads every sample once, counting pixels per class and collecting every problem
(`seg data check`); `checked_survey` runs it before training so a bad file is reported up front.
No torch here: the torch data set is `training.data.SegmentationDataset`.
"""

from __future__ import annotations

import os
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from seg.config import DataConfig
from seg.data import exports
from seg.data.coco import coco_samples
from seg.data.common import Sample, colours_to_index
from seg.data.labelme import labelme_samples
from seg.errors import DataError, ImageError
from seg.io.headers import is_image_file
from seg.io.images import read_image, read_mask, to_channels


def find_samples(data: DataConfig) -> tuple[list[Sample], list[Sample]]:
    """(train, val) sample lists for the config's data section (an export's classes and colours are read
    into it first: `seg.data.exports.resolve`)."""
    exports.resolve(data)
    if data.format == "voc":
        return _voc_samples(data)
    if data.format == "coco":
        return _coco_samples(data)
    if data.format == "labelme":
        return _split(labelme_samples(data, data.root), data, data.root)
    if data.format == "cvat":
        return _cvat_samples(data)
    return _folder_samples(data)


def _coco_samples(data: DataConfig) -> tuple[list[Sample], list[Sample]]:
    root = data.root
    masks = root / data.masks
    train = coco_samples(data.annotations, root / data.images, data.classes, masks)
    if data.val_annotations is None:
        return _split({s.name: s for s in train}, data, root)
    images = root / (data.val_images or data.images)
    return train, coco_samples(data.val_annotations, images, data.classes, masks)


def _cvat_samples(data: DataConfig) -> tuple[list[Sample], list[Sample]]:
    """CVAT's Segmentation mask 1.1: JPEGImages/, SegmentationClass/ (colour PNGs), ImageSets/Segmentation."""
    root, chosen = data.root, data.model_fields_set
    images = data.images if "images" in chosen else "JPEGImages"
    pairs = _pairs(root, images, data.masks if "masks" in chosen else "SegmentationClass")
    lists = root / "ImageSets" / "Segmentation"
    if not (data.train_list or data.val_list) and (lists / "train.txt").is_file() and (lists / "val.txt").is_file():
        return _nonempty(_listed(pairs, lists / "train.txt"), "train", root), _listed(pairs, lists / "val.txt")
    return _split(pairs, data, root)


def _pairs(root: Path, images: str, masks: str) -> dict[str, Sample]:
    image_dir, mask_dir = root / images, root / masks
    for folder, key in ((image_dir, "data.images"), (mask_dir, "data.masks")):
        if not folder.is_dir():
            raise DataError(f"{key}: no such folder {folder}")
    mask_files = [p for p in sorted(mask_dir.rglob("*")) if is_image_file(p)]
    masks_by_stem = {p.stem: p for p in mask_files}
    images = [p for p in sorted(image_dir.rglob("*")) if is_image_file(p)]
    if not images:
        raise DataError(f"data.images: no images in {image_dir}")
    by_suffix = _matched_by_suffix(images, mask_files) if any(p.stem not in masks_by_stem for p in images) else {}
    pairs = {}
    for image in images:
        name = str(image.relative_to(image_dir).with_suffix(""))
        mask = mask_dir / Path(name).parent / masks_by_stem.get(image.stem, Path("")).name
        if not mask.is_file():
            mask = masks_by_stem.get(image.stem) or by_suffix.get(image)
        if mask is None:
            raise DataError(f"{image}: no mask with stem {image.stem!r} in {mask_dir}")
        pairs[name] = Sample(name, image, mask)
    return pairs


def _shared_ending(stems: list[str]) -> str:
    """The ending all stems share, from a separator (_ - . or space) on: DRIVE's '_manual1' of '21_manual1'
    and '22_manual1', ISIC's '_segmentation'; '' when they share none."""
    common = os.path.commonprefix([s[::-1] for s in stems])[::-1]
    cut = next((i for i, c in enumerate(common) if c in "_-. "), None)
    return "" if cut is None else common[cut:]


def _matched_by_suffix(images: list[Path], masks: list[Path]) -> dict[Path, Path]:
    """Masks named as their images plus a suffix all masks share (ISIC's 'ISIC_0000000_segmentation'), or
    both named with a suffix of their own (DRIVE's '21_training' and '21_manual1'): the images that pair
    up so, one mask each, by whichever naming pairs more of them."""
    if not masks:
        return {}
    image_end, mask_end = _shared_ending([p.stem for p in images]), _shared_ending([p.stem for p in masks])
    keys: dict[str, Path | None] = {}
    for mask in masks:
        key = mask.stem[: len(mask.stem) - len(mask_end)]
        keys[key] = None if key in keys or not key else mask  # an ambiguous key pairs with nothing
    best: dict[Path, Path] = {}
    for image_cut in dict.fromkeys([image_end, ""]):  # DRIVE's naming, then ISIC's
        found = {image: keys.get(image.stem[: len(image.stem) - len(image_cut)]) for image in images}
        found = {image: mask for image, mask in found.items() if mask is not None}
        if len(found) > len(best) and len(set(found.values())) == len(found):
            best = found
    return best


def _folder_samples(data: DataConfig) -> tuple[list[Sample], list[Sample]]:
    root = data.root
    if (root / "train" / data.images).is_dir() and (root / "val" / data.images).is_dir():
        train = list(_pairs(root / "train", data.images, data.masks).values())
        val = list(_pairs(root / "val", data.images, data.masks).values())
        return _nonempty(train, "train", root), _nonempty(val, "val", root)
    return _split(_pairs(root, data.images, data.masks), data, root)


def _split(pairs: dict[str, Sample], data: DataConfig, root: Path) -> tuple[list[Sample], list[Sample]]:
    """(train, val) by data.train_list / val_list, else a seeded val_fraction of the names."""
    if data.train_list or data.val_list:
        train = _listed(pairs, data.train_list) if data.train_list else None
        val = _listed(pairs, data.val_list) if data.val_list else []
        if train is None:
            taken = {s.name for s in val}
            train = [s for s in pairs.values() if s.name not in taken]
        return _nonempty(train, "train", root), val
    names = sorted(pairs)
    random.Random(0).shuffle(names)
    n_val = int(round(len(names) * data.val_fraction))
    if data.val_fraction > 0 and len(names) > 1:
        n_val = max(1, n_val)
    val = sorted(names[:n_val])
    train = sorted(names[n_val:])
    return _nonempty([pairs[n] for n in train], "train", root), [pairs[n] for n in val]


def _listed(pairs: dict[str, Sample], list_file: Path) -> list[Sample]:
    by_stem = {Path(name).name: s for name, s in pairs.items()}
    out = []
    for line in list_file.read_text().split():
        sample = pairs.get(line) or by_stem.get(Path(line).stem)
        if sample is None:
            raise DataError(f"{list_file}: {line!r} has no image and mask pair")
        out.append(sample)
    return out


def _voc_samples(data: DataConfig) -> tuple[list[Sample], list[Sample]]:
    root = data.root
    for candidate in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
        if (candidate / "JPEGImages").is_dir():
            root = candidate
            break
    else:
        raise DataError(f"data.root: {data.root} holds no VOC2012 tree (JPEGImages, SegmentationClass)")
    sets = root / "ImageSets" / "Segmentation"

    def split(name: str, list_file: Path | None) -> list[Sample]:
        list_file = list_file or sets / f"{name}.txt"
        if not list_file.is_file():
            raise DataError(f"VOC split file missing: {list_file}")
        ids = list_file.read_text().split()
        return [Sample(i, root / "JPEGImages" / f"{i}.jpg", root / "SegmentationClass" / f"{i}.png") for i in ids]

    train = split("train", data.train_list)
    val = split("val", data.val_list)
    return _nonempty(train, "train", root), val


def _nonempty(samples: list[Sample], split: str, root: Path) -> list[Sample]:
    if not samples:
        raise DataError(f"the {split} split of {root} is empty")
    return samples


def encode_mask(raw: np.ndarray, data: DataConfig, path: Path | str = "mask") -> np.ndarray:
    """Class indices (int64) from a mask file's values; 0/255 masks become 0/1 in binary mode.

    Raises DataError for values that are neither a class index nor the ignore index."""
    binary = data.mask_mode == "binary"
    if data.mask_mode == "auto" and data.num_classes == 2 and raw.max(initial=0) > 1:
        binary = bool(np.isin(np.unique(raw), (0, 255)).all())
    mask = (raw > 0).astype(np.int64) if binary else raw.astype(np.int64)
    bad = (mask >= data.num_classes) & (mask != data.ignore_index) | (mask < 0)
    if bad.any():
        values = sorted(set(np.unique(mask[bad]).tolist()))[:5]
        raise DataError(
            f"{path}: mask values {values} are outside classes 0..{data.num_classes - 1}"
            f" (ignore index {data.ignore_index})"
        )
    return mask


def load_pair(sample: Sample, data: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    """The image (H, W, C) in its own dtype and the mask (H, W) int64, checked against each other."""
    target = sample.target
    try:
        embedded = target.image() if hasattr(target, "image") and not sample.image.is_file() else None
        image = to_channels(embedded if embedded is not None else read_image(sample.image), data.in_channels)
    except ImageError as err:
        message = str(err) if str(sample.image) in str(err) else f"{sample.image}: {err}"
        raise DataError(f"{target.source}: {message}" if target is not None else message) from None
    if target is not None:
        return image, target.draw(image.shape[0], image.shape[1], data.ignore_index)
    try:
        raw = read_image(sample.mask) if data.mask_mode == "color" else read_mask(sample.mask)
    except ImageError as err:
        raise DataError(str(err)) from None
    if raw.shape[:2] != image.shape[:2]:
        raise DataError(
            f"{sample.mask}: mask is {raw.shape[1]}x{raw.shape[0]} but image {sample.image.name} is "
            f"{image.shape[1]}x{image.shape[0]}"
        )
    if data.mask_mode == "color":
        if raw.ndim != 3 or raw.shape[2] < 3:
            raise DataError(f"{sample.mask}: mask_mode color needs RGB masks, this one is grey")
        ignore = {tuple(data.ignore_color): data.ignore_index} if data.ignore_color else None
        return image, colours_to_index(raw, data.class_palette[: data.num_classes], sample.mask, ignore)
    return image, encode_mask(raw, data, sample.mask)


@dataclass
class Survey:
    """What `survey` found: per split, images, pixels per class, ignored pixels, image sizes and the
    images' total area; problems."""

    splits: dict[str, dict[str, Any]]
    problems: list[str]
    cache: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {"splits": self.splits, "problems": self.problems}


def survey(
    splits: dict[str, list[Sample]],
    data: DataConfig,
    keep: bool = False,
    each: Callable[[np.ndarray, np.ndarray], None] | None = None,
) -> Survey:
    """Read every sample once, as training does; a bad sample is a problem, not the end of the survey.
    With `keep`, the pairs read are kept in `cache` (for `data.cache`); `each(image, mask)` is called with
    every pair read (for measures of its own)."""
    report = Survey({}, [])
    for split, samples in splits.items():
        pixels = np.zeros(data.num_classes, np.int64)
        ignored, sizes, area = 0, Counter(), 0
        for sample in samples:
            try:
                image, mask = load_pair(sample, data)
            except DataError as err:
                report.problems.append(str(err))
                continue
            counts = np.bincount(mask[mask != data.ignore_index].ravel(), minlength=data.num_classes)
            pixels += counts[: data.num_classes]
            ignored += int((mask == data.ignore_index).sum())
            sizes[f"{image.shape[1]}x{image.shape[0]}"] += 1
            area += mask.size
            if each is not None:
                each(image, mask)
            if keep:
                report.cache[sample.name] = (image, mask)
        report.splits[split] = {
            "images": len(samples),
            "pixels": dict(zip(data.classes, pixels.tolist())),
            "ignored": ignored,
            "sizes": dict(sizes.most_common()),
            "area": area,
        }
    return report


def checked_survey(
    splits: dict[str, list[Sample]], data: DataConfig, each: Callable[[np.ndarray, np.ndarray], None] | None = None
) -> Survey:
    """`survey` (keeping the pairs if `data.cache`), raising DataError with the first problem (and how many
    more there are)."""
    report = survey(splits, data, keep=data.cache, each=each)
    if report.problems:
        more = len(report.problems) - 1
        raise DataError(report.problems[0] + (f" (and {more} more problems: seg data check lists them)" if more else ""))
    return report


def check_samples(samples: list[Sample], data: DataConfig) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Read every pair once; raises DataError with the first problem; returns the pairs if caching."""
    return checked_survey({"all": samples}, data).cache

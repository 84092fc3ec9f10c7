"""The training data set: normalised, augmented crops of the sample pairs `seg.data.samples` finds and checks.

`SegmentationDataset` yields (C, H, W) float32 tensors and (H, W) int64 masks for a torch DataLoader,
and with border weights an (H, W) float32 weight map per crop; `border_weight_map` is U-Net's weight map;
`build_augmentation` is the albumentations pipeline the config asks for.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import Dataset

from seg.config import BorderWeight, DataConfig
from seg.data.samples import Sample, load_pair
from seg.errors import DataError
from seg.inference.preprocess import intensity_range, normalize


def border_weight_map(
    mask: np.ndarray, w0: float = 10.0, sigma: float = 5.0, ignore_index: int = 255, background: int = 0
) -> np.ndarray:
    """U-Net's weight map (Ronneberger et al. 2015, eq. 2) of an (H, W) class-index mask, float32.

    w(x) = w_c(x) + w0 * exp(-(d1(x) + d2(x))^2 / (2 sigma^2)), with d1, d2 the distances to the nearest and
    second-nearest connected component (4-connected) of the foreground: every class but `background`.
    w_c is the inverse pixel frequency of x's class in this mask, scaled so its mean over valid pixels is 1
    (with two classes present, a class covering fraction f gets 1 / (2 f)). The border term is added on
    `background` pixels only, the ones that separate components, and only where d1 + d2 <= 6 sigma (past
    that it is below 1e-7); each component's distances are computed in its bounding box grown by 6 sigma.
    Pixels at `ignore_index` get 0.
    """
    from scipy import ndimage

    mask = np.asarray(mask)
    valid = mask != ignore_index
    weights = np.zeros(mask.shape, np.float32)
    classes, counts = np.unique(mask[valid], return_counts=True)
    if not len(classes):
        return weights
    per_class = counts.sum() / (len(classes) * counts)  # mean over valid pixels is 1
    weights[valid] = per_class[np.searchsorted(classes, mask[valid])]
    labels, count = ndimage.label(valid & (mask != background))
    if count < 2 or w0 == 0:
        return weights
    margin = math.ceil(6 * sigma)
    d1 = np.full(mask.shape, np.inf, np.float32)
    d2 = np.full(mask.shape, np.inf, np.float32)
    height, width = mask.shape
    for index, box in enumerate(ndimage.find_objects(labels), start=1):
        rows = slice(max(box[0].start - margin, 0), min(box[0].stop + margin, height))
        cols = slice(max(box[1].start - margin, 0), min(box[1].stop + margin, width))
        dist = ndimage.distance_transform_edt(labels[rows, cols] != index).astype(np.float32)
        near, second = d1[rows, cols], d2[rows, cols]  # views: updated in place
        np.minimum(second, np.maximum(near, dist), out=second)
        np.minimum(near, dist, out=near)
    border = (mask == background) & np.isfinite(d2)
    total = d1[border] + d2[border]
    weights[border] += w0 * np.exp(-(total**2) / (2 * sigma**2))
    return weights


class SegmentationDataset(Dataset):
    """Normalised (C, H, W) float32 images and (H, W) int64 masks, augmented by `transform`.

    With `border_weight` it yields (image, mask, weights) with U-Net's weight map of the whole image,
    computed once per image and moved by `transform` as a second mask (float32, 0 at ignored pixels).
    """

    def __init__(
        self, samples: list[Sample], data: DataConfig, transform=None, cache: dict | None = None,
        border_weight: BorderWeight | None = None,
    ):  # fmt: skip
        self.samples = samples
        self.data = data
        self.transform = transform
        self.cache = cache or {}
        self.ranges: dict[int, tuple[float, float]] = {}  # each image's intensity range, computed once
        # A pad and crop that lead the pipeline run on the image as read, and only the crop is normalised.
        self.crop_first = transform is not None and crop_leads(data)
        if self.crop_first:
            import albumentations as A

            seed, targets = getattr(transform, "seed", None), {"weights": "mask"}
            self.lead = A.Compose(transform.transforms[:2], additional_targets=targets, seed=seed)
            self.rest = A.Compose(transform.transforms[2:], additional_targets=targets, seed=seed)
        self.weight_maps: dict[str, np.ndarray] = {}
        if border_weight is not None:
            for i, sample in enumerate(samples):
                self.weight_maps[sample.name] = border_weight_map(
                    self.load(i)[1], border_weight.w0, border_weight.sigma, data.ignore_index
                )

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        sample = self.samples[index]
        pair = self.cache.get(sample.name)
        return pair if pair is not None else load_pair(sample, self.data)

    def masks(self):
        """Each image's mask in turn, as `load` gives it."""
        for i in range(len(self)):
            yield self.load(i)[1]

    def set_random_seed(self, seed: int) -> None:
        """Seed the augmentation (both its parts when the crop runs first)."""
        if self.crop_first:
            self.lead.set_random_seed(seed)
            self.rest.set_random_seed(seed ^ 0x5EED)  # its own stream, not the crop's
        elif self.transform is not None:
            self.transform.set_random_seed(seed)

    def __getitem__(self, index: int):
        image, mask = self.load(index)
        weights = self.weight_maps.get(self.samples[index].name)
        extra = {} if weights is None else {"weights": weights}
        value_range = self.ranges.get(index)
        if value_range is None:
            value_range = self.ranges[index] = intensity_range(image, self.data.normalize)
        transform = self.transform
        if self.crop_first:
            out = self.lead(image=image, mask=mask, **extra)
            image, mask, extra = out["image"], out["mask"], {k: out[k] for k in extra}
            transform = self.rest
        x = normalize(image, self.data.normalize, value_range, channels_first=False)
        if transform is not None:
            out = transform(image=x, mask=mask, **extra)
            x, mask, weights = out["image"], out["mask"], out.get("weights")
        x = torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))
        y = torch.from_numpy(np.ascontiguousarray(mask)).long()
        if weights is None:
            return x, y
        w = torch.from_numpy(np.array(weights, np.float32))
        w[y == self.data.ignore_index] = 0  # e.g. padding filled with the ignore index
        return x, y, w


def random_crop(data: DataConfig):
    """A random `crop_size` crop; with `foreground_crops` f, a fraction f of them hold foreground (a class
    other than 0), as nnU-Net draws a third of its patches around foreground."""
    import albumentations as A

    size, f = data.crop_size, data.foreground_crops
    if not f:
        return A.RandomCrop(size, size)
    around = A.CropNonEmptyMaskIfExists(size, size, ignore_values=[data.ignore_index], p=f)
    return A.OneOf([A.RandomCrop(size, size, p=1 - f), around], p=1.0) if f < 1 else around


def build_augmentation(data: DataConfig, seed: int = 0):
    """The albumentations pipeline for training crops: the config's list, or the data kind's family
    (`default`; `strong` adds an elastic warp and brightness jitter)."""
    import albumentations as A
    import cv2

    size = data.crop_size
    crop = random_crop(data)
    if isinstance(data.augment, list):
        steps = []
        for i, spec in enumerate(data.augment):
            kwargs = spec.model_dump(exclude={"name"})
            cls = getattr(A, spec.name, None)
            if cls is None or not isinstance(cls, type):
                raise DataError(f"data.augment.{i}.name: albumentations has no transform {spec.name!r}")
            try:
                steps.append(cls(**kwargs))
            except (TypeError, ValueError) as err:
                raise DataError(f"data.augment.{i} ({spec.name}): {err}") from None
    elif data.augment == "none":
        steps = [A.PadIfNeeded(size, size, border_mode=cv2.BORDER_REFLECT_101), crop]
    elif data.kind == "em":
        # Flips and 90° turns only: with an elastic warp and brightness jitter as well, Lucchi++ at 15 minutes
        # on 2 cores scored 0.628 ± 0.087 test IoU against 0.773 ± 0.053 (2 seeds; bench/README.md).
        steps = [A.PadIfNeeded(size, size, border_mode=cv2.BORDER_REFLECT_101), crop, A.SquareSymmetry()]
    elif data.format == "voc":
        steps = [
            A.RandomScale(scale_limit=(-0.5, 1.0), p=1.0),
            A.PadIfNeeded(size, size, border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=data.ignore_index),
            crop,
            A.HorizontalFlip(),
        ]
    else:
        # Photographs and RGB microscopy of a user's own: crops and flips only. Scaling and brightness
        # jitter slowed learning so much in runs of hundreds of steps that they cost 12 points of mIoU.
        steps = [
            A.PadIfNeeded(size, size, border_mode=cv2.BORDER_REFLECT_101),
            crop,
            A.HorizontalFlip(),
            A.VerticalFlip(),
        ]
    if data.augment == "strong":  # the family, then a warp and brightness jitter (the bundled ISBI recipe until 2026-12-05)
        steps += [
            A.ElasticTransform(alpha=30, sigma=5, border_mode=cv2.BORDER_REFLECT_101, p=0.5),
            A.RandomBrightnessContrast(brightness_limit=0.1, contrast_limit=0.1, p=0.5),
        ]
    return A.Compose(steps, seed=seed, additional_targets={"weights": "mask"})


def crop_leads(data: DataConfig) -> bool:
    """Whether `build_augmentation`'s first two steps are a reflecting pad and a crop, which commute with
    normalisation: every built-in family's but VOC's (which scales first and pads with a constant)."""
    return isinstance(data.augment, str) and data.format != "voc"

"""The training data set: normalised, augmented crops of the sample pairs `seg.data` finds and checks.

`SegmentationDataset` yields (C, H, W) float32 tensors and (H, W) int64 masks for a torch DataLoader;
`build_augmentation` is the albumentations pipeline the config asks for.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from seg.config import DataConfig
from seg.data import Sample, load_pair
from seg.errors import DataError
from seg.preprocess import normalize


class SegmentationDataset(Dataset):
    """Normalised (C, H, W) float32 images and (H, W) int64 masks, augmented by `transform`."""

    def __init__(self, samples: list[Sample], data: DataConfig, transform=None, cache: dict | None = None):
        self.samples = samples
        self.data = data
        self.transform = transform
        self.cache = cache or {}

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        sample = self.samples[index]
        pair = self.cache.get(sample.name)
        return pair if pair is not None else load_pair(sample, self.data)

    def __getitem__(self, index: int):
        image, mask = self.load(index)
        x = normalize(image, self.data.normalize).transpose(1, 2, 0)
        if self.transform is not None:
            out = self.transform(image=x, mask=mask)
            x, mask = out["image"], out["mask"]
        x = torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))
        return x, torch.from_numpy(np.ascontiguousarray(mask)).long()


def build_augmentation(data: DataConfig, seed: int = 0):
    """The albumentations pipeline for training crops: the config's list, or defaults for the data kind."""
    import albumentations as A
    import cv2

    size = data.crop_size
    if data.augment == "none":
        steps = [A.PadIfNeeded(size, size, border_mode=cv2.BORDER_REFLECT_101), A.RandomCrop(size, size)]
    elif data.augment == "default" and data.kind == "em":
        steps = [
            A.PadIfNeeded(size, size, border_mode=cv2.BORDER_REFLECT_101),
            A.RandomCrop(size, size),
            A.SquareSymmetry(),
            A.ElasticTransform(alpha=30, sigma=5, border_mode=cv2.BORDER_REFLECT_101, p=0.5),
            A.RandomBrightnessContrast(brightness_limit=0.1, contrast_limit=0.1, p=0.5),
        ]
    elif data.augment == "default":
        steps = [
            A.RandomScale(scale_limit=(-0.5, 1.0), p=1.0),
            A.PadIfNeeded(size, size, border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=data.ignore_index),
            A.RandomCrop(size, size),
            A.HorizontalFlip(),
        ]
    else:
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
    return A.Compose(steps, seed=seed)

"""Data sets for bench/accuracy.py: folders of train/ and test/, each with images/ and masks/ (PNG).

- `isbi`: the 25 real ISBI 2012 EM slices, 20 train / 5 test by a fixed list; masks 0 membrane, 1 cell.
- `blobs`: RGB 384x384 stain-like tissue: textured stroma, overlapping glands and nuclei (3 classes),
  blur, noise and an illumination gradient; 40 train / 20 test.
- `scene`: RGB 320x320 scene-like images: warped regions of 6 textured classes, their borders 255 (void);
  40 train / 20 test.

Masks hold class indices (255 = ignore). Deterministic by seed; numpy, scipy and skimage only.

    python bench/make_data.py [--out /tmp/seg_bench/accuracy] [--sets isbi,blobs,scene]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage as ndi

ROOT = Path(__file__).resolve().parents[1]
ISBI = ROOT / "data" / "isbi2012" / "train"
ISBI_TEST = ["03", "08", "13", "18", "23"]
DEFAULT_OUT = Path(os.environ.get("SEG_BENCH_DIR", "/tmp/seg_bench")) / "accuracy"

# name -> classes, in_channels, the headline metric
SETS = {
    "isbi": {"classes": ["membrane", "cell"], "in_channels": 1, "metric": "pixel_error"},
    "blobs": {"classes": ["background", "nucleus", "gland"], "in_channels": 3, "metric": "fg_dice"},
    "scene": {"classes": ["sky", "road", "grass", "building", "tree", "car"], "in_channels": 3, "metric": "miou"},
}


def _save(root: Path, split: str, name: str, image: np.ndarray, mask: np.ndarray) -> None:
    for sub, array in (("images", image), ("masks", mask)):
        folder = root / split / sub
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(folder / f"{name}.png")


def make_isbi(root: Path) -> None:
    for path in sorted((ISBI / "images").glob("*.png")):
        split = "test" if path.stem in ISBI_TEST else "train"
        mask = (np.asarray(Image.open(ISBI / "labels" / path.name)) > 127).astype(np.uint8)
        _save(root, split, path.stem, np.asarray(Image.open(path)), mask)


def _noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Smooth noise of unit standard deviation."""
    n = ndi.gaussian_filter(rng.standard_normal(shape), sigma)
    return n / (n.std() + 1e-8)


def _blob_mask(rng, shape, centres, radius, rough: float) -> np.ndarray:
    """Irregular discs: distance to the centres, radii modulated by smooth noise."""
    h, w = shape
    out = np.zeros(shape, bool)
    yy, xx = np.mgrid[:h, :w]
    wobble = _noise(rng, shape, 6) * rough
    for (cy, cx), r in zip(centres, radius):
        ry, rx = r * rng.uniform(0.7, 1.3), r * rng.uniform(0.7, 1.3)
        d = np.sqrt(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2)
        out |= d + wobble < 1
    return out


def blobs_image(rng: np.random.Generator, size: int = 384) -> tuple[np.ndarray, np.ndarray]:
    """An H&E-like RGB image and its mask: 0 stroma, 1 nucleus, 2 gland."""
    shape = (size, size)
    n_glands = rng.integers(2, 6)
    glands = _blob_mask(rng, shape, rng.uniform(0, size, (n_glands, 2)), rng.uniform(30, 70, n_glands), 0.25)
    lumen = ndi.binary_erosion(glands, iterations=int(rng.integers(8, 14))) & (_noise(rng, shape, 3) > -0.3)
    n_nuclei = rng.integers(30, 90)
    nuclei = _blob_mask(rng, shape, rng.uniform(0, size, (n_nuclei, 2)), rng.uniform(5, 11, n_nuclei), 0.15)
    mask = np.zeros(shape, np.uint8)
    mask[glands] = 2
    mask[nuclei] = 1  # nuclei lie over glands and stroma
    # Stain densities: haematoxylin (blue-purple) and eosin (pink).
    fibres = np.abs(_noise(rng, shape, 1.5)) * 0.4 + _noise(rng, shape, 8) * 0.15
    eosin = 0.35 + fibres + 0.25 * glands - 0.3 * lumen
    haem = 0.08 + 0.05 * _noise(rng, shape, 2) + 0.35 * (glands & ~lumen)
    haem = haem + nuclei * (rng.uniform(0.9, 1.4) + 0.3 * _noise(rng, shape, 1.0))
    haem, eosin = ndi.gaussian_filter(haem, 1.2), ndi.gaussian_filter(np.maximum(eosin, 0), 1.0)
    h_rgb = np.array([0.65, 0.70, 0.29]) * rng.uniform(0.8, 1.2, 3)
    e_rgb = np.array([0.07, 0.99, 0.11]) * rng.uniform(0.8, 1.2, 3)
    od = haem[..., None] * h_rgb + eosin[..., None] * e_rgb
    yy, xx = np.mgrid[:size, :size] / size
    light = 1 - 0.25 * (rng.uniform(-1, 1) * yy + rng.uniform(-1, 1) * xx)
    rgb = 255 * np.exp(-od) * light[..., None] + rng.normal(0, 6, (*shape, 3))
    return np.clip(rgb, 0, 255).astype(np.uint8), mask


def scene_image(rng: np.random.Generator, size: int = 320) -> tuple[np.ndarray, np.ndarray]:
    """A scene-like RGB image: sky on top, road at the bottom, warped regions of the other classes
    between; each class its own colour range and texture; region borders are 255."""
    shape = (size, size)
    yy, xx = np.mgrid[:size, :size].astype(float)
    horizon = size * rng.uniform(0.25, 0.45) + 15 * _noise(rng, (1, size), 20)[0]
    road = size * rng.uniform(0.7, 0.85)
    n = int(rng.integers(5, 10))
    seeds = np.c_[rng.uniform(horizon.min(), road, n), rng.uniform(0, size, n)]
    labels = rng.choice([2, 3, 4, 5], n, p=[0.3, 0.3, 0.25, 0.15])
    wy, wx = yy + 18 * _noise(rng, shape, 12), xx + 18 * _noise(rng, shape, 12)
    nearest = np.argmin([(wy - sy) ** 2 + (wx - sx) ** 2 for sy, sx in seeds], axis=0)
    mask = labels[nearest].astype(np.uint8)
    mask[yy < horizon[None, :]] = 0
    mask[yy > road + 8 * _noise(rng, shape, 15)] = 1
    colours = {0: (150, 180, 225), 1: (95, 95, 100), 2: (80, 140, 60), 3: (150, 110, 90), 4: (50, 95, 45), 5: (160, 40, 40)}
    textures = {0: (12, 0.1), 1: (1.0, 0.5), 2: (0.8, 0.9), 3: (4.0, 0.6), 4: (2.0, 1.2), 5: (3.0, 0.3)}
    rgb = np.zeros((*shape, 3))
    for c, base in colours.items():
        sel = mask == c
        if not sel.any():
            continue
        sigma, amp = textures[c]
        tex = _noise(rng, shape, sigma) * amp
        if c == 3:  # windows: a grid
            tex += 0.8 * ((np.sin(yy / 5) > 0.6) | (np.sin(xx / 6) > 0.7))
        colour = np.array(base) * rng.uniform(0.75, 1.25) + rng.normal(0, 12, 3)
        rgb[sel] = colour + 25 * tex[sel, None]
    rgb = ndi.gaussian_filter(rgb, (0.8, 0.8, 0)) + rng.normal(0, 5, (*shape, 3))
    edges = ndi.morphological_gradient(mask, size=3) > 0
    mask[ndi.binary_dilation(edges)] = 255
    return np.clip(rgb, 0, 255).astype(np.uint8), mask


def make_generated(root: Path, kind: str, train: int = 40, test: int = 20, size: int | None = None, seed: int = 0) -> None:
    make = blobs_image if kind == "blobs" else scene_image
    rng = np.random.default_rng([seed, 1 if kind == "blobs" else 2])
    for i in range(train + test):
        image, mask = make(rng, size) if size else make(rng)
        _save(root, "train" if i < train else "test", f"{kind}{i:03d}", image, mask)


def make_set(out: Path, name: str, **kwargs) -> Path:
    """Write one data set under out/name (if not there yet) and return that folder."""
    root = Path(out) / name
    if (root / "test" / "masks").is_dir():
        return root
    tmp = root.with_name(root.name + ".tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    if name == "isbi":
        make_isbi(tmp)
    else:
        make_generated(tmp, name, **kwargs)
    tmp.rename(root)
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--sets", default="isbi,blobs,scene")
    args = parser.parse_args()
    for name in args.sets.split(","):
        print(make_set(args.out, name))


if __name__ == "__main__":
    main()

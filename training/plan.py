"""`seg plan`: a complete training config from the data, as nnU-Net plans from a data set's fingerprint.

`fingerprint(root)` reads a data folder once (images/ and masks/; train/ and val/ with those inside; or a
COCO, labelme or CVAT export) and measures what the choices depend on: image count and sizes, channels,
bit depth and intensity percentiles per channel, class pixel frequencies and typical object sizes.
`plan(fp, device, time_limit)` turns it into a config; `plan_yaml` writes that config with each planned
value's reason beside it, so a user sees which figure chose what.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from seg.errors import DataError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}
RARE = 0.10  # a class below this share of the pixels gets foreground crops
FOREGROUND_CROPS = 0.33  # nnU-Net's share of patches drawn around foreground
# Per device: the largest training crop, the batch at that crop, tile side for prediction, steps, minutes.
DEVICES = {
    "cpu": {"crop": 256, "batch": 8, "tile": 512, "steps": 2000, "minutes": 30},
    "cuda": {"crop": 512, "batch": 16, "tile": 1024, "steps": 4000, "minutes": 120},
}


@dataclass
class Fingerprint:
    """What `seg plan` measured of a data set."""

    root: str
    data: dict[str, Any]  # the config's data keys that locate the data (format, root, annotations, ...)
    classes: list[str]
    train: int = 0
    val: int = 0
    heights: list[int] = field(default_factory=list)
    widths: list[int] = field(default_factory=list)
    channels: int = 1
    dtype: str = "uint8"
    percentiles: list[list[float]] = field(default_factory=list)  # per channel: 0.5, 50, 99.5
    class_pixels: list[int] = field(default_factory=list)
    ignored_pixels: int = 0
    object_size: list[float | None] = field(default_factory=list)  # per class: median component area, px
    how_classes: str = ""
    val_folder: bool = False  # the validation images are a folder of their own (else a fraction of train)

    @property
    def images(self) -> int:
        return self.train + self.val

    @property
    def class_fraction(self) -> list[float]:
        total = max(sum(self.class_pixels), 1)
        return [n / total for n in self.class_pixels]

    def size(self, which: str) -> tuple[int, int]:
        """(height, width) by `median`, `min` or `max`."""
        fn = {"median": np.median, "min": np.min, "max": np.max}[which]
        return int(fn(self.heights)), int(fn(self.widths))

    def as_dict(self) -> dict[str, Any]:
        return {
            "root": self.root, "format": self.data["format"], "images": self.images, "train": self.train,
            "val": self.val, "size_median": self.size("median"), "size_min": self.size("min"),
            "size_max": self.size("max"), "channels": self.channels, "dtype": self.dtype,
            "percentiles_0.5_50_99.5": self.percentiles, "classes": self.classes,
            "class_fraction": [round(f, 5) for f in self.class_fraction], "ignored_pixels": self.ignored_pixels,
            "object_size_median_px": self.object_size,
        }  # fmt: skip


def foreground_crops(classes: list[str], fractions: list[float]) -> tuple[float, str]:
    """The share of training crops drawn around foreground, and why: FOREGROUND_CROPS (nnU-Net's third) when
    the rarest class other than 0 covers under RARE of the pixels, else none. `seg plan` and
    `data.foreground_crops: auto` both decide with this."""
    named = list(zip(classes, fractions))[1:] or list(zip(classes, fractions))
    rarest, share = min(named, key=lambda item: item[1])
    if share < RARE:
        why = f"{rarest} covers {100 * share:.1f}% of the pixels: a third of the crops hold foreground, as nnU-Net's"
        return FOREGROUND_CROPS, why
    return 0.0, f"rarest class {rarest} covers {100 * share:.1f}%: uniform crops"


def detect(root: Path) -> dict[str, Any]:
    """The data keys for the layout at `root`: folder (images/ and masks/, or train/ and val/ with those
    inside), a CVAT export (folder or zip), labelme JSON files or a COCO JSON."""
    if root.is_file() and root.suffix == ".zip":
        return {"format": "cvat", "root": str(root)}
    if not root.is_dir():
        raise DataError(f"{root}: no such folder")
    if (root / "images").is_dir() and (root / "masks").is_dir():
        return {"format": "folder", "root": str(root)}
    if all((root / s / d).is_dir() for s in ("train", "val") for d in ("images", "masks")):
        return {"format": "folder", "root": str(root)}
    if (root / "train" / "images").is_dir() and (root / "train" / "masks").is_dir():
        return {"format": "folder", "root": str(root / "train")}  # no val/: a fraction of train/ is held out
    if (root / "labelmap.txt").is_file():
        return {"format": "cvat", "root": str(root)}
    jsons = sorted(root.glob("*.json")) + sorted(root.glob("annotations/*.json"))
    for path in jsons:
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(doc, dict) and "shapes" in doc:
            return {"format": "labelme", "root": str(root)}
        if isinstance(doc, dict) and {"images", "annotations", "categories"} <= doc.keys():
            return {"format": "coco", "root": str(root), "annotations": str(path.relative_to(root)),
                    "images": _coco_images(root, doc)}  # fmt: skip
    raise DataError(
        f"{root}: found neither images/ and masks/, nor train/ and val/ with those inside, nor a COCO, labelme "
        "or CVAT export"
    )


def _coco_images(root: Path, doc: dict) -> str:
    """The folder under `root` that holds the COCO file's images."""
    names = [image.get("file_name", "") for image in doc.get("images", [])[:5]]
    for folder in [root, *sorted(p for p in root.iterdir() if p.is_dir())]:
        if names and all((folder / name).is_file() for name in names):
            return str(folder.relative_to(root)) if folder != root else "."
    raise DataError(f"{root}: no folder holds the images its COCO file names (e.g. {names[0] if names else '?'})")


def _folder_classes(data: dict[str, Any]) -> tuple[list[str], str]:
    """Class names from the mask values of a folder data set, and how they were read."""
    from seg.io.images import read_mask

    root = Path(data["root"])
    values: set[int] = set()
    for folder in [root / "masks", root / "train" / "masks", root / "val" / "masks"]:
        for path in sorted(folder.glob("*")) if folder.is_dir() else []:
            if path.suffix.lower() in IMAGE_SUFFIXES:
                values.update(np.unique(read_mask(path)).tolist())
    if not values:
        raise DataError(f"{root}: no mask files")
    if values <= {0, 255}:
        return ["background", "foreground"], "masks hold 0 and 255: one object class"
    values.discard(255)  # the ignore index
    top = max(values)
    return ["background"] + [f"class_{i}" for i in range(1, top + 1)], f"mask values 0..{top}"


def fingerprint(root: Path) -> Fingerprint:
    """Read every image and mask of the data at `root` once and measure them."""
    from scipy import ndimage

    from seg.config import validate_config
    from seg.data.samples import checked_survey, find_samples, load_pair
    from seg.errors import ConfigError
    from seg.io.images import read_image

    root = Path(root).resolve()
    data = detect(root)
    how = "from the export"
    if data["format"] == "folder":
        data["classes"], how = _folder_classes(data)
    try:
        cfg = validate_config({"data": {**data, "in_channels": 1}, "output": {"dir": str(root / "run")}}, root / "plan.yaml")
    except ConfigError as err:
        raise DataError(str(err).removeprefix(f"{root / 'plan.yaml'}: ")) from None
    train, val = find_samples(cfg.data)
    val_folder = data["format"] == "folder" and (Path(data["root"]) / "val").is_dir()
    samples = train + val
    if len(samples) < 2:
        raise DataError(f"{root}: {len(samples)} image(s) found; training needs at least 2")
    first = read_image(samples[0].image) if samples[0].image.is_file() else load_pair(samples[0], cfg.data)[0]
    channels = 1 if first.ndim == 2 else first.shape[2]
    cfg.data.in_channels = channels
    fp = Fingerprint(str(root), data, list(cfg.data.classes), train=len(train), val=len(val), channels=channels,
                     dtype=str(first.dtype), class_pixels=[0] * cfg.data.num_classes, how_classes=how,
                     val_folder=val_folder)  # fmt: skip
    samples_per_image = max(1000, 2_000_000 // len(samples))
    pixels: list[np.ndarray] = []
    areas: list[list[int]] = [[] for _ in fp.classes]

    def measure(image: np.ndarray, mask: np.ndarray) -> None:
        fp.heights.append(image.shape[0])
        fp.widths.append(image.shape[1])
        step = max(1, int(math.sqrt(image.shape[0] * image.shape[1] / samples_per_image)))
        pixels.append(image[::step, ::step].reshape(-1, image.shape[2]).astype(np.float32))
        for c in np.unique(mask).tolist():
            if 0 < c < cfg.data.num_classes:
                labels, _ = ndimage.label(mask == c)
                areas[c].extend(np.bincount(labels.ravel())[1:].tolist())

    cfg.data.cache = False
    report = checked_survey({"all": samples}, cfg.data, each=measure)
    fp.class_pixels = list(report.splits["all"]["pixels"].values())
    fp.ignored_pixels = report.splits["all"]["ignored"]
    stacked = np.concatenate(pixels)
    fp.percentiles = [[round(float(v), 2) for v in np.percentile(stacked[:, i], (0.5, 50, 99.5))] for i in range(channels)]
    fp.object_size = [None] + [float(np.median(a)) if a else None for a in areas[1:]]
    return fp


def planned_device(device: str) -> str:
    """cpu or cuda: `device`, or for auto whether torch sees a CUDA GPU."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _round32(value: float) -> int:
    return max(32, int(math.ceil(value / 32)) * 32)


def plan(fp: Fingerprint, device: str = "cpu", time_limit: float | None = None, out_dir: str | None = None) -> list[tuple[str, Any, str]]:
    """The planned config as (dotted key, value, reason) rows, in the order they are written."""
    d = DEVICES[device]
    rows: list[tuple[str, Any, str]] = []
    add = lambda key, value, why="": rows.append((key, value, why))  # noqa: E731
    found = "images/ and masks/" if fp.data["format"] == "folder" else f"a {fp.data['format']} export"
    for key, value in fp.data.items():
        if key != "classes":
            add(f"data.{key}", value, f"found {found}" if key == "format" else "")
    fractions = fp.class_fraction
    add("data.classes", fp.classes, fp.how_classes)
    add("data.in_channels", fp.channels, f"{fp.channels} channel(s) in every image, {fp.dtype}")
    if fp.val_folder:
        add("data.val_fraction", 0.2, f"unused: val/ holds {fp.val} images for validation")
    else:
        add("data.val_fraction", 0.2, f"{fp.images} images: {fp.val} held out for validation and the checkpoint choice")
    eight_bit = fp.dtype == "uint8"
    if eight_bit:
        add("data.normalize", {"mode": "fixed", "mean": [0.5] * fp.channels, "std": [0.25] * fp.channels},
            "8-bit: the dtype's range 0..255")  # fmt: skip
    else:
        lo = min(p[0] for p in fp.percentiles)
        hi = max(p[2] for p in fp.percentiles)
        add("data.normalize", {"mode": "percentile", "low": 1, "high": 99.8, "mean": [0.5] * fp.channels,
                               "std": [0.25] * fp.channels},
            f"{fp.dtype}: intensities fill {lo:g}..{hi:g} (0.5-99.5 percentile), not the dtype's range; each image's own percentiles")  # fmt: skip
    kind = "natural" if fp.channels == 3 else "em"
    add("data.kind", kind, "RGB: photographs (crops and flips)" if kind == "natural"
        else f"{fp.channels}-channel: microscopy/EM augmentation (flips, 90° turns)")  # fmt: skip
    h, w = fp.size("median")
    side = min(h, w)
    crop = min(d["crop"], _round32(side))
    objects = [math.sqrt(a) for a in fp.object_size[1:] if a]
    across = f", median object about {min(objects):.0f} px across" if objects else ""
    add("data.crop_size", crop, f"median image {w}x{h}{across}; at most {d['crop']} on {device}")
    batch = max(2, min(2 * d["batch"], round(d["batch"] * (d["crop"] / crop) ** 2)))
    add("train.batch_size", batch, f"{d['batch']} crops of {d['crop']}² on {device}, scaled to crops of {crop}²")
    value, why = foreground_crops(fp.classes, fractions)
    add("data.foreground_crops", value, why)
    add("data.augment", "default", f"the {kind} family (see data.kind)")
    add("model.arch", "unet", "")
    add("model.encoder", "resnet34", "")
    add("model.encoder_weights", None, "imagenet: smp's weights, downloaded once (the largest gain on small data)")
    add("train.loss", "dice_ce", "Dice + cross-entropy" + (": the Dice term keeps a rare class from vanishing" if value else ""))
    minutes = time_limit if time_limit is not None else d["minutes"]
    add("train.steps", d["steps"], f"{d['steps']} steps of {batch} crops: {d['steps'] * batch / max(fp.train, 1):.0f} "
        f"passes over the {fp.train} training images, if the time limit allows")  # fmt: skip
    add("train.time_limit_minutes", minutes, f"stop after {minutes:g} min on {device} if the steps take longer")
    add("train.device", device, "")
    edges = "mirror" if kind == "em" else "inside"
    add("output.edges", edges, "EM: U-Net's mirrored overlap-tile" if kind == "em" else "photographs: tiles inside the image")
    add("output.tile_size", max(crop, d["tile"]), f"prediction tiles on {device}")
    add("output.overlap", 0.25, "")
    add("output.dir", out_dir or str(Path("runs") / Path(fp.root).name), "")
    return rows


SECTIONS = ("data", "model", "train", "output")


def plan_yaml(fp: Fingerprint, rows: list[tuple[str, Any, str]]) -> str:
    """The config as YAML, each planned value with its reason as a comment."""
    h, w = fp.size("median")
    lines = [
        f"# Planned by `seg plan` from {fp.root}: {fp.images} images ({fp.train} train, {fp.val} val), median "
        f"{w}x{h}, {fp.channels} channel(s) {fp.dtype}.",
        "# Each value's comment gives the figure that chose it; edit any of them.",
    ]
    section = None
    for key, value, why in sorted(rows, key=lambda row: SECTIONS.index(row[0].split(".")[0])):
        top, name = key.split(".")
        if top != section:
            lines.append(f"{top}:")
            section = top
        text = yaml.safe_dump({name: value}, default_flow_style=True, width=10_000).strip()[1:-1]
        lines.append(f"  {text}" + (f"  # {why}" if why else ""))
    return "\n".join(lines) + "\n"

"""What the annotation formats share: the sample type, JSON reading, colour masks and the ignore label."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from seg.errors import DataError

IGNORE_LABEL = "__ignore__"  # labelme's and our CVAT label for pixels to leave out of the loss


@dataclass(frozen=True)
class Sample:
    """An image and its mask file, or the `target` that draws its mask from annotations."""

    name: str
    image: Path
    mask: Path | None = None
    target: Any = field(default=None, compare=False)  # draws the mask: draw(height, width, ignore_index)


def read_json(path: Path) -> Any:
    if not path.is_file():
        raise DataError(f"{path}: no such annotation file")
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: not valid JSON ({err})") from None


def annotation_path(data: dict[str, Any] | Any, root: Path, key: str = "annotations") -> Path:
    value = get_field(data, key)
    if value is None:
        raise DataError(f"data.{key}: format {get_field(data, 'format')} needs the annotation JSON (relative to data.root)")
    path = Path(value)
    return path if path.is_absolute() else root / path


def get_field(data, key: str):
    return data.get(key) if isinstance(data, dict) else getattr(data, key)


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


def check_size(size: tuple[int | None, int | None], height: int, width: int, where: str) -> None:
    if None not in size and tuple(size) != (height, width):
        raise DataError(f"{where}: the JSON says {size[1]}x{size[0]} but the image file is {width}x{height}")

"""CVAT's Segmentation mask 1.1 exports: labelmap.txt's colours, and zips unpacked beside themselves."""

from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from pathlib import Path

from seg.errors import DataError


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

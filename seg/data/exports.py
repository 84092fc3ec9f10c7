"""What an annotation tool's export says about itself, read when its data is first loaded: the classes
(when the config names none), CVAT's colours, and a CVAT zip unpacked beside itself."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError

from seg.config import DataConfig
from seg.data.coco import is_panoptic
from seg.data.common import IGNORE_LABEL, annotation_path, get_field, read_json
from seg.data.cvat import cvat_root, labelmap, unpack_zip
from seg.data.labelme import LABELME_BACKGROUND, labelme_files, shapes
from seg.errors import DataError

EXPORT_FORMATS = ("coco", "labelme", "cvat")


def resolve(data: DataConfig) -> DataConfig:
    """Fill `data` in place from its export (format coco, labelme or cvat; others are left alone): a CVAT
    zip unpacked and the root moved to the export's folder, `classes` read from the export when unset
    (`class_names`), and for CVAT the palette and ignore colour from labelmap.txt. Safe to call again."""
    if data.format not in EXPORT_FORMATS:
        return data
    root = data.root
    if data.format == "cvat":
        root = cvat_root(unpack_zip(root) if root.suffix == ".zip" and root.is_file() else root)
    if not root.is_dir():
        raise DataError(f"data.root: no such folder {root}")
    changes: dict[str, Any] = {"root": root}
    classes = data.classes if data.classes is not None else class_names(data, root)
    changes["classes"] = classes
    if data.format == "cvat":
        labels = labelmap(root)
        missing = [name for name in classes if name not in labels]
        if missing:
            raise DataError(f"{root / 'labelmap.txt'}: no colour for data.classes {missing}")
        changes["palette"] = [labels[name] for name in classes]
        if data.ignore_color is None and IGNORE_LABEL in labels:
            changes["ignore_color"] = labels[IGNORE_LABEL]
    try:
        DataConfig.model_validate({**data.model_dump(), **changes})
    except ValidationError as err:
        raise DataError(f"data: {err.errors()[0]['msg']}") from None
    for key, value in changes.items():
        if getattr(data, key) != value:
            setattr(data, key, value)
    return data


def class_names(data: DataConfig | dict[str, Any], root: Path) -> list[str]:
    """The classes of an export, for a config that leaves `classes` out.

    COCO instances: background, then the categories in the JSON's order; panoptic: the categories alone
    (unlabelled pixels are ignored). labelme: `labels.txt` in the root if there is one (labelme's own
    convention, `__ignore__` and `_background_` first), else background and every label found, sorted.
    CVAT: labelmap.txt's labels in its order."""
    fmt = get_field(data, "format")
    if fmt == "coco":
        doc = read_json(annotation_path(data, root))
        names = [str(c.get("name")) for c in doc.get("categories", [])]
        return names if is_panoptic(doc) else ["background", *names]
    if fmt == "labelme":
        labels = root / "labels.txt"
        if labels.is_file():
            found = [line.strip() for line in labels.read_text().splitlines() if line.strip()]
        else:
            found = sorted({str(s.get("label")) for path in labelme_files(data, root) for s in shapes(path)})
        names = [n for n in found if n not in (IGNORE_LABEL, LABELME_BACKGROUND, "background")]
        return ["background", *names]
    if fmt == "cvat":
        return [n for n in labelmap(root) if n != IGNORE_LABEL]
    return []

"""Training data as annotation tools export it: COCO (pycocotools), labelme JSON, CVAT's mask export and
colour masks, read through `seg data check` and `seg train` as a user runs them."""

from __future__ import annotations

import base64
import io
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import ISBI

pytest.importorskip("pycocotools")
from pycocotools import mask as coco_mask  # noqa: E402
from helpers import seg, seg_quick

HEIGHT, WIDTH = 96, 128
QUICK = {
    "model": {"arch": "unet", "encoder": "resnet18", "options": {"decoder_channels": [32, 16, 16, 8, 8]}},
    "train": {"epochs": 1, "steps_per_epoch": 2, "batch_size": 2, "threads": 2},
}


def slice_image(i: int, rgb: bool = True) -> np.ndarray:
    """A 96 x 128 crop of real ISBI slice i (as RGB, the way annotation tools hand out photographs)."""
    grey = np.asarray(Image.open(ISBI / "images" / f"{i:02d}.png"))[200 : 200 + HEIGHT, 100 : 100 + WIDTH]
    return np.repeat(grey[..., None], 3, axis=2) if rgb else grey


def write_config(path: Path, data: dict, out: Path | None = None, **sections) -> Path:
    cfg = {"data": {"crop_size": 64, "in_channels": 3, **data}, **QUICK, **sections}
    cfg["output"] = {"dir": str(out or path.parent / "run"), "tile_size": 64, "overlays": 0}
    path.write_text(yaml.safe_dump(cfg))
    return path


def check_json(config: Path) -> tuple[int, dict]:
    result = seg_quick("data", "check", config, "--json")
    return result.returncode, json.loads(result.stdout)


def rle(mask: np.ndarray) -> dict:
    """pycocotools' compressed RLE of a bool mask, as COCO JSON stores it."""
    encoded = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": encoded["size"], "counts": encoded["counts"].decode()}


# ---- COCO -------------------------------------------------------------------------------------------


def coco_export(root: Path, count: int = 4) -> tuple[Path, list[np.ndarray]]:
    """COCO instances: per image a polygon 'cell', an RLE 'cell' inside a larger RLE 'vesicle' (overlap),
    an uncompressed-RLE 'vesicle' and a crowd region. Returns the JSON and the masks seg must draw."""
    (root / "images").mkdir(parents=True)
    images, annotations, expected = [], [], []
    ann_id = 1
    for i in range(count):
        Image.fromarray(slice_image(i)).save(root / "images" / f"slice{i}.jpg", quality=95)
        images.append({"id": 100 + i, "file_name": f"slice{i}.jpg", "height": HEIGHT, "width": WIDTH})
        truth = np.zeros((HEIGHT, WIDTH), np.int64)
        big = np.zeros((HEIGHT, WIDTH), bool)
        big[10:60, 60 + i : 120] = True
        small = np.zeros((HEIGHT, WIDTH), bool)
        small[20:40, 70:90] = True
        strip = np.zeros((HEIGHT, WIDTH), bool)
        strip[80:90, 5:50] = True
        crowd = np.zeros((HEIGHT, WIDTH), bool)
        crowd[62:78, 70:110] = True
        polygon = [5.0, 5.0, 40.0, 5.0, 40.0, 30.0, 5.0, 30.0]
        poly_mask = coco_mask.decode(coco_mask.frPyObjects([polygon], HEIGHT, WIDTH)).max(axis=2).astype(bool)
        truth[crowd] = 255
        truth[big] = 2
        truth[small] = 1  # the smaller instance wins where two overlap
        truth[poly_mask] = 1
        truth[strip] = 2
        counts = rle(strip)  # the same strip as an uncompressed RLE: counts as a list
        flat = strip.ravel(order="F")
        starts = np.flatnonzero(np.concatenate(([True], flat[1:] != flat[:-1])))
        runs = np.diff(np.append(starts, flat.size)).tolist()
        counts = {"size": counts["size"], "counts": ([0] if flat[0] else []) + runs}
        for segmentation, category, crowd_flag in (
            ([polygon], 1, 0), (rle(small), 1, 0), (rle(big), 2, 0), (counts, 2, 0), (rle(crowd), 1, 1),
        ):  # fmt: skip
            annotations.append({"id": ann_id, "image_id": 100 + i, "category_id": category, "iscrowd": crowd_flag,
                                "segmentation": segmentation, "area": 0, "bbox": [0, 0, 1, 1]})  # fmt: skip
            ann_id += 1
        expected.append(truth)
    doc = {"images": images, "annotations": annotations,
           "categories": [{"id": 1, "name": "cell"}, {"id": 2, "name": "vesicle"}]}  # fmt: skip
    path = root / "annotations.json"
    path.write_text(json.dumps(doc))
    return path, expected


def pixel_counts(masks: list[np.ndarray], classes: list[str]) -> tuple[dict, int]:
    pixels = {name: int(sum((m == i).sum() for m in masks)) for i, name in enumerate(classes)}
    return pixels, int(sum((m == 255).sum() for m in masks))


def test_coco_instances_are_drawn_as_documented_and_train(tmp_path):
    """Classes come from the categories after background; crowd is ignored; the smaller of two
    overlapping instances wins; the report's pixel counts equal the masks pycocotools decodes."""
    path, expected = coco_export(tmp_path / "coco")
    config = write_config(tmp_path / "coco.yaml", {"format": "coco", "root": "coco", "annotations": "annotations.json",
                                                    "val_fraction": 0.25})  # fmt: skip
    code, report = check_json(config)
    assert code == 0 and report["problems"] == []
    splits = report["splits"]
    assert (splits["train"]["images"], splits["val"]["images"]) == (3, 1)
    both = {n: splits["train"]["pixels"][n] + splits["val"]["pixels"][n] for n in splits["train"]["pixels"]}
    pixels, ignored = pixel_counts(expected, ["background", "cell", "vesicle"])
    assert both == pixels
    assert splits["train"]["ignored"] + splits["val"]["ignored"] == ignored > 0
    assert splits["train"]["sizes"] == {f"{WIDTH}x{HEIGHT}": 3}

    from seg.config import load_config
    from seg.data.samples import find_samples, load_pair

    cfg = load_config(config)
    train, val = find_samples(cfg.data)
    for sample in train + val:
        _, mask = load_pair(sample, cfg.data)
        np.testing.assert_array_equal(mask, expected[int(sample.name[-1])])

    result = seg("train", config)
    assert result.returncode == 0, result.stderr
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["data"]["classes"] == ["background", "cell", "vesicle"]  # the run records what it used
    assert "val_iou_vesicle" in (tmp_path / "run" / "metrics.csv").read_text()


def test_coco_train_and_val_jsons_and_named_classes(tmp_path):
    """Two JSONs give the splits; data.classes maps categories by name, in the config's order."""
    train_json, _ = coco_export(tmp_path / "train", 3)
    val_json, expected = coco_export(tmp_path / "val", 2)
    config = write_config(tmp_path / "c.yaml", {
        "format": "coco", "root": str(tmp_path), "annotations": "train/annotations.json", "images": "train/images",
        "val_annotations": "val/annotations.json", "val_images": "val/images", "classes": ["bg", "vesicle", "cell"],
    })  # fmt: skip
    code, report = check_json(config)
    assert code == 0, report
    assert (report["splits"]["train"]["images"], report["splits"]["val"]["images"]) == (3, 2)
    swapped = [np.where(m == 1, 2, np.where(m == 2, 1, m)) for m in expected]
    assert (report["splits"]["val"]["pixels"], report["splits"]["val"]["ignored"]) == pixel_counts(
        swapped, ["bg", "vesicle", "cell"]
    )


def test_coco_panoptic(tmp_path):
    """Segment PNGs (id = R + 256 G + 256^2 B) by segments_info; id 0 and crowd segments are ignored."""
    root = tmp_path / "pan"
    (root / "images").mkdir(parents=True)
    (root / "panoptic").mkdir()
    images, annotations, expected = [], [], []
    for i in range(3):
        Image.fromarray(slice_image(i)).save(root / "images" / f"s{i}.png")
        ids = np.zeros((HEIGHT, WIDTH), np.int64)
        ids[:, :50] = 1000 + i  # stuff: 'wall'
        ids[10:40, 60:100] = 70000  # thing: 'cell' (an id past 65535 uses the blue byte)
        ids[50:70, 60:100] = 5  # crowd
        png = np.stack([ids % 256, ids // 256 % 256, ids // 65536], axis=-1).astype(np.uint8)
        Image.fromarray(png).save(root / "panoptic" / f"s{i}.png")
        truth = np.full((HEIGHT, WIDTH), 255, np.int64)
        truth[:, :50], truth[10:40, 60:100] = 0, 1
        expected.append(truth)
        images.append({"id": i, "file_name": f"s{i}.png", "height": HEIGHT, "width": WIDTH})
        annotations.append({"image_id": i, "file_name": f"s{i}.png", "segments_info": [
            {"id": 1000 + i, "category_id": 8, "iscrowd": 0}, {"id": 70000, "category_id": 3, "iscrowd": 0},
            {"id": 5, "category_id": 3, "iscrowd": 1}]})  # fmt: skip
    doc = {"images": images, "annotations": annotations,
           "categories": [{"id": 8, "name": "wall", "isthing": 0}, {"id": 3, "name": "cell", "isthing": 1}]}  # fmt: skip
    (root / "panoptic.json").write_text(json.dumps(doc))
    config = write_config(tmp_path / "p.yaml", {"format": "coco", "root": str(root), "annotations": "panoptic.json",
                                                 "masks": "panoptic", "val_fraction": 0.0})  # fmt: skip
    code, report = check_json(config)
    assert code == 0, report
    assert (report["splits"]["train"]["pixels"], report["splits"]["train"]["ignored"]) == pixel_counts(
        expected, ["wall", "cell"]
    )


def edit_coco(path: Path, change) -> None:
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc))


@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda d: d["annotations"][0].update(segmentation=[[1.0, 1.0, 9.0, 9.0]]), "annotation 1 (image slice0.jpg): a polygon needs 3 or more"),
        (lambda d: d["annotations"][1]["segmentation"].update(size=[50, 50]), "annotation 2 (image slice0.jpg): RLE size 50x50"),
        (lambda d: d["categories"].append({"id": 9, "name": "axon"}) or d["annotations"][2].update(category_id=9),
         "annotation 3 (image slice0.jpg): category 9 ('axon') is not in data.classes"),
        (lambda d: d["images"][1].update(file_name="gone.jpg"), "gone.jpg: no such file"),
    ],
    ids=["two-point-polygon", "rle-size", "unknown-category", "missing-image"],
)
def test_bad_coco_annotations_name_the_file_and_annotation(tmp_path, breakage, message):
    path, _ = coco_export(tmp_path / "coco", 2)
    edit_coco(path, breakage)
    config = write_config(tmp_path / "c.yaml", {"format": "coco", "root": "coco", "annotations": "annotations.json",
                                                 "classes": ["background", "cell", "vesicle"]})  # fmt: skip
    code, report = check_json(config)
    assert code == 1 and len(report["problems"]) == 1
    assert str(path) in report["problems"][0] and message in report["problems"][0]
    result = seg_quick("train", config)  # the same check stops training before any step, in one line
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2 and last.startswith("error: ") and message in last
    assert "Traceback" not in result.stderr


# ---- labelme ------------------------------------------------------------------------------------------


def labelme_doc(i: int, shapes: list[dict], embed: bool = False) -> dict:
    buffer = io.BytesIO()
    Image.fromarray(slice_image(i)).save(buffer, format="PNG")
    return {"version": "5.5.0", "flags": {}, "shapes": shapes, "imagePath": f"slice{i}.png",
            "imageData": base64.b64encode(buffer.getvalue()).decode() if embed else None,
            "imageHeight": HEIGHT, "imageWidth": WIDTH}  # fmt: skip


def shape(label: str, kind: str, points: list) -> dict:
    return {"label": label, "points": points, "group_id": None, "description": "", "shape_type": kind, "flags": {}}


def labelme_export(root: Path, count: int = 4) -> Path:
    """labelme files: images beside the JSON, the last one embedded as imageData only."""
    root.mkdir(parents=True)
    for i in range(count):
        shapes = [
            shape("cell", "polygon", [[10, 10], [50, 10], [30, 40]]),
            shape("vesicle", "rectangle", [[60, 50], [70 + i, 60]]),
            shape("vesicle", "circle", [[100, 30], [100, 40]]),
            shape("cell", "line", [[5, 80], [60, 80]]),
            shape("vesicle", "point", [[110, 80]]),
            shape("__ignore__", "rectangle", [[0, 0], [3, 3]]),
            shape("cell", "rectangle", [[64, 54], [66, 56]]),  # drawn later: on top of the vesicle
        ]
        embed = i == count - 1
        if not embed:
            Image.fromarray(slice_image(i)).save(root / f"slice{i}.png")
        (root / f"slice{i}.json").write_text(json.dumps(labelme_doc(i, shapes, embed)))
    return root


def test_labelme_shapes_rasterise_as_labelme_draws_them(tmp_path):
    from seg.data.labelme import labelme_shape

    rect = labelme_shape(shape("a", "rectangle", [[70, 60], [60, 50]]), HEIGHT, WIDTH)
    assert rect.sum() == 11 * 11 and rect[50, 60] and rect[60, 70]  # corners included, in any order
    circle = labelme_shape(shape("a", "circle", [[64, 48], [64, 58]]), HEIGHT, WIDTH)
    assert abs(int(circle.sum()) - np.pi * 10.5**2) < 0.05 * np.pi * 10.5**2  # Pillow's box includes its edges
    line = labelme_shape(shape("a", "line", [[10, 20], [90, 20]]), HEIGHT, WIDTH)
    assert line[:, 50].sum() in (10, 11) and line[20, 10:91].all()  # 10 px wide, as labelme's default
    point = labelme_shape(shape("a", "point", [[30, 30]]), HEIGHT, WIDTH)
    assert point[30, 30] and point[25:36, 30].sum() == 11 and not point[30, 37]
    tri = labelme_shape(shape("a", "polygon", [[10, 10], [50, 10], [30, 40]]), HEIGHT, WIDTH)
    assert abs(int(tri.sum()) - 0.5 * 40 * 30) < 60


def test_labelme_folder_trains_with_embedded_images_and_ignore(tmp_path):
    labelme_export(tmp_path / "lm")
    config = write_config(tmp_path / "lm.yaml", {"format": "labelme", "root": "lm", "val_fraction": 0.25})
    code, report = check_json(config)
    assert code == 0, report
    train = report["splits"]["train"]
    assert list(train["pixels"]) == ["background", "cell", "vesicle"]  # sorted labels after background
    assert train["ignored"] + report["splits"]["val"]["ignored"] == 4 * 16  # the 4x4 __ignore__ box
    from seg.config import load_config
    from seg.data.samples import find_samples, load_pair

    cfg = load_config(config)
    train_s, val_s = find_samples(cfg.data)
    by_name = {s.name: s for s in train_s + val_s}
    image, mask = load_pair(by_name["slice3"], cfg.data)  # embedded as imageData only
    np.testing.assert_array_equal(image, slice_image(3))
    assert mask[55, 65] == 1 and mask[52, 62] == 2 and mask[1, 1] == 255 and mask[80, 30] == 1
    result = seg("train", config)
    assert result.returncode == 0, result.stderr


def test_labelme_labels_txt_and_bad_shapes(tmp_path):
    root = labelme_export(tmp_path / "lm", 2)
    (root / "labels.txt").write_text("__ignore__\n_background_\nvesicle\ncell\n")  # labelme's own file
    config = write_config(tmp_path / "lm.yaml", {"format": "labelme", "root": "lm", "val_fraction": 0.0})
    code, report = check_json(config)
    assert code == 0 and list(report["splits"]["train"]["pixels"]) == ["background", "vesicle", "cell"]
    doc = json.loads((root / "slice1.json").read_text())
    doc["shapes"][0]["points"] = [[1, 1], [5, 5]]
    doc["shapes"][2]["label"] = "axon"
    (root / "slice1.json").write_text(json.dumps(doc))
    (root / "slice0.png").unlink()
    code, report = check_json(config)
    assert code == 1 and report["problems"] == [
        f"{root / 'slice0.json'}: {root / 'slice0.png'}: no such file",
        f"{root / 'slice1.json'}: shape 0 (label 'cell'): a polygon needs 3 or more points, this one has 2",
    ]
    doc["shapes"][0]["points"] = [[1, 1], [5, 5], [1, 5]]
    (root / "slice1.json").write_text(json.dumps(doc))
    code, report = check_json(config)
    assert report["problems"][1] == f"{root / 'slice1.json'}: shape 2 (label 'axon'): label is not in data.classes"


# ---- CVAT and colour masks ----------------------------------------------------------------------------

LABELMAP = {"background": (0, 0, 0), "cell": (250, 50, 83), "vesicle": (61, 245, 61), "__ignore__": (255, 255, 255)}


def colour_masks(count: int) -> list[np.ndarray]:
    out = []
    for i in range(count):
        index = np.zeros((HEIGHT, WIDTH), np.int64)
        index[10:50, 10 + i : 60] = 1
        index[60:90, 70:120] = 2
        index[0:5, 0:5] = 255
        out.append(index)
    return out


def paint(index: np.ndarray, colours: dict) -> np.ndarray:
    rgb = np.zeros((*index.shape, 3), np.uint8)
    for value, colour in colours.items():
        rgb[index == value] = colour
    return rgb


def cvat_export(root: Path, count: int = 5) -> list[np.ndarray]:
    """CVAT's Segmentation mask 1.1 layout, with images and train/val lists."""
    for sub in ("JPEGImages", "SegmentationClass", "SegmentationObject", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True)
    (root / "labelmap.txt").write_text(
        "# label:color_rgb:parts:actions\n" + "".join(f"{n}:{','.join(map(str, c))}::\n" for n, c in LABELMAP.items())
    )
    masks = colour_masks(count)
    colours = {0: LABELMAP["background"], 1: LABELMAP["cell"], 2: LABELMAP["vesicle"], 255: LABELMAP["__ignore__"]}
    for i, index in enumerate(masks):
        Image.fromarray(slice_image(i)).save(root / "JPEGImages" / f"frame_{i:06d}.jpg", quality=95)
        Image.fromarray(paint(index, colours)).save(root / "SegmentationClass" / f"frame_{i:06d}.png")
    lists = root / "ImageSets" / "Segmentation"
    (lists / "train.txt").write_text("".join(f"frame_{i:06d}\n" for i in range(count - 1)))
    (lists / "val.txt").write_text(f"frame_{count - 1:06d}\n")
    return masks


@pytest.mark.parametrize("packed", [False, True], ids=["folder", "zip"])
def test_cvat_mask_export_trains(tmp_path, packed):
    masks = cvat_export(tmp_path / "task")
    root = "task"
    if packed:
        with zipfile.ZipFile(tmp_path / "task.zip", "w") as archive:
            for file in sorted((tmp_path / "task").rglob("*")):
                archive.write(file, file.relative_to(tmp_path / "task"))
        shutil.rmtree(tmp_path / "task")
        root = "task.zip"
    config = write_config(tmp_path / "cvat.yaml", {"format": "cvat", "root": root})
    code, report = check_json(config)
    assert code == 0, report
    assert (report["splits"]["train"]["images"], report["splits"]["val"]["images"]) == (4, 1)
    pixels, ignored = pixel_counts(masks[:4], ["background", "cell", "vesicle"])
    assert (report["splits"]["train"]["pixels"], report["splits"]["train"]["ignored"]) == (pixels, ignored)
    if packed:
        assert (tmp_path / "task.unpacked" / "labelmap.txt").is_file()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".task")]  # no half-unpacked folder
        return
    result = seg("train", config)
    assert result.returncode == 0, result.stderr
    assert "val_iou_cell" in (tmp_path / "run" / "metrics.csv").read_text()


def test_colour_masks_by_palette_and_an_unknown_colour(tmp_path):
    root = tmp_path / "rgb"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    masks = colour_masks(4)
    palette = [[0, 0, 0], [200, 0, 0], [0, 0, 200]]
    for i, index in enumerate(masks):
        Image.fromarray(slice_image(i)).save(root / "images" / f"s{i}.png")
        rgb = paint(index, {0: palette[0], 1: palette[1], 2: palette[2], 255: (224, 224, 192)})
        Image.fromarray(rgb).save(root / "masks" / f"s{i}.png")
    config = write_config(tmp_path / "rgb.yaml", {
        "root": "rgb", "classes": ["background", "cell", "vesicle"], "palette": palette, "mask_mode": "color",
        "ignore_color": [224, 224, 192], "val_fraction": 0.0,
    })  # fmt: skip
    code, report = check_json(config)
    assert code == 0, report
    assert (report["splits"]["train"]["pixels"], report["splits"]["train"]["ignored"]) == pixel_counts(
        masks, ["background", "cell", "vesicle"]
    )
    bad = np.asarray(Image.open(root / "masks" / "s2.png")).copy()
    bad[70, 33] = (10, 20, 30)
    Image.fromarray(bad).save(root / "masks" / "s2.png")
    code, report = check_json(config)
    assert code == 1 and report["problems"] == [
        f"{root / 'masks' / 's2.png'}: colour [10, 20, 30] at pixel (x=33, y=70) is not in the palette (data.palette)"
    ]
    human = seg_quick("data", "check", config)
    assert human.returncode == 1 and "colour [10, 20, 30]" in human.stderr and human.stderr.strip().endswith("1 problem")


def test_data_check_reports_a_config_error_in_one_line(tmp_path):
    config = write_config(tmp_path / "c.yaml", {"format": "coco", "root": "."})
    result = seg_quick("data", "check", config)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"error: {config}: data: format coco needs annotations: the COCO JSON, relative to root"
    )


@pytest.mark.parametrize("name", ["coco", "labelme", "cvat"])
def test_shipped_configs_read_an_export(tmp_path, name):
    from seg.config import load_config
    from seg.data.samples import find_samples

    root = tmp_path / name
    overrides = [f"data.root={root}"]
    if name == "coco":
        coco_export(root)
        overrides += ["data.annotations=annotations.json", "data.images=images"]
    elif name == "labelme":
        labelme_export(root)
    else:
        cvat_export(root)
    cfg = load_config(Path(__file__).parents[1] / "configs" / f"{name}.yaml", overrides)
    assert cfg.data.classes is None  # the config alone reads no data; the export names its classes when read
    train, val = find_samples(cfg.data)
    assert cfg.data.classes == ["background", "cell", "vesicle"]
    assert len(train) + len(val) == (5 if name == "cvat" else 4) and val

"""`seg plan` and `seg train DATA_DIR`: a config planned from the data's fingerprint, through the CLI.

Three sets cut from the real ISBI slices: 8-bit grey EM with its membrane masks; the same as 16-bit TIFF
in a narrow intensity band, as microscopy cameras write; and an RGB version whose masks mark small rare
objects (blobs around cell centres, under 10% of the pixels)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import yaml
from PIL import Image
from scipy import ndimage
from typer.testing import CliRunner

from seg.cli import app

ROOT = Path(__file__).resolve().parents[1]

from conftest import ISBI

runner = CliRunner()


def isbi_crops(count: int = 6, size: int = 96):
    for i in range(count):
        image = np.asarray(Image.open(ISBI / "images" / f"{i:02d}.png"))[100 : 100 + size, 60 : 60 + size]
        label = np.asarray(Image.open(ISBI / "labels" / f"{i:02d}.png"))[100 : 100 + size, 60 : 60 + size]
        yield i, image, label


def write_set(root, kind: str):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i, image, label in isbi_crops():
        if kind == "em":
            Image.fromarray(image).save(root / "images" / f"s{i}.png")
            Image.fromarray(label).save(root / "masks" / f"s{i}.png")
        elif kind == "uint16":
            tifffile.imwrite(root / "images" / f"s{i}.tif", (image.astype(np.uint16) * 4 + 900))
            Image.fromarray(label).save(root / "masks" / f"s{i}.png")
        else:  # RGB, with small objects: a disk of radius 4 at each cell's deepest point
            rgb = np.stack([image, (image * 0.8).astype(np.uint8), (image * 0.6).astype(np.uint8)], -1)
            Image.fromarray(rgb).save(root / "images" / f"s{i}.jpg", quality=95)
            depth = ndimage.distance_transform_edt(label > 0)
            cells, count = ndimage.label(label > 0)
            centres = ndimage.maximum_position(depth, cells, range(1, count + 1))
            rows, cols = np.ogrid[: label.shape[0], : label.shape[1]]
            mask = np.zeros(label.shape, np.uint8)
            for r, c in centres:
                mask[(rows - r) ** 2 + (cols - c) ** 2 <= 16] = 255
            Image.fromarray(mask).save(root / "masks" / f"s{i}.png")
    return root


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    base = tmp_path_factory.mktemp("plan")
    return {kind: write_set(base / kind, kind) for kind in ("em", "uint16", "rgb")}


def planned(data, tmp_path, *extra) -> dict:
    out = tmp_path / f"{data.name}.yaml"
    result = runner.invoke(app, ["plan", str(data), "--out", str(out), "--device", "cpu", *extra])
    assert result.exit_code == 0, result.output
    text = out.read_text()
    for line in text.splitlines():  # every planned value but paths and names carries its reason
        key = line.strip().split(":")[0]
        if line.startswith("  ") and key not in ("root", "arch", "encoder", "device", "dir", "overlap"):
            assert "  # " in line, line
    return yaml.safe_load(text)


def test_plans_differ_where_the_data_does(sets, tmp_path):
    em, u16, rgb = (planned(sets[k], tmp_path) for k in ("em", "uint16", "rgb"))
    # 8-bit keeps the dtype's range; the 16-bit set fills 900..1920 of 0..65535: its own percentiles.
    assert em["data"]["normalize"]["mode"] == "fixed" and rgb["data"]["normalize"]["mode"] == "fixed"
    assert u16["data"]["normalize"]["mode"] == "percentile"
    assert [p["data"]["in_channels"] for p in (em, u16, rgb)] == [1, 1, 3]
    assert [p["data"]["kind"] for p in (em, u16, rgb)] == ["em", "em", "natural"]
    assert [p["output"]["edges"] for p in (em, u16, rgb)] == ["mirror", "mirror", "inside"]
    # Cell interiors are 78% of the EM masks; the RGB set's objects are rare: a third of crops on them.
    assert em["data"]["foreground_crops"] == 0 and rgb["data"]["foreground_crops"] == pytest.approx(0.33)
    # 96x96 images: 96 crops (a multiple of 32), the batch scaled up from 8 at 256 and capped at 16.
    assert em["data"]["crop_size"] == 96 and em["train"]["batch_size"] == 16
    assert em["data"]["val_fraction"] == 0.2 and "6 images: 1 held out" in (tmp_path / "em.yaml").read_text()
    assert em["train"]["steps"] == 2000 and em["train"]["time_limit_minutes"] == 30
    assert planned(sets["em"], tmp_path, "--time-limit", "7")["train"]["time_limit_minutes"] == 7


def test_plan_prints_the_fingerprint(sets):
    result = runner.invoke(app, ["plan", str(sets["uint16"]), "--json", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    fp = yaml.safe_load(result.stdout)
    assert fp["images"] == 6 and fp["channels"] == 1 and fp["dtype"] == "uint16"
    labels = np.concatenate([label.ravel() for _, _, label in isbi_crops()])
    assert fp["class_fraction"][1] == pytest.approx((labels == 255).mean(), abs=1e-4)
    images = np.concatenate([image.ravel() for _, image, _ in isbi_crops()]).astype(np.float64) * 4 + 900
    assert fp["percentiles_0.5_50_99.5"][0][2] == pytest.approx(np.percentile(images, 99.5), rel=0.02)


@pytest.mark.parametrize("kind", ["em", "uint16", "rgb"])
def test_seg_train_on_a_data_folder_plans_and_trains(sets, tmp_path, kind):
    run = tmp_path / "run"
    result = runner.invoke(app, ["train", str(sets[kind]), "--set", "train.steps=2", "--set", f"output.dir={run}",
                                 "--set", "model.encoder=resnet18", "--set", "output.overlays=0"])
    assert result.exit_code == 0, result.output
    plan = yaml.safe_load((run / "plan.yaml").read_text())
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["data"]["normalize"]["mode"] == plan["data"]["normalize"]["mode"]
    assert resolved["train"]["steps"] == 2 and resolved["model"]["encoder"] == "resnet18"
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"] == 2
    again = runner.invoke(app, ["train", str(sets[kind]), "--set", f"output.dir={run}"])
    assert again.exit_code == 2 and "already holds a run" in again.stderr


def test_a_folder_without_masks_is_one_line(tmp_path):
    (tmp_path / "images").mkdir()
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "images" / "a.png")
    result = runner.invoke(app, ["plan", str(tmp_path)])
    assert result.exit_code == 2
    assert result.stderr.strip().count("\n") == 0
    assert "found neither images/ and masks/" in result.stderr


def test_foreground_crops_hold_foreground_at_their_share(sets):
    """data.foreground_crops f: a share f of the training crops is drawn around foreground, the rest
    uniformly, so crops with foreground rise from p to f + (1 - f) p."""
    from seg.config import DataConfig
    from seg.data.samples import find_samples
    from training.data import SegmentationDataset, build_augmentation

    def share(f: float) -> float:
        data = DataConfig(root=sets["rgb"], classes=["background", "centre"], in_channels=3, crop_size=16,
                          val_fraction=0, foreground_crops=f, augment="none")  # fmt: skip
        train, _ = find_samples(data)
        dataset = SegmentationDataset(train, data, build_augmentation(data, seed=3))
        return np.mean([bool(dataset[i % len(dataset)][1].any()) for i in range(600)])

    uniform, planned = share(0.0), share(0.33)
    assert 0.1 < uniform < 0.7
    assert planned == pytest.approx(0.33 + 0.67 * uniform, abs=0.06)
    assert share(1.0) == 1.0


@pytest.mark.parametrize("kind, channels, expected", [("rgb", 3, 0.33), ("em", 1, 0.0)])
def test_the_templates_auto_foreground_crops_is_the_plans(sets, tmp_path, kind, channels, expected):
    """configs/custom_folder.yaml says foreground_crops: auto; training decides it from the training masks
    by the rule `seg plan` uses, and the run's config.yaml records the number."""
    run = tmp_path / "run"
    overrides = [f"data.root={sets[kind]}", f"data.in_channels={channels}", "data.crop_size=32", "train.steps=1",
                 "train.time_limit_minutes=null", "model.encoder=resnet18", f"output.dir={run}", "output.overlays=0"]
    result = runner.invoke(app, ["train", str(ROOT / "configs" / "custom_folder.yaml"),
                                 *(a for o in overrides for a in ("--set", o))])
    assert result.exit_code == 0, result.output
    assert f"data.foreground_crops auto: {expected:g}" in result.stderr
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["foreground_crops"] == pytest.approx(expected)


@pytest.mark.parametrize("image_name, mask_name", [
    ("{i}_training.png", "{i}_manual1.png"),  # DRIVE: both named with a suffix of their own
    ("ISIC_{i:07d}.jpg", "ISIC_{i:07d}_segmentation.png"),  # ISIC: the mask is the image's name plus a suffix
])  # fmt: skip
def test_masks_named_with_a_shared_suffix_pair_with_their_images(tmp_path, image_name, mask_name):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for i, image, label in isbi_crops(count=4, size=128):
        side = 64 + 16 * i  # a wrong pairing would be a size mismatch
        Image.fromarray(image[:side, :side]).convert("RGB").save(tmp_path / "images" / image_name.format(i=i + 21))
        Image.fromarray(label[:side, :side]).save(tmp_path / "masks" / mask_name.format(i=i + 21))
    out = tmp_path / "plan.yaml"
    result = runner.invoke(app, ["plan", str(tmp_path), "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    check = runner.invoke(app, ["data", "check", str(out), "--json"])
    assert check.exit_code == 0, check.output
    report = json.loads(check.stdout)
    assert report["problems"] == []
    assert sum(split["images"] for split in report["splits"].values()) == 4

    (tmp_path / "masks" / mask_name.format(i=22)).unlink()  # one image without its mask
    result = runner.invoke(app, ["plan", str(tmp_path), "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 2
    assert f"{image_name.format(i=22)}: no mask with stem" in result.stderr

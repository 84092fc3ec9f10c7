"""The shipped configs, and training on the data kinds they stand for: VOC trees and 16-bit TIFF stacks."""

from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image
from typer.testing import CliRunner

from seg.cli import app
from seg.config import VOC_CLASSES, load_config
from seg.data.samples import find_samples, load_pair
from seg.inference.preprocess import normalize
from training.data import SegmentationDataset, build_augmentation

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["train.epochs=1", "train.steps_per_epoch=1", "train.batch_size=2", "train.threads=2", "output.overlays=1"]


def run_seg(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.stderr or result.stdout
    return result


def sets(*items):
    return [arg for item in items for arg in ("--set", item)]


def make_voc(root: Path, n: int = 4) -> Path:
    """A VOC2012-shaped tree: JPEG images, palette PNG masks with 255 borders, split lists."""
    voc = root / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    palette = Image.new("P", (1, 1))
    palette.putpalette([v for i in range(256) for v in ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256)])
    ids = []
    for i in range(n):
        h, w = 75 + 10 * i, 100
        image = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        mask = np.zeros((h, w), np.uint8)
        cls = 1 + i * 5
        mask[20:50, 30:70] = cls
        image[20:50, 30:70] = (cls * 12) % 255
        mask[19, 29:71] = 255  # object boundary: ignored
        name = f"2007_{i:06d}"
        Image.fromarray(image).save(voc / "JPEGImages" / f"{name}.jpg", quality=90)
        m = Image.fromarray(mask, mode="L").convert("P")
        m.putpalette(palette.getpalette())
        m.save(voc / "SegmentationClass" / f"{name}.png")
        ids.append(name)
    (voc / "ImageSets/Segmentation/train.txt").write_text("\n".join(ids[:3]) + "\n")
    (voc / "ImageSets/Segmentation/val.txt").write_text(ids[3] + "\n")
    return root


@pytest.mark.parametrize("name", ["unet_isbi2012", "refinenet_voc", "refinenet_lw_voc", "custom_folder"])
def test_shipped_configs_validate(name, tmp_path):
    overrides = [] if name == "unet_isbi2012" else [f"data.root={make_voc(tmp_path) if 'voc' in name else tmp_path}"]
    cfg = load_config(ROOT / "configs" / f"{name}.yaml", overrides)
    assert cfg.data.num_classes == (21 if "voc" in name else 2)
    if name == "unet_isbi2012":
        train, val = find_samples(cfg.data)
        assert (len(train), len(val)) == (20, 5)


def test_em_default_augmentation_only_turns_and_flips_and_strong_also_warps():
    """On whole 512² ISBI slices (the crop is the slice), every `default` mask (the bundled model's recipe)
    is one of the slice's 8 turns and flips; `strong` also warps them."""
    config = ROOT / "configs" / "unet_isbi2012.yaml"

    def masks(augment: str, draws: int = 12):
        cfg = load_config(config, ["data.crop_size=512", f"data.augment={augment}"])
        train, _ = find_samples(cfg.data)
        ds = SegmentationDataset(train[:1], cfg.data, build_augmentation(cfg.data, seed=5))
        return ds.load(0)[1], [ds[0][1].numpy() for _ in range(draws)]

    assert load_config(config).data.augment == "default"
    for augment, warped in (("default", False), ("strong", True)):
        mask, drawn = masks(augment)
        turns = [np.rot90(m, k) for m in (mask, mask.T) for k in range(4)]
        plain = [any(np.array_equal(d, t) for t in turns) for d in drawn]
        assert (not all(plain)) if warped else all(plain), augment


def test_voc_tree_trains_with_ignore_index(tmp_path):
    make_voc(tmp_path)
    cfg = load_config(ROOT / "configs" / "refinenet_lw_voc.yaml", [f"data.root={tmp_path}", "data.crop_size=64"])
    assert cfg.data.classes == VOC_CLASSES
    train, val = find_samples(cfg.data)
    assert [s.name for s in val] == ["2007_000003"]
    ds = SegmentationDataset(train, cfg.data, build_augmentation(cfg.data))
    x, y = ds[0]
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32
    assert set(torch.unique(y).tolist()) <= {0, 1, 255}  # palette indices, not colours; padding ignored

    run_seg("train", ROOT / "configs" / "refinenet_lw_voc.yaml",
            *sets(f"data.root={tmp_path}", f"output.dir={tmp_path / 'run'}", "model.encoder=resnet18",
                  "data.crop_size=64", "train.num_workers=0", *QUICK))
    metrics = (tmp_path / "run" / "metrics.csv").read_text()
    assert "val_iou_person" in metrics  # per-class metrics carry the VOC names


def test_16bit_multichannel_tiff_with_percentile_normalisation(tmp_path):
    root = tmp_path / "tiffs"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(1)
    for i in range(4):
        mask = np.zeros((80, 96), np.uint8)
        mask[10 + i : 40 + i, 20:60] = 1
        image = rng.normal(1000, 50, (2, 80, 96))  # two channels, channel-first as microscopes write them
        image[:, mask == 1] += 3000
        tifffile.imwrite(root / "images" / f"cell{i}.tif", image.clip(0, 65535).astype(np.uint16), imagej=True,
                         metadata={"axes": "CYX"})  # fmt: skip
        tifffile.imwrite(root / "masks" / f"cell{i}.tif", mask)
    cfg_path = ROOT / "configs" / "custom_folder.yaml"
    overrides = [f"data.root={root}", "data.in_channels=2", "data.normalize.mean=[0.5,0.5]",
                 "data.normalize.std=[0.25,0.25]", "data.crop_size=64", "model.encoder=resnet18",
                 f"output.dir={tmp_path / 'run'}", "train.num_workers=0", *QUICK]
    cfg = load_config(cfg_path, overrides)
    train, _ = find_samples(cfg.data)
    x, y = SegmentationDataset(train, cfg.data)[0]
    assert x.shape == (2, 80, 96)
    assert -2.1 <= float(x.min()) and float(x.max()) <= 2.1  # percentiles mapped to 0..1, then mean/std
    assert set(torch.unique(y).tolist()) == {0, 1}
    image, _ = load_pair(train[0], cfg.data)  # training's input is the predictor's, bit for bit
    np.testing.assert_array_equal(x.numpy(), normalize(image, cfg.data.normalize))
    run_seg("train", cfg_path, *sets(*overrides))
    assert (tmp_path / "run" / "checkpoints" / "best.pt").is_file()


@pytest.mark.parametrize("given, dropped", [
    ("train.val_every=1", "val_every_steps"),
    ("train.val_every_minutes=5", "val_every_steps"),
    ("train.epochs=20", "steps"),
])
def test_an_override_of_one_cadence_or_budget_replaces_the_files_other(given, dropped):
    """configs/unet_isbi2012.yaml validates every 100 steps and budgets in optimiser steps; a --set of another
    cadence or budget is what the user asked for, not a conflict."""
    cfg = load_config(ROOT / "configs" / "unet_isbi2012.yaml", [given])
    key, _, value = given.partition("=")
    assert getattr(cfg.train, key.split(".")[1]) == int(value)
    assert getattr(cfg.train, dropped) in (None, cfg.train.model_fields[dropped].default)
    both = ["train.val_every=1", "train.val_every_steps=10"]  # two cadences given at once are still refused
    with pytest.raises(Exception, match="set one of val_every, val_every_steps"):
        load_config(ROOT / "configs" / "unet_isbi2012.yaml", both)


@pytest.mark.parametrize("augment", ["none", "default"])
def test_crops_cut_before_normalising_are_the_crops_of_the_normalised_image(tmp_path, augment):
    """The built-in families pad and crop the image as read, then normalise the crop with the whole image's
    percentiles: bit for bit the crop of the normalised image (ISBI slices as narrow-band 16-bit TIFFs)."""
    from conftest import ISBI

    root = tmp_path / "set"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(2):
        image = np.asarray(Image.open(ISBI / "images" / f"{i:02d}.png"))[:200, :300]
        label = np.asarray(Image.open(ISBI / "labels" / f"{i:02d}.png"))[:200, :300]
        tifffile.imwrite(root / "images" / f"s{i}.tif", image.astype(np.uint16) * 3 + 700)
        Image.fromarray(label).save(root / "masks" / f"s{i}.png")
    cfg = load_config(ROOT / "configs" / "custom_folder.yaml", [
        f"data.root={root}", "data.crop_size=128", f"data.augment={augment}", "data.val_fraction=0",
        "data.foreground_crops=0"])  # fmt: skip
    train, _ = find_samples(cfg.data)
    ds = SegmentationDataset(train, cfg.data, build_augmentation(cfg.data, seed=2))
    assert ds.crop_first and cfg.data.normalize.mode == "auto"
    whole = normalize(ds.load(1)[0], cfg.data.normalize, channels_first=True)
    for seed in range(6):
        ds.set_random_seed(seed)
        x, y = ds[1]
        crop = x[0].numpy()
        turned = [np.rot90(v, k) for v in (crop, crop.T) for k in range(4)] if augment == "default" else [crop]
        assert crop.shape == (128, 128) and any(is_window_of(whole[0], v) for v in turned)


def is_window_of(image: np.ndarray, crop: np.ndarray) -> bool:
    """Whether `crop` is, bit for bit, a window of `image`."""
    h, w = crop.shape
    rows, cols = np.nonzero(image[: image.shape[0] - h + 1, : image.shape[1] - w + 1] == crop[0, 0])
    return any(np.array_equal(image[r : r + h, c : c + w], crop) for r, c in zip(rows, cols))

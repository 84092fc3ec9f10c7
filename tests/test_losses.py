"""The loss registry: every name the config takes builds a loss that leaves out the ignore index; U-Net's border
weight map and class weights for the cross-entropy part."""

import csv
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from scipy import ndimage
from typer.testing import CliRunner

from conftest import ISBI, em_crops
from seg.cli import app
from seg.config import BorderWeight, DataConfig, validate_config
from seg.data.samples import check_samples, find_samples
from seg.errors import ConfigError
from training.data import SegmentationDataset, border_weight_map, build_augmentation
from training.losses import LOSSES, build_loss, median_frequency_weights
from helpers import seg, seg_quick, write_config

CONFIG_NAMES = sorted(LOSSES)
IGNORE = 255


def batch(classes: int = 3):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, classes, 16, 16, generator=generator, requires_grad=True)
    target = torch.randint(0, classes, (2, 16, 16), generator=generator)
    target[:, :4] = IGNORE  # a band of ignored pixels, as VOC borders are
    return logits, target


@pytest.mark.parametrize("key, value, message", [
    ("train.loss", "lovasz", "train.loss: unknown loss 'lovasz'; one of ce, dice, dice_ce, focal, weighted_ce"),
    ("model.arch", "deeplab", "model.arch: unknown architecture 'deeplab'; one of attention_unet, linknet, refinenet"),
])
def test_names_come_from_the_registries_and_fail_before_any_data_is_read(tmp_path, key, value, message):
    """The config takes any name; `seg train` checks it against the registry (the one list) in one line,
    before reading data (the data folder here is empty)."""
    config = write_config(tmp_path / "c.yaml", tmp_path, tmp_path / "run")
    result = seg_quick("train", config, "--set", f"{key}={value}")
    assert result.returncode == 2 and result.stderr.strip().startswith(f"error: {config}: {message}")
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_each_config_loss_is_finite_and_ignores_the_ignore_index(name):
    loss_fn = build_loss(name, IGNORE)
    logits, target = batch()
    loss = loss_fn(logits, target)
    assert loss.ndim == 0 and math.isfinite(loss.item()) and loss.item() > 0
    loss.backward()
    ignored = target == IGNORE
    grad = logits.grad.abs().sum(1)
    assert float(grad[ignored].max()) == 0.0 and float(grad[~ignored].max()) > 0  # ignored pixels teach nothing


def test_dice_ce_is_the_sum_of_dice_and_ce():
    logits, target = batch()
    total = build_loss("dice_ce", IGNORE)(logits, target)
    parts = build_loss("dice", IGNORE)(logits, target) + build_loss("ce", IGNORE)(logits, target)
    assert torch.allclose(total, parts)


def test_an_unknown_name_is_a_config_error():
    with pytest.raises(ConfigError, match="train.loss: unknown loss 'lovasz'; one of ce, dice, dice_ce, focal"):
        build_loss("lovasz", IGNORE)


# -- U-Net's border weight map and class weights ------------------------------------------------------------

W0, SIGMA = 10.0, 5.0


def two_squares(gap: int = 1) -> np.ndarray:
    """Two 20x20 cells (class 1) `gap` px apart on background (class 0), an ignored corner far from both."""
    mask = np.zeros((60, 100), np.int64)
    mask[20:40, 20:40] = 1
    mask[20:40, 40 + gap : 60 + gap] = 1
    mask[:3, 95:] = IGNORE
    return mask


def isbi_mask(index: int = 0) -> np.ndarray:
    """A real ISBI label slice as classes: 0 membrane, 1 cell."""
    return (np.asarray(Image.open(ISBI / "labels" / f"{index:02d}.png")) > 0).astype(np.int64)


def brute_force_map(mask: np.ndarray) -> np.ndarray:
    """Eq. 2 with every component's distance over the whole image (the slow, plain way)."""
    valid = mask != IGNORE
    labels, count = ndimage.label(valid & (mask != 0))
    dist = np.sort(np.stack([ndimage.distance_transform_edt(labels != i) for i in range(1, count + 1)]), 0)
    classes, counts = np.unique(mask[valid], return_counts=True)
    w_c = dict(zip(classes.tolist(), counts.sum() / (len(classes) * counts)))
    weights = np.vectorize(lambda c: w_c.get(c, 0.0))(mask)
    weights += W0 * np.exp(-((dist[0] + dist[1]) ** 2) / (2 * SIGMA**2)) * (mask == 0)
    return np.where(valid, weights, 0.0)


def test_border_map_of_two_squares_peaks_in_the_gap():
    mask = two_squares(gap=1)
    w = border_weight_map(mask, W0, SIGMA, IGNORE)
    valid = mask != IGNORE
    w_bg = valid.sum() / (2 * (mask == 0).sum())  # inverse frequency, mean 1 over valid pixels
    w_cell = valid.sum() / (2 * (mask == 1).sum())
    assert w.shape == mask.shape and w.dtype == np.float32
    gap = w[20:40, 40]
    assert gap == pytest.approx(w_bg + W0 * math.exp(-4 / (2 * SIGMA**2)), rel=1e-5)  # d1 = d2 = 1
    assert float(w.max()) == pytest.approx(float(gap.max())) and gap.min() > w_bg + 0.9 * W0
    assert w[58, 2] == pytest.approx(w_bg, rel=1e-5)  # far from both cells
    assert np.allclose(w[25:35, 25:35], w_cell)  # inside a cell: its class weight only
    assert (w[~valid] == 0).all()
    assert np.allclose(w, brute_force_map(mask), atol=1e-4)


def test_border_map_with_one_component_or_none_is_the_class_weights():
    one = np.zeros((40, 40), np.int64)
    one[10:20, 10:20] = 1
    w = border_weight_map(one, W0, SIGMA, IGNORE)
    assert np.unique(w) == pytest.approx([1600 / (2 * 1500), 1600 / (2 * 100)])  # no border term
    assert (border_weight_map(np.zeros((8, 8), np.int64)) == 1).all()
    assert (border_weight_map(np.full((8, 8), IGNORE)) == 0).all()


def test_border_map_of_a_real_isbi_mask():
    mask = isbi_mask(0)
    w = border_weight_map(mask, W0, SIGMA, IGNORE)
    assert w.shape == (512, 512) and np.isfinite(w).all()
    w_membrane = mask.size / (2 * (mask == 0).sum())
    assert w_membrane + 0.8 * W0 < w.max() <= w_membrane + W0  # narrow membranes between two cells
    assert (w[mask == 1] < 1).all()  # cells are the majority class; no border term on them
    crop = mask[128:320, 160:352]  # the bounding-box shortcut gives the full computation's map
    assert np.allclose(border_weight_map(crop, W0, SIGMA, IGNORE), brute_force_map(crop), atol=1e-4)


def em_dataset(tmp_path, augment, crop_size=64, kind="em"):
    root = em_crops(tmp_path / "em", 2, slice(40, 136), slice(300, 380))  # 96x80: not square, not symmetric
    data = DataConfig(root=root, classes=["membrane", "cell"], in_channels=1, crop_size=crop_size,
                      val_fraction=0.0, augment=augment, kind=kind)  # fmt: skip
    samples, _ = find_samples(data)
    border = BorderWeight(w0=W0, sigma=SIGMA)
    return SegmentationDataset(samples, data, build_augmentation(data, seed=3), check_samples(samples, data), border)


def test_the_map_turns_and_flips_with_the_mask(tmp_path):
    ds = em_dataset(tmp_path, [{"name": "SquareSymmetry", "p": 1.0}])
    seen = set()
    for _ in range(12):
        x, y, w = ds[0]
        assert w.dtype == torch.float32 and w.shape == y.shape and x.shape[1:] == y.shape
        # flips and rot90 keep the distances, so the moved map is the map of the moved mask
        assert np.allclose(w.numpy(), border_weight_map(y.numpy(), W0, SIGMA, IGNORE), atol=1e-5)
        seen.add(y.numpy().tobytes())
    assert len(seen) >= 3  # several orientations came up


def test_the_map_follows_crops_and_the_elastic_warp(tmp_path):
    ds = em_dataset(tmp_path, "default", crop_size=48)
    full = ds.weight_maps[ds.samples[0].name]
    w_cell = float(full[ds.load(0)[1] == 1].max())
    for _ in range(10):
        _, y, w = ds[0]
        assert w.shape == (48, 48)
        assert set(np.unique(w.numpy())) <= set(np.unique(full))  # moved, not interpolated
        assert (y[w > w_cell + 1e-4] == 0).all()  # border weights stay on membrane pixels
        assert (w[y == 1] == w_cell).all()


def test_padding_with_the_ignore_index_has_weight_zero(tmp_path):
    pad = [{"name": "PadIfNeeded", "min_height": 160, "min_width": 160, "border_mode": 0, "fill_mask": IGNORE},
           {"name": "RandomCrop", "height": 160, "width": 160}]  # fmt: skip
    ds = em_dataset(tmp_path, pad, crop_size=160)  # 96x80 padded with ignore to 160x160
    padded = 0
    for _ in range(6):
        _, y, w = ds[0]
        padded += int((y == IGNORE).sum())
        assert (w[y == IGNORE] == 0).all() and (w[y != IGNORE] > 0).all()
    assert padded > 0


def test_weighted_ce_equals_ce_when_all_weights_are_one_and_differs_with_a_map():
    logits, target = batch()
    ce = torch.nn.functional.cross_entropy(logits, target, ignore_index=IGNORE)
    weighted = build_loss("weighted_ce", IGNORE)
    assert torch.allclose(weighted(logits, target, torch.ones(2, 16, 16)), ce)
    assert torch.allclose(weighted(logits, target), ce)
    pixel_weights = torch.rand(2, 16, 16, generator=torch.Generator().manual_seed(1)) * 10
    loss = weighted(logits, target, pixel_weights)
    assert abs(loss.item() - ce.item()) > 1e-3
    each = torch.nn.functional.cross_entropy(logits, target, ignore_index=IGNORE, reduction="none")
    valid = target != IGNORE
    assert torch.allclose(loss, (pixel_weights * each)[valid].sum() / pixel_weights[valid].sum())
    loss.backward()
    assert float(logits.grad.abs().sum(1)[~valid].max()) == 0.0


def test_class_weights_compose_with_pixel_weights_and_dice_stays_unweighted():
    logits, target = batch(classes=2)
    weights = [0.5, 2.0]
    plain = torch.nn.functional.cross_entropy(logits, target, weight=torch.tensor(weights), ignore_index=IGNORE)
    ce = build_loss("ce", IGNORE, weights, ["a", "b"])
    assert torch.allclose(ce(logits, target), plain)
    assert torch.allclose(ce(logits, target, torch.ones(2, 16, 16)), plain)
    pixel_weights = torch.rand(2, 16, 16, generator=torch.Generator().manual_seed(2))
    total = build_loss("dice_ce", IGNORE, weights, ["a", "b"])(logits, target, pixel_weights)
    assert torch.allclose(total, build_loss("dice", IGNORE)(logits, target) + ce(logits, target, pixel_weights))


def test_auto_class_weights_balance_an_imbalanced_mask():
    mask = np.zeros((10, 10), np.int64)
    mask[:1] = 1  # 90% class 0, 10% class 1
    mask[9, :5] = IGNORE
    assert median_frequency_weights([mask], 3, IGNORE) == pytest.approx([0.5 / (85 / 95), 0.5 / (10 / 95), 1.0])
    lines = []
    loss_fn = build_loss("ce", IGNORE, "auto", ["bg", "fg", "other"], [mask], lines.append)
    assert lines == ["class weights (median frequency): bg 0.559, fg 4.75, other 1"]
    logits, target = batch(classes=3)
    expected = torch.tensor(median_frequency_weights([mask], 3, IGNORE), dtype=torch.float32)
    plain = F.cross_entropy(logits, target, weight=expected, ignore_index=IGNORE)
    assert torch.allclose(loss_fn(logits, target), plain)


def test_config_weight_keys(tmp_path):
    raw = {"data": {"root": str(tmp_path)}, "train": {"loss": "weighted_ce"}}
    assert validate_config(raw).train.border_weight == BorderWeight(w0=10, sigma=5)
    assert validate_config({"data": {"root": str(tmp_path)}}).train.border_weight is None
    raw["train"] = {"loss": "dice", "border_weight": {"w0": 5}}
    with pytest.raises(ConfigError, match="train.border_weight: .*loss dice has no cross-entropy part"):
        validate_config(raw)
    raw["train"] = {"class_weights": [1, -1]}
    with pytest.raises(ConfigError, match="train.class_weights: "):
        validate_config(raw)


def test_class_weights_of_the_wrong_length_are_a_config_error(tmp_path):
    root = em_crops(tmp_path / "em", 4, slice(0, 64), slice(0, 64))
    cfg = write_config(tmp_path / "c.yaml", root, tmp_path / "run", class_weights=[1.0, 2.0, 3.0])
    result = CliRunner().invoke(app, ["train", str(cfg)])
    assert result.exit_code == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last == f"error: {cfg}: train.class_weights: 3 weights for 2 classes (membrane, cell)"
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "train",
    [{"loss": "weighted_ce"}, {"loss": "dice_ce", "border_weight": {"w0": 5, "sigma": 3}, "class_weights": "auto"}],
    ids=["weighted_ce", "dice_ce_border_auto"],
)
def test_seg_train_with_border_weights_writes_checkpoints(tmp_path, train):
    root = em_crops(tmp_path / "em", 4, slice(100, 196), slice(50, 178))
    cfg = write_config(tmp_path / "c.yaml", root, tmp_path / "run", epochs=2, **train)
    r = seg("train", cfg)
    assert r.returncode == 0, r.stderr
    run = tmp_path / "run"
    assert (run / "checkpoints" / "last.pt").is_file() and (run / "checkpoints" / "best.pt").is_file()
    resolved = yaml.safe_load((run / "config.yaml").read_text())["train"]
    implied = {"w0": 10.0, "sigma": 5.0}  # weighted_ce's default block
    assert resolved["border_weight"] == (implied if train["loss"] == "weighted_ce" else train["border_weight"])
    losses = [float(row["train_loss"]) for row in csv.DictReader(open(run / "metrics.csv"))]
    assert len(losses) == 2 and all(math.isfinite(v) and v > 0 for v in losses)
    assert ("class weights (median frequency): membrane" in r.stderr) == (train.get("class_weights") == "auto")

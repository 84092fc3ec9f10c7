"""bench/accuracy.py's parts: the generated data sets, the bare smp loop, equal steps for `seg train`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import accuracy  # noqa: E402
import make_data  # noqa: E402


def read(folder: Path) -> list[np.ndarray]:
    return [np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))]


@pytest.mark.parametrize("kind, values", [("blobs", {0, 1, 2}), ("scene", {0, 1, 2, 3, 4, 5, 255})])
def test_generated_sets_are_deterministic_and_labelled(tmp_path, kind, values):
    for name in ("a", "b"):
        make_data.make_generated(tmp_path / name, kind, train=3, test=1, size=128)
    a, b = read(tmp_path / "a" / "train" / "images"), read(tmp_path / "b" / "train" / "images")
    assert len(a) == 3 and all(x.shape == (128, 128, 3) and np.array_equal(x, y) for x, y in zip(a, b))
    masks = read(tmp_path / "a" / "train" / "masks") + read(tmp_path / "a" / "test" / "masks")
    found = set(np.unique(np.concatenate([m.ravel() for m in masks])).tolist())
    assert found <= values and len(found) >= 3
    assert (255 in found) == (kind == "scene")


def test_bare_loop_trains_and_scores_the_test_images(tmp_path):
    make_data.make_generated(tmp_path, "blobs", train=4, test=2, size=96)
    out = tmp_path / "bare.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bare_loop.py"), str(tmp_path / "train"), str(tmp_path / "test"),
         "--classes", "3", "--steps", "2", "--encoder", "resnet18", "--crop", "64", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["steps"] == 2 and np.isfinite(result["loss"])
    assert result["pixels"] == 2 * 96 * 96 and 0 <= result["miou"] <= 1


@pytest.mark.parametrize("steps, expected", [(4, ["train.epochs=2"]), (100, ["train.epochs=50"]),
                                             (5, ["train.steps_per_epoch=1", "train.epochs=5"])])
def test_seg_train_gets_the_same_number_of_steps(tmp_path, steps, expected):
    make_data.make_isbi(tmp_path / "isbi")  # 20 train images: 16 after the template's 0.2 held out, 2 batches
    config = accuracy.template_config(tmp_path, tmp_path / "isbi" / "train", ["membrane", "cell"], 1, tmp_path / "run")
    assert accuracy.step_overrides(config, steps, []) == expected

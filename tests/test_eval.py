"""`seg eval`: the ISBI 2012 challenge's figures (Rand error, variation of information) on two-class EM data,
and its TTA levels."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from seg.cli import app
from training.evaluate import em_metrics

from conftest import ISBI, ROOT, em_crops

runner = CliRunner()
BUNDLED = ROOT / "seg" / "assets" / "model.onnx"
EM_KEYS = ("rand_error", "vi", "vi_split", "vi_merge")


def isbi_cells(index: int) -> np.ndarray:
    """The classes of a real ISBI label: 0 membrane, 1 cell."""
    return (np.asarray(Image.open(ISBI / "labels" / f"{index:02d}.png")) > 0).astype(np.uint8)


@pytest.mark.parametrize("index", [0, 7])
def test_a_perfect_prediction_has_no_rand_error_and_no_vi(index):
    mask = isbi_cells(index)
    assert em_metrics(mask, mask) == pytest.approx(dict.fromkeys(EM_KEYS, 0.0), abs=1e-12)


def test_merging_every_cell_is_a_merge_not_a_split():
    mask = isbi_cells(0)
    merged = em_metrics(np.ones_like(mask), mask)
    assert merged["vi_split"] == pytest.approx(0.0, abs=1e-12) and merged["vi_merge"] > 1.0
    assert merged["vi"] == pytest.approx(merged["vi_split"] + merged["vi_merge"])
    assert 0.5 < merged["rand_error"] <= 1.0
    # Cutting the cells by extra membrane lines is mostly a split.
    cut = mask.copy()
    cut[::16] = 0
    cut[:, ::16] = 0
    split = em_metrics(cut, mask)
    assert split["vi_split"] > 1.0 and split["vi_split"] > 2 * split["vi_merge"]


def test_seg_eval_reports_the_challenge_figures(tmp_path):
    data = em_crops(tmp_path / "data", 3, slice(0, 256), slice(128, 384))
    args = ["eval", str(BUNDLED), "--data", str(data), "--tta", "d4", "--out", str(tmp_path / "m.json")]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "Rand error" in result.output and "VI" in result.output
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["tta"] == "d4"
    assert 0.0 < metrics["rand_error"] < 1.0
    assert np.isfinite(metrics["vi"]) and metrics["vi"] > 0
    assert metrics["vi"] == pytest.approx(metrics["vi_split"] + metrics["vi_merge"])
    assert len(metrics["per_image"]) == 3
    for key in EM_KEYS:
        per_image = [entry[key] for entry in metrics["per_image"]]
        assert metrics[key] == pytest.approx(np.mean(per_image))


def test_seg_eval_tta_changes_the_prediction_and_a_bad_level_exits_2(tmp_path):
    data = em_crops(tmp_path / "data", 1, slice(0, 256), slice(0, 256))
    figures = {}
    for level in ("none", "flips"):
        out = tmp_path / f"{level}.json"
        result = runner.invoke(app, ["eval", str(BUNDLED), "--data", str(data), "--tta", level, "--out", str(out)])
        assert result.exit_code == 0, result.output
        figures[level] = json.loads(out.read_text())
    assert figures["none"]["confusion"] != figures["flips"]["confusion"]
    result = runner.invoke(app, ["eval", str(BUNDLED), "--data", str(data), "--tta", "8"])
    assert result.exit_code == 2 and result.output.strip() == "error: tta '8': choose none, flips or d4"


def test_other_data_has_no_em_figures(conv_onnx_factory, tmp_path):
    data = em_crops(tmp_path / "data", 1, slice(0, 128), slice(0, 128))
    model = conv_onnx_factory(in_channels=3)  # 3 channels: natural images
    out = tmp_path / "m.json"
    result = runner.invoke(app, ["eval", str(model), "--data", str(data), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "Rand error" not in result.output
    metrics = json.loads(out.read_text())
    assert not set(EM_KEYS) & set(metrics)
    assert metrics["tta"] == "none"  # auto: no TTA on other data


def test_seg_eval_uses_d4_on_em_data_unless_told(tmp_path):
    data = em_crops(tmp_path / "data", 1, slice(0, 128), slice(0, 128))
    for args, level in (([], "d4"), (["--tta", "none"], "none"), (["--tta", "flips"], "flips")):
        out = tmp_path / f"{level}.json"
        result = runner.invoke(app, ["eval", str(BUNDLED), "--data", str(data), "--out", str(out), *args])
        assert result.exit_code == 0, result.output
        assert json.loads(out.read_text())["tta"] == level

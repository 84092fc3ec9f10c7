"""INT8 models: `seg export --int8` (static QDQ quantization behind the accuracy gate), the int8 variant
chosen on the CPU and reported by `seg predict`, `seg eval` and `/info`, and the bundled int8 model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
import yaml
from typer.testing import CliRunner

from conftest import SAMPLES, build_checkpoint, em_crops
from seg.cli import app
from seg.errors import SegError
from seg.inference.predictor import Predictor
from seg.inference.runtime import BUNDLED_MODEL, int8_variant
from training.evaluate import evaluate
from helpers import running_server

runner = CliRunner()


def seg(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A run folder: an (untrained, balanced) U-Net checkpoint and the config of six real EM crops."""
    root = tmp_path_factory.mktemp("int8")
    data = em_crops(root / "data", 6, slice(0, 256), slice(0, 256))
    folder = root / "run"
    build_checkpoint(folder / "checkpoints" / "best.pt", tile_size=256)
    config = {"data": {"root": str(data), "classes": ["membrane", "cell"], "in_channels": 1, "val_fraction": 0.34,
                       "normalize": {"mode": "fixed", "mean": [0.5], "std": [0.25]}}}  # fmt: skip
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    return folder


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("models") / "unet.onnx"
    result = seg("export", run / "checkpoints" / "best.pt", "--out", out, "--int8", "--calibration-images", "3")
    assert result.exit_code == 0, result.output
    return out


def metadata(path: Path) -> dict:
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    return json.loads(props["seg"])


def test_int8_export_is_qdq_with_the_gate_figures(run, exported):
    int8 = int8_variant(exported)
    assert int8.name == "unet.int8.onnx" and int8.is_file() and exported.is_file()
    graph = onnx.load(str(int8)).graph
    ops = {node.op_type for node in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    int8_weights = [t for t in graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert int8_weights and int8.stat().st_size < 0.5 * exported.stat().st_size
    meta = metadata(int8)
    q = meta["quantization"]
    assert meta["precision"] == "int8" and metadata(exported)["precision"] == "fp32"
    assert (q["calibration_images"], q["calibration_tiles"], q["val_images"], q["margin_points"]) == (3, 6, 2, 0.5)
    # The figures are what `seg eval` reports for each file, on the same split, without TTA.
    config = run / "config.yaml"
    fp32 = evaluate(exported, config, "val", device="cpu", tta="none", precision="fp32")
    quantized = evaluate(int8, config, "val", device="cpu", tta="none", precision="int8")
    assert q["fp32"]["miou"] == pytest.approx(fp32["miou"], abs=1e-12)
    assert q["int8"]["miou"] == pytest.approx(quantized["miou"], abs=1e-12)
    assert q["miou_drop_points"] == pytest.approx(100 * (fp32["miou"] - quantized["miou"]), abs=1e-3)
    assert q["miou_drop_points"] <= 0.5


def test_the_gate_stops_the_export_and_writes_nothing(run, exported, tmp_path):
    """A margin of -100 points asks the int8 model to beat fp32 by 100 points, which no model does."""
    fp32 = tmp_path / "m.onnx"
    shutil.copyfile(exported, fp32)
    result = seg("export", fp32, "--out", fp32, "--int8", "--data", run / "config.yaml", "--int8-margin", "-100",
                 "--calibration-images", "2")  # fmt: skip
    assert result.exit_code == 1
    assert "not written" in result.output and "points lower (allowed: -100" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # no int8 model, no temporary file


def test_predict_runs_the_int8_variant_on_the_cpu_unless_told(exported, tmp_path):
    image = SAMPLES / "isbi_test_00.png"
    runs = {}
    for precision in ("auto", "fp32", "int8"):
        out = tmp_path / precision
        result = seg("predict", exported, image, "--out", out, "--device", "cpu", "--precision", precision)
        assert result.exit_code == 0, result.output
        summary = json.loads((out / "summary.json").read_text())
        runs[precision] = summary
        assert f", {summary['precision']}) on cpu" in result.output  # the log line says which ran
    assert (runs["auto"]["precision"], runs["auto"]["model"]) == ("int8", str(int8_variant(exported)))
    assert (runs["fp32"]["precision"], runs["fp32"]["model"]) == ("fp32", str(exported))
    assert runs["int8"]["model_sha256"] == runs["auto"]["model_sha256"] != runs["fp32"]["model_sha256"]

    from PIL import Image

    int8_mask = np.asarray(Image.open(tmp_path / "auto" / "isbi_test_00.png"))
    fp32_mask = np.asarray(Image.open(tmp_path / "fp32" / "isbi_test_00.png"))
    # Close, not equal: this untrained model's biases put half its pixels near the decision boundary (the
    # bundled, trained model agrees on more than 99 %, below).
    assert (int8_mask == fp32_mask).mean() > 0.85 and len(np.unique(fp32_mask)) == 2


def test_precision_errors_are_one_line(exported, conv_onnx, tmp_path):
    result = seg("predict", conv_onnx, SAMPLES / "isbi_test_00.png", "--out", tmp_path, "--precision", "int8")
    assert result.exit_code == 2 and "no conv0.int8.onnx beside it (seg export --int8)" in result.output
    with pytest.raises(SegError, match="this is an int8 model"):
        Predictor.from_onnx(int8_variant(exported), device="cpu", precision="fp32")
    result = seg("predict", conv_onnx, SAMPLES / "isbi_test_00.png", "--out", tmp_path, "--precision", "fp8")
    assert result.exit_code == 2 and "--precision 'fp8': choose one of auto, fp32, int8" in result.output
    result = seg("export", conv_onnx, "--out", tmp_path / "c.onnx", "--int8")
    assert result.exit_code == 2 and "--int8 needs the training config (--data CONFIG)" in result.output


def test_info_says_which_model_runs(exported, tmp_path):

    for precision, want in (("auto", "int8"), ("fp32", "fp32")):
        (tmp_path / precision).mkdir()
        with running_server(exported, tmp_path / precision, SEG_DEVICE="cpu", SEG_PRECISION=precision) as server:
            info = httpx.post(server.url + "/info", json={}).json()
        assert info["precision"] == want
        assert info["model_file"] == (int8_variant(exported) if want == "int8" else exported).name  # no folders
        assert bool(info["quantization"]) == (want == "int8")


def test_the_bundled_int8_model_passed_its_gate_and_runs_by_default():
    int8 = int8_variant(BUNDLED_MODEL)
    q = metadata(int8)["quantization"]
    assert q["val_images"] == 5 and q["miou_drop_points"] <= q["margin_points"] == 0.5
    assert metadata(int8)["name"] == metadata(BUNDLED_MODEL)["name"]
    predictor = Predictor.from_onnx(BUNDLED_MODEL, device="cpu")
    assert (predictor.path, predictor.info.precision) == (int8, "int8")
    from seg.io.images import read_image

    image = read_image(SAMPLES / "isbi_test_01.png")
    fp32 = Predictor.from_onnx(BUNDLED_MODEL, device="cpu", precision="fp32").predict(image).mask
    assert (predictor.predict(image).mask == fp32).mean() > 0.98  # 99.8 % on this slice


def test_seg_precision_is_checked_when_the_server_reads_it():
    from serving.settings import Settings

    assert Settings.from_env({"SEG_PRECISION": "fp32"}).precision == "fp32"
    assert Settings.from_env({}).precision == "auto"
    with pytest.raises(SegError, match="SEG_PRECISION='fp8': choose one of auto, fp32, int8"):
        Settings.from_env({"SEG_PRECISION": "fp8"})

"""`seg export`: dynamic shapes, metadata a predictor can live on, the parity check, fp16, and user errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
import torch
from typer.testing import CliRunner

from seg.cli import app
from seg.errors import SegError
from seg.inference.runtime import create_session, read_model_info
from training.checkpoint import load_checkpoint, model_from_checkpoint
from training.export import FP32_TOLERANCE, export_onnx

from conftest import ROOT

runner = CliRunner()


def test_cli_exports_a_run_folder_with_metadata_and_parity(unet_checkpoint, tmp_path):
    run = tmp_path / "my_run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(unet_checkpoint, run / "checkpoints" / "best.pt")
    out = tmp_path / "exported" / "model.onnx"

    result = runner.invoke(app, ["export", str(run), "--out", str(out), "--opset", "17"])

    assert result.exit_code == 0, result.output
    assert out.is_file() and not list(out.parent.glob(".*.tmp"))
    # Two parity sizes, one of them not a multiple of the stride (32), both within the float32 bound.
    parity = [line for line in result.output.splitlines() if line.startswith("parity")]
    sizes = [tuple(int(v) for v in line.split()[1].rstrip(":").split("x")) for line in parity]
    diffs = [float(line.split("max abs diff ")[1].split()[0]) for line in parity]
    assert len(sizes) == 2 and any(h % 32 or w % 32 for _, _, h, w in sizes)
    assert all(d <= FP32_TOLERANCE for d in diffs)
    assert onnx.load(str(out), load_external_data=False).opset_import[0].version == 17
    props = {p.key: p.value for p in onnx.load(str(out), load_external_data=False).metadata_props}
    for key in ("seg", "arch", "encoder", "classes", "palette", "in_channels", "normalize", "stride", "tile_size",
                "overlap", "seg_version"):  # fmt: skip
        assert key in props, key
    meta = json.loads(props["seg"])
    assert meta["name"] == "my_run"
    assert json.loads(props["classes"]) == ["membrane", "cell"]
    assert props["arch"] == "unet" and props["encoder"] == "mobilenet_v2"
    assert int(props["stride"]) == 32 and int(props["tile_size"]) == 256 and float(props["overlap"]) == 0.25


def test_metadata_is_everything_a_predictor_needs(unet_onnx, unet_checkpoint):
    ckpt = load_checkpoint(unet_checkpoint)
    session, provider = create_session(unet_onnx, device="cpu")
    info = read_model_info(session, unet_onnx)
    assert provider == "CPUExecutionProvider"
    assert info.classes == ckpt["classes"] and info.palette == ckpt["palette"]
    assert info.in_channels == 1 and info.stride == ckpt["stride"] == 32
    assert info.normalize.model_dump() == ckpt["normalize"]
    assert (info.tile_size, info.overlap) == (256, 0.25)
    assert info.arch == "unet" and info.encoder == "mobilenet_v2" and info.version


def test_dynamic_batch_height_width_match_pytorch(unet_onnx, unet_checkpoint):
    model = model_from_checkpoint(load_checkpoint(unet_checkpoint))
    session, _ = create_session(unet_onnx, device="cpu")
    for shape in [(3, 1, 77, 45), (1, 1, 160, 96)]:
        x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            expected = model(x).numpy()
        (logits,) = session.run(["logits"], {"image": x.numpy()})
        assert logits.shape == (shape[0], 2, shape[2], shape[3])
        assert np.abs(logits - expected).max() <= FP32_TOLERANCE


def test_fp16_keeps_float32_io_and_passes_its_bound(unet_checkpoint, unet_onnx, tmp_path):
    out = tmp_path / "half.onnx"
    report = export_onnx(unet_checkpoint, out, fp16=True)
    assert report["fp16"] and out.stat().st_size < 0.6 * unet_onnx.stat().st_size
    assert all(row["max_abs_diff"] <= row["bound"] for row in report["parity"])
    session, _ = create_session(out, device="cpu")
    assert session.get_inputs()[0].type == "tensor(float)" and session.get_outputs()[0].type == "tensor(float)"
    assert read_model_info(session, out).fp16


def test_failed_parity_writes_nothing(unet_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr("training.export.FP32_TOLERANCE", -1.0)
    monkeypatch.setattr("training.export.FP32_RELATIVE", -1.0)
    out = tmp_path / "bad.onnx"
    with pytest.raises(SegError, match="parity check failed"):
        export_onnx(unet_checkpoint, out)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["export", "{tmp}/nothing.pt", "--out", "{tmp}/m.onnx"], "no such checkpoint"),
        (["export", "{ckpt}", "--out", "{tmp}/m.onnx", "--opset", "5"], "--opset 5"),
        (["export", "{tmp}/garbage.pt", "--out", "{tmp}/m.onnx"], "not a readable checkpoint"),
    ],
)
def test_user_errors_exit_2_naming_the_file(args, message, unet_checkpoint, tmp_path):
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    args = [a.format(tmp=tmp_path, ckpt=unet_checkpoint) for a in args]
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert message in result.output
    assert not (tmp_path / "m.onnx").exists()


def test_eval_of_the_exported_model_matches_its_checkpoint(unet_checkpoint, unet_onnx, tmp_path):
    """`seg eval` on a folder through ONNX Runtime and through PyTorch: the same confusion matrix."""
    isbi = ROOT / "data" / "isbi2012" / "train"
    for sub in ("images", "labels"):
        (tmp_path / "data" / sub).mkdir(parents=True)
        for i in range(3):
            shutil.copy(isbi / sub / f"{i:02d}.png", tmp_path / "data" / sub / f"{i:02d}.png")
    results = {}
    for name, model in (("onnx", unet_onnx), ("checkpoint", unet_checkpoint)):
        out = tmp_path / f"{name}.json"
        result = runner.invoke(app, ["eval", str(model), "--data", str(tmp_path / "data"), "--tta", "none", "--out", str(out)])
        assert result.exit_code == 0, result.output
        results[name] = json.loads(out.read_text())
    onnx_conf, torch_conf = (np.array(results[k]["confusion"]) for k in ("onnx", "checkpoint"))
    assert onnx_conf.sum() == torch_conf.sum() == 3 * 512 * 512
    assert onnx_conf.diagonal().sum() > 0 and np.all(onnx_conf.sum(0) > 0)  # both classes predicted
    assert np.abs(onnx_conf - torch_conf).sum() <= 2e-4 * onnx_conf.sum()  # float noise on class borders


def test_eval_of_a_percentile_model_over_4_megapixels_matches_its_checkpoint(tmp_path):
    """Percentile normalisation samples a large image: PyTorch and ONNX Runtime must sample it alike (one
    predictor normalises for both). The image's even rows and columns are darker, so a sample with another
    step would see other percentiles and give other masks."""
    import tifffile

    from conftest import build_checkpoint

    from seg.io.images import read_image, read_mask

    ckpt = build_checkpoint(tmp_path / "pct.pt", normalize={"mode": "percentile", "mean": [0.5], "std": [0.25]},
                            tile_size=512)  # fmt: skip
    export_onnx(ckpt, tmp_path / "pct.onnx")
    isbi = ROOT / "data" / "isbi2012" / "train"
    side = 2100  # 4.41 megapixels: over the 4 MP percentile sample
    images = [read_image(isbi / "images" / f"{i:02d}.png") for i in range(4)]
    labels = [read_mask(isbi / "labels" / f"{i:02d}.png") for i in range(4)]
    big, big_labels = (np.tile(np.block([[a[0], a[1]], [a[2], a[3]]]), (3, 3))[:side, :side] for a in (images, labels))
    big = big.astype(np.uint16) * 257
    big[::2, ::2] //= 4
    for sub, picture, small in (("images", big, images[0]), ("labels", big_labels.astype(np.uint8), labels[0])):
        (tmp_path / "data" / sub).mkdir(parents=True)
        tifffile.imwrite(tmp_path / "data" / sub / "big.tif", picture)
        tifffile.imwrite(tmp_path / "data" / sub / "small.tif", small.astype(np.uint8))
    confusion = {}
    for model in (tmp_path / "pct.onnx", ckpt):
        out = tmp_path / f"{model.suffix[1:]}.json"
        result = runner.invoke(app, ["eval", str(model), "--data", str(tmp_path / "data"), "--tta", "none", "--out", str(out)])
        assert result.exit_code == 0, result.output
        confusion[model.suffix] = np.array(json.loads(out.read_text())["confusion"])
    onnx_conf, torch_conf = confusion[".onnx"], confusion[".pt"]
    assert onnx_conf.sum() == side * side + 512 * 512
    assert np.all(onnx_conf.sum(0) > 0)  # both classes predicted
    assert np.abs(onnx_conf - torch_conf).sum() <= 2e-4 * onnx_conf.sum()  # float noise on class borders


def test_one_model_description_from_checkpoint_to_onnx_and_back(unet_checkpoint, unet_onnx):
    from seg.inference.modelinfo import ModelInfo
    from seg.inference.predictor import Predictor

    ckpt = load_checkpoint(unet_checkpoint)
    info = ModelInfo.from_checkpoint(ckpt, "unet")
    assert ModelInfo.from_metadata(info.to_metadata()) == info
    assert ModelInfo.from_checkpoint({**ckpt, **info.to_checkpoint()}, "unet") == info
    exported = Predictor.from_onnx(unet_onnx, device="cpu").info
    assert exported.model_dump(exclude={"version", "opset"}) == info.model_dump(exclude={"version", "opset"})
    assert (exported.num_classes, exported.classes) == (2, ["membrane", "cell"])


def test_bundled_model_written_by_an_earlier_export_still_loads():
    from seg.inference.predictor import Predictor
    from seg.inference.runtime import BUNDLED_MODEL

    info = Predictor.from_onnx(BUNDLED_MODEL, device="cpu").info
    assert info.classes == ["membrane", "cell"] and info.in_channels == 1 and info.model_kwargs["arch"] == "unet"


def test_a_single_class_name_means_background_and_that_class():
    """A one-channel (sigmoid) model has two outputs, so two names and colours: `classes` is per output."""
    from seg.inference.modelinfo import ModelInfo

    info = ModelInfo(classes=["cell"], in_channels=1)
    assert (info.classes, info.num_classes, len(info.palette)) == (["background", "cell"], 2, 2)
    with pytest.raises(SegError, match="inconsistent seg metadata"):
        ModelInfo.from_onnx_props({"seg": json.dumps({"classes": [], "in_channels": 1})}, "m.onnx")

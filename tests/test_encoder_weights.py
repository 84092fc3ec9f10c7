"""`model.encoder_weights`: a torchvision ResNet state dict from a file, on 1-, 3- and 4-channel models (the
first convolution adapted as smp adapts pretrained encoders), and one-line errors for files that do not fit."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torchvision
import yaml
from segmentation_models_pytorch.encoders._utils import patch_first_conv
from typer.testing import CliRunner

from seg.cli import app
from seg.errors import ConfigError
from seg.models import build_model

from conftest import em_crops


@pytest.fixture(scope="module")
def resnet_file(tmp_path_factory):
    """Factory: a torchvision resnet18/resnet34 state dict saved with torch.save, and the network itself."""
    folder = tmp_path_factory.mktemp("weights")
    made: dict[str, tuple[Path, torch.nn.Module]] = {}

    def make(name: str) -> tuple[Path, torch.nn.Module]:
        if name not in made:
            torch.manual_seed(1)
            net = getattr(torchvision.models, name)(weights=None)
            for m in net.modules():  # non-trivial BatchNorm statistics, as trained weights have
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_mean.uniform_(-1, 1)
                    m.running_var.uniform_(0.5, 2)
            torch.save(net.state_dict(), folder / f"{name}.pth")
            made[name] = folder / f"{name}.pth", net
        return made[name]

    return make


@pytest.mark.parametrize(
    ("encoder", "in_channels", "arch"),
    [("resnet18", 1, "unet"), ("resnet18", 3, "unet"), ("resnet18", 4, "unet"), ("resnet34", 1, "refinenet_lw")],
)
def test_imagenet_resnet_file_loads_with_the_first_conv_adapted(resnet_file, encoder, in_channels, arch):
    path, net = resnet_file(encoder)
    options = {"channels": (64, 32, 32, 32)} if arch != "unet" else {}
    model = build_model(arch, encoder, classes=2, in_channels=in_channels, encoder_weights=path, **options)

    loaded = model.encoder.state_dict()
    saved = torch.load(path, weights_only=True)
    kernels = saved["conv1.weight"]
    if in_channels == 1:
        expected = kernels.sum(1, keepdim=True)
    elif in_channels == 3:
        expected = kernels
    else:
        expected = torch.cat([kernels, kernels[:, :1]], 1) * (3 / 4)
    torch.testing.assert_close(loaded["conv1.weight"], expected, rtol=0, atol=1e-6)
    # The same kernels as smp's own patch of a pretrained first convolution.
    patched = copy.deepcopy(net)
    patch_first_conv(patched, in_channels, pretrained=True)
    torch.testing.assert_close(loaded["conv1.weight"], patched.conv1.weight.detach(), rtol=0, atol=1e-6)
    others = [k for k in saved if not k.startswith("fc.") and k != "conv1.weight"]
    assert others and set(others) == set(loaded) - {"conv1.weight"}
    for key in others:
        assert torch.equal(loaded[key], saved[key]), key
    with torch.no_grad():
        assert model.eval()(torch.randn(1, in_channels, 70, 90)).shape == (1, 2, 70, 90)


def test_one_channel_model_responds_to_grey_as_the_rgb_network_to_repeated_grey(resnet_file):
    """Summing the kernels is what makes a grey image through the 1-channel encoder equal the RGB one."""
    path, net = resnet_file("resnet18")
    model = build_model("unet", "resnet18", classes=2, in_channels=1, encoder_weights=path).eval()
    grey = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        ours = model.encoder.conv1(grey)
        theirs = net.eval().conv1(grey.repeat(1, 3, 1, 1))
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_a_file_for_another_encoder_is_a_config_error(resnet_file):
    path, _ = resnet_file("resnet18")
    with pytest.raises(ConfigError, match="does not fit encoder resnet34: .*missing, e.g. layer1.2"):
        build_model("unet", "resnet34", classes=2, in_channels=1, encoder_weights=path)


@pytest.fixture(scope="module")
def em_folder(tmp_path_factory):
    """Four 64x64 crops of real ISBI slices with their membrane masks."""
    return em_crops(tmp_path_factory.mktemp("em"), 4, slice(100, 164), slice(50, 114))


def train_with_weights(tmp_path: Path, data: Path, weights: Path, encoder: str = "resnet18"):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"root": str(data), "classes": ["membrane", "cell"], "in_channels": 1, "crop_size": 64,
                 "val_fraction": 0.25},
        "model": {"arch": "unet", "encoder": encoder, "encoder_weights": str(weights),
                  "options": {"decoder_channels": [16, 16, 8, 8, 8]}},
        "train": {"epochs": 1, "steps_per_epoch": 1, "batch_size": 2, "threads": 2, "device": "cpu"},
        "output": {"dir": str(tmp_path / "run"), "tile_size": 64, "overlays": 0},
    }))  # fmt: skip
    return CliRunner().invoke(app, ["train", str(config)])


def error_line(result) -> str:
    """The one `error:` line of a failed `seg train`; there is no traceback."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert errors[-1].startswith("error: ") and sum(line.startswith("error") for line in errors) == 1
    return errors[-1]


@pytest.mark.parametrize(
    ("file_encoder", "model_encoder", "message"),
    [
        ("resnet34", "resnet18", "does not fit encoder resnet18: 96 unknown, e.g. layer1.2.conv1.weight"),
        ("resnet18", "resnet34", "does not fit encoder resnet34: "),
    ],
)
def test_seg_train_refuses_weights_of_another_encoder(resnet_file, em_folder, tmp_path, file_encoder, model_encoder, message):
    path, _ = resnet_file(file_encoder)
    line = error_line(train_with_weights(tmp_path, em_folder, path, encoder=model_encoder))
    assert message in line and str(path) in line
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("content", ["truncated", "text", "tensor", "module"])
def test_seg_train_refuses_a_corrupt_weights_file(resnet_file, em_folder, tmp_path, content):
    good, _ = resnet_file("resnet18")
    bad = tmp_path / "weights.pth"
    if content == "truncated":
        bad.write_bytes(good.read_bytes()[:5000])
    elif content == "text":
        bad.write_text("not weights\n")
    elif content == "tensor":
        torch.save(torch.zeros(3), bad)
    else:  # a whole pickled network, not its state dict
        torch.save(torch.nn.Conv2d(3, 8, 3), bad)
    line = error_line(train_with_weights(tmp_path, em_folder, bad))
    assert str(bad) in line and ("not a readable PyTorch weights file" in line or "holds no state dict" in line)


def test_seg_train_starts_from_the_file(resnet_file, em_folder, tmp_path):
    """The 1-channel run's checkpoint starts from the file: one optimiser step (lr 0.001) from its kernels."""
    path, _ = resnet_file("resnet18")
    result = train_with_weights(tmp_path, em_folder, path)
    assert result.exit_code == 0, result.output
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)["model"]
    saved = torch.load(path, weights_only=True)
    pairs = [("conv1.weight", saved["conv1.weight"].sum(1, keepdim=True)), ("layer3.0.conv1.weight", saved["layer3.0.conv1.weight"])]
    for key, start in pairs:
        trained = state[f"net.encoder.{key}"]
        assert trained.shape == start.shape and (trained - start).abs().max() < 0.005, key


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An offline Hugging Face cache laid out as smp's loader reads it; `put(encoder)` stores a state dict
    made here as that encoder's imagenet weights and returns it."""
    from huggingface_hub import constants
    from safetensors.torch import save_file
    from segmentation_models_pytorch.encoders import encoders, get_encoder

    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def put(encoder: str) -> dict[str, torch.Tensor]:
        settings = encoders[encoder]["pretrained_settings"]["imagenet"]
        snapshot = cache / f"models--{settings['repo_id'].replace('/', '--')}" / "snapshots" / settings["revision"]
        snapshot.mkdir(parents=True)
        torch.manual_seed(7)
        net = get_encoder(encoder, in_channels=3, weights=None)
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
        state = {k: v.contiguous() for k, v in net.state_dict().items()}
        save_file(state, str(snapshot / "model.safetensors"))
        (snapshot / "config.json").write_text('{"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}')
        return state

    return put


def test_seg_train_takes_imagenet_weights_from_the_cache_offline(hub_cache, em_folder, tmp_path):
    """`encoder_weights: imagenet` is passed to smp, which reads the cache; the 1-channel first convolution
    is smp's sum of the RGB kernels; one step (lr 0.001) moves no weight far from them."""
    saved = hub_cache("resnet18")
    result = train_with_weights(tmp_path, em_folder, "imagenet")
    assert result.exit_code == 0, result.output
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)["model"]
    pairs = [("conv1.weight", saved["conv1.weight"].sum(1, keepdim=True)),
             ("layer3.0.conv1.weight", saved["layer3.0.conv1.weight"])]
    for key, start in pairs:
        trained = state[f"net.encoder.{key}"]
        assert trained.shape == start.shape and (trained - start).abs().max() < 0.005, key
    # BatchNorm statistics start from the cached ones (momentum 0.1, one step), not from zero.
    kept = torch.stack([state["net.encoder.layer4.1.bn2.running_mean"], saved["layer4.1.bn2.running_mean"]])
    assert torch.corrcoef(kept)[0, 1] > 0.9
    config = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert config["model"]["encoder_weights"] == "imagenet"


def test_imagenet_weights_neither_cached_nor_downloadable_are_one_line(hub_cache, em_folder, tmp_path):
    line = error_line(train_with_weights(tmp_path, em_folder, "imagenet"))
    assert "model.encoder_weights 'imagenet': the weights of resnet18 are not in the Hugging Face cache" in line
    assert "hf download smp-hub/resnet18.imagenet --revision " in line and "HF_HOME" in line
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_weights_name_smp_does_not_know_lists_the_ones_it_does(hub_cache, em_folder, tmp_path):
    line = error_line(train_with_weights(tmp_path, em_folder, "imagenet21k"))
    assert "smp has no such weights for encoder resnet18 (it has: imagenet, ssl, swsl)" in line

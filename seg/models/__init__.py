"""The model zoo: U-Net (smp's own) and RefineNet (full and light-weight) on any smp encoder.

`build_model` returns a `SegModel`: the architecture wrapped so that any input height and width works
(padded to the encoder's stride multiple, cropped back). Every caller (training, export, the predictor's
PyTorch path) goes through it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from seg.errors import ConfigError

ARCHS: dict[str, Callable[..., nn.Module]] = {}


def register(name: str):
    def wrap(factory):
        ARCHS[name] = factory
        return factory

    return wrap


class SegModel(nn.Module):
    """An encoder-decoder that takes any input size: pads to `stride` and crops the logits back."""

    def __init__(self, net: nn.Module, stride: int):
        super().__init__()
        self.net = net
        self.stride = stride

    @property
    def encoder(self) -> nn.Module:
        return self.net.encoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        pad_h = (self.stride - h % self.stride) % self.stride
        pad_w = (self.stride - w % self.stride) % self.stride
        x = F.pad(x, (0, pad_w, 0, pad_h))
        return self.net(x)[..., :h, :w]


@register("unet")
def _unet(encoder: str, classes: int, in_channels: int, **options) -> nn.Module:
    import segmentation_models_pytorch as smp

    return smp.Unet(encoder_name=encoder, encoder_weights=None, classes=classes, in_channels=in_channels, **options)


@register("refinenet")
def _refinenet(encoder: str, classes: int, in_channels: int, **options) -> nn.Module:
    from seg.models.refinenet import RefineNet

    return RefineNet(encoder_name=encoder, classes=classes, in_channels=in_channels, **options)


@register("refinenet_lw")
def _refinenet_lw(encoder: str, classes: int, in_channels: int, **options) -> nn.Module:
    from seg.models.refinenet import RefineNetLW

    return RefineNetLW(encoder_name=encoder, classes=classes, in_channels=in_channels, **options)


def build_model(
    arch: str = "unet",
    encoder: str = "resnet34",
    classes: int = 1,
    in_channels: int = 3,
    encoder_weights: str | Path | None = None,
    **options: Any,
) -> SegModel:
    """Build `arch` ("unet", "refinenet", "refinenet_lw") on the smp encoder `encoder`.

    Args:
        arch: architecture name, one of `ARCHS`.
        encoder: any smp encoder name (resnet34, mobilenet_v2, efficientnet-b0, ...).
        classes: output channels (1 for a binary mask with a sigmoid, else one per class).
        in_channels: image channels (1 for grey EM slices, 3 for RGB).
        encoder_weights: a local file with the encoder's state dict (nothing is ever downloaded).
        options: passed to the architecture (for U-Net: decoder_channels, encoder_depth, ...).
    """
    if arch not in ARCHS:
        raise ConfigError(f"unknown model.arch {arch!r}; choose one of {', '.join(sorted(ARCHS))}")
    if encoder_weights in ("imagenet", "ssl", "swsl", "instagram"):
        raise ConfigError(
            f"model.encoder_weights {encoder_weights!r} would download from a hub; give a local weights file or none"
        )
    try:
        net = ARCHS[arch](encoder=encoder, classes=classes, in_channels=in_channels, **options)
    except (KeyError, TypeError, ValueError) as err:
        raise ConfigError(f"cannot build {arch} on encoder {encoder!r}: {err}") from None
    if encoder_weights:
        load_encoder_weights(net.encoder, encoder_weights)
    depth = options.get("encoder_depth", 5)
    return SegModel(net, stride=getattr(net.encoder, "output_stride", 2**depth))


def build_model_from_config(cfg: Mapping[str, Any] | Any) -> SegModel:
    """Build from a config mapping (or the `model` section object) with keys arch, encoder, classes, ..."""
    if hasattr(cfg, "model_dump"):
        cfg = cfg.model_dump()
    cfg = dict(cfg)
    options = dict(cfg.pop("options", None) or {})
    return build_model(**cfg, **options)


def load_encoder_weights(encoder: nn.Module, path: str | Path) -> None:
    """Load an encoder state dict from a local file, ignoring a classifier head (`fc.*`) if present."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"model.encoder_weights: no such file {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    state = {k: v for k, v in state.items() if not k.startswith(("fc.", "classifier."))}
    missing, unexpected = encoder.load_state_dict(state, strict=False)
    if unexpected or len(missing) == len(list(encoder.state_dict())):
        raise ConfigError(f"model.encoder_weights: {path} does not fit the encoder (unexpected keys: {unexpected[:3]})")


__all__ = ["ARCHS", "SegModel", "build_model", "build_model_from_config", "load_encoder_weights"]

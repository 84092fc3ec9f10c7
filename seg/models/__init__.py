"""The model zoo on any smp encoder: U-Net, U-Net++ (nested dense skips), LinkNet (additive skips) and
U-Net with attention-gated skips (smp's, the last gated here), and RefineNet (full and light-weight).

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

from seg.config import is_weights_name
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


@register("unetplusplus")
def _unetplusplus(encoder: str, classes: int, in_channels: int, **options) -> nn.Module:
    import segmentation_models_pytorch as smp

    return smp.UnetPlusPlus(encoder_name=encoder, encoder_weights=None, classes=classes, in_channels=in_channels, **options)


@register("linknet")
def _linknet(encoder: str, classes: int, in_channels: int, **options) -> nn.Module:
    import segmentation_models_pytorch as smp

    return smp.Linknet(encoder_name=encoder, encoder_weights=None, classes=classes, in_channels=in_channels, **options)


@register("attention_unet")
def _attention_unet(encoder: str, classes: int, in_channels: int, **options) -> nn.Module:
    from seg.models.attention import gate_skips

    return gate_skips(_unet(encoder, classes, in_channels, **options))


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
    """Build `arch` (one of `ARCHS`: unet, unetplusplus, linknet, attention_unet, refinenet, refinenet_lw) on
    the smp encoder `encoder`.

    Args:
        arch: architecture name, one of `ARCHS`.
        encoder: any smp encoder name (resnet34, mobilenet_v2, efficientnet-b0, ...).
        classes: output channels (1 for a binary mask with a sigmoid, else one per class).
        in_channels: image channels (1 for grey EM slices, 3 for RGB).
        encoder_weights: a name smp knows for the encoder's weights ("imagenet", "ssl", ...), taken from the
            Hugging Face cache or downloaded into it once, or a local file with the encoder's state dict.
        options: passed to the architecture (for U-Net: decoder_channels, encoder_depth, ...).
    """
    if arch not in ARCHS:
        raise ConfigError(f"model.arch: unknown architecture {arch!r}; one of {', '.join(sorted(ARCHS))}")
    try:
        net = ARCHS[arch](encoder=encoder, classes=classes, in_channels=in_channels, **options)
    except (KeyError, TypeError, ValueError) as err:
        raise ConfigError(f"cannot build {arch} on encoder {encoder!r}: {err}") from None
    if encoder_weights and is_weights_name(encoder_weights):
        load_pretrained_encoder(net.encoder, encoder, str(encoder_weights), in_channels)
    elif encoder_weights:
        load_encoder_weights(net.encoder, encoder_weights, name=f"encoder {encoder}")
    depth = options.get("encoder_depth", 5)
    return SegModel(net, stride=getattr(net.encoder, "output_stride", 2**depth))


def build_model_from_config(cfg: Mapping[str, Any] | Any) -> SegModel:
    """Build from a config mapping (or the `model` section object) with keys arch, encoder, classes, ..."""
    if hasattr(cfg, "model_dump"):
        cfg = cfg.model_dump()
    cfg = dict(cfg)
    options = dict(cfg.pop("options", None) or {})
    return build_model(**cfg, **options)


def load_encoder_weights(encoder: nn.Module, path: str | Path, name: str = "the encoder") -> None:
    """Load an encoder state dict from a local file (e.g. a torchvision ResNet's), ignoring a classifier head.

    When the encoder's first convolution takes other than the file's input channels (a 1- or 4-channel
    model from 3-channel ImageNet weights), its kernels are adapted as smp does for pretrained encoders
    (see `adapt_first_conv`). Any other mismatch, or a file that is not a state dict, is a `ConfigError`.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"model.encoder_weights: no such file {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # truncated, not a torch file, or pickled objects that weights_only refuses
        raise ConfigError(
            f"model.encoder_weights: {path} is not a readable PyTorch weights file (a state dict saved with torch.save)"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"model.encoder_weights: {path} holds no state dict (names to tensors)")
    state = {k: v for k, v in state.items() if not str(k).startswith(("fc.", "classifier."))}
    own = encoder.state_dict()
    first = next((f"{n}.weight" for n, m in encoder.named_modules() if isinstance(m, nn.Conv2d)), None)
    if first in state and first in own:
        kept, wanted = state[first].shape, own[first].shape
        if kept != wanted and kept[0] == wanted[0] and kept[2:] == wanted[2:]:
            state[first] = adapt_first_conv(state[first], wanted[1])
    # Files from older torch versions have no BatchNorm counters; those start at zero.
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in state if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} weight(s) missing, e.g. {missing[0]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unknown, e.g. {unexpected[0]}")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} of another shape, e.g. {k} {_shape(state[k])} instead of {_shape(own[k])}")
        raise ConfigError(f"model.encoder_weights: {path} does not fit {name}: {'; '.join(parts)}")
    encoder.load_state_dict(state, strict=False)


def load_pretrained_encoder(encoder: nn.Module, encoder_name: str, weights: str, in_channels: int) -> None:
    """Load smp's pretrained `weights` for `encoder_name` into `encoder`, as smp's own models do.

    smp reads them from the Hugging Face cache (HF_HOME, default ~/.cache/huggingface), downloading them
    there once when it can; offline (HF_HUB_OFFLINE=1, or no network) a cached copy is used. A name smp
    does not know for the encoder, or weights neither cached nor downloadable, is a one-line `ConfigError`.
    """
    from segmentation_models_pytorch.encoders import encoders, get_encoder

    if encoder_name.startswith("tu-"):
        raise ConfigError(
            f"model.encoder_weights {weights!r}: timm encoders ({encoder_name}) name their weights in the encoder "
            "name (tu-NAME.TAG); give a local weights file instead"
        )
    known = encoders.get(encoder_name, {}).get("pretrained_settings", {})
    if weights not in known:
        choices = ", ".join(known) or "none"
        raise ConfigError(
            f"model.encoder_weights {weights!r}: smp has no such weights for encoder {encoder_name} "
            f"(it has: {choices}); or give a local weights file"
        )
    try:
        pretrained = get_encoder(encoder_name, in_channels=in_channels, depth=getattr(encoder, "_depth", 5),
                                 weights=weights)
    except Exception as err:  # hub errors: offline and not cached, no network, a broken cache entry
        from huggingface_hub.constants import HF_HUB_CACHE

        repo, revision = known[weights]["repo_id"], known[weights]["revision"]
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"model.encoder_weights {weights!r}: the weights of {encoder_name} are not in the Hugging Face cache "
            f"{HF_HUB_CACHE} and could not be downloaded ({reason[:160]}); fetch them once where there is a "
            f"network (hf download {repo} --revision {revision}) and copy the cache here or point HF_HOME at it, "
            "or give a local weights file"
        ) from None
    encoder.load_state_dict(pretrained.state_dict())


def adapt_first_conv(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """First-convolution kernels (out, C, kh, kw) for `in_channels` inputs, as smp's `patch_first_conv`.

    One channel gets the sum over the C kernels; otherwise channel i takes kernel i % C, and all are scaled
    by C / in_channels, so that an image repeated over the channels gives the same response.
    """
    if in_channels == 1:
        return weight.sum(1, keepdim=True)
    channels = weight.shape[1]
    return weight[:, torch.arange(in_channels) % channels] * (channels / in_channels)


def _shape(tensor: torch.Tensor) -> str:
    return "x".join(map(str, tensor.shape))


__all__ = [
    "ARCHS", "SegModel", "adapt_first_conv", "build_model", "build_model_from_config", "is_weights_name",
    "load_encoder_weights", "load_pretrained_encoder",
]

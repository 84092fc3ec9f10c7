"""RefineNet (Lin et al., CVPR 2017) and Light-Weight RefineNet (Nekrasov et al., BMVC 2018) on any smp encoder."""

from __future__ import annotations

from typing import Sequence

import torch
from segmentation_models_pytorch.encoders import get_encoder
from torch import nn

from seg.models.refinenet.blocks import RefineNetBlock, ResidualConvUnit, conv, upsample

# The authors' RF-LW-MobileNet-v2 taps these torchvision `features` indices (all inverted-residual groups
# from stride 4 on), grouped by stride 4, 8, 16, 32; it does not use the final 1x1 320->1280 conv (index 18).
_MOBILENET_V2_TAPS = ((3,), (6,), (10, 13), (16, 17))
_MOBILENET_V2_TAP_CHANNELS = ((24,), (32,), (64, 96), (160, 320))


def _check_channels(channels: Sequence[int]) -> tuple[int, ...]:
    channels = tuple(int(c) for c in channels)
    if len(channels) != 4 or min(channels) < 1:
        raise ValueError(f"channels needs four positive widths (RefineNet-4 .. RefineNet-1), got {channels}")
    return channels


class RefineNet(nn.Module):
    """RefineNet_ is a multi-path refinement network: instead of dilating the encoder, it refines the coarse
    deep features with the finer encoder features, from stride 32 down to stride 4, through a cascade of
    four RefineNet blocks.

    The four deepest encoder feature maps (strides 4, 8, 16, 32) are used. RefineNet-4 takes only the
    stride-32 map; RefineNet-3 takes RefineNet-4's output and the stride-16 map; and so on down to
    RefineNet-1 at stride 4. Each block (see `RefineNetBlock`) adapts its encoder map with a 3x3
    convolution, passes every input path through two residual conv units (RCU: ReLU-conv-ReLU-conv plus
    identity, no batch norm), fuses the paths (3x3 convolution per path, bilinear upsampling, sum), captures
    context with chained residual pooling (CRP: a chain of 5x5 stride-1 max-pools and 3x3 convolutions,
    summed residually) and ends with one RCU. The paths are identity mappings all the way, so gradients
    reach every encoder stage directly. After RefineNet-1 come two more RCUs, optional dropout and a 3x3
    convolution to the classes; the logits are upsampled bilinearly to the input size.

    Widths and the layout follow the paper and the authors' code (guosheng/refinenet and its PyTorch port
    DrSleep/refinenet-pytorch): 512 channels for RefineNet-4, 256 for the others; the deeper input path of
    a block keeps the previous block's width through its RCUs and is brought to the block's width by its
    fusion convolution. With `crp_blocks=4` the decoder has exactly the layout (and parameter count) of the
    released RefineNet-101 (ResNet-101 encoder, about 118M parameters).

    Args:
        encoder_name: Name of the smp encoder (backbone) that extracts the features, e.g. "resnet101",
            "mobilenet_v2", "efficientnet-b0", "tu-..."; any encoder with five stages works.
        in_channels: Number of input channels (1 for grey images, 3 for RGB).
        classes: Number of output channels (logits), one per class.
        channels: Widths of RefineNet-4, -3, -2, -1 (deepest first). Default **(512, 256, 256, 256)** as in the
            paper.
        crp_blocks: Pooling blocks in each chained residual pooling. Default **2** as in the CVPR paper ("in
            practice we use two pooling blocks"); the released RefineNet models use 4.
        head_rcus: Residual conv units after RefineNet-1, before the classifier. Default **2** (the paper: "two
            additional RCUs before the final softmax prediction").
        dropout: Dropout probability before the classifier. Default **0.0** (the PyTorch port uses 0.5).
        norm: Batch norm after every decoder convolution, residual branches starting at zero. Default
            **True**: without it training from random initialisation explodes (`seg.models.refinenet.blocks`);
            False is the paper's layout, for its weights.

    Returns:
        ``torch.nn.Module``: **RefineNet**, whose forward maps (N, in_channels, H, W) to logits
        (N, classes, H, W). H and W can be anything; `seg.models.build_model` pads to a multiple of 32.

    .. _RefineNet:
        https://arxiv.org/abs/1611.06612
    """

    def __init__(
        self,
        encoder_name: str = "resnet101",
        in_channels: int = 3,
        classes: int = 1,
        channels: Sequence[int] = (512, 256, 256, 256),
        crp_blocks: int = 2,
        head_rcus: int = 2,
        dropout: float = 0.0,
        norm: bool = True,
    ):
        super().__init__()
        channels = _check_channels(channels)
        self.encoder = get_encoder(encoder_name, in_channels=in_channels, depth=5, weights=None)
        skips = list(self.encoder.out_channels[-4:])[::-1]  # strides 32, 16, 8, 4

        blocks = [RefineNetBlock([skips[0]], channels[0], crp_blocks, adapt=[True], norm=norm)]
        for i in range(1, 4):
            blocks.append(
                RefineNetBlock([channels[i - 1], skips[i]], channels[i], crp_blocks, adapt=[False, True], norm=norm)
            )
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Sequential(
            *(ResidualConvUnit(channels[3], norm=norm) for _ in range(head_rcus)),
            nn.Dropout(dropout),
            conv(channels[3], classes, kernel_size=3, bias=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        skips = self.encoder(x)[-4:][::-1]  # strides 32, 16, 8, 4
        y = self.blocks[0](skips[0])
        for block, skip in zip(self.blocks[1:], skips[1:]):
            y = block(y, skip)
        return upsample(self.head(y), size)


class RefineNetLW(nn.Module):
    """Light-Weight RefineNet_ (RF-LW): RefineNet with 1x1 instead of 3x3 convolutions in the adapting,
    fusion and pooling convolutions, and without residual conv units. It keeps RefineNet's cascade from
    stride 32 to stride 4 and the chained residual pooling (four blocks of 5x5 stride-1 max-pool and 1x1
    convolution), and cuts the decoder's parameters and multiply-adds several times.

    The layout follows the authors' code (DrSleep/light-weight-refinenet, models/resnet.py): each encoder
    map gets a 1x1 convolution to the level's width (512 at stride 32, 256 elsewhere) and a 1x1 fusion
    convolution; the deeper path gets its own 1x1 fusion convolution, is upsampled bilinearly and added;
    then ReLU and CRP. The classifier is a 3x3 convolution on the stride-4 features; the logits are
    upsampled bilinearly to the input size. On ResNet-50/101/152 this reproduces the authors' parameter
    counts (27M, 46M, 62M with 21 classes).

    Args:
        encoder_name: Name of the smp encoder (backbone), e.g. "resnet50", "mobilenet_v2"; any encoder with
            five stages works (its four deepest maps, strides 4 to 32, are used).
        in_channels: Number of input channels (1 for grey images, 3 for RGB).
        classes: Number of output channels (logits), one per class.
        channels: Widths of the four levels, deepest first. Default **(512, 256, 256, 256)** as in the
            authors' ResNet models, or **(256, 256, 256, 256)** with `paper_mobilenet_v2`.
        crp_blocks: Pooling blocks in each chained residual pooling. Default **4** as in the paper.
        paper_mobilenet_v2: Reproduce the authors' RF-LW-MobileNet-v2 (needs ``encoder_name="mobilenet_v2"``):
            it taps all six inverted-residual groups from stride 4 on (24, 32, 64, 96, 160 and 320 channels;
            the two maps at stride 16 and the two at stride 32 are each projected by one 1x1 convolution on
            their concatenation, which equals the authors' sum of two 1x1 convolutions), gives encoder paths
            no separate fusion convolution, and drops torchvision's final 1x1 320->1280 convolution
            (``encoder.features[18]`` becomes an identity, so a weights file for this encoder must leave out
            ``features.18.*``). Default **False**: the general layout on the four deepest maps, which on
            smp's mobilenet_v2 uses the 1280-channel map.
        norm: Batch norm after every decoder convolution, pooling branches starting at zero. Default
            **True** (see `seg.models.refinenet.blocks`); False is the paper's layout, for its weights.

    Returns:
        ``torch.nn.Module``: **RefineNetLW**, whose forward maps (N, in_channels, H, W) to logits
        (N, classes, H, W).

    .. _Light-Weight RefineNet:
        https://arxiv.org/abs/1810.03272
    """

    def __init__(
        self,
        encoder_name: str = "resnet50",
        in_channels: int = 3,
        classes: int = 1,
        channels: Sequence[int] | None = None,
        crp_blocks: int = 4,
        paper_mobilenet_v2: bool = False,
        norm: bool = True,
    ):
        super().__init__()
        self.encoder = get_encoder(encoder_name, in_channels=in_channels, depth=5, weights=None)
        if paper_mobilenet_v2:
            if encoder_name != "mobilenet_v2":
                raise ValueError(f"paper_mobilenet_v2 needs encoder_name='mobilenet_v2', got {encoder_name!r}")
            self.encoder.features[18] = nn.Identity()
            self.encoder._out_channels = list(self.encoder._out_channels[:-1]) + [320]
            self.taps = _MOBILENET_V2_TAPS
            skips = [sum(c) for c in _MOBILENET_V2_TAP_CHANNELS][::-1]
            channels = (256, 256, 256, 256) if channels is None else channels
            fusion_convs = [True, False]
        else:
            self.taps = None
            skips = list(self.encoder.out_channels[-4:])[::-1]  # strides 32, 16, 8, 4
            channels = (512, 256, 256, 256) if channels is None else channels
            fusion_convs = None
        channels = _check_channels(channels)

        light = dict(crp_blocks=crp_blocks, kernel_size=1, path_rcus=0, out_rcus=0, norm=norm)
        blocks = [RefineNetBlock([skips[0]], channels[0], adapt=[True], **light)]
        for i in range(1, 4):
            blocks.append(
                RefineNetBlock(
                    [channels[i - 1], skips[i]], channels[i], adapt=[False, True], fusion_convs=fusion_convs, **light
                )
            )
        self.blocks = nn.ModuleList(blocks)
        self.classifier = conv(channels[3], classes, kernel_size=3, bias=True)

    def _skips(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Encoder maps at strides 32, 16, 8, 4."""
        if self.taps is None:
            return self.encoder(x)[-4:][::-1]
        wanted = {i for tap in self.taps for i in tap}
        outs = {}
        for i, module in enumerate(self.encoder.features[: max(wanted) + 1]):
            x = module(x)
            if i in wanted:
                outs[i] = x
        skips = [torch.cat([outs[i] for i in tap], dim=1) if len(tap) > 1 else outs[tap[0]] for tap in self.taps]
        return skips[::-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        skips = self._skips(x)
        y = self.blocks[0](skips[0])
        for block, skip in zip(self.blocks[1:], skips[1:]):
            y = block(y, skip)
        return upsample(self.classifier(y), size)


__all__ = ["RefineNet", "RefineNetLW"]

"""RefineNet building blocks, named as in Lin et al., "RefineNet: Multi-Path Refinement Networks for
High-Resolution Semantic Segmentation" (CVPR 2017), Fig. 2.

The light-weight variant (Nekrasov et al., BMVC 2018) reuses them with 1x1 convolutions (`kernel_size=1`),
no residual conv units and four pooling blocks.

None of the blocks has batch norm: RefineNet adapts and fuses the (batch-normed) encoder features with
plain convolutions.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def conv(in_channels: int, out_channels: int, kernel_size: int = 3, bias: bool = False) -> nn.Conv2d:
    """A stride-1 "same" convolution (3x3 in RefineNet, 1x1 in the light-weight RefineNet)."""
    return nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias)


def upsample(x: torch.Tensor, size: Sequence[int] | torch.Size) -> torch.Tensor:
    """Bilinear resize to an explicit `size` (not a scale factor): odd sizes and ONNX dynamic shapes work."""
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class ResidualConvUnit(nn.Module):
    """Residual conv unit (RCU): ReLU-conv3x3-ReLU-conv3x3 plus the identity, no batch norm (paper Fig. 2b).

    As in the authors' code, the first convolution has a bias and the second has none.

    Args:
        channels: input and output channels.
        kernel_size: convolution size (3 in the paper).
    """

    def __init__(self, channels: int, kernel_size: int = 3):
        super().__init__()
        self.conv1 = conv(channels, channels, kernel_size, bias=True)
        self.conv2 = conv(channels, channels, kernel_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(F.relu(x))
        out = self.conv2(F.relu(out))
        return x + out


class MultiResolutionFusion(nn.Module):
    """Multi-resolution fusion (paper Fig. 2c): one convolution per path to `out_channels`, bilinear upsampling
    of every path to the size of the largest one, sum.

    Paths are ordered from the lowest to the highest resolution: the last one sets the output size (a fixed
    choice, so the graph does not depend on the input size when exported).

    Args:
        in_channels: channels of each input path.
        out_channels: channels of the fused output (the paper uses the smallest of the inputs).
        kernel_size: size of the per-path convolutions (3 in RefineNet, 1 in the light-weight RefineNet).
        convs: per path, whether it gets a convolution (default: all). A path without one must already
            have `out_channels` channels (used to reproduce the light-weight MobileNet-v2 model, whose encoder
            paths are only projected once).
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        out_channels: int,
        kernel_size: int = 3,
        convs: Sequence[bool] | None = None,
    ):
        super().__init__()
        convs = [True] * len(in_channels) if convs is None else list(convs)
        if len(convs) != len(in_channels):
            raise ValueError(f"convs has {len(convs)} entries for {len(in_channels)} paths")
        for c, use in zip(in_channels, convs):
            if not use and c != out_channels:
                raise ValueError(f"a path of {c} channels needs a fusion conv to reach {out_channels}")
        self.convs = nn.ModuleList(
            conv(c, out_channels, kernel_size) if use else nn.Identity() for c, use in zip(in_channels, convs)
        )

    def forward(self, *paths: torch.Tensor) -> torch.Tensor:
        size = paths[-1].shape[-2:]
        out = self.convs[-1](paths[-1])
        for path, conv_ in zip(paths[:-1], self.convs[:-1]):
            out = out + upsample(conv_(path), size)
        return out


class ChainedResidualPooling(nn.Module):
    """Chained residual pooling (CRP, paper Fig. 2d): ReLU, then a chain of `blocks` pooling blocks, each a
    5x5 max-pool (stride 1, padding 2) followed by a bias-free convolution. Each block takes the previous
    block's output, and every block's output is added to the running sum that starts from the ReLU'd input:

        x = relu(x); top = x
        for each block: top = conv(maxpool(top)); x = x + top

    With all convolutions zero it is therefore `relu(x)` (the identity on non-negative input).

    Args:
        channels: input and output channels.
        blocks: number of pooling blocks (2 in the CVPR paper, 4 in the released RefineNet code and in the
            light-weight RefineNet).
        kernel_size: convolution size (3 in RefineNet, 1 in the light-weight RefineNet).
    """

    def __init__(self, channels: int, blocks: int = 2, kernel_size: int = 3):
        super().__init__()
        self.pool = nn.MaxPool2d(kernel_size=5, stride=1, padding=2)
        self.convs = nn.ModuleList(conv(channels, channels, kernel_size) for _ in range(blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(x)
        top = x
        for conv_ in self.convs:
            top = conv_(self.pool(top))
            x = x + top
        return x


class RefineNetBlock(nn.Module):
    """One RefineNet block (paper Fig. 2a): per input path an optional channel-adapting convolution and
    `path_rcus` residual conv units; multi-resolution fusion when there is more than one path; chained
    residual pooling; `out_rcus` output residual conv units.

    Paths are ordered deepest first: the previous RefineNet block's output (at its own width, refined by
    this block's RCUs and brought to `channels` by the fusion convolution, as in the authors' code), then
    the encoder feature map (adapted to `channels` first).

    Args:
        in_channels: channels of each input path.
        channels: width of the block (the paper: 512 for RefineNet-4, 256 for the others); also its output.
        crp_blocks: pooling blocks in the chained residual pooling.
        kernel_size: size of the adapting, fusion and pooling convolutions (and of the RCUs).
        path_rcus: residual conv units on each input path (2 in the paper, 0 in the light-weight RefineNet).
        out_rcus: residual conv units on the output (1 in the paper, 0 in the light-weight RefineNet).
        adapt: per path, whether it gets the channel-adapting convolution to `channels`
            (default: the paths whose channels differ from `channels`).
        fusion_convs: per path, whether it gets a fusion convolution (see `MultiResolutionFusion`).
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        channels: int,
        crp_blocks: int = 2,
        kernel_size: int = 3,
        path_rcus: int = 2,
        out_rcus: int = 1,
        adapt: Sequence[bool] | None = None,
        fusion_convs: Sequence[bool] | None = None,
    ):
        super().__init__()
        adapt = [c != channels for c in in_channels] if adapt is None else list(adapt)
        if len(adapt) != len(in_channels):
            raise ValueError(f"adapt has {len(adapt)} entries for {len(in_channels)} paths")
        path_channels = [channels if a else c for c, a in zip(in_channels, adapt)]
        self.paths = nn.ModuleList(
            nn.Sequential(
                *([conv(c, channels, kernel_size)] if a else []),
                *(ResidualConvUnit(pc, kernel_size) for _ in range(path_rcus)),
            )
            for c, a, pc in zip(in_channels, adapt, path_channels)
        )
        if len(in_channels) > 1:
            self.fusion = MultiResolutionFusion(path_channels, channels, kernel_size, fusion_convs)
        elif path_channels[0] != channels:
            raise ValueError(f"a single path of {path_channels[0]} channels needs adapt=True to reach {channels}")
        else:
            self.fusion = None
        self.crp = ChainedResidualPooling(channels, crp_blocks, kernel_size)
        self.out = nn.Sequential(*(ResidualConvUnit(channels, kernel_size) for _ in range(out_rcus)))
        self.out_channels = channels

    def forward(self, *paths: torch.Tensor) -> torch.Tensor:
        paths = [path(x) for path, x in zip(self.paths, paths)]
        x = self.fusion(*paths) if self.fusion is not None else paths[0]
        return self.out(self.crp(x))


__all__ = [
    "ChainedResidualPooling",
    "MultiResolutionFusion",
    "RefineNetBlock",
    "ResidualConvUnit",
    "conv",
    "upsample",
]

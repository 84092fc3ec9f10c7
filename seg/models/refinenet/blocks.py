"""RefineNet building blocks, named as in Lin et al., "RefineNet: Multi-Path Refinement Networks for
High-Resolution Semantic Segmentation" (CVPR 2017), Fig. 2.

The light-weight variant (Nekrasov et al., BMVC 2018) reuses them with 1x1 convolutions (`kernel_size=1`),
no residual conv units and four pooling blocks.

The papers' blocks have no normalisation: RefineNet adapts and fuses the (batch-normed) encoder features
with plain convolutions. Trained from random initialisation, that chain of un-normalised convolutions
explodes within the first optimiser steps: Adam moves every weight by about the learning rate whatever
its gradient, a 3x3 convolution over 256 channels sums 2304 such changes, and the changes multiply along
the adapting, residual, fusion and pooling convolutions of four blocks (the logits' spread went from 0.3
to 1.8e7 after one step at lr 0.001 on resnet18). So by default (`norm=True`) every decoder convolution is
followed by batch norm, which keeps each output's scale whatever the weights' scale, and the last batch
norm of each residual branch (the RCU's second, each pooling block's) starts with scale 0, so every block
starts as the identity on its main path. Measured over 8 steps from random initialisation (ISBI crops of
128, batch 2, AdamW), the largest training loss of RefineNet on resnet18 at lr 0.001: 9.1e6 as the papers
lay it out, 4.6e3 with zero-initialised branches alone, 286 with branches scaled by 0.2, 3.6 with batch
norm, 0.88 with batch norm and zero-initialised branches (the default). `norm=False` is the papers'
layout, with their weight names.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def conv(in_channels: int, out_channels: int, kernel_size: int = 3, bias: bool = False) -> nn.Conv2d:
    """A stride-1 "same" convolution (3x3 in RefineNet, 1x1 in the light-weight RefineNet)."""
    return nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias)


def norm_layer(channels: int, norm: bool, zero: bool = False) -> nn.Module:
    """Batch norm after a decoder convolution, or nothing (no weights, so state dicts keep their names).
    With `zero` its scale starts at 0: the last layer of a residual branch, which then starts as nothing."""
    if not norm:
        return nn.Identity()
    layer = nn.BatchNorm2d(channels)
    if zero:
        nn.init.zeros_(layer.weight)
    return layer


def upsample(x: torch.Tensor, size: Sequence[int] | torch.Size) -> torch.Tensor:
    """Bilinear resize to an explicit `size` (not a scale factor): odd sizes and ONNX dynamic shapes work."""
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class ResidualConvUnit(nn.Module):
    """Residual conv unit (RCU): ReLU-conv3x3-ReLU-conv3x3 plus the identity, no batch norm (paper Fig. 2b).

    As in the authors' code, the first convolution has a bias and the second has none; with `norm` each
    is followed by batch norm instead (and neither has a bias).

    Args:
        channels: input and output channels.
        kernel_size: convolution size (3 in the paper).
        norm: batch norm after each convolution.
    """

    def __init__(self, channels: int, kernel_size: int = 3, norm: bool = True):
        super().__init__()
        self.conv1 = conv(channels, channels, kernel_size, bias=not norm)
        self.bn1 = norm_layer(channels, norm)
        self.conv2 = conv(channels, channels, kernel_size, bias=False)
        self.bn2 = norm_layer(channels, norm, zero=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn1(self.conv1(F.relu(x)))
        out = self.bn2(self.conv2(F.relu(out)))
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
        norm: batch norm after each path's convolution.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        out_channels: int,
        kernel_size: int = 3,
        convs: Sequence[bool] | None = None,
        norm: bool = True,
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
        self.norms = nn.ModuleList(norm_layer(out_channels, norm and use) for use in convs)

    def forward(self, *paths: torch.Tensor) -> torch.Tensor:
        size = paths[-1].shape[-2:]
        out = self.norms[-1](self.convs[-1](paths[-1]))
        for path, conv_, norm_ in zip(paths[:-1], self.convs[:-1], self.norms[:-1]):
            out = out + upsample(norm_(conv_(path)), size)
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
        norm: batch norm after each pooling block's convolution.
    """

    def __init__(self, channels: int, blocks: int = 2, kernel_size: int = 3, norm: bool = True):
        super().__init__()
        self.pool = nn.MaxPool2d(kernel_size=5, stride=1, padding=2)
        self.convs = nn.ModuleList(conv(channels, channels, kernel_size) for _ in range(blocks))
        self.norms = nn.ModuleList(norm_layer(channels, norm, zero=True) for _ in range(blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(x)
        top = x
        for conv_, norm_ in zip(self.convs, self.norms):
            top = norm_(conv_(self.pool(top)))
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
        norm: batch norm after every convolution of the block (see the module's docstring).
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
        norm: bool = True,
    ):
        super().__init__()
        adapt = [c != channels for c in in_channels] if adapt is None else list(adapt)
        if len(adapt) != len(in_channels):
            raise ValueError(f"adapt has {len(adapt)} entries for {len(in_channels)} paths")
        path_channels = [channels if a else c for c, a in zip(in_channels, adapt)]
        self.paths = nn.ModuleList(
            nn.Sequential(
                *([conv(c, channels, kernel_size)] if a else []),
                *([nn.BatchNorm2d(channels)] if a and norm else []),
                *(ResidualConvUnit(pc, kernel_size, norm) for _ in range(path_rcus)),
            )
            for c, a, pc in zip(in_channels, adapt, path_channels)
        )
        if len(in_channels) > 1:
            self.fusion = MultiResolutionFusion(path_channels, channels, kernel_size, fusion_convs, norm)
        elif path_channels[0] != channels:
            raise ValueError(f"a single path of {path_channels[0]} channels needs adapt=True to reach {channels}")
        else:
            self.fusion = None
        self.crp = ChainedResidualPooling(channels, crp_blocks, kernel_size, norm)
        self.out = nn.Sequential(*(ResidualConvUnit(channels, kernel_size, norm) for _ in range(out_rcus)))
        self.out_channels = channels

    def forward(self, *paths: torch.Tensor) -> torch.Tensor:
        paths = [path(x) for path, x in zip(self.paths, paths)]
        x = self.fusion(*paths) if self.fusion is not None else paths[0]
        return self.out(self.crp(x))


__all__ = [
    "ChainedResidualPooling",
    "norm_layer",
    "MultiResolutionFusion",
    "RefineNetBlock",
    "ResidualConvUnit",
    "conv",
    "upsample",
]

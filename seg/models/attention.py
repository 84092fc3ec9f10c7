"""Attention-gated skip connections for smp's U-Net (Oktay et al. 2018, "Attention U-Net").

Each decoder stage multiplies its skip features by a gate in [0, 1] computed from them and from the coarser
decoder features (the gating signal, upsampled to the skip's size): alpha = sigmoid(psi(relu(W_x x + W_g g))),
MONAI's `AttentionBlock`. The gated skip is then concatenated as in the plain U-Net, so the gate can learn to
pass only the regions the coarser level finds relevant.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class GatedDecoderBlock(nn.Module):
    """An smp `UnetDecoderBlock` whose skip connection goes through an attention gate first."""

    def __init__(self, block: nn.Module, in_channels: int, skip_channels: int):
        super().__init__()
        from monai.networks.nets.attentionunet import AttentionBlock

        self.block = block
        self.gate = AttentionBlock(2, f_int=max(skip_channels // 2, 1), f_g=in_channels, f_l=skip_channels)

    def forward(self, feature_map: torch.Tensor, target_height: int, target_width: int,
                skip_connection: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        if skip_connection is not None:
            g = F.interpolate(feature_map, size=(target_height, target_width), mode=self.block.interpolation_mode)
            skip_connection = self.gate(g, skip_connection)
        return self.block(feature_map, target_height, target_width, skip_connection)


def gate_skips(unet: nn.Module) -> nn.Module:
    """Put an attention gate on every skip connection of an smp `Unet`, in place; returns it."""
    stages = list(unet.encoder.out_channels[1:])[::-1]  # deepest first, as the decoder takes them
    blocks = unet.decoder.blocks
    in_channels = [stages[0]] + [b.conv2[0].out_channels for b in blocks][:-1]
    skips = stages[1:] + [0] * (len(blocks) - len(stages) + 1)
    unet.decoder.blocks = nn.ModuleList(
        GatedDecoderBlock(b, i, s) if s else b for b, i, s in zip(blocks, in_channels, skips)
    )
    return unet

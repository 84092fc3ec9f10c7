"""RefineNet (Lin et al., CVPR 2017) and Light-Weight RefineNet (Nekrasov et al., BMVC 2018) on smp encoders."""

from seg.models.refinenet.blocks import (
    ChainedResidualPooling,
    MultiResolutionFusion,
    RefineNetBlock,
    ResidualConvUnit,
)
from seg.models.refinenet.model import RefineNet, RefineNetLW

__all__ = [
    "ChainedResidualPooling",
    "MultiResolutionFusion",
    "RefineNet",
    "RefineNetBlock",
    "RefineNetLW",
    "ResidualConvUnit",
]

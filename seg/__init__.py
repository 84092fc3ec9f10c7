"""seg: U-Net and RefineNet segmentation, from a config file to a tiled ONNX predictor."""

__version__ = "0.1.0"

from seg.errors import SegError  # noqa: E402
from seg.models import build_model, build_model_from_config  # noqa: E402

__all__ = ["SegError", "build_model", "build_model_from_config", "__version__"]

"""seg: U-Net and RefineNet segmentation, from a config file to a tiled ONNX predictor.

The prediction path (`seg.inference`) imports no torch; the model zoo (`seg.models`) loads it on first use.
`from seg import Predictor, TilingOptions, build_model` is the public surface; the rooms are listed in
README.md, "Where things are".
"""

__version__ = "0.1.0"

from seg.errors import SegError  # noqa: E402

__all__ = ["SegError", "Predictor", "TilingOptions", "build_model", "build_model_from_config", "__version__"]


def __getattr__(name: str):
    if name in ("build_model", "build_model_from_config"):
        from seg import models

        return getattr(models, name)
    if name == "Predictor":
        from seg.inference.predictor import Predictor

        return Predictor
    if name == "TilingOptions":
        from seg.inference.tiling import TilingOptions

        return TilingOptions
    raise AttributeError(f"module 'seg' has no attribute {name!r}")

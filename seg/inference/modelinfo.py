"""The description of a trained model, `ModelInfo`: read from and written to checkpoints and ONNX metadata.

A checkpoint holds the facts as top-level keys beside its weights; an exported ONNX file holds them as one
JSON object under the metadata key "seg" (and repeats the main ones as readable single keys). Both are read
and written here only, so a new fact is one field. This module imports pydantic and numpy, never torch.

    info = ModelInfo.from_checkpoint(ckpt, name="run")      # training.checkpoint writes info.to_checkpoint()
    meta = info.to_metadata()                               # ModelInfo.from_metadata(meta) reads it back
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, computed_field, model_validator

from seg.errors import SegError
from seg.inference.preprocess import Normalization
from seg.inference.tiling import TilingOptions

ONNX_FORMAT = "seg-onnx/1"
# Checkpoint keys besides the weights (older checkpoints have exactly these).
CHECKPOINT_KEYS = ("model_kwargs", "stride", "classes", "palette", "normalize", "in_channels", "ignore_index",
                   "tile_size", "overlap", "edges")  # fmt: skip
READABLE_KEYS = ("arch", "encoder", "classes", "palette", "in_channels", "normalize", "stride", "tile_size", "overlap",
                 "edges")  # fmt: skip


class ModelInfo(BaseModel):
    """What a predictor, the service and evaluation know about a model."""

    model_config = ConfigDict(frozen=True, protected_namespaces=())

    name: str = Field("model", description="the run (or file) the model comes from")
    arch: str = "unet"
    encoder: str = ""
    classes: list[str] = Field(min_length=2, description="one name per output class (a sigmoid model has two)")
    palette: list[list[int]] = Field(default_factory=list, description="RGB colour of each class")
    in_channels: int = Field(ge=1)
    normalize: Normalization = Field(default_factory=Normalization)
    stride: int = Field(32, ge=1, description="tile sides are multiples of it")
    tile_size: int = Field(512, description="the recommended tile side")
    overlap: float = Field(0.25, description="the recommended tile overlap fraction")
    edges: Literal["mirror", "inside"] = Field(
        "mirror", description="tiles past the image's edges into a reflected margin, or within the image"
    )
    ignore_index: int = 255
    version: str = Field("", description="seg's version at export")
    fp16: bool = False
    quantization: dict[str, Any] = Field(
        default_factory=dict,
        description="empty for a float model; for `seg export --int8`: method, calibration size, the gate's "
        "margin and the fp32 and int8 validation figures",
    )
    opset: int | None = None
    epoch: int | None = None
    model_kwargs: dict[str, Any] = Field(default_factory=dict, description="build_model's arguments")
    input: str = Field("image", description="the ONNX input's name")
    output: str = Field("logits", description="the ONNX output's name")

    @model_validator(mode="before")
    @classmethod
    def _outputs(cls, values: Any) -> Any:
        """Classes and palette are per output: a single class name gets "background" before it, and
        missing colours come from the default palette."""
        from seg.io.images import default_palette

        if not isinstance(values, dict) or not isinstance(values.get("classes"), (list, tuple)):
            return values
        classes = [str(name) for name in values["classes"]]
        if len(classes) == 1:
            classes = ["background", *classes]
        palette = [[int(v) for v in colour] for colour in values.get("palette") or []][: len(classes)]
        return {**values, "classes": classes, "palette": palette + default_palette(len(classes))[len(palette) :]}

    @computed_field(description="what the network computes in: int8, fp16 or fp32")
    @property
    def precision(self) -> str:
        """What the network computes in: "int8", "fp16" or "fp32"."""
        return "int8" if self.quantization else "fp16" if self.fp16 else "fp32"

    @property
    def num_classes(self) -> int:
        """Classes in the output, each with a name in `classes`."""
        return len(self.classes)

    def tiling(self, **overrides: Any) -> TilingOptions:
        """The model's recommended tiling, with the options given (None keeps the default)."""
        given = {key: value for key, value in overrides.items() if value is not None}
        return TilingOptions(**{"tile": self.tile_size, "overlap": self.overlap, "edges": self.edges, **given})

    # -- checkpoints ---------------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, ckpt: dict[str, Any], name: str = "model") -> "ModelInfo":
        """From a checkpoint dict (`training.checkpoint.load_checkpoint`)."""
        kwargs = {k: v for k, v in ckpt["model_kwargs"].items() if k != "encoder_weights"}
        facts = {key: ckpt[key] for key in CHECKPOINT_KEYS if key in ckpt}
        return cls(
            **{**facts, "model_kwargs": kwargs}, name=name, arch=kwargs.get("arch", "unet"),
            encoder=kwargs.get("encoder", ""), epoch=ckpt.get("epoch"),
        )  # fmt: skip

    def to_checkpoint(self) -> dict[str, Any]:
        """The checkpoint keys that describe the model (the weights go beside them)."""
        values = self.model_dump(mode="json")
        return {key: values[key] for key in CHECKPOINT_KEYS}

    # -- ONNX metadata -------------------------------------------------------------------------------
    @classmethod
    def from_metadata(cls, meta: dict[str, Any]) -> "ModelInfo":
        """From the "seg" JSON object of an exported file (older exports included); unknown keys are ignored."""
        return cls.model_validate(meta)

    def to_metadata(self) -> dict[str, Any]:
        """The "seg" JSON object."""
        return {"format": ONNX_FORMAT, **self.model_dump(mode="json")}

    def readable_metadata(self) -> dict[str, str]:
        """ONNX metadata_props: "seg" holds the whole object; single keys repeat the main facts readably."""
        meta = self.to_metadata()
        readable = {key: meta[key] if isinstance(meta[key], str) else json.dumps(meta[key]) for key in READABLE_KEYS}
        return {"seg": json.dumps(meta), "seg_version": self.version, **readable}

    @classmethod
    def from_onnx_props(cls, props: dict[str, str], name: str = "model") -> "ModelInfo":
        """From an ONNX file's metadata_props; SegError when the file was not written by `seg export`."""
        if "seg" not in props:
            raise SegError(f"{name}: this ONNX file has no seg metadata; export it with `seg export`")
        try:
            return cls.from_metadata(json.loads(props["seg"]))
        except ValidationError as err:
            first = err.errors()[0]
            key = ".".join(str(p) for p in first["loc"]) or "seg"
            raise SegError(f"{name}: inconsistent seg metadata ({key}: {first['msg']})") from None
        except (ValueError, TypeError) as err:
            raise SegError(f"{name}: unreadable seg metadata ({err})") from None

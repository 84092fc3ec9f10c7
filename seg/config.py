"""The training config: one YAML file with sections data, model, train, output, validated by pydantic.

`load_config(path, overrides)` is the one entry point; every error comes out as a `ConfigError` whose
message names the file and the dotted key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from seg.errors import ConfigError, SegError
from seg.inference.preprocess import Normalization
from seg.inference.tiling import TilingOptions

VOC_CLASSES = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
]  # fmt: skip


def is_weights_name(value: str | Path) -> bool:
    """True for a pretrained-weights name such as "imagenet" (no dot, no slash), False for a file path."""
    text = str(value)
    return not any(c in text for c in "./\\")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class Transform(Section):
    """One albumentations transform: its class name and keyword arguments."""

    model_config = ConfigDict(extra="allow")
    name: str


class DataConfig(Section):
    format: Literal["folder", "voc", "coco", "labelme", "cvat"] = "folder"
    root: Path
    images: str = "images"
    masks: str = "masks"
    annotations: Path | None = None  # coco: the (train) JSON; labelme: the folder of JSON files (default root)
    val_annotations: Path | None = None  # coco: a second JSON for the val split
    val_images: str | None = None  # coco: the val JSON's image folder (default: images)
    train_list: Path | None = None
    val_list: Path | None = None
    val_fraction: float = Field(0.2, ge=0.0, lt=1.0)
    classes: list[str] | None = None
    palette: list[list[int]] | None = None
    mask_mode: Literal["auto", "index", "binary", "color"] = "auto"
    ignore_index: int = 255
    ignore_color: list[int] | None = None  # color masks: this colour is the ignore index
    in_channels: int = Field(3, ge=1)
    normalize: Normalization = Field(default_factory=Normalization)
    crop_size: int = Field(256, ge=8)
    # share of training crops that hold a class other than 0; auto: a third when a class is rare (under 10%)
    foreground_crops: Annotated[float, Field(ge=0, le=1)] | Literal["auto"] = 0.0
    augment: list[Transform] | Literal["default", "strong", "none"] = "default"
    kind: Literal["em", "natural"] | None = None
    cache: bool = True

    @field_validator("palette", "ignore_color")
    @classmethod
    def _rgb(cls, value, info):
        for colour in (value or []) if info.field_name == "palette" else [value] if value else []:
            if len(colour) != 3 or not all(0 <= c <= 255 for c in colour):
                raise ValueError(f"colours are [r, g, b] in 0..255, got {colour}")
        return value

    @model_validator(mode="after")
    def _defaults(self):
        if self.classes is None and self.format not in ("coco", "labelme", "cvat"):  # exports: read with the data
            self.classes = list(VOC_CLASSES) if self.format == "voc" else ["background", "foreground"]
        if self.classes is not None and len(self.classes) < 2:
            raise ValueError("classes needs at least two names (background and one more)")
        if self.palette is not None and self.classes is not None and len(self.palette) < len(self.classes):
            raise ValueError(f"palette has {len(self.palette)} colours for {len(self.classes)} classes")
        if self.format == "coco" and self.annotations is None:
            raise ValueError("format coco needs annotations: the COCO JSON, relative to root")
        if self.format == "cvat":
            self.mask_mode = "color"
        if self.mask_mode == "color" and self.classes is not None:
            colours = [tuple(c) for c in self.class_palette[: len(self.classes)]]
            if self.ignore_color:
                colours.append(tuple(self.ignore_color))
            if len(set(colours)) < len(colours):
                raise ValueError("mask_mode color needs a different colour for each class (palette, ignore_color)")
        if self.kind is None:
            self.kind = "natural" if self.format == "voc" or self.in_channels == 3 else "em"
        return self

    @property
    def num_classes(self) -> int:
        if self.classes is None:
            raise SegError(f"data.classes: not read from the {self.format} export yet (seg.data.samples.find_samples reads it)")
        return len(self.classes)

    @property
    def class_palette(self) -> list[list[int]]:
        """`palette`, or the VOC colour map for these classes."""
        from seg.io.images import default_palette

        return self.palette or default_palette(self.num_classes)


class ModelConfig(Section):
    arch: str = "unet"  # a name in seg.models.ARCHS (checked there, and by `seg train` before it starts)
    encoder: str = "resnet34"
    encoder_weights: str | None = None  # a name smp knows (imagenet, ssl, ...) or a local weights file
    options: dict[str, Any] = Field(default_factory=dict)


class BorderWeight(Section):
    """U-Net's border weight map (`training.data.border_weight_map`): w0 and sigma in pixels."""

    w0: float = Field(10.0, ge=0)
    sigma: float = Field(5.0, gt=0)


class EMAConfig(Section):
    """An exponential moving average of the weights, for validation, checkpoints and export."""

    decay: float = Field(0.999, gt=0, lt=1)


class TrainConfig(Section):
    steps: int | None = Field(None, ge=1)  # optimiser steps for the run, instead of epochs
    epochs: int = Field(50, ge=1)
    time_limit_minutes: float | None = Field(None, gt=0)
    steps_per_epoch: int | None = Field(None, ge=1)
    batch_size: int = Field(8, ge=1)
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    scheduler: Literal["cosine", "poly", "none"] = "cosine"
    warmup_epochs: int = Field(0, ge=0)
    loss: str = "dice_ce"  # a name in training.losses.LOSSES (checked there, and by `seg train` before it starts)
    border_weight: BorderWeight | None = Field(None, validate_default=True)
    class_weights: list[float] | Literal["auto"] | None = Field(None, validate_default=True)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"
    channels_last: bool | None = None
    num_workers: int = Field(0, ge=0)
    val_every: int | None = Field(None, ge=1)
    val_every_steps: int | None = Field(None, ge=1)
    val_every_minutes: float | None = Field(None, gt=0)
    patience: int | None = Field(None, ge=1)
    accumulate: int = Field(1, ge=1)
    ema: EMAConfig | None = None
    metric: Literal["miou", "dice", "pixel_accuracy", "loss"] = "miou"
    threads: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _one_budget(self):
        if self.steps is not None and "epochs" in self.model_fields_set:
            raise ValueError("set steps or epochs, not both (steps counts optimiser steps; epochs passes over the data)")
        return self

    @model_validator(mode="after")
    def _one_cadence(self):
        keys = [k for k in ("val_every", "val_every_steps", "val_every_minutes") if getattr(self, k) is not None]
        if len(keys) > 1:
            raise ValueError(f"set one of val_every, val_every_steps, val_every_minutes, not {' and '.join(keys)}")
        return self

    @field_validator("border_weight", "class_weights")
    @classmethod
    def _ce_part(cls, value, info):
        """Both weight the cross-entropy part; `weighted_ce` turns the border weights on by default."""
        loss = info.data.get("loss")
        if value is None:
            return BorderWeight() if loss == "weighted_ce" and info.field_name == "border_weight" else None
        if loss in ("dice", "focal"):
            raise ValueError(f"loss {loss} has no cross-entropy part to weight")
        if isinstance(value, list) and not (all(0 <= w < float("inf") for w in value) and sum(value) > 0):
            raise ValueError(f"class weights are 0 or more, at least one above 0, got {value}")
        return value


class OutputConfig(Section):
    dir: Path = Path("runs/run")
    tile_size: int = 512
    overlap: float = 0.25
    edges: Literal["auto", "mirror", "inside"] = "auto"  # auto: mirror for data.kind em, inside for natural
    overlays: int = Field(4, ge=0)
    loggers: list[Literal["tensorboard", "mlflow"]] = Field(default_factory=list)
    mlflow_uri: str | None = None

    @field_validator("tile_size", "overlap")
    @classmethod
    def _tiling(cls, value, info):
        """The limits of every tiling (`seg.inference.tiling.TilingOptions`)."""
        try:
            TilingOptions(**{"tile" if info.field_name == "tile_size" else "overlap": value})
        except SegError as err:
            raise ValueError(str(err)) from None
        return value


class Config(Section):
    data: DataConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)

    @model_validator(mode="after")
    def _across_sections(self):
        weights, classes = self.train.class_weights, self.data.classes
        if isinstance(weights, list) and len(weights) != len(classes):
            raise ValueError(f"train.class_weights: {len(weights)} weights for {len(classes)} classes ({', '.join(classes)})")
        if self.output.edges == "auto":
            self.output.edges = "mirror" if self.data.kind == "em" else "inside"
        return self

    def model_kwargs(self) -> dict[str, Any]:
        """Arguments for `seg.models.build_model`."""
        return dict(
            arch=self.model.arch,
            encoder=self.model.encoder,
            classes=self.data.num_classes,
            in_channels=self.data.in_channels,
            encoder_weights=self.model.encoder_weights,
            **self.model.options,
        )


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config, apply `key.sub=value` overrides, validate. Relative paths (data.root,
    output.dir, model.encoder_weights) are taken relative to the file's folder."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} not valid YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with sections data, model, train, output")
    for item in overrides:
        apply_override(raw, item, path)
    keys = {item.partition("=")[0].strip() for item in overrides}
    train = raw.get("train")
    # An override of one budget or validation cadence replaces the file's other ones (--set train.epochs=5
    # drops the file's steps; --set train.val_every=1 its val_every_steps).
    for group in (("epochs", "steps"), ("val_every", "val_every_steps", "val_every_minutes")):
        given = [key for key in group if f"train.{key}" in keys]
        if given and isinstance(train, dict):
            for key in group:
                if key not in given:
                    train.pop(key, None)
    return validate_config(raw, path)


def validate_config(raw: dict[str, Any], path: str | Path = "<config>") -> Config:
    base = Path(path).parent
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        msg = first["msg"].removeprefix("Value error, ")
        if first["type"] == "extra_forbidden":
            msg = "unknown key"
        if not key and msg.split(":")[0].count(".") == 1:  # a check across sections names its key itself
            raise ConfigError(f"{path}: {msg}") from None
        raise ConfigError(f"{path}: {key or '(top level)'}: {msg}") from None
    _resolve_paths(cfg, base, path)
    return cfg


def _resolve_paths(cfg: Config, base: Path, path: str | Path) -> None:
    if not cfg.output.dir.is_absolute():
        cfg.output.dir = (base / cfg.output.dir).resolve()
    data = cfg.data
    if not data.root.is_absolute():
        data.root = (base / data.root).resolve()
    zipped = data.format == "cvat" and data.root.suffix == ".zip" and data.root.is_file()  # unpacked when read
    if not data.root.is_dir() and not zipped:
        raise ConfigError(f"{path}: data.root: no such folder {data.root}")
    for key in ("train_list", "val_list", "annotations", "val_annotations"):
        value = getattr(data, key)
        if key == "annotations" and data.format == "labelme":
            continue  # a folder, checked by seg.data.labelme
        if value is not None:
            value = value if value.is_absolute() else data.root / value
            if not value.is_file():
                raise ConfigError(f"{path}: data.{key}: no such file {value}")
            setattr(data, key, value)
    weights = cfg.model.encoder_weights
    if weights is not None and not is_weights_name(weights):
        weights = Path(weights) if Path(weights).is_absolute() else (base / weights).resolve()
        if not weights.is_file():
            raise ConfigError(f"{path}: model.encoder_weights: no such file {weights}")
        cfg.model.encoder_weights = str(weights)


def apply_override(raw: dict[str, Any], item: str, path: str | Path = "<config>") -> None:
    """Set `a.b.c=value` in a nested mapping; the value is parsed as YAML (numbers, lists, null)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. train.epochs=10")
    key, _, text = item.partition("=")
    parts = key.strip().split(".")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = text
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{path}: --set {key}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """A YAML/JSON-safe dict of the resolved config (without epochs when steps sets the budget)."""
    raw = cfg.model_dump(mode="json")
    if cfg.train.steps is not None:
        del raw["train"]["epochs"]
    return raw

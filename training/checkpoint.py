"""Checkpoints: plain dicts of tensors and primitives, written atomically, loadable with weights_only=True."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from seg.config import Config
from seg.errors import SegError
from seg.inference.modelinfo import ModelInfo
from seg.io.images import atomic_path
from seg.models import SegModel, build_model

FORMAT = "seg-checkpoint/1"


def model_info(model: SegModel, model_kwargs: dict[str, Any], cfg: Config, name: str = "model") -> ModelInfo:
    """The description of a model being trained: its architecture, and what export and prediction need
    from the config (classes, palette, normalisation, channels, tiling)."""
    data = cfg.data
    return ModelInfo.from_checkpoint(
        {"model_kwargs": model_kwargs, "stride": model.stride, "classes": data.classes, "palette": data.class_palette,
         "normalize": data.normalize, "in_channels": data.in_channels, "ignore_index": data.ignore_index,
         "tile_size": cfg.output.tile_size, "overlap": cfg.output.overlap, "edges": cfg.output.edges},
        name,
    )  # fmt: skip


def model_state(model: SegModel, model_kwargs: dict[str, Any], cfg: Config) -> dict[str, Any]:
    """The part of a checkpoint that describes its model: the weights and `model_info`'s keys."""
    return {"model": model.state_dict(), **model_info(model, model_kwargs, cfg).to_checkpoint()}


def checkpoint_name(path: str | Path) -> str:
    """A model's name from its checkpoint file: the run folder's for RUN/checkpoints/best.pt, else the stem."""
    path = Path(path)
    return path.parent.parent.name if path.parent.name == "checkpoints" else path.stem


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save({"format": FORMAT, **state}, tmp)


def resolve_checkpoint(path: str | Path, which: str = "best") -> Path:
    """A checkpoint file, or a run folder (its checkpoints/best.pt, else last.pt)."""
    path = Path(path)
    if path.is_dir():
        for name in (which, "last", "best"):
            candidate = path / "checkpoints" / f"{name}.pt"
            if candidate.is_file():
                return candidate
        raise SegError(f"{path}: no checkpoints/best.pt or last.pt in this run folder")
    if not path.is_file():
        raise SegError(f"{path}: no such checkpoint or run folder")
    return path


def load_checkpoint(path: str | Path, which: str = "best") -> dict[str, Any]:
    path = resolve_checkpoint(path, which)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for truncated or foreign files
        raise SegError(f"{path}: not a readable checkpoint ({err})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise SegError(f"{path}: not a seg checkpoint")
    ckpt["path"] = str(path)
    return ckpt


def saved_layout(kwargs: dict[str, Any], weights: dict[str, Any]) -> dict[str, Any]:
    """`kwargs` with what the saved `weights` say of the layout: RefineNet decoders had no batch norm
    before it became the default, so such weights are read (and resumed) as they are."""
    if kwargs.get("arch", "").startswith("refinenet") and "norm" not in kwargs:
        decoder = [k for k in weights if not k.startswith("net.encoder.")]
        kwargs = {**kwargs, "norm": any(".bn1." in k or ".norms." in k for k in decoder)}
    return kwargs


def model_from_checkpoint(ckpt: dict[str, Any]) -> SegModel:
    kwargs = dict(ckpt["model_kwargs"])
    kwargs.pop("encoder_weights", None)
    model = build_model(**saved_layout(kwargs, ckpt["model"]))
    model.load_state_dict(ckpt["model"])
    return model.eval()


def rng_state() -> dict[str, Any]:
    import random

    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    import random

    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"]))
    random.setstate(state["python"])

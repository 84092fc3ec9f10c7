"""Model size and cost: parameters and multiply-adds (MACs), for `seg models` and the table in docs/models.md."""

from __future__ import annotations

import copy
from typing import Any, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters of `model` (all of them, or only those with `requires_grad`)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def count_macs(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Multiply-adds (MACs) of one forward pass of `model` on a zero input of `input_shape` (N, C, H, W).

    Counted with `torch.utils.flop_counter.FlopCounterMode`, which counts FLOPs = 2 x MACs for convolutions
    (grouped and depthwise included) and matrix products (mm, addmm, bmm, attention) and nothing else:
    bias adds, batch norm, activations, pooling, interpolation and element-wise sums are not counted, as
    in the usual "GFLOPs" tables of segmentation papers (which are multiply-adds). The result is that
    count divided by 2.

    The forward runs on a copy of the model on PyTorch's "meta" device (shapes only, no arithmetic), so
    even large models at full resolution take well under a second; a model with an operation that has no
    meta kernel is run for real on the CPU in eval mode instead.
    """
    shape = tuple(int(s) for s in input_shape)
    try:
        meta = copy.deepcopy(model).to("meta").eval()
        flops = _flops(meta, torch.zeros(shape, device="meta"))
    except (NotImplementedError, RuntimeError):
        was_training = model.training
        model.eval()
        try:
            device = next(model.parameters()).device
        except StopIteration:
            device = torch.device("cpu")
        flops = _flops(model, torch.zeros(shape, device=device))
        model.train(was_training)
    return flops // 2


def _flops(model: nn.Module, x: torch.Tensor) -> int:
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    return int(counter.get_total_flops())


def summarize(
    arch: str,
    encoder: str,
    classes: int,
    in_channels: int,
    height: int,
    width: int,
    *,
    padded: bool = True,
    **options: Any,
) -> dict[str, Any]:
    """Build `arch` on `encoder` (no weights) and count its parameters and multiply-adds on one
    `in_channels` x `height` x `width` image.

    Args:
        arch, encoder, classes, in_channels, options: as for `seg.models.build_model`.
        height, width: input size for the MACs.
        padded: count the model as `build_model` returns it, i.e. with the input padded to a multiple of
            the encoder stride (625x468 runs at 640x480), which is what actually runs. With False, count
            the bare network on exactly `height` x `width`, as papers do (RefineNet takes any size; U-Net
            needs multiples of 32).

    Returns:
        A dict with the arguments and ``params`` (int), ``macs`` (int, multiply-adds), ``params_m``
        (millions) and ``gmacs`` (billions), plus ``input`` (the (N, C, H, W) counted).
    """
    from seg.models import build_model

    model = build_model(arch=arch, encoder=encoder, classes=classes, in_channels=in_channels, **options)
    net = model if padded else model.net
    shape = (1, in_channels, height, width)
    params = count_parameters(model)
    macs = count_macs(net, shape)
    if padded:
        shape = (1, in_channels, -(-height // model.stride) * model.stride, -(-width // model.stride) * model.stride)
    return {
        "arch": arch,
        "encoder": encoder,
        "classes": classes,
        "in_channels": in_channels,
        "height": height,
        "width": width,
        "options": dict(options),
        "input": shape,
        "params": params,
        "macs": macs,
        "params_m": params / 1e6,
        "gmacs": macs / 1e9,
    }


__all__ = ["count_macs", "count_parameters", "summarize"]

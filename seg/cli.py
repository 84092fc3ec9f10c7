"""The `seg` command line: train, eval, export, predict, serve, models.

Errors a user can cause (`SegError`) print one line on stderr and exit with code 2.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from seg.errors import SegError

app = typer.Typer(
    name="seg",
    help="Train, export and serve U-Net and RefineNet segmentation models; predict images of any size by tiles.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)


def user_errors(fn):
    """Turn a SegError into `error: ...` on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SegError as e:
            err.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err.print("interrupted")
            raise typer.Exit(130) from None

    return wrapper


@app.command()
@user_errors
def train(
    config: Path = typer.Argument(..., help="YAML config file (sections data, model, train, output)."),
    set_: list[str] = typer.Option([], "--set", help="Override a key, e.g. --set train.epochs=10 (repeatable)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in output.dir from its last checkpoint."),
):
    """Train a model from a config file into a run folder."""
    from seg.config import load_config
    from training.train import train as run_training

    cfg = load_config(config, set_)
    run_training(cfg, resume=resume, console=err)


@app.command("eval")
@user_errors
def evaluate(
    model: Path = typer.Argument(..., help="A run folder, a checkpoint (.pt) or an exported model (.onnx)."),
    data: Path = typer.Option(..., "--data", help="A config file (its validation split) or a folder with images/ and masks/."),
    split: str = typer.Option("val", help="With a config: 'val' or 'train'."),
    out: Optional[Path] = typer.Option(None, help="Write the metrics as JSON here (default: beside the model)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
):
    """Evaluate a model on labelled images: per-class IoU and Dice, mIoU, pixel accuracy."""
    from training.evaluate import evaluate as run_eval, print_table

    result = run_eval(model, data, split=split, device=device)
    print_table(result, Console())
    target = out or (model if model.is_dir() else model.parent) / f"eval_{split}.json"
    from seg.imageio import atomic_path

    with atomic_path(target) as tmp:
        tmp.write_text(json.dumps(result, indent=2))
    err.print(f"metrics written to {target}")


@app.command()
@user_errors
def export(
    run: Path = typer.Argument(..., help="A run folder or a checkpoint (.pt)."),
    out: Path = typer.Option(..., "--out", help="The ONNX file to write."),
    opset: int = typer.Option(18, help="ONNX opset."),
    fp16: bool = typer.Option(False, "--fp16", help="Store weights and compute in float16."),
):
    """Export a checkpoint to ONNX with its metadata, and check it against PyTorch."""
    raise SegError("`seg export` is not available yet")


@app.command()
@user_errors
def predict(
    inputs: list[str] = typer.Argument(..., help="[MODEL] then image files, folders or globs."),
    out: Path = typer.Option(..., "--out", help="Output folder."),
):
    """Segment images by tiles with an ONNX model (the bundled one by default)."""
    raise SegError("`seg predict` is not available yet")


@app.command()
@user_errors
def serve(
    model: Optional[Path] = typer.Argument(None, help="ONNX model (default: the bundled one)."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(3000, help="Port."),
    workers: int = typer.Option(1, help="Worker processes."),
):
    """Start the HTTP service."""
    raise SegError("`seg serve` is not available yet")


@app.command()
@user_errors
def models(
    arch: list[str] = typer.Option(["unet", "refinenet", "refinenet_lw"], help="Architectures (repeatable)."),
    encoder: list[str] = typer.Option(["resnet50"], help="smp encoders (repeatable)."),
    classes: int = typer.Option(21, help="Output classes."),
    in_channels: int = typer.Option(3, help="Input channels."),
    size: str = typer.Option("468x625", help="Input HEIGHTxWIDTH for the multiply-add count."),
):
    """Print parameters and multiply-adds of architectures on encoders."""
    from rich.table import Table

    from seg.models.summary import summarize

    try:
        height, width = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise SegError(f"--size {size!r}: expected HEIGHTxWIDTH, e.g. 468x625") from None
    table = Table("arch", "encoder", "params (M)", f"GMACs @ {height}x{width}")
    for a in arch:
        for e in encoder:
            s = summarize(a, e, classes, in_channels, height, width)
            table.add_row(a, e, f"{s['params'] / 1e6:.1f}", f"{s['macs'] / 1e9:.1f}")
    Console().print(table)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

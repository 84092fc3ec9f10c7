"""The `seg` command line: plan, train, eval, export, data check (`seg.cli.train_commands`) and predict,
merge-summaries, serve, models (`seg.cli.predict_commands`); `app` and the one-line error handling are here.

Errors a user can cause (`SegError`) print one line on stderr and exit with code 2. Only this package may
reach up into `training` and `serving` (the import contract in pyproject.toml says so).
"""

from __future__ import annotations

import functools
import logging
import warnings

import typer
from rich.console import Console
from rich.markup import escape

from seg.errors import SegError

app = typer.Typer(
    name="seg",
    help="Train, export and serve U-Net and RefineNet segmentation models; predict images of any size by tiles.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)
# tifffile logs an error for each broken tag of a corrupt file; seg reports the file's error itself.
logging.getLogger("tifffile").setLevel(logging.CRITICAL)
warnings.filterwarnings("ignore", category=UserWarning, module="PIL")  # e.g. "Corrupt EXIF data"
# Imported by train, eval, export and models only; `pip install seg` leaves them out.
TRAIN_MODULES = {
    "torch", "torchvision", "segmentation_models_pytorch", "albumentations", "monai", "onnx", "matplotlib", "skimage",
    "pycocotools",
}
data_app = typer.Typer(help="Look at a training config's data without training.", no_args_is_help=True)
app.add_typer(data_app, name="data")


def user_errors(fn):
    """Turn a SegError into `error: ...` on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SegError as e:
            err.print(f"[red]error:[/red] {escape(str(e))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except ModuleNotFoundError as e:
            if e.name is None or e.name.split(".")[0] not in TRAIN_MODULES:
                raise
            command = {"evaluate": "eval", "data_check": "data check"}.get(fn.__name__, fn.__name__)
            err.print(
                f"[red]error:[/red] `seg {command}` needs {e.name.split('.')[0]}, from the training extra:"
                " pip install 'seg\\[train]' (prediction and serving do not)",
                highlight=False, soft_wrap=True,
            )  # fmt: skip
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err.print("interrupted")
            raise typer.Exit(130) from None

    return wrapper


PRECISION = typer.Option(
    "auto", "--precision",
    help="auto (on the CPU, MODEL.int8.onnx beside MODEL.onnx when there is one), fp32 (the file as named) or int8.",
)  # fmt: skip


def main() -> None:  # pragma: no cover
    app()


from seg.cli import train_commands  # noqa: E402,F401  (registers its commands on `app`, first in the help)
from seg.cli import predict_commands  # noqa: E402,F401

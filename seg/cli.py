"""The `seg` command line: plan, train, eval, export, predict, serve, models, data check.

Errors a user can cause (`SegError`) print one line on stderr and exit with code 2.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
import warnings
from pathlib import Path
from typing import Optional

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


@app.command()
@user_errors
def train(
    config: Path = typer.Argument(..., help="YAML config file (sections data, model, train, output), or a data folder to plan a config for (see `seg plan`)."),
    set_: list[str] = typer.Option([], "--set", help="Override a key, e.g. --set train.steps=500 (repeatable)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in output.dir from its last checkpoint."),
    nproc: int = typer.Option(1, "--nproc", help="Train on this many local processes under torchrun (DDP: one GPU each on CUDA, gloo on the CPU)."),
):
    """Train a model from a config file into a run folder (under torchrun: one model on all its processes).

    Given a data folder instead of a config, plan the config from the data first (as `seg plan` does) and
    keep the plan as plan.yaml in the run folder (runs/FOLDER unless --set output.dir=...)."""
    import os

    from seg.config import load_config

    if config.is_dir() or config.suffix == ".zip":
        config = _plan_into_run(config, set_, resume)
    cfg = load_config(config, set_)  # a broken config fails here, before any process starts
    if nproc != 1 and "WORLD_SIZE" not in os.environ:
        from training.distributed import launch

        args = ["train", str(config), *(a for s in set_ for a in ("--set", s)), *(["--resume"] if resume else [])]
        code = launch(nproc, args)
        if code:
            raise typer.Exit(code)
        return
    from training.train import train as run_training

    run_training(cfg, resume=resume, console=err)


def _plan_into_run(data_dir: Path, set_: list[str], resume: bool) -> Path:
    """Plan a config for `data_dir` and write it to RUN/plan.yaml; on --resume, the run's own plan."""
    from seg.config import apply_override
    from training.plan import fingerprint, plan, plan_yaml, planned_device

    wanted: dict = {}
    for item in set_:
        apply_override(wanted, item)
    out = Path(str(wanted.get("output", {}).get("dir") or Path("runs") / data_dir.stem)).resolve()
    path = out / "plan.yaml"
    if resume and path.is_file():
        return path
    if (out / "checkpoints" / "last.pt").exists() and not resume:
        raise SegError(f"{out} already holds a run: pass --resume, or --set output.dir=NEW_FOLDER")
    fp = fingerprint(data_dir)
    device = planned_device(wanted.get("train", {}).get("device", "auto"))
    rows = plan(fp, device, out_dir=str(out))
    from seg.imageio import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(plan_yaml(fp, rows))
    err.print(f"planned {path} from {fp.images} images of {data_dir}", highlight=False)
    return path


@app.command()
@user_errors
def plan(
    data: Path = typer.Argument(..., help="A data folder (images/ and masks/, or train/ and val/ with those inside) or a COCO, labelme or CVAT export."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the config here (default: print it)."),
    time_limit: Optional[float] = typer.Option(None, "--time-limit", help="Minutes of training to plan for (default: 30 on the CPU, 120 on a GPU)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda: the machine that will train."),
    as_json: bool = typer.Option(False, "--json", help="Print the fingerprint as JSON instead of a table."),
):
    """Read a data folder once and write a complete training config for it: crop and batch size, normalisation,
    augmentation, foreground crops, loss, tiling, validation split and budget, each with the figure that chose it."""
    from rich.table import Table

    from training.plan import fingerprint, plan as make_plan, plan_yaml, planned_device

    if device not in ("auto", "cpu", "cuda"):
        raise SegError(f"--device {device!r}: choose auto, cpu or cuda")
    if time_limit is not None and time_limit <= 0:
        raise SegError(f"--time-limit {time_limit:g}: give minutes above 0")
    fp = fingerprint(data)
    rows = make_plan(fp, planned_device(device), time_limit)
    text = plan_yaml(fp, rows)
    if as_json:
        print(json.dumps(fp.as_dict(), indent=2))
    else:
        h, w = fp.size("median")
        (h0, w0), (h1, w1) = fp.size("min"), fp.size("max")
        table = Table("measure", "value", title=f"{fp.root}: {fp.data['format']}", title_justify="left")
        table.add_row("images", f"{fp.images} ({fp.train} train, {fp.val} val)")
        table.add_row("size (median, min, max)", f"{w}x{h}, {w0}x{h0}, {w1}x{h1}")
        table.add_row("channels, type", f"{fp.channels}, {fp.dtype}")
        for i, p in enumerate(fp.percentiles):
            table.add_row(f"channel {i}: 0.5 / 50 / 99.5 percentile", " / ".join(f"{v:g}" for v in p))
        for name, share, size in zip(fp.classes, fp.class_fraction, fp.object_size):
            table.add_row(f"class {name}", f"{100 * share:.2f} % of pixels" + (f", median object {size:.0f} px" if size else ""))
        Console(stderr=out is None).print(table)
    if out is None:
        if not as_json:
            print(text, end="")
        return
    from seg.imageio import atomic_path

    with atomic_path(out) as tmp:
        tmp.write_text(text)
    err.print(f"wrote {out}", highlight=False)


PRECISION = typer.Option(
    "auto", "--precision",
    help="auto (on the CPU, MODEL.int8.onnx beside MODEL.onnx when there is one), fp32 (the file as named) or int8.",
)  # fmt: skip


@app.command("eval")
@user_errors
def evaluate(
    model: Path = typer.Argument(..., help="A run folder, a checkpoint (.pt) or an exported model (.onnx)."),
    data: Path = typer.Option(..., "--data", help="A config file (its validation split) or a folder with images/ and masks/."),
    split: str = typer.Option("val", help="With a config: 'val' or 'train'."),
    out: Optional[Path] = typer.Option(None, help="Write the metrics as JSON here (default: beside the model)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    tta: str = typer.Option("auto", "--tta", help="Test-time augmentation: none, flips (4 runs per tile), d4 (8: rotations and flips) or auto (d4 on two-class EM data, else none)."),
    precision: str = PRECISION,
):
    """Evaluate a model on labelled images: per-class IoU and Dice, mIoU, pixel accuracy (and the ISBI
    challenge's Rand error and variation of information on two-class EM data)."""
    from training.evaluate import evaluate as run_eval, print_table

    result = run_eval(model, data, split=split, device=device, tta=tta, precision=precision)
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
    int8: bool = typer.Option(False, "--int8", help="Also write OUT's int8 model, NAME.int8.onnx, for CPUs, if it passes the accuracy gate (RUN may then be an exported .onnx)."),
    data: Optional[Path] = typer.Option(None, "--data", help="--int8: the config whose train split calibrates and val split gates (default: the run's config.yaml)."),
    calibration: Optional[Path] = typer.Option(None, "--calibration", help="--int8: a folder of calibration images instead of the train split."),
    calibration_images: int = typer.Option(16, "--calibration-images", help="--int8: images to calibrate on (2 tiles each)."),
    int8_margin: float = typer.Option(0.5, "--int8-margin", help="--int8: validation mIoU points the int8 model may lose; more and it is not written (exit 1)."),
):
    """Export a checkpoint to ONNX with its metadata, and check it against PyTorch; with --int8 also its
    static INT8 model, checked on the validation split."""
    from training.export import export_onnx

    if int8:
        _export_int8(run, out, opset, data, calibration, calibration_images, int8_margin)
        return
    report = export_onnx(run, out, opset=opset, fp16=fp16)
    meta = report["metadata"]
    console = Console()
    console.print(
        f"wrote {report['path']} ({report['bytes'] / 1e6:.1f} MB, opset {report['opset']}"
        f"{', float16' if report['fp16'] else ''}) from {report['checkpoint']} in {report['seconds']:.1f} s",
        highlight=False, soft_wrap=True,
    )
    console.print(
        f"model {meta['arch']}/{meta['encoder']}, {meta['in_channels']} input channel(s), classes {meta['classes']},"
        f" stride {meta['stride']}, tile {meta['tile_size']} overlap {meta['overlap']:g}",
        highlight=False, soft_wrap=True,
    )
    for row in report["parity"]:
        shape = "x".join(map(str, row["shape"]))
        console.print(
            f"parity {shape}: max abs diff {row['max_abs_diff']:.2e} (bound {row['bound']:.1e}, {report['provider']})",
            highlight=False,
        )


def _export_int8(run: Path, out: Path, opset: int, data: Path | None, calibration: Path | None, count: int, margin: float) -> None:
    """`seg export --int8`: the fp32 export (unless RUN is one), then its int8 model behind the gate."""
    import shutil

    from seg.imageio import atomic_path
    from training.quantize import GateFailed, export_int8

    if run.suffix == ".onnx":
        if run.resolve() != out.resolve():
            with atomic_path(out) as tmp:
                shutil.copyfile(run, tmp)
    else:
        from training.export import export_onnx

        export_onnx(run, out, opset=opset)
        err.print(f"wrote {out}", highlight=False, soft_wrap=True)
    if data is None:
        folders = [run] if run.is_dir() else [run.parent, run.parent.parent]  # a run, or its checkpoints/x.pt
        data = next((f / "config.yaml" for f in folders if (f / "config.yaml").is_file()), folders[0] / "config.yaml")
        if not data.is_file():
            raise SegError(f"--int8 needs the training config (--data CONFIG): no {data}")
    try:
        report = export_int8(out, data, calibration, count, margin)
    except GateFailed as e:
        err.print(f"[red]error:[/red] {escape(str(e))}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    q = report["quantization"]
    err.print(
        f"wrote {report['path']} ({report['bytes'] / 1e6:.1f} MB) in {report['seconds']:.1f} s: calibrated on"
        f" {q['calibration_images']} images; validation mIoU {q['int8']['miou']:.4f} (fp32 {q['fp32']['miou']:.4f},"
        f" {q['miou_drop_points']:+.2f} points lost, {q['margin_points']:g} allowed) on {q['val_images']} images",
        highlight=False, soft_wrap=True,
    )  # fmt: skip


@app.command()
@user_errors
def predict(
    inputs: list[str] = typer.Argument(..., help="[MODEL.onnx] then image files, folders (recursive) or globs."),
    out: Path = typer.Option(..., "--out", help="Output folder (same relative paths and stems as the inputs)."),
    tile: Optional[int] = typer.Option(None, help="Tile side in pixels (default: the model's)."),
    overlap: Optional[float] = typer.Option(None, help="Tile overlap fraction in [0, 1) (default: the model's)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Tiles per model call (default: 4 on the CPU; on a GPU as many as half its free memory holds, up to 32)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    threads: Optional[int] = typer.Option(None, help="CPU threads for ONNX Runtime (default: physical cores)."),
    tta: str = typer.Option("none", "--tta", help="Test-time augmentation: none, flips (4 runs per tile) or d4 (8: rotations and flips)."),
    edges: Optional[str] = typer.Option(None, "--edges", help="mirror (tiles reach into a reflected margin) or inside (tiles within the image); default: the model's."),
    overlay: bool = typer.Option(False, "--overlay", help="Also write STEM.overlay.png, the image with the coloured mask."),
    probabilities: bool = typer.Option(False, "--probabilities", help="Also write STEM.probs.tif, (H, W, K) float32."),
    confidence: bool = typer.Option(False, "--confidence", help="Also write STEM.confidence.tif, the chosen class's probability."),
    fmt: str = typer.Option("png", "--format", help="Mask format: png (palette PNG) or tif (tiled TIFF)."),
    force: bool = typer.Option(False, "--force", help="Predict again even where outputs made the same way exist."),
    num_parts: int = typer.Option(1, "--num-parts", help="Split the inputs into this many parts (job arrays; see --part-id)."),
    part_id: int = typer.Option(0, "--part-id", help="The part to predict, 0 to --num-parts - 1; it writes summary.part-I-of-K.json."),
    ray: bool = typer.Option(False, "--ray", help="Predict on Ray Data actors (a local Ray unless --ray-address or RAY_ADDRESS); needs seg[distributed]."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="A Ray cluster to join: auto, or ray://HOST:10001."),
    ray_actors: Optional[int] = typer.Option(None, "--ray-actors", help="Ray actors (default: one per GPU, else the cluster's CPUs / --threads)."),
    precision: str = PRECISION,
):
    """Segment images by tiles with an ONNX model (default: $SEG_MODEL, else the bundled one)."""
    from seg.batch import run_batch, split_model
    from seg.predictor import Predictor

    model, items = split_model(inputs)
    predictor = Predictor.from_onnx(model, device=device, threads=threads, precision=precision)
    options = predictor.options.replace(tile=tile, overlap=overlap, batch_size=batch_size, tta=tta, edges=edges)
    summary = run_batch(
        predictor, items, out, options, overlay=overlay, probabilities=probabilities, confidence=confidence,
        fmt=fmt, force=force, console=err, num_parts=num_parts, part_id=part_id,
        ray={"address": ray_address, "actors": ray_actors, "threads": threads}
        if ray or ray_address or ray_actors is not None else None,
    )
    err.print(
        f"{summary['ok']} predicted, {summary['skipped']} skipped, {summary['failed']} failed"
        f" in {summary['seconds']:.1f} s; summary: {summary['summary_path']}",
        highlight=False, soft_wrap=True,
    )
    if summary["failed"]:
        raise typer.Exit(1)


@app.command("merge-summaries")
@user_errors
def merge_summaries(out: Path = typer.Argument(..., help="The --out folder of a run split with --num-parts.")):
    """Join the summary.part-I-of-K.json files of a split run into summary.json."""
    from seg.batch import merge_summaries as merge

    merged = merge(out)
    err.print(
        f"{merged['parts']} part(s): {merged['ok']} predicted, {merged['skipped']} skipped, {merged['failed']} failed;"
        f" {'complete' if merged['complete'] else 'INCOMPLETE'}; wrote {out / 'summary.json'}",
        highlight=False, soft_wrap=True,
    )  # fmt: skip
    if not merged["complete"] or merged["failed"]:
        raise typer.Exit(1)


@app.command()
@user_errors
def serve(
    model: Optional[Path] = typer.Argument(None, help="ONNX model (default: $SEG_MODEL, else the bundled one)."),
    host: str = typer.Option("127.0.0.1", envvar="SEG_HOST", help="Address to listen on."),
    port: int = typer.Option(3000, envvar="SEG_PORT", help="Port."),
    workers: int = typer.Option(1, envvar="SEG_WORKERS", help="Worker processes (each loads its own copy of the model; worker i uses GPU i mod the GPUs)."),
    precision: str = typer.Option("auto", "--precision", envvar="SEG_PRECISION", help="auto (on the CPU, MODEL.int8.onnx beside MODEL.onnx when there is one), fp32 or int8."),
):
    """Start the HTTP service (BentoML): segment, segment_json, overlay, info; limits from SEG_* variables."""
    import os

    from seg.predictor import Predictor
    from seg.runtime import BUNDLED_MODEL, default_model

    path = (model or default_model()).resolve()
    if path == BUNDLED_MODEL.resolve() and not path.is_file():
        raise SegError(f"{path}: no bundled model yet; pass one: seg serve model.onnx (see `seg export`)")
    if workers < 1:
        raise SegError(f"--workers {workers}: must be at least 1")
    Predictor.from_onnx(path, device="cpu", precision=precision)  # a bad file or precision fails here, in one line
    env = {**os.environ, "SEG_MODEL": str(path), "SEG_WORKERS": str(workers), "SEG_PRECISION": precision,
           "BENTOML_DO_NOT_TRACK": "True"}  # fmt: skip
    root = Path(__file__).resolve().parents[1]
    command = [sys.executable, "-m", "bentoml", "serve", "serving.service:Segmentation", "--host", host,
               "--port", str(port), "--working-dir", str(root)]  # fmt: skip
    err.print(f"serving {path} on http://{host}:{port} (the page at /ui/, API docs at /, health at /readyz)", soft_wrap=True)
    sys.stderr.flush()
    os.execve(sys.executable, command, env)  # become the server: signals reach it directly


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


@data_app.command("check")
@user_errors
def data_check(
    config: Path = typer.Argument(..., help="YAML config file (its data section)."),
    set_: list[str] = typer.Option([], "--set", help="Override a key, e.g. --set data.val_fraction=0.1 (repeatable)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
):
    """Read every image and mask once, as training does: images and pixels per class in each split, the
    image sizes, and every problem with its file. Exit code 1 when there are problems."""
    from rich.table import Table

    from seg.config import load_config
    from seg.data import Survey, find_samples, survey
    from seg.errors import DataError

    data = load_config(config, set_).data
    try:
        train_samples, val_samples = find_samples(data)
        report = survey({"train": train_samples, "val": val_samples}, data)
    except DataError as e:  # the data set as a whole: no folder, no images, a JSON that does not parse
        report = Survey({}, [str(e)])
    if as_json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        console = Console()
        for split, info in report.splits.items():
            total = sum(info["pixels"].values()) or 1
            sizes = ", ".join(f"{size} ({n})" for size, n in list(info["sizes"].items())[:6])
            more = len(info["sizes"]) - 6
            table = Table("class", "pixels", "share", title=f"{split}: {info['images']} images; sizes {sizes}"
                          + (f" and {more} more" if more > 0 else ""), title_justify="left")  # fmt: skip
            for name, n in info["pixels"].items():
                table.add_row(name, str(n), f"{100 * n / total:.2f} %")
            table.add_row("(ignored)", str(info["ignored"]), "")
            console.print(table)
        for problem in report.problems:
            err.print(f"[red]problem:[/red] {escape(problem)}", highlight=False, soft_wrap=True)
        count = len(report.problems)
        err.print(f"{count} problem{'s' if count > 1 else ''}" if count else "no problems found")
    if report.problems:
        raise typer.Exit(1)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

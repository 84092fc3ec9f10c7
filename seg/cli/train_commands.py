"""`seg plan`, `seg train`, `seg eval`, `seg export` and `seg data check`: the commands that need the train extra."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from seg.cli import PRECISION, app, data_app, err, user_errors
from seg.errors import SegError


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
    from seg.data import exports
    from seg.errors import DataError

    if config.is_dir() or config.suffix == ".zip":
        config = _plan_into_run(config, set_, resume)
    cfg = load_config(config, set_)  # a broken config fails here, before any process starts
    from training.setup import check_names

    try:
        check_names(cfg)
    except SegError as e:
        raise SegError(f"{config}: {e}") from None
    try:
        exports.resolve(cfg.data)  # an export's classes, read once here so a bad one fails before training
    except DataError as e:
        raise DataError(f"{config}: {e}") from None
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
    from seg.io.images import atomic_path

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
    from seg.io.images import atomic_path

    with atomic_path(out) as tmp:
        tmp.write_text(text)
    err.print(f"wrote {out}", highlight=False)


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
    from seg.io.images import atomic_path

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

    from seg.io.images import atomic_path
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
    from seg.data.samples import Survey, find_samples, survey
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

"""`seg predict`, `seg merge-summaries`, `seg serve` and `seg models`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from seg.cli import PRECISION, app, err, user_errors
from seg.errors import SegError


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
    probabilities: bool = typer.Option(False, "--probabilities", help="Also write STEM.probs.tif, (H, W, K) float32; with --format ome-zarr, STEM.probs.ome.zarr, (K, H, W) uint8 (255 for 1)."),
    confidence: bool = typer.Option(False, "--confidence", help="Also write STEM.confidence.tif, the chosen class's probability."),
    fmt: str = typer.Option("png", "--format", help="Mask format: png (palette PNG), tif (tiled TIFF), ome-tiff (pyramidal, for QuPath, Fiji, napari), ome-zarr (the image with the mask as its labels, for napari) or geojson (polygons per class, as QuPath imports them)."),
    force: bool = typer.Option(False, "--force", help="Predict again even where outputs made the same way exist."),
    num_parts: int = typer.Option(1, "--num-parts", help="Split the inputs into this many parts (job arrays; see --part-id)."),
    part_id: int = typer.Option(0, "--part-id", help="The part to predict, 0 to --num-parts - 1; it writes summary.part-I-of-K.json."),
    ray: bool = typer.Option(False, "--ray", help="Predict on Ray Data actors (a local Ray unless --ray-address or RAY_ADDRESS); needs seg[distributed]."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="A Ray cluster to join: auto, or ray://HOST:10001."),
    ray_actors: Optional[int] = typer.Option(None, "--ray-actors", help="Ray actors (default: one per GPU, else the cluster's CPUs / --threads)."),
    precision: str = PRECISION,
):
    """Segment images by tiles with an ONNX model (default: $SEG_MODEL, else the bundled one)."""
    from seg.inference.predictor import Predictor
    from seg.jobs.batch import run_batch
    from seg.jobs.inputs import split_model

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
    from seg.jobs.ledger import merge_summaries as merge

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

    from seg.inference.predictor import Predictor
    from seg.inference.runtime import BUNDLED_MODEL, default_model

    path = (model or default_model()).resolve()
    if path == BUNDLED_MODEL.resolve() and not path.is_file():
        raise SegError(f"{path}: no bundled model yet; pass one: seg serve model.onnx (see `seg export`)")
    if workers < 1:
        raise SegError(f"--workers {workers}: must be at least 1")
    Predictor.from_onnx(path, device="cpu", precision=precision)  # a bad file or precision fails here, in one line
    # BentoML keeps its Prometheus files in BENTOML_HOME and empties them on start: one folder per port, so that
    # a second server on this machine does not wipe the first one's metrics.
    home = Path(os.environ.get("BENTOML_HOME") or Path.home() / "bentoml") / f"seg-serve-{port}"
    env = {**os.environ, "SEG_MODEL": str(path), "SEG_WORKERS": str(workers), "SEG_PRECISION": precision,
           "BENTOML_DO_NOT_TRACK": "True", "BENTOML_HOME": str(home)}  # fmt: skip
    root = Path(__file__).resolve().parents[2]
    command = [sys.executable, "-m", "bentoml", "serve", "serving.service:Segmentation", "--host", host,
               "--port", str(port), "--working-dir", str(root)]  # fmt: skip
    err.print(f"serving {path} on http://{host}:{port} (the page at /ui/, the API schema at /docs.json, health at /readyz)", soft_wrap=True)
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

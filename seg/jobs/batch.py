"""`seg predict`: many images through one `Predictor`, resumable, with a JSON summary.

For each input image, under `out` with the input's relative path and stem:

    STEM.png | STEM.tif         the mask (palette PNG, or tiled TIFF with --format tif; see FORMATS)
    STEM.overlay.png            the image with the coloured mask (--overlay)
    STEM.probs.tif              (H, W, K) float32 class probabilities (--probabilities); with
                                --format ome-zarr, STEM.probs.ome.zarr: (K, H, W) uint8, 255 for 1
    STEM.confidence.tif         (H, W) float32 probability of the chosen class (--confidence)
    summary.json                per image: size, seconds, pixels per class, outputs, status, made_with

Outputs are written atomically, the mask last, so a killed run leaves no half-written file under a
final name; summary.json is replaced after each image. Each entry records what made its outputs
(`made_with`: the model file's SHA-256, tile, overlap, TTA, blending, edges, format, the input's size and
modification time). A rerun skips images whose outputs all exist whole and were recorded as made the
same way (unless `force`); the others are predicted again. No output lands outside `out`: `..` in a
glob is folded away (or the file name alone is used), and an image whose output path leads out through
a symbolic link fails. An image that cannot be read is reported and skipped; the summary counts it as
failed.

With `num_parts=K, part_id=I` (the nnU-Net convention, for job arrays and one process per GPU) a run takes
every K-th input from the I-th on, of the inputs in the order `expand_inputs` gives, and writes
summary.part-I-of-K.json instead of summary.json; `merge_summaries` joins the parts' files into
summary.json.
"""


from __future__ import annotations

import bisect
import time
from pathlib import Path
from typing import Any, Sequence

from rich.console import Console
from rich.text import Text

from seg.errors import SegError
from seg.inference.predictor import Predictor
from seg.inference.tiling import TilingOptions
from seg.io.writers import FORMATS
from seg.jobs.inputs import check_writable, expand_inputs, is_done, plan_outputs
from seg.jobs.job import Job, run_job
from seg.jobs.ledger import COUNTS, SummaryFile, file_sha256, made_with, previous_entries, same_making
from seg.jobs.progress import Progress


def run_batch(
    predictor: Predictor,
    items: Sequence[str],
    out: str | Path,
    options: TilingOptions | None = None,
    overlay: bool = False,
    probabilities: bool = False,
    confidence: bool = False,
    fmt: str = "png",
    force: bool = False,
    console: Console | None = None,
    num_parts: int = 1,
    part_id: int = 0,
    ray: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Predict every input image into `out`; returns the summary (also written to out/summary.json).

    Args:
        predictor: the model's predictor (`Predictor.from_onnx`).
        items: image files, folders (recursive) or globs.
        out: the output folder.
        options: the tiling (None: the predictor's).
        overlay: also write STEM.overlay.png.
        probabilities: also write STEM.probs.tif (STEM.probs.ome.zarr with fmt ome-zarr).
        confidence: also write STEM.confidence.tif.
        fmt: the mask's format: "png", "tif", "ome-tiff" (pyramidal) or "geojson" (polygons).
        force: predict again even when outputs recorded as made the same way exist.
        console: where progress and messages go (default: stderr).
        num_parts: split the inputs into this many parts ...
        part_id: ... and predict this one (0 to num_parts - 1).
        ray: run the predictions on Ray Data (`seg.jobs.ray_runner.ray_results`' keyword arguments: address,
            actors, threads); planning, skips and the summary stay here, the same as without.

    Raises:
        SegError: a bad option or model; failures of single images are reported in the summary instead.
    """
    console = console or Console(stderr=True)
    if fmt not in FORMATS:
        raise SegError(f"--format {fmt!r}: choose {', '.join(FORMATS)}")
    if fmt == "geojson":
        from seg.io.geojson import check_libraries

        check_libraries()  # before any work
    if fmt == "ome-zarr":
        from seg.io.omezarr import check_library

        check_library()
    if num_parts < 1 or not 0 <= part_id < num_parts:
        raise SegError(f"--part-id {part_id} of --num-parts {num_parts}: need 0 <= part id < parts")
    if ray is not None:
        from seg.jobs.ray_runner import require_ray

        require_ray()  # before any work
    out = Path(out)
    check_writable(out)
    options = options or predictor.options
    jobs = expand_inputs(items, exclude=out)[part_id::num_parts]
    plan_outputs(jobs, out, fmt, overlay, probabilities, confidence)
    console.print(
        f"model {predictor.path} ({predictor.info.arch}/{predictor.info.encoder}, {predictor.info.num_classes} classes,"
        f" {predictor.info.precision}) on {predictor.device}; tile {options.tile}, overlap {options.overlap:g}, batch {options.batch_size}"
        f", TTA {options.tta}; {len(jobs)} input(s)"
        + (f" (part {part_id} of {num_parts})" if num_parts > 1 else ""),
        highlight=False, soft_wrap=True,
    )  # fmt: skip
    summary_path = out / (f"summary.part-{part_id}-of-{num_parts}.json" if num_parts > 1 else "summary.json")
    previous = previous_entries(summary_path)
    settings = {
        "model_sha256": file_sha256(predictor.path), "tile": options.tile, "overlap": options.overlap,
        "tta": options.tta, "blend": options.blend, "edges": options.edges, "format": fmt,
    }  # fmt: skip
    records = [made_with(job, settings) for job in jobs]
    skips = [
        not force and not job.error and same_making(job, record, previous.get(str(job.source)))
        for job, record in zip(jobs, records)
    ]  # fmt: skip
    redo = sum(not (skip or force or job.error) and is_done(job) for job, skip in zip(jobs, skips))
    if redo:
        console.print(
            f"{redo} image(s) have outputs made with other settings or not recorded in {summary_path}:"
            " predicting them again", highlight=False, soft_wrap=True,
        )  # fmt: skip
    entries: list[dict[str, Any]] = []
    earlier = dict(previous)  # entries of earlier runs for inputs this run has not written yet
    start = time.perf_counter()

    def summary_now(complete: bool) -> dict[str, Any]:
        counts = {status: sum(e["status"] == status for e in entries) for status in COUNTS}
        return {
            "model": str(predictor.path),
            "model_name": predictor.info.name,
            "model_sha256": settings["model_sha256"],
            "provider": predictor.provider,
            "precision": predictor.info.precision,
            "classes": predictor.info.classes,
            "tile": options.tile,
            "overlap": options.overlap,
            "batch_size": options.batch_size,
            "tta": options.tta,
            "blend": options.blend,
            "edges": options.edges,
            "format": fmt,
            **counts,
            "complete": complete,
            **({"part": [part_id, num_parts]} if num_parts > 1 else {}),
            "seconds": round(time.perf_counter() - start, 3),
            "images": entries,
            "earlier": list(earlier.values()),
        }

    summary_file = SummaryFile(summary_path)
    order: list[int] = []  # the input index of each entry
    with Progress(console, "images", len(jobs)) as progress:
        if ray is None:
            results = ((i, run_job(predictor, options, job, skip, record, previous, progress))
                       for i, (job, record, skip) in enumerate(zip(jobs, records, skips)))  # fmt: skip
        else:
            results = _with_planned(predictor, options, jobs, records, skips, previous, progress, ray, console)
        for i, entry in results:
            at = bisect.bisect(order, i)  # in input order, whatever order they finish in
            order.insert(at, i)
            entries.insert(at, entry)
            earlier.pop(str(jobs[i].source), None)
            summary_file.write(summary_now(complete=False))
            _image_done(progress, jobs[i], entry)
    summary = summary_now(complete=True)
    summary_file.write(summary, final=True)
    summary["summary_path"] = str(summary_path)
    return summary


def _with_planned(predictor, options, jobs, records, skips, previous, progress, ray, console):
    """Failed and skipped jobs' entries at once, then the others' from Ray as its actors finish them."""
    from seg.jobs.ray_runner import ray_results

    todo = []
    for i, (job, record, skip) in enumerate(zip(jobs, records, skips)):
        if job.error or skip:
            yield i, run_job(predictor, options, job, skip, record, previous, progress)
        else:
            todo.append(i)
    yield from ray_results(predictor, options, [(i, jobs[i], records[i]) for i in todo], console=console, **ray)


def _image_done(progress: Progress, job: Job, entry: dict[str, Any]) -> None:
    """One image done: a line for it (over the bar only for a failure)."""
    progress.advance()
    status = entry["status"]
    if status == "failed":
        line = Text.assemble(("failed ", "red"), entry["error"])
    elif status == "skipped":
        line = Text(f"skipped {job.source} (outputs made the same way exist; --force to redo)")
    else:
        line = Text(f"ok {job.source} -> {job.outputs['mask']} ({entry['width']}x{entry['height']}, {entry['seconds']:.2f} s)")
    progress.line(line, above_bar=status == "failed")

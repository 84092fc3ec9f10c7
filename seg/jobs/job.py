"""One batch job: an input image, the files it produces, and `run_job`, which predicts it into them and
returns its summary entry (on this machine, or inside a Ray actor)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from seg.errors import SegError
from seg.inference.predictor import Predictor
from seg.inference.tiling import TilingOptions
from seg.io.headers import image_size
from seg.jobs.progress import Progress

LARGE_IMAGE_TILES = 16  # images with more tiles get their own progress bar


@dataclass
class Job:
    """One input image and the files it produces."""

    source: Path
    relative: Path  # the input's path below the folder or glob it came from
    outputs: dict[str, Path] = field(default_factory=dict)
    error: str | None = None  # set when the input cannot be processed at all
    slices: int = 1  # of a TIFF stack (read once, when the outputs are planned)


def run_job(
    predictor: Predictor, options: TilingOptions, job: Job, skip: bool, made_with: dict[str, Any] | None, previous: dict[str, dict],
    progress: Progress,
) -> dict[str, Any]:  # fmt: skip
    """Predict `job` into its outputs (or skip it, or report why it failed) and return its summary entry.
    One image's failure is its entry's error, never an exception."""
    entry: dict[str, Any] = {"input": str(job.source), "outputs": {k: str(v) for k, v in job.outputs.items()}}
    if job.error:
        return {**entry, "status": "failed", "error": job.error}
    if skip:
        old = previous.get(str(job.source), {})
        kept = {k: old[k] for k in ("height", "width", "slices", "seconds", "pixels_per_class") if k in old}
        return {**entry, **kept, "made_with": made_with, "status": "skipped"}
    paths = job.outputs
    try:
        on_tiles = _tile_bar(progress, job, predictor, options)
        result = predictor.predict_file(
            job.source, paths["mask"], options, probabilities_path=paths.get("probabilities"),
            confidence_path=paths.get("confidence"), overlay_path=paths.get("overlay"), on_tiles=on_tiles,
        )  # fmt: skip
    except Exception as err:  # one image's failure (unreadable, corrupt, out of memory) must not stop the run
        text = str(err) if isinstance(err, SegError) else f"{type(err).__name__}: {err}"
        message = text if str(job.source) in text else f"{job.source}: {text}"
        return {**entry, "status": "failed", "error": message}
    finally:
        progress.end_sub()
    keep = ("height", "width", "slices", "channels", "dtype", "tiles", "seconds", "pixels_per_class")
    if "slices" in result:
        entry["note"] = f"a stack of {result['slices']} slices: one page per slice in multi-page TIFFs"
    return {**entry, **{k: result[k] for k in keep if k in result}, "made_with": made_with, "status": "ok"}


def _tile_bar(progress: Progress, job: Job, predictor: Predictor, options: TilingOptions):
    """A tile callback for a large image (its own bar under the images bar), else None."""
    if not progress.live:
        return None
    size = image_size(job.source)
    tiles = predictor.tile_count(*size, options) * job.slices if size else 0
    if tiles <= LARGE_IMAGE_TILES:
        return None
    return progress.sub(f"  tiles of {job.relative}", tiles)

"""`seg predict`: many images through one `Predictor`, resumable, with a JSON summary.

For each input image, under `out` with the input's relative path and stem:

    STEM.png | STEM.tif         the mask (palette PNG, or tiled TIFF with --format tif)
    STEM.overlay.png            the image with the coloured mask (--overlay)
    STEM.probs.tif              (H, W, K) float32 class probabilities (--probabilities)
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
import functools
import glob
import hashlib
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from rich.console import Console
from rich.text import Text

from seg.errors import SegError
from seg.imageio import atomic_path, is_image_file
from seg.predictor import Predictor
from seg.sources import image_size, stack_size
from seg.tiling import TilingOptions
from seg.writers import output_is_whole
from seg.progress import Progress
from seg.runtime import default_model

FORMATS = ("png", "tif")
COUNTS = ("ok", "skipped", "failed")  # the statuses of summary entries, counted in the summary
LARGE_IMAGE_TILES = 16  # images with more tiles get their own progress bar


@dataclass
class Job:
    """One input image and the files it produces."""

    source: Path
    relative: Path  # the input's path below the folder or glob it came from
    outputs: dict[str, Path] = field(default_factory=dict)
    error: str | None = None  # set when the input cannot be processed at all
    slices: int = 1  # of a TIFF stack (read once, when the outputs are planned)


def split_model(inputs: Sequence[str]) -> tuple[Path, list[str]]:
    """The model (an .onnx first argument, else $SEG_MODEL or the bundled one) and the image arguments."""
    items = list(inputs)
    if items and items[0].lower().endswith(".onnx"):
        model, items = Path(items[0]), items[1:]
        if not model.is_file():
            raise SegError(f"{model}: no such ONNX model")
    else:
        model = default_model()
        if not model.is_file():
            source = "SEG_MODEL" if os.environ.get("SEG_MODEL") else "the bundled model"
            raise SegError(f"no model given and {source} {model} is missing: pass MODEL.onnx as the first argument")
    if not items:
        raise SegError("no input images given (files, folders or globs after the model)")
    return model, items


def expand_inputs(items: Sequence[str], exclude: Path | None = None) -> list[Job]:
    """Image files from files, folders (recursive) and globs; missing ones become failed jobs.

    Args:
        items: file paths, folder paths or glob patterns (`**` recurses).
        exclude: a folder whose files are never inputs (the output folder).

    Returns:
        Jobs in the order given (folders and globs sorted), each source once.
    """
    exclude = exclude.resolve() if exclude is not None else None
    jobs: list[Job] = []
    seen: set[Path] = set()

    def add(path: Path, relative: Path) -> None:
        key = path.resolve()
        if key in seen or (exclude is not None and key.is_relative_to(exclude)):
            return
        seen.add(key)
        jobs.append(Job(path, _inside_relative(relative, path)))

    for item in items:
        path = Path(item)
        if glob.has_magic(item) and not path.exists():
            base = _glob_base(item)
            matches = sorted(Path(m) for m in glob.glob(item, recursive=True))
            files = [m for m in matches if m.is_file() and is_image_file(m)]
            if not files:
                jobs.append(Job(path, Path(path.name), error=f"{item}: no image files match"))
            for m in files:
                add(m, m.relative_to(base) if m.is_relative_to(base) else Path(m.name))
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and is_image_file(p) and not _hidden(p, path))
            if not files:
                jobs.append(Job(path, Path(path.name), error=f"{path}: no image files in this folder"))
            for f in files:
                add(f, f.relative_to(path))
        elif path.is_file():
            add(path, Path(path.name))
        else:
            jobs.append(Job(path, Path(path.name), error=f"{path}: no such file or folder"))
    return jobs


def _glob_base(pattern: str) -> Path:
    """The folder part of a glob before its first wildcard."""
    parts = Path(pattern).parts
    fixed = [p for p in parts[: next(i for i, p in enumerate(parts) if glob.has_magic(p))]]
    return Path(*fixed) if fixed else Path(".")


def _inside_relative(relative: Path, path: Path) -> Path:
    """`relative` with `..` folded away (a glob's `**/..`); the file name alone where it would climb out."""
    folded = Path(os.path.normpath(relative))
    if folded.is_absolute() or folded.parts[:1] in ((), ("..",), (".",)):
        return Path(path.name)
    return folded


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def plan_outputs(jobs: list[Job], out: Path, fmt: str, overlay: bool, probabilities: bool, confidence: bool) -> None:
    """Fill in each job's output paths; a second input that would write the same files fails, and so does
    one whose outputs would land outside `out` (through a symbolic link already under `out`)."""
    owners: dict[Path, Path] = {}
    root = out.resolve()
    for job in jobs:
        if job.error:
            continue
        stem = out / job.relative.parent / job.relative.stem
        job.slices = stack_size(job.source)
        kind = "tif" if job.slices > 1 else fmt  # a stack's outputs are multi-page TIFFs
        job.outputs = {"mask": stem.with_name(f"{stem.name}.{kind}")}
        if overlay:
            job.outputs["overlay"] = stem.with_name(f"{stem.name}.overlay.{'tif' if kind != fmt else 'png'}")
        if probabilities:
            job.outputs["probabilities"] = stem.with_name(f"{stem.name}.probs.tif")
        if confidence:
            job.outputs["confidence"] = stem.with_name(f"{stem.name}.confidence.tif")
        mask = job.outputs["mask"]
        if not all(_lands_inside(path, root) for path in job.outputs.values()):
            job.error = f"{job.source}: its output {mask} leads outside --out through a symbolic link; not predicted"
        elif mask in owners:
            job.error = f"{job.source}: its output {mask} is already that of {owners[mask]}; rename one of them"
        else:
            owners[mask] = job.source


def _lands_inside(path: Path, root: Path) -> bool:
    """True when `path`, with every symbolic link on it followed, lies under `root` (already resolved)."""
    try:
        return path.resolve().is_relative_to(root)
    except (OSError, RuntimeError):  # a link loop
        return False


def is_done(job: Job) -> bool:
    """True when every output of the job exists whole, with the input's size."""
    size = image_size(job.source)
    if size is None:
        return False
    return all(output_is_whole(path, *size) for path in job.outputs.values())


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
        probabilities: also write STEM.probs.tif.
        confidence: also write STEM.confidence.tif.
        fmt: the mask's format, "png" or "tif".
        force: predict again even when outputs recorded as made the same way exist.
        console: where progress and messages go (default: stderr).
        num_parts: split the inputs into this many parts ...
        part_id: ... and predict this one (0 to num_parts - 1).
        ray: run the predictions on Ray Data (`seg.ray_batch.ray_results`' keyword arguments: address,
            actors, threads); planning, skips and the summary stay here, the same as without.

    Raises:
        SegError: a bad option or model; failures of single images are reported in the summary instead.
    """
    console = console or Console(stderr=True)
    if fmt not in FORMATS:
        raise SegError(f"--format {fmt!r}: choose png or tif")
    if num_parts < 1 or not 0 <= part_id < num_parts:
        raise SegError(f"--part-id {part_id} of --num-parts {num_parts}: need 0 <= part id < parts")
    if ray is not None:
        from seg.ray_batch import require_ray

        require_ray()  # before any work
    out = Path(out)
    _check_writable(out)
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
    previous = _previous_entries(summary_path)
    settings = {
        "model_sha256": file_sha256(predictor.path), "tile": options.tile, "overlap": options.overlap,
        "tta": options.tta, "blend": options.blend, "edges": options.edges, "format": fmt,
    }  # fmt: skip
    records = [_made_with(job, settings) for job in jobs]
    skips = [
        not force and not job.error and _same_making(job, record, previous.get(str(job.source)))
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

    summary_file = _SummaryFile(summary_path)
    order: list[int] = []  # the input index of each entry
    with Progress(console, "images", len(jobs)) as progress:
        if ray is None:
            results = ((i, _run_job(predictor, options, job, skip, record, previous, progress))
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


def merge_summaries(out: str | Path) -> dict[str, Any]:
    """Join the summary.part-I-of-K.json files of a sharded run in `out` into out/summary.json.

    The settings must agree across parts; counts add up, `seconds` is the slowest part's, and `complete` is
    true when all K parts are there and complete. Returns the merged summary.
    """
    out = Path(out)
    parts = sorted(out.glob("summary.part-*-of-*.json"))
    if not parts:
        raise SegError(f"{out}: no summary.part-I-of-K.json files to merge")
    summaries = []
    for path in parts:
        try:
            summaries.append(json.loads(path.read_text()))
        except (OSError, ValueError) as e:
            raise SegError(f"{path}: not a readable summary ({e})") from None
    for s, path in zip(summaries, parts):
        if not (isinstance(s, dict) and isinstance(s.get("part"), list) and len(s["part"]) == 2):
            raise SegError(f"{path}: not the summary of one part (no \"part\" field)")
    totals = {s["part"][1] for s in summaries}
    if len(totals) > 1:
        raise SegError(f"{out}: part files of runs split in different numbers of parts ({sorted(totals)}); remove the stale ones")
    keys = ("model_sha256", "tile", "overlap", "tta", "blend", "edges", "format")
    first = summaries[0]
    for s, path in zip(summaries, parts):
        differ = [k for k in keys if s.get(k) != first.get(k)]
        if differ:
            raise SegError(f"{path}: {differ[0]} differs from {parts[0].name}'s; the parts were run with other settings")
    seen = {s["part"][0] for s in summaries}
    merged = {k: v for k, v in first.items() if k not in ("images", "earlier", "part", *COUNTS)}
    merged.update({c: sum(s[c] for s in summaries) for c in COUNTS})
    merged["complete"] = all(s["complete"] for s in summaries) and seen == set(range(totals.pop()))
    merged["seconds"] = max(s["seconds"] for s in summaries)
    merged["images"] = sorted((e for s in summaries for e in s["images"]), key=lambda e: e["input"])
    merged["earlier"] = [e for s in summaries for e in s["earlier"]]
    merged["parts"] = len(summaries)
    with atomic_path(out / "summary.json") as tmp:
        tmp.write_text(json.dumps(merged, indent=2))
    return merged


def _with_planned(predictor, options, jobs, records, skips, previous, progress, ray, console):
    """Failed and skipped jobs' entries at once, then the others' from Ray as its actors finish them."""
    from seg.ray_batch import ray_results

    todo = []
    for i, (job, record, skip) in enumerate(zip(jobs, records, skips)):
        if job.error or skip:
            yield i, _run_job(predictor, options, job, skip, record, previous, progress)
        else:
            todo.append(i)
    yield from ray_results(predictor, options, [(i, jobs[i], records[i]) for i in todo], console=console, **ray)


class _SummaryFile:
    """summary.json, replaced atomically as images finish: after every image, unless writing it would take
    more than about a tenth of the time (very many small images); then as often as that allows."""

    def __init__(self, path: Path):
        self.path, self.cost, self.last = path, 0.0, -math.inf

    def write(self, summary: dict[str, Any], final: bool = False) -> None:
        now = time.perf_counter()
        if not final and now - self.last < 10 * self.cost:
            return
        with atomic_path(self.path) as tmp:
            tmp.write_text(json.dumps(summary, indent=2))
        self.last = time.perf_counter()
        self.cost = self.last - now


@functools.lru_cache(maxsize=8)
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path: str | Path) -> str:
    """The file's SHA-256 in hex, computed once per file version (path, size, modification time)."""
    st = os.stat(path)
    return _sha256_of(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


def _made_with(job: Job, settings: dict[str, Any]) -> dict[str, Any] | None:
    """What makes the job's outputs: the run's settings and the input file's size and modification time."""
    try:
        st = job.source.stat()
    except OSError:
        return None
    return {**settings, "input_bytes": st.st_size, "input_mtime_ns": st.st_mtime_ns}


def _same_making(job: Job, made_with: dict[str, Any] | None, old: dict[str, Any] | None) -> bool:
    """True when an earlier run recorded the same making for every output the job wants, and they exist whole."""
    recorded = (old or {}).get("made_with")
    if isinstance(recorded, dict) and isinstance(recorded.get("tta"), bool):  # before the TTA levels
        recorded = {**recorded, "tta": "flips" if recorded["tta"] else "none"}
    if isinstance(recorded, dict) and "edges" not in recorded:  # before the edges option: always mirrored
        recorded = {**recorded, "edges": "mirror"}
    return (
        made_with is not None and old is not None and recorded == made_with
        and set(job.outputs) <= set(old.get("outputs", {})) and is_done(job)
    )  # fmt: skip


def _check_writable(out: Path) -> None:
    """Fail before any work when `out` cannot take files (a volume mounted read-only or owned by another user)."""
    if out.exists() and not out.is_dir():
        raise SegError(f"--out {out}: exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        who = f"user {os.getuid()}" if hasattr(os, "getuid") else "this user"
        raise SegError(f"--out {out}: {who} cannot write here ({e.strerror or e})") from None


def _run_job(
    predictor: Predictor, options: TilingOptions, job: Job, skip: bool, made_with: dict[str, Any] | None, previous: dict[str, dict],
    progress: Progress,
) -> dict[str, Any]:  # fmt: skip
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
        predict = predictor.predict_stack if job.slices > 1 else predictor.predict_file
        result = predict(
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


def _previous_entries(path: Path) -> dict[str, dict]:
    """Recorded entries of an earlier summary (its images and those it kept), by input path, where the mask exists."""
    try:
        summary = json.loads(path.read_text())
        entries = [*summary.get("earlier", []), *summary["images"]]
        return {
            e["input"]: e for e in entries
            if e.get("status") != "failed" and e.get("made_with") and Path(e["outputs"]["mask"]).is_file()
        }  # fmt: skip
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def _tile_bar(progress: Progress, job: Job, predictor: Predictor, options: TilingOptions):
    """A tile callback for a large image (its own bar under the images bar), else None."""
    if not progress.live:
        return None
    size = image_size(job.source)
    tiles = predictor.tile_count(*size, options) * job.slices if size else 0
    if tiles <= LARGE_IMAGE_TILES:
        return None
    return progress.sub(f"  tiles of {job.relative}", tiles)


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

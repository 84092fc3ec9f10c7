"""A batch's inputs and outputs: files, folders and globs expanded into jobs, and each job's output paths
planned under the output folder, none landing outside it."""

from __future__ import annotations

import glob
import os
import tempfile
from pathlib import Path
from typing import Sequence

from seg.errors import SegError
from seg.inference.runtime import default_model
from seg.io.headers import image_size, is_image_file, stack_size
from seg.io.slides import slide_parts
from seg.io.writers import FORMATS, output_is_whole
from seg.jobs.job import Job


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
            files = _without_slide_parts([m for m in matches if m.is_file() and is_image_file(m)])
            if not files:
                jobs.append(Job(path, Path(path.name), error=f"{item}: no image files match"))
            for m in files:
                add(m, m.relative_to(base) if m.is_relative_to(base) else Path(m.name))
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and is_image_file(p) and not _hidden(p, path))
            files = _without_slide_parts(files)
            if not files:
                jobs.append(Job(path, Path(path.name), error=f"{path}: no image files in this folder"))
            for f in files:
                add(f, f.relative_to(path))
        elif path.is_file():
            add(path, Path(path.name))
        else:
            jobs.append(Job(path, Path(path.name), error=f"{path}: no such file or folder"))
    return jobs


def _without_slide_parts(files: list[Path]) -> list[Path]:
    parts = slide_parts(files)
    return [f for f in files if f.resolve() not in parts] if parts else files


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
        stack = job.slices > 1  # a stack's outputs are multi-page TIFFs
        job.outputs = {"mask": stem.with_name(f"{stem.name}.{'tif' if stack else FORMATS[fmt]}")}
        if overlay:
            job.outputs["overlay"] = stem.with_name(f"{stem.name}.overlay.{'tif' if stack else 'png'}")
        if probabilities:
            zarr = fmt == "ome-zarr" and not stack
            job.outputs["probabilities"] = stem.with_name(f"{stem.name}.probs.{'ome.zarr' if zarr else 'tif'}")
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


def check_writable(out: Path) -> None:
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

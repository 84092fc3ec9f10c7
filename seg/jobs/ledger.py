"""A batch's record: summary.json written as images finish, what made each output (so a rerun skips
what is already made the same way), and the parts of a split run merged into one summary."""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any

from seg.errors import SegError
from seg.io.images import atomic_path
from seg.jobs.inputs import is_done
from seg.jobs.job import Job

COUNTS = ("ok", "skipped", "failed")  # the statuses of summary entries, counted in the summary


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


class SummaryFile:
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


def made_with(job: Job, settings: dict[str, Any]) -> dict[str, Any] | None:
    """What makes the job's outputs: the run's settings and the input file's size and modification time."""
    try:
        st = job.source.stat()
    except OSError:
        return None
    return {**settings, "input_bytes": st.st_size, "input_mtime_ns": st.st_mtime_ns}


def same_making(job: Job, made_with: dict[str, Any] | None, old: dict[str, Any] | None) -> bool:
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


def previous_entries(path: Path) -> dict[str, dict]:
    """Recorded entries of an earlier summary (its images and those it kept), by input path, where the mask exists."""
    try:
        summary = json.loads(path.read_text())
        entries = [*summary.get("earlier", []), *summary["images"]]
        return {
            e["input"]: e for e in entries
            if e.get("status") != "failed" and e.get("made_with") and Path(e["outputs"]["mask"]).exists()
        }  # fmt: skip
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}

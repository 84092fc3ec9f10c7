"""Jobs: images segmented in the background, for images past the synchronous limits. Their state lives on
disk, so a server killed mid-job and started again runs the job again from its upload.

SEG_JOB_DIR holds `jobs.sqlite3` (one row per job) and a folder per job: its upload (`input.EXT`, removed when
the job ends) and its results (`mask.EXT`, `probabilities.tif`; OME-Zarrs zipped: `mask.ome.zarr.zip`,
`probabilities.ome.zarr.zip`). Each
worker process runs one `JobRunner` thread, which claims the oldest queued job and predicts it with the
worker's `Predictor`, band by band (`Predictor.predict_file`), so a job's memory is bounded by its image's
width. A job whose worker died (its process is gone) goes back to the queue; one whose server was told to
stop goes back at once.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import threading
import time
import uuid
import zipfile
from contextlib import closing
from pathlib import Path
from typing import Any, Callable

import psutil

from seg.errors import SegError
from seg.inference.predictor import Predictor
from seg.io.writers import FORMATS
from serving.lifecycle import STOPPING, ShuttingDown

ENDED = ("done", "failed", "cancelled")
CHECK_SECONDS = 0.5  # a running job reads its state (cancelled?) and writes its progress at most this often
POLL_SECONDS = 1.0  # an idle runner looks for new jobs (from other workers) this often
MEDIA_TYPES = {"png": "image/png", "tif": "image/tiff", "ome-tiff": "image/tiff", "ome-zarr": "application/zip",
               "geojson": "application/geo+json"}  # fmt: skip

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, state TEXT NOT NULL, options TEXT NOT NULL, input TEXT NOT NULL,
    width INTEGER, height INTEGER, tiles_done INTEGER DEFAULT 0, tiles_total INTEGER DEFAULT 0,
    created REAL NOT NULL, started REAL, finished REAL, error TEXT, owner_pid INTEGER, owner_started REAL
)"""


class Cancelled(SegError):
    """A job cancelled while it ran."""


class JobStore:
    """The job table and folders under `folder`; every method opens its own connection (any thread, any
    worker process)."""

    def __init__(self, folder: Path, ttl: float):
        self.folder, self.ttl = Path(folder), ttl
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            with self._db() as db:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute(SCHEMA)
        except (OSError, sqlite3.Error) as err:
            raise SegError(f"SEG_JOB_DIR={self.folder}: cannot keep jobs there ({err})") from None

    def _db(self) -> closing[sqlite3.Connection]:
        db = sqlite3.connect(self.folder / "jobs.sqlite3", timeout=30, isolation_level=None)
        db.row_factory = sqlite3.Row
        return closing(db)

    def new_folder(self) -> tuple[str, Path]:
        job_id = uuid.uuid4().hex
        folder = self.folder / job_id
        folder.mkdir()
        return job_id, folder

    def add(self, job_id: str, options: dict[str, Any], input_name: str, height: int, width: int, tiles: int) -> None:
        with self._db() as db:
            db.execute(
                "INSERT INTO jobs (id, state, options, input, width, height, tiles_total, created)"
                " VALUES (?, 'queued', ?, ?, ?, ?, ?, ?)",
                (job_id, json.dumps(options), input_name, width, height, tiles, time.time()),
            )

    def get(self, job_id: str) -> dict[str, Any] | None:
        with self._db() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _row(row) if row else None

    def recent(self, limit: int = 100) -> list[dict[str, Any]]:
        with self._db() as db:
            rows = db.execute("SELECT * FROM jobs ORDER BY created DESC LIMIT ?", (limit,)).fetchall()
        return [_row(row) for row in rows]

    def waiting(self) -> int:
        """Jobs queued or running."""
        with self._db() as db:
            return db.execute("SELECT COUNT(*) FROM jobs WHERE state IN ('queued', 'running')").fetchone()[0]

    def claim(self) -> dict[str, Any] | None:
        """The oldest queued job, now running in this process; None when none is queued."""
        me = psutil.Process()
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            row = db.execute("SELECT * FROM jobs WHERE state = 'queued' ORDER BY created LIMIT 1").fetchone()
            if row is not None:
                db.execute(
                    "UPDATE jobs SET state = 'running', started = ?, tiles_done = 0, owner_pid = ?, owner_started = ?"
                    " WHERE id = ?",
                    (time.time(), me.pid, me.create_time(), row["id"]),
                )
            db.execute("COMMIT")
        return self.get(row["id"]) if row is not None else None

    def state(self, job_id: str) -> str | None:
        with self._db() as db:
            row = db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return row["state"] if row else None

    def progress(self, job_id: str, done: int) -> None:
        with self._db() as db:
            db.execute("UPDATE jobs SET tiles_done = ? WHERE id = ? AND state = 'running'", (done, job_id))

    def end(self, job_id: str, state: str, error: str | None = None) -> None:
        """A running job ended (done, failed) or goes back to the queue (queued); a cancelled job stays so."""
        done = ", tiles_done = tiles_total" if state == "done" else ""
        with self._db() as db:
            db.execute(
                f"UPDATE jobs SET state = ?, error = ?, finished = ?{done} WHERE id = ? AND state = 'running'",
                (state, error, None if state == "queued" else time.time(), job_id),
            )

    def cancel(self, job_id: str) -> str | None:
        """Cancel a queued or running job (its runner stops at its next check) or remove an ended one;
        the job's state afterwards ('cancelled' or 'removed'), None when there is no such job."""
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            row = db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                db.execute("COMMIT")
                return None
            if row["state"] in ENDED:
                db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
            else:
                db.execute("UPDATE jobs SET state = 'cancelled', finished = ? WHERE id = ?", (time.time(), job_id))
            db.execute("COMMIT")
        if row["state"] in ENDED:
            shutil.rmtree(self.folder / job_id, ignore_errors=True)
            return "removed"
        if row["state"] == "queued":
            shutil.rmtree(self.folder / job_id, ignore_errors=True)
        return "cancelled"

    def tidy(self) -> None:
        """Send jobs whose worker died back to the queue; remove ended jobs older than the TTL, and folders
        that no job owns (an upload cut off by a crash)."""
        now = time.time()
        with self._db() as db:
            rows = db.execute("SELECT id, owner_pid, owner_started FROM jobs WHERE state = 'running'").fetchall()
            for row in rows:
                if not _alive(row["owner_pid"], row["owner_started"]):
                    db.execute("UPDATE jobs SET state = 'queued', tiles_done = 0 WHERE id = ? AND state = 'running'",
                               (row["id"],))  # fmt: skip
            ended = f"SELECT id FROM jobs WHERE state IN {ENDED} AND finished < ?"
            old = [r["id"] for r in db.execute(ended, (now - self.ttl,))]
            db.executemany("DELETE FROM jobs WHERE id = ?", [(job_id,) for job_id in old])
            known = {r["id"] for r in db.execute("SELECT id FROM jobs")}
        for job_id in old:
            shutil.rmtree(self.folder / job_id, ignore_errors=True)
        for folder in self.folder.iterdir():
            if folder.is_dir() and len(folder.name) == 32 and folder.name not in known and _idle(folder, now) > 3600:
                shutil.rmtree(folder, ignore_errors=True)  # an upload still arriving was written to in the last hour

    def outputs(self, job: dict[str, Any]) -> dict[str, Path]:
        folder = self.folder / job["id"]
        fmt = job["options"]["format"]
        zipped = ".zip" if fmt == "ome-zarr" else ""  # a folder, zipped
        paths = {"mask": folder / f"mask.{FORMATS[fmt]}{zipped}"}
        if job["options"].get("probabilities"):
            paths["probabilities"] = folder / f"probabilities.{'ome.zarr' if zipped else 'tif'}{zipped}"
        return paths


def _row(row: sqlite3.Row) -> dict[str, Any]:
    return {**dict(row), "options": json.loads(row["options"])}


def _idle(folder: Path, now: float) -> float:
    """Seconds since anything in `folder` was last written."""
    try:
        return now - max(p.stat().st_mtime for p in [folder, *folder.iterdir()])
    except OSError:  # removed meanwhile
        return 0.0


def _alive(pid: int | None, started: float | None) -> bool:
    try:
        return pid is not None and abs(psutil.Process(pid).create_time() - (started or 0)) < 1e-3
    except psutil.Error:
        return False


def zip_folder(folder: Path, path: Path) -> None:
    """`folder` as a zip (stored: Zarr chunks are compressed already) at `path`, written atomically; the
    folder is removed."""
    tmp = path.with_name(f".{path.name}.tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for file in sorted(folder.rglob("*")):
            if file.is_file():
                archive.write(file, Path(folder.name) / file.relative_to(folder))
    tmp.replace(path)
    shutil.rmtree(folder)


class JobRunner(threading.Thread):
    """Runs the store's queued jobs one at a time with the worker's predictor until the server stops."""

    def __init__(self, store: JobStore):
        super().__init__(name="seg-jobs", daemon=True)
        self.store = store
        self.predictor: Predictor | None = None
        self.wake = threading.Event()
        self.last_tidy = 0.0

    def start_with(self, predictor: Predictor) -> None:
        self.predictor = predictor
        self.start()

    def run(self) -> None:
        while not STOPPING.is_set():
            if time.monotonic() - self.last_tidy > min(60.0, self.store.ttl / 2):
                self.store.tidy()
                self.last_tidy = time.monotonic()
            job = self.store.claim()
            if job is None:
                self.wake.wait(POLL_SECONDS)
                self.wake.clear()
                continue
            self.run_job(job)

    def run_job(self, job: dict[str, Any]) -> None:
        folder, options = self.store.folder / job["id"], job["options"]
        tiling = self.predictor.options.replace(tile=options.get("tile"), overlap=options.get("overlap"), tta=options.get("tta"))
        outputs = self.store.outputs(job)
        written = {part: path.with_suffix("") if path.suffix == ".zip" else path for part, path in outputs.items()}
        on_tiles, check = self._watch(job["id"])
        try:
            self.predictor.predict_file(
                folder / job["input"], written["mask"], tiling, probabilities_path=written.get("probabilities"),
                on_tiles=on_tiles, check=check,
            )  # fmt: skip
            for part, path in outputs.items():
                if written[part] != path:
                    zip_folder(written[part], path)
        except Cancelled:
            shutil.rmtree(folder, ignore_errors=True)
            return
        except ShuttingDown:
            self.store.end(job["id"], "queued")  # runs again from its upload when the server is back
            return
        except Exception as err:  # the job fails, the runner goes on
            text = str(err) if isinstance(err, SegError) else f"{type(err).__name__}: {err}"
            self.store.end(job["id"], "failed", text.replace(str(folder / job["input"]), "image"))
        else:
            self.store.end(job["id"], "done")
        if self.store.state(job["id"]) == "cancelled":  # cancelled as it ended
            shutil.rmtree(folder, ignore_errors=True)
        else:
            (folder / job["input"]).unlink(missing_ok=True)

    def _watch(self, job_id: str) -> tuple[Callable[[int], None], Callable[[], None]]:
        """The job's tile callback (progress into the store) and its check (stop when cancelled or stopping)."""
        done, last = 0, time.monotonic()

        def on_tiles(count: int) -> None:
            nonlocal done, last
            done += count
            if time.monotonic() - last > CHECK_SECONDS:
                self.store.progress(job_id, done)
                last = time.monotonic()

        read = time.monotonic()

        def check() -> None:
            nonlocal read
            if STOPPING.is_set():
                raise ShuttingDown("the server is stopping")
            if time.monotonic() - read > CHECK_SECONDS:
                read = time.monotonic()
                if self.store.state(job_id) == "cancelled":
                    raise Cancelled("cancelled")

        return on_tiles, check

"""A job over HTTP against `seg predict` on the same gigapixel-class image: wall time, peak memory, the mask,
and what the pyramid and polygon writers cost.

1. A SIDE x SIDE 8-bit TIFF (256-pixel tiles) made of real EM slices (the ISBI samples).
2. `seg predict IMAGE --format tif`: wall time, peak RSS (the process's maximum resident set).
3. `seg serve` on the same model, `POST /jobs` with the image as the raw body (`format=tif`), polled every
   `--poll` seconds (2) until done: wall time from the upload's start to the result downloaded and where it went
   (upload, queue, run, status lag, download), the worker's peak RSS (its VmHWM; the worker loads the same
   model), whether progress only grew, and whether the mask equals `seg predict`'s (pixels, and bytes).
   Steps 2 and 3 alternate `--repeats` times, so a change in the machine's load falls on both.
4. One more job whose server and worker are SIGKILLed at `--kill-at` of its tiles; a second server on the
   same SEG_JOB_DIR ends it, with the same mask.
5. `seg predict` on a WRITERS_SIDE square crop with `--format tif`, `ome-tiff` and `geojson`: the
   pyramid's and the polygons' share of the wall time.

Both sides run on the bundled model (int8 on the CPU, as `seg serve` picks it), two threads.

    python bench/jobs.py --side 20000 --out bench/jobs_results.json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from helpers import kill_workers, running_server, server_workers  # noqa: E402

SEG = [sys.executable, "-m", "seg.cli"]
WRITERS_SIDE = 8192


def make_image(path: Path, side: int) -> None:
    """A side x side mosaic of the ISBI sample slices, written band by band (never whole in memory)."""
    import tifffile

    from seg.io.images import read_image

    slices = [read_image(p) for p in sorted((ROOT / "data" / "samples").glob("isbi_test_*.png"))]
    row = np.concatenate([slices[i % len(slices)] for i in range(-(-side // 512))], axis=1)[:, :side]

    def bands():
        for y in range(0, side, 512):
            band = np.roll(row, y // 512 * 97, axis=1)[: min(512, side - y)]
            for t in range(0, band.shape[0], 256):
                yield from (band[t : t + 256, x : x + 256] for x in range(0, side, 256))

    tifffile.imwrite(path, bands(), shape=(side, side), dtype=np.uint8, tile=(256, 256), compression="zlib", bigtiff=True)


def predict(image: Path, out: Path, fmt: str) -> dict:
    """`seg predict` in a child process: wall seconds and its peak RSS (from wait4, this child alone)."""
    began = time.perf_counter()
    proc = subprocess.Popen([*SEG, "predict", str(image), "--out", str(out), "--format", fmt, "--device", "cpu"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - began
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"seg predict failed: {proc.stderr.read().decode()[-2000:]}")
    return {"seconds": round(seconds, 1), "peak_rss_mb": round(usage.ru_maxrss * 1024 / 2**20),
            "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1)}


def worker_hwm(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def worker_cpu(pid: int) -> float:
    """User and system CPU seconds of the process `pid` so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


POLL_SECONDS = 2.0  # polled twice a second, the client alone used a tenth of one of the 2 cores


def poll(url: str, job_id: str, seen: list[int], stop=lambda status: False, every: float = POLL_SECONDS) -> dict:
    """The job's status every `every` seconds until it ends (or `stop(status)`); every tiles_done goes into
    `seen`."""
    while True:
        status = httpx.get(f"{url}/jobs/{job_id}", timeout=30).json()
        seen.append(status["progress"]["tiles_done"])
        if status["state"] not in ("queued", "running") or stop(status):
            return status
        time.sleep(every)


def job(image: Path, folder: Path, kill_at: float | None = None, every: float = POLL_SECONDS) -> dict:
    """One job through a fresh `seg serve`: wall seconds (upload to result downloaded) and where they went
    (upload, queue, run, status lag, download, from the job table's own clock), the worker's peak RSS and
    whether progress only grew. With `kill_at`, the server and its worker are SIGKILLed once that share of
    the tiles is done, and a second server on the same SEG_JOB_DIR ends the job."""
    from seg.inference.runtime import BUNDLED_MODEL

    env = {"SEG_DEVICE": "cpu", "SEG_JOB_DIR": str(folder / "jobs")}
    seen: list[int] = []
    peaks = []
    (folder / "first").mkdir()
    with running_server(BUNDLED_MODEL, folder / "first", **env) as server:
        workers = server_workers(server.pid)
        began = time.perf_counter()
        with open(image, "rb") as f:
            answer = httpx.post(f"{server.url}/jobs", content=f, params={"format": "tif"}, timeout=600)
        answer.raise_for_status()
        uploaded = time.perf_counter()
        job_id = answer.json()["id"]
        if kill_at:
            part = poll(server.url, job_id, seen,
                        lambda s: s["progress"]["tiles_done"] >= kill_at * s["progress"]["tiles_total"] > 0, every)
            assert part["state"] == "running", part
            peaks.append(max(worker_hwm(pid) for pid in workers))
            os.killpg(server.pid, signal.SIGKILL)  # the server, and its worker (in a session of its own)
            kill_workers(workers)
            killed_at, before = part["progress"]["tiles_done"], list(seen)
        else:
            status = poll(server.url, job_id, seen, every=every)
            ended = time.perf_counter()
            status = download(server.url, status, folder)
            peaks.append(max(worker_hwm(pid) for pid in workers))
            cpu = {"worker": round(sum(worker_cpu(pid) for pid in workers), 1), "server": round(worker_cpu(server.pid), 1)}
    kill_workers(workers)
    if kill_at:
        (folder / "second").mkdir()
        with running_server(BUNDLED_MODEL, folder / "second", **env) as server:
            workers = server_workers(server.pid)
            status = poll(server.url, job_id, seen, every=every)
            ended = time.perf_counter()
            status = download(server.url, status, folder)
            peaks.append(max(worker_hwm(pid) for pid in workers))
        kill_workers(workers)
    finished = time.perf_counter()
    with sqlite3.connect(folder / "jobs" / "jobs.sqlite3") as db:
        created, started, done = db.execute("SELECT created, started, finished FROM jobs WHERE id = ?", (job_id,)).fetchone()
    result = {
        "seconds": round(finished - began, 1), "peak_rss_mb": round(max(peaks) / 2**20),
        "phases": {"upload": round(uploaded - began, 1), "queued": round(started - created, 1), "run": round(done - started, 1),
                   "status_lag": round(ended - began - (done - created) - (uploaded - began), 1),
                   "download": round(finished - ended, 1)},
        "progress_monotone": seen == sorted(seen), "polls": len(seen), "tiles": status["progress"]["tiles_total"],
    }  # fmt: skip
    if not kill_at:
        result["cpu_seconds"] = cpu
    else:  # progress starts again from 0 when the job runs again
        first, second = seen[: len(before)], seen[len(before) :]
        result["killed_after_tiles"] = killed_at
        result["progress_monotone"] = first == sorted(first) and second == sorted(second)
    return result


def download(url: str, status: dict, folder: Path) -> dict:
    assert status["state"] == "done", status
    with httpx.stream("GET", url + status["result_url"], timeout=600) as result, open(folder / "job.tif", "wb") as f:
        for chunk in result.iter_bytes(1 << 20):
            f.write(chunk)
    return status


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each, alternated (predict, job, predict, job, ...)")
    parser.add_argument("--kill-at", type=float, default=0.5,
                        help="one more job, its server killed at this share of its tiles (0: none)")
    parser.add_argument("--poll", type=float, default=POLL_SECONDS, help="seconds between status requests")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    import tifffile

    os.environ.setdefault("OMP_NUM_THREADS", "2")
    with tempfile.TemporaryDirectory(prefix="seg_jobs_bench_") as tmp:
        tmp = Path(tmp)
        image = tmp / "mosaic.tif"
        make_image(image, args.side)
        results: dict = {"side": args.side, "image_mb": round(image.stat().st_size / 2**20), "poll_seconds": args.poll,
                         "predict": [], "job": []}
        for run in range(args.repeats):
            results["predict"].append(predict(image, tmp / f"predict{run}", "tif"))
            (tmp / f"server{run}").mkdir()
            results["job"].append(job(image, tmp / f"server{run}", every=args.poll))
            print(json.dumps(results, indent=2), flush=True)
        masks = [tmp / f"server{run}" / "job.tif" for run in range(args.repeats)]
        if args.kill_at:
            (tmp / "killed").mkdir()
            results["killed_job"] = job(image, tmp / "killed", args.kill_at, every=args.poll)
            masks.append(tmp / "killed" / "job.tif")
        reference = tmp / "predict0" / "mosaic.tif"
        expected = tifffile.imread(reference)
        results["same_pixels"] = all(np.array_equal(tifffile.imread(m), expected) for m in masks)
        results["same_bytes"] = all(m.read_bytes() == reference.read_bytes() for m in masks)
        mean = lambda runs, key: statistics.mean(r[key] for r in runs)  # noqa: E731
        results["time_ratio"] = round(mean(results["job"], "seconds") / mean(results["predict"], "seconds"), 3)
        run = statistics.mean(r["phases"]["run"] for r in results["job"])
        results["run_ratio"] = round(run / mean(results["predict"], "seconds"), 3)
        results["memory_ratio"] = round(mean(results["job"], "peak_rss_mb") / mean(results["predict"], "peak_rss_mb"), 3)
        print(json.dumps(results, indent=2), flush=True)

        crop = tmp / "crop.tif"
        make_image(crop, min(WRITERS_SIDE, args.side))
        writers = {fmt: predict(crop, tmp / f"w_{fmt}", fmt)["seconds"] for fmt in ("tif", "ome-tiff", "geojson")}
        shares = {f"{fmt}_share": round(1 - writers["tif"] / writers[fmt], 3) for fmt in ("ome-tiff", "geojson")}
        results["writers"] = {"side": min(WRITERS_SIDE, args.side), "seconds": writers, **shares}
    print(json.dumps(results, indent=2))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""A job over HTTP against `seg predict` on the same gigapixel-class image: wall time, peak memory, the mask,
and what the pyramid and polygon writers cost.

1. A SIDE x SIDE 8-bit TIFF (256-pixel tiles) made of real EM slices (the ISBI samples).
2. `seg predict IMAGE --format tif`: wall time, peak RSS (the process's maximum resident set).
3. `seg serve` on the same model, `POST /jobs` with the image as the raw body (`format=tif`), polled every
   0.5 s until done: wall time from the upload's start to the result downloaded, the worker's peak RSS (its
   VmHWM; the worker loads the same model), whether progress only grew, and whether the mask equals
   `seg predict`'s (pixels, and bytes).
4. `seg predict` on a WRITERS_SIDE square crop with `--format tif`, `ome-tiff` and `geojson`: the
   pyramid's and the polygons' share of the wall time.

Both sides run on the bundled model (int8 on the CPU, as `seg serve` picks it), two threads.

    python bench/jobs.py --side 20000 --out bench/jobs_results.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
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
    """`seg predict` in a child process: wall seconds and the peak RSS of this process's children so far (the
    first call's is its own)."""
    began = time.perf_counter()
    subprocess.run([*SEG, "predict", str(image), "--out", str(out), "--format", fmt, "--device", "cpu"],
                   check=True, capture_output=True)  # fmt: skip
    seconds = time.perf_counter() - began
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return {"seconds": round(seconds, 1), "peak_rss_mb": round(peak / 2**20)}


def worker_hwm(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def job(image: Path, folder: Path) -> dict:
    """One job through a fresh `seg serve`: wall seconds (upload to result), worker peak RSS, progress."""
    from seg.inference.runtime import BUNDLED_MODEL

    with running_server(BUNDLED_MODEL, folder, SEG_DEVICE="cpu") as server:
        workers = server_workers(server.pid)
        began = time.perf_counter()
        with open(image, "rb") as f:
            answer = httpx.post(f"{server.url}/jobs", content=f, params={"format": "tif"}, timeout=600)
        answer.raise_for_status()
        job_id, seen = answer.json()["id"], []
        while True:
            status = httpx.get(f"{server.url}/jobs/{job_id}", timeout=30).json()
            seen.append(status["progress"]["tiles_done"])
            if status["state"] not in ("queued", "running"):
                break
            time.sleep(0.5)
        assert status["state"] == "done", status
        with httpx.stream("GET", server.url + status["result_url"], timeout=600) as result, open(folder / "job.tif", "wb") as f:
            for chunk in result.iter_bytes(1 << 20):
                f.write(chunk)
        seconds = time.perf_counter() - began
        peak = max(worker_hwm(pid) for pid in workers)
    kill_workers(workers)
    return {"seconds": round(seconds, 1), "peak_rss_mb": round(peak / 2**20), "progress_monotone": seen == sorted(seen),
            "polls": len(seen), "tiles": status["progress"]["tiles_total"]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", type=int, default=20000)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    import tifffile

    os.environ.setdefault("OMP_NUM_THREADS", "2")
    with tempfile.TemporaryDirectory(prefix="seg_jobs_bench_") as tmp:
        tmp = Path(tmp)
        image = tmp / "mosaic.tif"
        make_image(image, args.side)
        results: dict = {"side": args.side, "image_mb": round(image.stat().st_size / 2**20)}
        results["predict"] = predict(image, tmp / "predict", "tif")
        (tmp / "server").mkdir()
        results["job"] = job(image, tmp / "server")
        ours, theirs = tmp / "server" / "job.tif", tmp / "predict" / "mosaic.tif"
        results["same_pixels"] = bool(np.array_equal(tifffile.imread(ours), tifffile.imread(theirs)))
        results["same_bytes"] = ours.read_bytes() == theirs.read_bytes()
        results["time_ratio"] = round(results["job"]["seconds"] / results["predict"]["seconds"], 3)
        results["memory_ratio"] = round(results["job"]["peak_rss_mb"] / results["predict"]["peak_rss_mb"], 3)
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

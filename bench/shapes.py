"""Cost by image shape: `seg predict` (the whole process) on images of one megapixel, square and thin.

Each image holds 1,000,000 pixels of real EM content (the ISBI 2012 slices, their rows laid end to end
for the thin shapes), as a grey PNG. Every run is a fresh `seg predict IMAGE --out DIR --force` process
with the bundled model; the shapes are run round-robin, `--repeats` times, and the best time and the
largest peak RSS of each are kept. The square image is the baseline: the table gives each shape's time
and peak RSS as a ratio of its.

    .venv/bin/python bench/shapes.py --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
WORK = Path(os.environ.get("SEG_BENCH_DIR", Path(tempfile.gettempdir()) / "seg_bench")) / "shapes"
SHAPES = {"1000 x 1000": (1000, 1000), "1 x 1,000,000": (1, 1_000_000), "1,000,000 x 1": (1_000_000, 1),
          "10 x 100,000": (10, 100_000)}  # fmt: skip
BASELINE = "1000 x 1000"


def make_image(height: int, width: int) -> Path:
    """A grey PNG of height x width EM pixels: the slices' rows end to end, cut to the shape."""
    path = WORK / f"em_{height}x{width}.png"
    if path.is_file():
        return path
    from PIL import Image

    slices = [np.asarray(Image.open(p)) for p in sorted((ROOT / "data/isbi2012/train/images").glob("*.png"))]
    if height >= 512 and width >= 512:  # a mosaic of whole slices
        rows = [np.concatenate([slices[(i * 7 + j) % len(slices)] for j in range(-(-width // 512))], axis=1)
                for i in range(-(-height // 512))]  # fmt: skip
        image = np.concatenate(rows)[:height, :width]
    else:  # a thin strip: the slices' rows of `height` (or columns) laid end to end
        thin, long = min(height, width), max(height, width)
        strips = [s[y : y + thin] for s in slices for y in range(0, 512 - thin + 1, thin)]
        image = np.concatenate(strips, axis=1)[:, :long]
        image = np.tile(image, (1, -(-long // image.shape[1])))[:, :long]
        image = image if height == thin else image.T
    WORK.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(image)).save(path)
    return path


def run_predict(image: Path, out: Path) -> tuple[float, float]:
    """(seconds, peak RSS in MB) of one `seg predict` process."""
    seg = Path(sys.executable).with_name("seg")
    start = time.perf_counter()
    child = subprocess.Popen([str(seg), "predict", str(image), "--out", str(out), "--force"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"seg predict {image} failed: {child.stderr.read().decode()[-2000:]}")
    return seconds, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    images = {name: make_image(*shape) for name, shape in SHAPES.items()}
    times: dict[str, list[float]] = {name: [] for name in SHAPES}
    peaks: dict[str, list[float]] = {name: [] for name in SHAPES}
    for _ in range(args.repeats):
        for name, image in images.items():
            seconds, peak = run_predict(image, WORK / "out")
            times[name].append(seconds)
            peaks[name].append(peak)
            print(f"{name:>14}: {seconds:6.2f} s  {peak:7.0f} MB", file=sys.stderr, flush=True)
    base_t, base_m = min(times[BASELINE]), max(peaks[BASELINE])
    rows = [{"shape": name, "seconds": round(min(times[name]), 2), "peak_rss_mb": round(max(peaks[name])),
             "time_ratio": round(min(times[name]) / base_t, 2), "rss_ratio": round(max(peaks[name]) / base_m, 2)}
            for name in SHAPES]  # fmt: skip
    print("| image (H x W) | seconds | peak RSS | time / square | RSS / square |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['seconds']:.2f} | {r['peak_rss_mb']} MB | {r['time_ratio']:.2f}x | {r['rss_ratio']:.2f}x |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

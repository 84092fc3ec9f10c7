"""The cost of going distributed, on one machine: `seg predict` locally and on Ray, and a training step on
one process and on two gloo processes (torchrun).

Prediction: 40 images (the 25 ISBI slices and 15 of them turned by 90 degrees, 512 x 512, tiled into a
1024 x 1024 mosaic of four each, so 40 MP in all) with the bundled model, as whole `seg predict`
processes into fresh folders: local with all cores as ONNX Runtime threads; `--ray` with 1 actor of all
cores (equal parallelism), and with 2 actors of half the cores each. Ray's start-up is included.

Training: `seg train` of a U-Net resnet18 on 256-pixel crops of the ISBI slices, global batch 8: one
process (batch 8, all cores) against `seg train --nproc 2` (batch 4 each, half the cores each); the
figure is training seconds per optimiser step from metrics.csv (validation and start-up left out).

    python bench/distributed.py [--steps 12] [--out distributed.json]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
ISBI = ROOT / "data" / "isbi2012" / "train"
SEG = [sys.executable, "-m", "seg"]
CORES = os.cpu_count() or 1


def make_images(folder: Path, count: int = 40) -> float:
    """`count` 1024 x 1024 mosaics of ISBI slices; returns their megapixels."""
    folder.mkdir(parents=True)
    slices = [np.asarray(Image.open(p)) for p in sorted((ISBI / "images").glob("*.png"))]
    slices += [np.rot90(s) for s in slices]
    for i in range(count):
        four = [slices[(i + k) % len(slices)] for k in range(4)]
        Image.fromarray(np.block([[four[0], four[1]], [four[2], four[3]]])).save(folder / f"m{i:02d}.png")
    return count * 1024 * 1024 / 1e6


def timed(command: list[str], env: dict | None = None) -> float:
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env={**os.environ, **(env or {})})
    if proc.returncode:
        sys.exit(f"error: {' '.join(command[2:5])} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return time.perf_counter() - start


def predict_rows(tmp: Path) -> list[dict]:
    images = tmp / "images"
    megapixels = make_images(images)
    runs = {
        f"local, {CORES} threads": ["--threads", str(CORES)],
        f"--ray, 1 actor x {CORES} CPUs": ["--ray", "--ray-actors", "1", "--threads", str(CORES)],
        f"--ray, 2 actors x {max(1, CORES // 2)} CPUs": ["--ray", "--ray-actors", "2", "--threads", str(max(1, CORES // 2))],
    }
    rows = []
    for name, args in runs.items():
        seconds = timed([*SEG, "predict", str(images), "--out", str(tmp / f"out{len(rows)}"), *args])
        rows.append({"run": name, "images": 40, "seconds": round(seconds, 2), "images_per_s": round(40 / seconds, 3),
                     "mp_per_s": round(megapixels / seconds, 3)})  # fmt: skip
    return rows


def train_config(tmp: Path, name: str, batch: int, steps: int) -> Path:
    cfg = {
        "data": {"root": str(ISBI), "images": "images", "masks": "labels", "classes": ["membrane", "cell"],
                 "in_channels": 1, "crop_size": 256, "val_fraction": 0.2},
        "model": {"arch": "unet", "encoder": "resnet18"},
        "train": {"epochs": 1, "steps_per_epoch": steps, "batch_size": batch, "val_every_steps": steps},
        "output": {"dir": str(tmp / name), "overlays": 0},
    }  # fmt: skip
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def step_seconds(run: Path) -> float:
    with open(run / "metrics.csv") as f:
        last = list(csv.DictReader(f))[-1]
    return float(last["seconds"]) / int(last["step"])


def train_rows(tmp: Path, steps: int) -> list[dict]:
    rows = []
    for name, batch, nproc in (("one", 8, 1), ("two", 4, 2)):
        cfg = train_config(tmp, name, batch, steps)
        threads = CORES // nproc
        wall = timed([*SEG, "train", str(cfg), "--nproc", str(nproc)], env={"OMP_NUM_THREADS": str(max(1, threads))})
        rows.append({"run": f"{nproc} process(es) x batch {batch}, {threads} threads each", "steps": steps,
                     "s_per_step": round(step_seconds(tmp / name), 3), "wall_seconds": round(wall, 1)})  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="seg_distributed_") as tmp:
        result = {"cores": CORES, "predict": predict_rows(Path(tmp)), "train": train_rows(Path(tmp), args.steps)}
    base = result["predict"][0]["seconds"]
    print("| prediction, 40 images of 1024² | seconds | images/s | MP/s | time vs local |\n|---|---:|---:|---:|---:|")
    for r in result["predict"]:
        print(f"| {r['run']} | {r['seconds']:.1f} | {r['images_per_s']:.2f} | {r['mp_per_s']:.2f} | {r['seconds'] / base:.2f}x |")
    one = result["train"][0]["s_per_step"]
    print(f"\n| training, global batch 8 | s/step | vs one process | wall s ({args.steps} steps) |\n|---|---:|---:|---:|")
    for r in result["train"]:
        print(f"| {r['run']} | {r['s_per_step']:.2f} | {r['s_per_step'] / one:.2f}x | {r['wall_seconds']:.0f} |")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

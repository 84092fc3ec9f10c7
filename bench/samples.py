"""Time to make one training sample (read from the cache, augment, normalise) on the real sets: the crop cut
first and only the crop normalised, with each image's percentiles kept (what `seg train` does), against
normalising the whole image before cropping and computing its percentiles every time (as it did until
2026-12-05). Same data set, same seeds, the two alternated; best of `--repeats`, one thread.

    python bench/samples.py --sets ph2,bbbc039,lucchi_pp,horses
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from accuracy import template_config  # noqa: E402


def per_sample_ms(dataset, crop_first: bool, count: int) -> float:
    from training.schedule import SeededSamples

    samples = SeededSamples(dataset)
    dataset.crop_first = crop_first
    if crop_first:  # every image's percentiles kept, as after the first pass over the data
        for i in range(len(dataset)):
            samples[(i, i)]
    start = time.perf_counter()
    for i in range(count):
        if not crop_first:
            dataset.ranges.clear()  # the whole image's percentiles every time, as before
        samples[(i % len(dataset), 1000 + i)]
    return (time.perf_counter() - start) / count * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", default="ph2,bbbc039,lucchi_pp,horses")
    parser.add_argument("--count", type=int, default=96, help="samples a timing")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch

    from seg.config import load_config
    from training.setup import load_data

    torch.set_num_threads(1)
    print("| set | image size | whole image first, ms | crop first, ms | speed-up |\n|---|---|---:|---:|---:|")
    for name in args.sets.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            config = template_config(Path(tmp), name, Path(tmp) / "run")
            cfg = load_config(config, [])
            dataset = load_data(cfg, lambda message: None).train_set
            for i in range(len(dataset)):
                dataset[i]  # every image decoded once, as the cache holds it after the first pass
            best = {True: float("inf"), False: float("inf")}
            for _ in range(args.repeats):
                for crop_first in (False, True):
                    best[crop_first] = min(best[crop_first], per_sample_ms(dataset, crop_first, args.count))
            h, w = dataset.load(0)[0].shape[:2]
            print(f"| {name} | {w} x {h} | {best[False]:.2f} | {best[True]:.2f} | {best[False] / best[True]:.1f}x |")


if __name__ == "__main__":
    main()

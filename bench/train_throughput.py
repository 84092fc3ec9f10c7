"""Wall time per step of a whole `seg train` run on the config template against the bare smp loop.

16 generated RGB images (bench/make_data.py's `blobs`, the size of a small user data set); `seg train` on
configs/custom_folder.yaml (validation on its held-out fifth every epoch, checkpoints, overlays: the whole
run) and bench/bare_loop.py, same encoder, crop, batch and number of steps, one after the other as child
processes. The bare loop's time leaves out its test prediction; `seg eval` is not counted either.

    python bench/train_throughput.py [--steps 20] [--encoder resnet34]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from accuracy import compare  # noqa: E402
from make_data import DEFAULT_OUT, make_set  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--encoder", default="resnet34")
    parser.add_argument("--images", type=int, default=16)
    args = parser.parse_args()
    root = make_set(DEFAULT_OUT / f"throughput{args.images}", "blobs", train=args.images, test=1)
    with tempfile.TemporaryDirectory(prefix="seg_throughput_") as tmp:
        r = compare("blobs", root, args.steps, args.encoder, Path(tmp), [])
    s, b = r["seg"], r["bare"]
    print(f"{args.images} images, {args.encoder}, {args.steps} steps of 8 ({' '.join(r['overrides'])})")
    print(f"{'loop':<12}{'wall s':>10}{'s/step':>10}")
    print(f"{'seg train':<12}{s['train_seconds']:>10.1f}{s['s_per_step']:>10.2f}")
    print(f"{'bare smp':<12}{b['train_seconds']:>10.1f}{b['s_per_step']:>10.2f}")
    print(f"seg train / bare: {s['train_seconds'] / max(b['train_seconds'], 1e-9):.2f}x")


if __name__ == "__main__":
    main()

"""One tile for an image that fits a batch, against the tiling it replaced, side by side.

An image whose canvas (the image, its reflected margin, rounded up to the stride) holds no more pixels
than a batch of tiles runs as one tile (`seg.inference.tiling.tile_grid`). The baseline is the grid as it
was before: tiles of at most `tile` x `tile`, whatever the batch. For each size (real EM content: the ISBI
2012 slices, mosaicked), `Predictor.predict` runs both, alternating, `--repeats` times, in one process; the
table gives the best times, their ratio and how many mask pixels agree. With `--eval RUN=FOLDER`, the
figures of `seg eval` (no TTA) of a trained run on a labelled folder, both ways.

    .venv/bin/python bench/one_tile.py --repeats 5 --eval runs/nuclei=../shared/data/bbbc039/test
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZES = "384x384,512x512,520x696,768x1024,1024x1024"  # the last fits no batch of 4: a control


@contextlib.contextmanager
def tiled():
    """The grid as it was: tiles of at most `tile` x `tile` (the one-tile rule with a batch of one tile)."""
    from seg.inference import tiling

    original = tiling.tile_grid
    tiling.tile_grid = lambda height, width, tile, overlap, multiple, edges="mirror", batch_size=1: original(
        height, width, tile, overlap, multiple, edges, batch_size=1)
    try:
        yield
    finally:
        tiling.tile_grid = original


def em_image(height: int, width: int) -> np.ndarray:
    from PIL import Image

    slices = [np.asarray(Image.open(p)) for p in sorted((ROOT / "data/isbi2012/train/images").glob("*.png"))]
    rows = [np.concatenate([slices[(i * 7 + j) % len(slices)] for j in range(-(-width // 512))], axis=1)
            for i in range(-(-height // 512))]  # fmt: skip
    return np.ascontiguousarray(np.concatenate(rows)[:height, :width])


def speed(model: Path, repeats: int, sizes: list[tuple[int, int]]) -> list[dict]:
    from seg.inference.predictor import Predictor
    from seg.inference.tiling import tile_grid

    predictor = Predictor.from_onnx(model, device="cpu")
    options = predictor.options
    rows = []
    for height, width in sizes:
        image = em_image(height, width)
        predictor.predict(image)  # warm-up at this shape
        times: dict[str, list[float]] = {"one tile": [], "tiled": []}
        masks = {}
        for _ in range(repeats):
            for kind in times:
                with tiled() if kind == "tiled" else contextlib.nullcontext():
                    start = time.perf_counter()
                    masks[kind] = predictor.predict(image).mask
                    times[kind].append(time.perf_counter() - start)
        grid = [tile_grid(height, width, options.tile, options.overlap, predictor.info.stride, options.edges, batch_size=b)
                for b in (options.batch_size, 1)]  # fmt: skip
        best = {kind: min(t) for kind, t in times.items()}
        rows.append({"size": f"{height} x {width}", "tiles": [g.tiles for g in grid],
                     "one_tile_s": round(best["one tile"], 3), "tiled_s": round(best["tiled"], 3),
                     "speedup": round(best["tiled"] / best["one tile"], 2),
                     "agreement": round(float((masks["one tile"] == masks["tiled"]).mean()), 5)})  # fmt: skip
        print(rows[-1], file=sys.stderr, flush=True)
    return rows


def evaluate_both(run: Path, folder: Path) -> dict:
    from training.evaluate import evaluate

    row = {"run": str(run), "data": str(folder)}
    for kind in ("one tile", "tiled"):
        with tiled() if kind == "tiled" else contextlib.nullcontext():
            m = evaluate(run, folder, tta="none", device="cpu")
        row[kind] = {"iou": m["iou"][1], "miou": m["miou"], "pixel_error": m["pixel_error"], "seconds": m["seconds"]}
        print(kind, row[kind], file=sys.stderr, flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "seg" / "assets" / "model.onnx")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sizes", default=SIZES, help="comma-separated HEIGHTxWIDTH")
    parser.add_argument("--eval", action="append", default=[], metavar="RUN=FOLDER")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    sizes = [tuple(int(n) for n in size.split("x")) for size in args.sizes.split(",")]
    results = {"speed": speed(args.model, args.repeats, sizes) if args.repeats else [], "eval": []}
    for pair in args.eval:
        run, _, folder = pair.partition("=")
        results["eval"].append(evaluate_both(Path(run), Path(folder)))
    print("| image | tiles (one-tile rule / before) | one tile | tiled | speed-up | masks agree |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for r in results["speed"]:
        print(f"| {r['size']} | {r['tiles'][0]} / {r['tiles'][1]} | {r['one_tile_s']} s | {r['tiled_s']} s | "
              f"{r['speedup']}x | {100 * r['agreement']:.2f}% |")
    for r in results["eval"]:
        one, old = r["one tile"], r["tiled"]
        print(f"{r['run']} on {r['data']}: IoU {one['iou']:.4f} (tiled {old['iou']:.4f}), pixel error "
              f"{one['pixel_error']:.4f} ({old['pixel_error']:.4f}), {one['seconds']} s ({old['seconds']} s)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

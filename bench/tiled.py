"""Tiled prediction benchmark: our ONNX Runtime predictor against MONAI's sliding_window_inference.

For each model (U-Net resnet18 on RGB, and the bundled model) on the same image, tile size and overlap:

- speed: megapixels/s of our predictor (TIFF in, tiled TIFF mask out), of MONAI's sliding_window_inference
  (torch eager, Gaussian blending, whole image in memory, same model weights) and their ratio;
- overhead: our throughput as a fraction of bare ONNX Runtime on the same tiles (same count, shape, batches);
- memory: peak RSS of ours and MONAI's for several image sizes (MONAI only up to --monai-max; beyond, its
  whole-image tensors are estimated, not run);
- optionally (--patchinferer), MONAI's PatchInferer + SlidingWindowSplitter + ZarrAvgMerger.

Every measurement runs in a fresh child process (`--child KIND`), so peak RSS is its own. Images are real
EM content (the ISBI 2012 slices, mosaicked; RGB from shifted copies) written as tiled, zlib TIFFs.

    .venv/bin/python bench/tiled.py                              # 4096² speed for both models, memory 4096², 8192²
    .venv/bin/python bench/tiled.py --memory-sizes 20000 --models resnet18 --speed-size 0   # the big one
    .venv/bin/python bench/tiled.py --resnet18-run runs/r18 --memory-sizes ''   # with int8 rows (below)

INT8: where a model has its int8 variant (NAME.int8.onnx, `seg export --int8`: the bundled model ships one;
with --resnet18-run, the U-Net resnet18 is that trained run, exported and quantized here behind the gate),
the speed table adds ours and bare ORT on the int8 model, and the accuracy table both models' held-out
mIoU (from the int8 file's gate figures: the run's validation split, no TTA).
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
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from seg.inference.runtime import int8_variant  # noqa: E402

WORK = Path(os.environ.get("SEG_BENCH_DIR", Path(tempfile.gettempdir()) / "seg_bench"))
BUNDLED = ROOT / "seg" / "assets" / "model.onnx"
BUNDLED_CONFIG = ROOT / "configs" / "unet_isbi2012.yaml"


# -- memory --------------------------------------------------------------------------------------------
def peak_rss_mb() -> float:
    """Peak resident set size of this process so far: VmHWM (ru_maxrss would include the parent's RSS at
    fork, which Linux carries across exec)."""
    return _vm_hwm_mb(os.getpid())


# -- inputs --------------------------------------------------------------------------------------------
def make_image(path: Path, size: int, channels: int = 3) -> Path:
    """A size x size tiled TIFF (256² tiles, zlib) of EM slices, written tile by tile (bounded memory)."""
    if path.is_file():
        return path
    import tifffile

    from seg.io.images import read_image

    slices = [read_image(p) for p in sorted((ROOT / "data" / "isbi2012" / "train" / "images").glob("*.png"))]

    def tiles():
        for y in range(0, size, 256):
            for x in range(0, size, 256):
                k = ((y // 512) * 7 + (x // 512)) % len(slices)
                grey = slices[k][y % 512 : y % 512 + 256, x % 512 : x % 512 + 256]
                if channels == 1:
                    yield grey[: size - y, : size - x]
                else:
                    rgb = np.stack([grey, np.roll(grey, 3, axis=1), 255 - grey // 2], axis=-1)
                    yield rgb[: size - y, : size - x]

    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (size, size) if channels == 1 else (size, size, channels)
    tmp = path.with_suffix(".part.tif")
    tifffile.imwrite(
        tmp, data=tiles(), shape=shape, dtype=np.uint8, tile=(256, 256), compression="zlib",
        photometric="minisblack" if channels == 1 else "rgb",
    )  # fmt: skip
    tmp.replace(path)
    return path


def make_models(names: list[str], resnet18_run: Path | None = None) -> dict[str, dict[str, Any]]:
    """ONNX files (and checkpoints with the same weights, for MONAI) for the requested models."""
    from seg.io.images import default_palette
    from training.checkpoint import save_checkpoint
    from training.export import export_onnx

    models: dict[str, dict[str, Any]] = {}
    for name in names:
        if name == "resnet18" and resnet18_run is not None:
            models[name] = _trained_run(resnet18_run)
            continue
        onnx_path, ckpt_path = WORK / f"{name}.onnx", WORK / f"{name}.pt"
        note = ""
        if name == "bundled" and BUNDLED.is_file():
            models[name] = {"onnx": BUNDLED, "checkpoint": _bundled_checkpoint(), "note": "seg/assets/model.onnx"}
            if models[name]["checkpoint"] is None:
                models[name]["note"] += "; MONAI runs its architecture with random weights (same speed, masks differ)"
            continue
        if not onnx_path.is_file():
            import torch

            from seg.models import build_model

            if name == "resnet18":
                kwargs = dict(arch="unet", encoder="resnet18", classes=2, in_channels=3)
                norm = {"mode": "fixed", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
            else:
                from seg.config import load_config

                cfg = load_config(BUNDLED_CONFIG)
                kwargs = {k: v for k, v in cfg.model_kwargs().items() if k != "encoder_weights"}
                norm = cfg.data.normalize.model_dump()
            torch.manual_seed(0)
            model = build_model(**kwargs)
            classes = ["background", "foreground"]
            save_checkpoint(ckpt_path, {
                "model": model.state_dict(), "model_kwargs": kwargs, "stride": model.stride, "classes": classes,
                "palette": default_palette(2), "normalize": norm, "in_channels": kwargs["in_channels"],
                "ignore_index": 255, "tile_size": 512, "overlap": 0.25, "config": {}, "epoch": 0,
            })  # fmt: skip
            export_onnx(ckpt_path, onnx_path)
        if name == "bundled":
            note = "bundled architecture (configs/unet_isbi2012.yaml), untrained: seg/assets/model.onnx not there yet"
        models[name] = {"onnx": onnx_path, "checkpoint": ckpt_path, "note": note}
    return models


def _trained_run(run: Path) -> dict[str, Any]:
    """A trained run exported to ONNX, and its int8 model behind the gate (`seg export --int8`)."""
    from seg.inference.runtime import int8_variant
    from training.export import export_onnx
    from training.quantize import export_int8

    checkpoint = run / "checkpoints" / "best.pt"
    onnx_path = WORK / f"{run.name}.onnx"
    if not onnx_path.is_file():
        export_onnx(checkpoint, onnx_path)
    if not int8_variant(onnx_path).is_file():
        export_int8(onnx_path, run / "config.yaml")
    return {"onnx": onnx_path, "checkpoint": checkpoint, "note": f"trained: {run}"}


def _bundled_checkpoint() -> Path | None:
    """The run the bundled model was exported from (runs/NAME/checkpoints/best.pt), if it is here and fits."""
    import torch

    from seg.inference.runtime import create_session, read_model_info

    info = read_model_info(create_session(BUNDLED, "cpu")[0])
    path = ROOT / "runs" / info.name / "checkpoints" / "best.pt"
    if not path.is_file():
        return None
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    kwargs = {k: v for k, v in ckpt["model_kwargs"].items() if k != "encoder_weights"}
    same = kwargs == info.model_kwargs and ckpt.get("epoch") == info.epoch
    return path if same else None


# -- children: one measurement each --------------------------------------------------------------------
def child_ours(a: argparse.Namespace) -> dict[str, Any]:
    from seg.inference.predictor import Predictor
    from seg.inference.tiling import TilingOptions

    options = TilingOptions(tile=a.tile, overlap=a.overlap, batch_size=a.batch_size)
    predictor = Predictor.from_onnx(a.model, device="cpu", threads=a.threads, options=options, precision=a.precision)
    base = peak_rss_mb()
    start = time.perf_counter()
    done = [0]

    def progress(n: int) -> None:  # for a parent that stops us early: how far we got
        done[0] += n
        Path(a.mask + ".progress").write_text(str(done[0]))

    summary = predictor.predict_file(a.image, a.mask, on_tiles=progress)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "pixels": summary["height"] * summary["width"], "tiles": summary["tiles"],
            "peak_rss_mb": peak_rss_mb(), "base_rss_mb": base, "torch_loaded": "torch" in sys.modules}  # fmt: skip


def child_bare(a: argparse.Namespace) -> dict[str, Any]:
    """ONNX Runtime alone on exactly the tiles our predictor runs: same count, shapes and batches."""
    from seg.inference.predictor import Predictor
    from seg.inference.tiling import TilingOptions, tile_grid
    from seg.io.sources import TiffSource

    options = TilingOptions(tile=a.tile, overlap=a.overlap, batch_size=a.batch_size)
    predictor = Predictor.from_onnx(a.model, device="cpu", threads=a.threads, options=options, precision=a.precision)
    with TiffSource(Path(a.image)) as source:
        height, width = source.height, source.width
    grid = tile_grid(height, width, options.tile, options.overlap, predictor.info.stride)
    channels, n_x = predictor.info.in_channels, len(grid.starts_x)
    rng = np.random.default_rng(0)
    batches = {}
    seconds = 0.0
    for _ in grid.starts_y:
        for b in range(0, n_x, options.batch_size):
            n = min(options.batch_size, n_x - b)
            if n not in batches:
                batches[n] = rng.standard_normal((n, channels, grid.tile_y, grid.tile_x), dtype=np.float32)
            start = time.perf_counter()
            predictor.run(batches[n])
            seconds += time.perf_counter() - start
    return {"seconds": seconds, "pixels": height * width, "tiles": grid.tiles, "peak_rss_mb": peak_rss_mb()}


def _torch_model(a: argparse.Namespace):
    import torch

    from seg.inference.runtime import create_session, read_model_info

    if a.threads:
        torch.set_num_threads(a.threads)
    if a.checkpoint:
        from training.checkpoint import load_checkpoint, model_from_checkpoint

        return model_from_checkpoint(load_checkpoint(a.checkpoint)), read_model_info(create_session(a.model, "cpu")[0])
    from seg.models import build_model  # the bundled ONNX file's architecture, untrained: same speed

    info = read_model_info(create_session(a.model, "cpu")[0])
    return build_model(**info.model_kwargs).eval(), info


def _load_normalised(a: argparse.Namespace, info) -> np.ndarray:
    import tifffile

    from seg.inference.preprocess import normalize
    from seg.io.images import to_channels

    image = to_channels(tifffile.imread(a.image), info.in_channels)
    return normalize(image, info.normalize)


def child_monai(a: argparse.Namespace) -> dict[str, Any]:
    import tifffile
    import torch
    from monai.inferers import sliding_window_inference

    model, info = _torch_model(a)
    base = peak_rss_mb()
    start = time.perf_counter()
    x = torch.from_numpy(_load_normalised(a, info))[None]
    with torch.inference_mode():
        logits = sliding_window_inference(
            x, roi_size=(a.tile, a.tile), sw_batch_size=a.batch_size, predictor=model, overlap=a.overlap,
            mode="gaussian", sigma_scale=0.125,
        )  # fmt: skip
        mask = logits[0].argmax(0).to(torch.uint8).numpy()
    tifffile.imwrite(a.mask, mask, tile=(256, 256), compression="zlib")
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "pixels": mask.size, "peak_rss_mb": peak_rss_mb(), "base_rss_mb": base}


def child_patchinferer(a: argparse.Namespace) -> dict[str, Any]:
    """MONAI's PatchInferer with SlidingWindowSplitter and ZarrAvgMerger (merged values on disk)."""
    import tifffile
    import torch
    from monai.inferers import PatchInferer, SlidingWindowSplitter
    from monai.inferers.merger import ZarrAvgMerger

    model, info = _torch_model(a)
    base = peak_rss_mb()
    start = time.perf_counter()
    x = torch.from_numpy(_load_normalised(a, info))[None]
    with tempfile.TemporaryDirectory(dir=WORK) as tmp:
        import zarr

        inferer = PatchInferer(
            splitter=SlidingWindowSplitter(patch_size=a.tile, overlap=a.overlap, pad_mode="constant"),
            merger_cls=ZarrAvgMerger, batch_size=a.batch_size,
            store=zarr.storage.LocalStore(f"{tmp}/out"), value_store=zarr.storage.LocalStore(f"{tmp}/values"),
            count_store=zarr.storage.LocalStore(f"{tmp}/counts"), chunks=(1, 2, 512, 512),
        )  # fmt: skip
        with torch.inference_mode():
            merged = inferer(x, model)
        del x
        height, width = merged.shape[-2:]
        mask = np.empty((height, width), np.uint8)
        for y in range(0, height, 512):
            mask[y : y + 512] = np.asarray(merged[0, :, y : y + 512]).argmax(0)
    tifffile.imwrite(a.mask, mask, tile=(256, 256), compression="zlib")
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "pixels": mask.size, "peak_rss_mb": peak_rss_mb(), "base_rss_mb": base}


CHILDREN = {
    "ours": child_ours, "bare": child_bare, "ours_int8": child_ours, "bare_int8": child_bare, "monai": child_monai,
    "patchinferer": child_patchinferer,
}  # fmt: skip


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_child(kind: str, model: dict[str, Any], image: Path, mask: Path, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [
        sys.executable, __file__, "--child", kind, "--model", str(model["onnx"]), "--image", str(image),
        "--mask", str(mask), "--tile", str(args.tile), "--overlap", str(args.overlap),
        "--batch-size", str(args.batch_size), "--precision", "int8" if kind.endswith("_int8") else "fp32",
    ]  # fmt: skip
    if model.get("checkpoint"):
        cmd += ["--checkpoint", str(model["checkpoint"])]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    print(f"  running {kind} on {image.name} ...", file=sys.stderr, flush=True)
    start, peak = time.monotonic(), 0.0
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        while proc.poll() is None:  # watch the peak RSS from outside, to report it even if we stop early
            peak = max(peak, _vm_hwm_mb(proc.pid))
            if args.child_timeout and time.monotonic() - start > args.child_timeout:
                proc.kill()
                proc.wait()
                progress = Path(str(mask) + ".progress")
                done = int(progress.read_text()) if progress.is_file() else None
                return {"stopped_after_s": round(time.monotonic() - start), "peak_rss_mb": peak, "tiles_done": done}
            time.sleep(0.5)
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        tail = stderr.strip().splitlines()[-3:]
        return {"error": f"exit {proc.returncode}: {' | '.join(tail)}"}
    result = json.loads(stdout.strip().splitlines()[-1])
    result["mp_per_s"] = result["pixels"] / 1e6 / result["seconds"]
    result["load_1min_after"] = os.getloadavg()[0]
    return result


def _vm_hwm_mb(pid: int) -> float:
    """A process's peak RSS so far (VmHWM), 0 when it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def agreement(a: Path, b: Path) -> float | None:
    import tifffile

    try:
        return float((tifffile.imread(a) == tifffile.imread(b)).mean())
    except Exception:  # a child failed
        return None


def monai_estimate_gb(size: int, channels: int, classes: int = 2) -> float:
    """MONAI's whole-image tensors: uint8 image, float32 input, float32 output + count map, argmax."""
    pixels = size * size
    return pixels * (channels + 4 * channels + 4 * classes + 4 + 8) / 1e9


# -- the run -------------------------------------------------------------------------------------------
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="resnet18,bundled", help="comma-separated: resnet18, bundled")
    p.add_argument("--speed-size", type=int, default=4096, help="image side for the speed table (0: skip)")
    p.add_argument("--memory-sizes", default="4096,8192", help="image sides for the memory table ('' to skip)")
    p.add_argument("--memory-model", default="resnet18")
    p.add_argument("--monai-max", type=int, default=8192, help="largest side MONAI is run at (beyond: estimated)")
    p.add_argument("--patchinferer", action="store_true", help="also time MONAI's PatchInferer at the speed size")
    p.add_argument("--tile", type=int, default=512)
    p.add_argument("--overlap", type=float, default=0.25)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--threads", type=int, default=None, help="CPU threads for ONNX Runtime and torch")
    p.add_argument("--repeats", type=int, default=1, help="speed runs per kind (round robin); the fastest counts")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--child-timeout", type=float, default=None,
                   help="stop a measurement after this many seconds; its peak RSS so far is reported")
    # child mode
    p.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", help=argparse.SUPPRESS)
    p.add_argument("--image", help=argparse.SUPPRESS)
    p.add_argument("--mask", help=argparse.SUPPRESS)
    p.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    p.add_argument("--resnet18-run", type=Path, default=None,
                   help="a trained U-Net resnet18 run folder to use as the resnet18 model (exported and quantized here)")
    args = p.parse_args()
    if args.child:
        result = CHILDREN[args.child](args)
        result["cpu_s"] = cpu_seconds()  # the whole child, set-up included
        print(json.dumps(result))
        return

    WORK.mkdir(parents=True, exist_ok=True)
    names = [n for n in args.models.split(",") if n]
    memory_sizes = [int(s) for s in args.memory_sizes.split(",") if s]
    models = make_models(sorted(set(names) | ({args.memory_model} if memory_sizes else set())), args.resnet18_run)
    results: dict[str, Any] = {"settings": {k: v for k, v in vars(args).items() if k in
                                            ("tile", "overlap", "batch_size", "threads")},
                               "cpu_count": os.cpu_count(), "speed": [], "memory": []}  # fmt: skip
    print(f"tile {args.tile}, overlap {args.overlap}, batch {args.batch_size}, {os.cpu_count()} CPUs", file=sys.stderr)

    runs: dict[tuple[str, int, str], dict[str, Any]] = {}

    def measure(name: str, size: int, kind: str) -> dict[str, Any]:
        """One child run, or the fastest of the runs so far (a shared machine makes single runs noisy)."""
        model = models[name]
        channels = _channels(model["onnx"])
        image = make_image(WORK / f"em_{size}_{'rgb' if channels == 3 else 'grey'}.tif", size, channels)
        result = run_child(kind, model, image, WORK / f"mask_{name}_{size}_{kind}.tif", args)
        result["mask"] = str(WORK / f"mask_{name}_{size}_{kind}.tif")
        best = runs.get((name, size, kind))
        if best is None or result.get("mp_per_s", 0) > best.get("mp_per_s", 0):
            result["runs"] = (best or {}).get("runs", 0) + 1
            runs[name, size, kind] = result
        else:
            best["runs"] += 1
        return runs[name, size, kind]

    if args.speed_size:
        for name in names:
            size = args.speed_size
            int8 = int8_variant(models[name]["onnx"])
            kinds = ("ours", "ours_int8", "bare", "bare_int8", "monai") if int8.is_file() else ("ours", "bare", "monai")
            for _ in range(args.repeats):  # round robin, so a busy spell of the machine hits all kinds alike
                measured = {kind: measure(name, size, kind) for kind in kinds}
            ours, bare, monai = measured["ours"], measured["bare"], measured["monai"]
            row = {"model": name, "note": models[name]["note"], "size": size, "ours": ours, "bare": bare, "monai": monai,
                   "agreement": agreement(Path(ours["mask"]), Path(monai["mask"]))}  # fmt: skip
            if int8.is_file():
                row.update(ours_int8=measured["ours_int8"], bare_int8=measured["bare_int8"],
                           int8_agreement=agreement(Path(ours["mask"]), Path(measured["ours_int8"]["mask"])),
                           quantization=_quantization(int8))  # fmt: skip
            if args.patchinferer:
                row["patchinferer"] = measure(name, size, "patchinferer")
            results["speed"].append(row)
    for size in memory_sizes:
        name = args.memory_model
        ours = runs.get((name, size, "ours")) or measure(name, size, "ours")
        channels = _channels(models[name]["onnx"])
        if size > args.monai_max:
            monai = {"estimate_gb": monai_estimate_gb(size, channels)}
        else:
            monai = runs.get((name, size, "monai")) or measure(name, size, "monai")
        results["memory"].append({"model": name, "size": size, "ours": ours, "monai": monai,
                                  "tile": args.tile, "overlap": args.overlap})

    print_tables(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))


def _channels(model: Path) -> int:
    from seg.inference.runtime import create_session, read_model_info

    return read_model_info(create_session(model, "cpu")[0]).in_channels


def _quantization(path: Path) -> dict[str, Any]:
    from seg.inference.runtime import create_session, read_model_info

    return read_model_info(create_session(path, "cpu")[0]).quantization


def _rate(r: dict[str, Any]) -> str:
    return f"{r['mp_per_s']:.3f}" if "mp_per_s" in r else r.get("error", "-")


def print_tables(results: dict[str, Any]) -> None:
    if results["speed"]:
        print("\n| model | image | ours MP/s | MONAI swi MP/s | ours / MONAI | bare ORT MP/s | ours / bare ORT | mask agreement |")
        print("|---|---|---|---|---|---|---|---|")
        for row in results["speed"]:
            ours, bare, monai = row["ours"], row["bare"], row["monai"]
            ratio = ours["mp_per_s"] / monai["mp_per_s"] if "mp_per_s" in ours and "mp_per_s" in monai else None
            frac = ours["mp_per_s"] / bare["mp_per_s"] if "mp_per_s" in ours and "mp_per_s" in bare else None
            agree = f"{row['agreement']:.2%}" if row["agreement"] is not None else "-"
            print(f"| {row['model']} | {row['size']}² | {_rate(ours)} | {_rate(monai)} | "
                  f"{'%.2fx' % ratio if ratio else '-'} | {_rate(bare)} | {'%.0f%%' % (100 * frac) if frac else '-'} | {agree} |")
            if "patchinferer" in row:
                pi = row["patchinferer"]
                print(f"| {row['model']} (MONAI PatchInferer + ZarrAvgMerger) | {row['size']}² | | {_rate(pi)} | "
                      f"{'%.2fx' % (ours['mp_per_s'] / pi['mp_per_s']) if 'mp_per_s' in pi else '-'} | | | "
                      f"peak RSS {pi.get('peak_rss_mb', 0):.0f} MB |")
        int8_rows = [row for row in results["speed"] if "ours_int8" in row]
        if int8_rows:
            print("\n| model | image | ours fp32 MP/s | ours int8 MP/s | int8 / fp32 | bare ORT fp32 | bare ORT int8 |"
                  " MONAI swi (fp32) | ours int8 / MONAI | masks equal | held-out mIoU fp32 | int8 |")
            print("|---|---|---|---|---|---|---|---|---|---|---|---|")
            for row in int8_rows:
                ours, fast, monai, q = row["ours"], row["ours_int8"], row["monai"], row["quantization"]
                speedup = fast["mp_per_s"] / ours["mp_per_s"] if "mp_per_s" in fast and "mp_per_s" in ours else None
                vs_monai = fast["mp_per_s"] / monai["mp_per_s"] if "mp_per_s" in fast and "mp_per_s" in monai else None
                agree = f"{row['int8_agreement']:.2%}" if row["int8_agreement"] is not None else "-"
                print(f"| {row['model']} | {row['size']}² | {_rate(ours)} | {_rate(fast)} | "
                      f"{'%.2fx' % speedup if speedup else '-'} | {_rate(row['bare'])} | {_rate(row['bare_int8'])} | "
                      f"{_rate(monai)} | {'%.2fx' % vs_monai if vs_monai else '-'} | {agree} | "
                      f"{q['fp32']['miou']:.4f} | {q['int8']['miou']:.4f} |")
        for row in results["speed"]:
            if row["note"]:
                print(f"\n{row['model']}: {row['note']}")
    if results["memory"]:
        print("\n| model | image | ours peak RSS | ours time | MONAI peak RSS | MONAI time |")
        print("|---|---|---|---|---|---|")
        for row in results["memory"]:
            ours, monai = row["ours"], row["monai"]
            ours_rss = f"{ours['peak_rss_mb']:.0f} MB" if "peak_rss_mb" in ours else ours.get("error", "-")
            ours_t = f"{ours['seconds']:.0f} s" if "seconds" in ours else "-"
            if "stopped_after_s" in ours:
                from seg.inference.tiling import tile_grid

                total = tile_grid(row["size"], row["size"], row["tile"], row["overlap"], 32).tiles
                ours_t = f"stopped after {ours['stopped_after_s']} s, {ours['tiles_done']}/{total} tiles done"
            if "estimate_gb" in monai:
                monai_rss, monai_t = f"not run: ≥ {monai['estimate_gb']:.1f} GB estimated (whole-image tensors)", "-"
            else:
                monai_rss = f"{monai['peak_rss_mb']:.0f} MB" if "peak_rss_mb" in monai else monai.get("error", "-")
                monai_t = f"{monai['seconds']:.0f} s" if "seconds" in monai else "-"
                if "stopped_after_s" in monai:
                    monai_t = f"stopped after {monai['stopped_after_s']} s"
            print(f"| {row['model']} | {row['size']}² | {ours_rss} | {ours_t} | {monai_rss} | {monai_t} |")


if __name__ == "__main__":
    main()

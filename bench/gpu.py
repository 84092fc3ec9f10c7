"""The tiled predictor on a GPU: U-Net resnet18 (RGB, untrained: speed does not depend on the weights) at
4096², CUDA provider in fp32 and fp16 (`seg export --fp16`), and TensorRT's provider when ONNX Runtime has
it; the CPU provider on a 1024² crop for scale. Run by bench/gpu.sh, which checks for a GPU first.

Each row is one `Predictor.predict_file` (tiled TIFF in, tiled TIFF mask out) after a warm-up run on a
1024² image, batch size chosen for the GPU's memory (`seg.inference.runtime.gpu_batch_size`) unless --batch-size.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from tiled import WORK, make_image, make_models  # noqa: E402


def session_predictor(path: Path, batch: int | None, fp16: bool = False):
    """A Predictor on one named provider (TensorRT is not one of `create_session`'s devices)."""
    import onnxruntime as ort

    from seg.inference.predictor import Predictor
    from seg.inference.runtime import CUDA, onnx_runner, read_model_info

    options = [("TensorrtExecutionProvider", {"trt_fp16_enable": fp16, "trt_engine_cache_enable": True,
                                               "trt_engine_cache_path": str(WORK / "trt")}), CUDA]  # fmt: skip
    session = ort.InferenceSession(str(path), providers=[*options, "CPUExecutionProvider"])
    info = read_model_info(session, path)
    tiling = info.tiling(batch_size=batch) if batch else info.tiling()
    return Predictor(onnx_runner(session, bound=True), info, tiling, provider=session.get_providers()[0], device="cuda", path=path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()

    import onnxruntime as ort

    from seg.inference.predictor import Predictor
    from training.export import export_onnx

    WORK.mkdir(parents=True, exist_ok=True)
    model = make_models(["resnet18"])["resnet18"]
    fp16 = WORK / "resnet18.fp16.onnx"
    if not fp16.is_file():
        export_onnx(model["checkpoint"], fp16, fp16=True)
    image = make_image(WORK / f"em_{args.size}_rgb.tif", args.size, 3)
    small = make_image(WORK / "em_1024_rgb.tif", 1024, 3)
    name = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()

    variants = [("CUDA fp32", lambda: Predictor.from_onnx(model["onnx"], device="cuda", precision="fp32")),
                ("CUDA fp16", lambda: Predictor.from_onnx(fp16, device="cuda", precision="fp32"))]  # fmt: skip
    if "TensorrtExecutionProvider" in ort.get_available_providers():
        variants += [("TensorRT fp32", lambda: session_predictor(model["onnx"], args.batch_size)),
                     ("TensorRT fp16", lambda: session_predictor(model["onnx"], args.batch_size, fp16=True))]  # fmt: skip
    rows = []
    for label, make in variants:
        predictor = make()
        if args.batch_size and label.startswith("CUDA"):
            predictor.options = predictor.options.replace(batch_size=args.batch_size)
        predictor.predict_file(small, WORK / "gpu_warmup.tif")
        start = time.perf_counter()
        predictor.predict_file(image, WORK / f"gpu_{label.replace(' ', '_')}.tif")
        seconds = time.perf_counter() - start
        rows.append({"variant": label, "provider": predictor.provider, "batch": predictor.options.batch_size,
                     "seconds": round(seconds, 2), "mp_per_s": round(args.size**2 / 1e6 / seconds, 2)})  # fmt: skip
    cpu = Predictor.from_onnx(model["onnx"], device="cpu", precision="fp32")
    start = time.perf_counter()
    cpu.predict_file(small, WORK / "gpu_cpu.tif")
    seconds = time.perf_counter() - start
    rows.append({"variant": "CPU fp32 (1024² crop)", "provider": cpu.provider, "batch": cpu.options.batch_size,
                 "seconds": round(seconds, 2), "mp_per_s": round(1024**2 / 1e6 / seconds, 2)})  # fmt: skip

    print(f"\n{name}: U-Net resnet18 (RGB), tile 512, overlap 0.25, {args.size}² tiled TIFF in and out\n")
    print("| variant | provider | batch | seconds | MP/s |")
    print("|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['variant']} | {r['provider']} | {r['batch']} | {r['seconds']} | {r['mp_per_s']} |")
    if args.json:
        args.json.write_text(json.dumps({"gpu": name, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()

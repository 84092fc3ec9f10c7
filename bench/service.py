"""The HTTP service against the in-process predictor, then the service under concurrent load.

1. Latency: the same 512x512 and 2048x2048 PNGs (real EM content) through POST /segment (upload, decode,
   predict, PNG mask back) and through `Predictor.predict` on the decoded array in this process; the two
   alternate, so machine noise hits both alike. Overhead = HTTP median / in-process median - 1 (goal:
   at most 10% at 2048x2048). As that ratio is at the mercy of noise on a busy machine, the table also
   gives the overhead measured within each request: its time minus the server's own predictor time
   (the `Server-Timing: predict;dur=...` header), as a fraction of the latter.
2. Load: `--requests` requests from `--clients` concurrent clients (one keep-alive connection each):
   throughput, latency percentiles (queueing included) and errors (anything but 200).

The server is `seg serve` in a subprocess on 127.0.0.1. Without --model: the bundled model, else an
untrained model of the default config's architecture (same compute as the trained one).

    python bench/service.py [--model m.onnx] [--repeats 7] [--requests 1000] [--clients 8] [--load-size 512]
"""

from __future__ import annotations

import argparse
import io
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from seg.imageio import decode_image, read_image  # noqa: E402
from seg.predictor import Predictor  # noqa: E402
from serving.settings import BUNDLED_MODEL  # noqa: E402

SAMPLES = ROOT / "data" / "samples"


def untrained_model(folder: Path) -> Path:
    """An untrained export of configs/unet_isbi2012.yaml's model (needs torch; only the bench does)."""
    from seg.config import load_config
    from seg.models import build_model
    from training.checkpoint import model_state, save_checkpoint
    from training.export import export_onnx

    cfg = load_config(ROOT / "configs" / "unet_isbi2012.yaml")
    kwargs = cfg.model_kwargs()
    save_checkpoint(folder / "untrained.pt", {**model_state(build_model(**kwargs), kwargs, cfg), "config": {}, "epoch": 0})
    export_onnx(folder / "untrained.pt", folder / "untrained.onnx")
    return folder / "untrained.onnx"


def images() -> dict[str, bytes]:
    """512x512 and 2048x2048 PNGs: an ISBI test slice, and 16 flipped slices side by side."""
    slices = [read_image(p) for p in sorted(SAMPLES.glob("isbi_test_*.png"))]
    rows = [[np.flip(slices[(r * 4 + c) % len(slices)], axis=(r + c) % 2) for c in range(4)] for r in range(4)]
    out = {}
    for name, array in (("512x512", slices[0]), ("2048x2048", np.block(rows))):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        out[name] = buffer.getvalue()
    return out


def start_server(model: Path, device: str, log: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("SEG_")}, "SEG_DEVICE": device}
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "seg.cli", "serve", str(model), "--port", str(port)],
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    stop_server(proc)
    sys.exit(f"the server did not start:\n{log.read_text()[-3000:]}")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def latency(url: str, predictor: Predictor, data: bytes, repeats: int) -> tuple[float, float, float]:
    """Medians of (HTTP /segment seconds, in-process predict seconds, HTTP time / server predict time - 1),
    alternating HTTP and in-process, after one warm-up each."""
    image = decode_image(data)
    http, local, within = [], [], []
    with httpx.Client(base_url=url, timeout=600) as client:
        for i in range(repeats + 1):
            start = time.perf_counter()
            response = client.post("/segment", content=data, headers={"content-type": "image/png"})
            response.raise_for_status()
            middle = time.perf_counter()
            predictor.predict(image)
            end = time.perf_counter()
            if i:  # the first round warms both up
                http.append(middle - start)
                local.append(end - middle)
                predict = float(response.headers["server-timing"].split("dur=")[1]) / 1000
                within.append((middle - start) / predict - 1)
    return statistics.median(http), statistics.median(local), statistics.median(within)


def load(url: str, data: bytes, requests: int, clients: int) -> dict:
    """`requests` POST /segment from `clients` threads; throughput, percentiles and errors."""
    times: list[float] = []
    errors: list[str] = []
    next_index = iter(range(requests))
    lock = threading.Lock()

    def client_loop() -> None:
        with httpx.Client(base_url=url, timeout=600) as client:
            while True:
                with lock:
                    if next(next_index, None) is None:
                        return
                start = time.perf_counter()
                try:
                    response = client.post("/segment", content=data, headers={"content-type": "image/png"})
                    ok = response.status_code == 200
                    problem = f"{response.status_code}: {response.text[:100]}"
                except httpx.HTTPError as err:
                    ok, problem = False, repr(err)
                with lock:
                    times.append(time.perf_counter() - start)
                    if not ok:
                        errors.append(problem)

    threads = [threading.Thread(target=client_loop) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    p50, p95, p99 = np.percentile(times, (50, 95, 99))
    return {"wall": wall, "rps": requests / wall, "p50": p50, "p95": p95, "p99": p99, "errors": errors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="ONNX model (default: the bundled one, else an untrained one)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (server and in-process alike)")
    parser.add_argument("--repeats", type=int, default=7, help="timed requests per image size")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--load-size", choices=["512x512", "2048x2048"], default="512x512")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="seg-bench-") as tmp:
        model = args.model or (BUNDLED_MODEL if BUNDLED_MODEL.is_file() else untrained_model(Path(tmp)))
        predictor = Predictor(model, device=args.device)
        pngs = images()
        proc, url = start_server(model, args.device, Path(tmp) / "server.log")
        try:
            rows = [(size, *latency(url, predictor, data, args.repeats)) for size, data in pngs.items()]
            del predictor  # the load test has the machine to the server
            result = load(url, pngs[args.load_size], args.requests, args.clients) if args.requests else None
        finally:
            stop_server(proc)

    print(f"\nmodel {model.name}, device {args.device}, {os.cpu_count()} CPUs; medians of {args.repeats} runs\n")
    print("| image | HTTP /segment | in-process predict | overhead | overhead within a request |")
    print("| --- | --- | --- | --- | --- |")
    for size, http, local, within in rows:
        print(f"| {size} | {http * 1000:.0f} ms | {local * 1000:.0f} ms | {100 * (http / local - 1):+.1f}% "
              f"| {100 * within:+.1f}% |")  # fmt: skip
    if result is None:
        return
    print(f"\n{args.requests} requests ({args.load_size}) from {args.clients} concurrent clients\n")
    print("| throughput | p50 | p95 | p99 | errors |")
    print("| --- | --- | --- | --- | --- |")
    print(f"| {result['rps']:.2f} req/s | {result['p50'] * 1000:.0f} ms | {result['p95'] * 1000:.0f} ms "
          f"| {result['p99'] * 1000:.0f} ms | {len(result['errors'])} |")  # fmt: skip
    for problem in sorted(set(result["errors"]))[:5]:
        print(f"  error: {problem}")


if __name__ == "__main__":
    main()

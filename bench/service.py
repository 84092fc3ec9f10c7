"""The HTTP service against the in-process predictor, then the service under concurrent load.

1. Latency: the same 512x512 and 2048x2048 PNGs (real EM content) through POST /segment (upload, decode,
   predict, PNG mask back) and through `Predictor.predict` on the decoded array in this process; the two
   alternate, so machine noise hits both alike. Overhead = HTTP median / in-process median - 1 (goal:
   at most 10% at 2048x2048). As that ratio is at the mercy of noise on a busy machine, the table also
   gives the overhead measured within each request: its time minus the server's own predictor time
   (the `Server-Timing: predict;dur=...` header), as a fraction of the latter.
2. Load: `--requests` requests from `--clients` concurrent clients (one keep-alive connection each):
   throughput, latency percentiles (queueing included) and errors (anything but 200).
3. Soak (`--soak SECONDS`, instead of 1 and 2): `--clients` clients send good and bad requests
   interleaved for that long (the tests' bad uploads, thin images, oversized bodies, pickle content
   types, mutated files from tests/mutants.py), each answer checked against the status its kind must get.
   Counts 5xx, hangs (no answer in 120 s) and other wrong answers, and compares the server's RSS (its
   whole process tree) at the end with its RSS after the first tenth of the run (the warm-up).

The server is `seg serve` in a subprocess on 127.0.0.1. Without --model: the bundled model, else an
untrained model of the default config's architecture (same compute as the trained one).

    python bench/service.py [--model m.onnx] [--repeats 7] [--requests 1000] [--clients 8] [--load-size 512]
    python bench/service.py --soak 600 --clients 8
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

from seg.inference.predictor import Predictor  # noqa: E402
from seg.io.images import decode_image, read_image  # noqa: E402
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


def start_server(model: Path, device: str, log: Path, **env: str) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("SEG_")}, "SEG_DEVICE": device, **env}
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


SOAK_MAX_BYTES = 8 << 20  # the soak's server limit, so an oversized body costs 9 MB, not 129 MB


def soak_requests() -> list[tuple[str, str, dict, bytes, range]]:
    """(kind, route, headers, body, statuses it must get): good and bad requests, mutants last."""
    sys.path.insert(0, str(ROOT / "tests"))
    import struct
    import zlib

    from mutants import mutants

    def png(array: np.ndarray) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        return buffer.getvalue()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    em = read_image(SAMPLES / "isbi_test_00.png")
    good = png(em)
    strip = np.concatenate([em[y : y + 1] for y in range(0, 512, 4)], axis=1)[:, :60000]  # real pixels, in SEG_MAX_SIDE
    bomb = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 60000, 60000, 8, 0, 0, 0, 0))
    bomb += chunk(b"IDAT", zlib.compress(b"\0" * 60001 * 4)) + chunk(b"IEND", b"")
    raw = {"content-type": "image/png"}
    ok, client_error = range(200, 201), range(400, 500)
    requests = [
        ("good /segment", "/segment", raw, good, ok),
        ("good /segment_json", "/segment_json?mask=rle", raw, good, ok),
        ("good /overlay", "/overlay", raw, good, ok),
        ("thin 1 x 60000", "/segment", raw, png(strip), ok),
        ("thin 60000 x 1", "/segment", raw, png(np.ascontiguousarray(strip.T)), ok),
        ("not an image", "/segment", raw, b"hello, this is text" * 10, client_error),
        ("empty", "/segment", raw, b"", client_error),
        ("truncated PNG", "/segment", raw, good[: len(good) // 2], client_error),
        ("60000 x 60000 bomb", "/segment", raw, bomb, range(413, 414)),
        ("JSON body", "/segment", {"content-type": "application/json"}, b'{"image": "x"}', client_error),
        ("pickle", "/segment", {"content-type": "application/vnd.bentoml+pickle"}, b"\x80\x04N.", range(415, 416)),
        ("oversized body", "/segment", raw, b"\0" * (SOAK_MAX_BYTES + (1 << 20)), range(413, 414)),
    ]
    for name, data in mutants(40, seed=1):
        requests.append((f"mutant {name}", "/segment", {"content-type": "application/octet-stream"}, data, range(200, 500)))
    return requests


def tree_rss(pid: int) -> int:
    """Resident memory (bytes) of a process and all its descendants (Linux)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
        except OSError:
            continue
        child = int(status.parent.name)
        children.setdefault(int(fields.get("PPid", "0")), []).append(child)
        rss[child] = int(fields.get("VmRSS", "0 kB").split()[0]) * 1024
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        total += rss.get(p, 0)
        todo += children.get(p, [])
    return total


def soak(url: str, pid: int, seconds: float, clients: int) -> dict:
    """Every client cycles through `soak_requests()` from its own offset until `seconds` have passed."""
    requests = soak_requests()
    counts: dict[str, int] = {"requests": 0, "5xx": 0, "hangs": 0, "wrong": 0}
    problems: list[str] = []
    lock = threading.Lock()
    end = time.monotonic() + seconds
    warm: dict[str, float] = {}

    def client_loop(offset: int) -> None:
        i = offset
        with httpx.Client(base_url=url, timeout=120) as client:
            while time.monotonic() < end:
                kind, route, headers, body, expected = requests[i % len(requests)]
                i += 1
                try:
                    status = client.post(route, content=body, headers=headers).status_code
                    problem = None if status in expected else f"{kind}: {status}"
                    key = "5xx" if status >= 500 else "wrong"
                except httpx.TimeoutException:
                    problem, key = f"{kind}: no answer in 120 s", "hangs"
                except httpx.TransportError as err:  # the server closed an oversized upload early
                    problem = None if kind == "oversized body" else f"{kind}: {type(err).__name__}"
                    key = "wrong"
                with lock:
                    counts["requests"] += 1
                    if problem:
                        counts[key] += 1
                        problems.append(problem)

    threads = [threading.Thread(target=client_loop, args=(k * len(requests) // clients,)) for k in range(clients)]
    for t in threads:
        t.start()
    time.sleep(seconds / 10)
    warm["rss"] = tree_rss(pid)
    for t in threads:
        t.join()
    return {**counts, "rss_warm": warm["rss"], "rss_end": tree_rss(pid), "problems": problems}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="ONNX model (default: the bundled one, else an untrained one)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (server and in-process alike)")
    parser.add_argument("--repeats", type=int, default=7, help="timed requests per image size")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--load-size", choices=["512x512", "2048x2048"], default="512x512")
    parser.add_argument("--soak", type=float, default=0, help="seconds of the soak (instead of latency and load)")
    args = parser.parse_args()
    if args.soak:
        return main_soak(args)

    with tempfile.TemporaryDirectory(prefix="seg-bench-") as tmp:
        model = args.model or (BUNDLED_MODEL if BUNDLED_MODEL.is_file() else untrained_model(Path(tmp)))
        predictor = Predictor.from_onnx(model, device=args.device)
        pngs = images()
        proc, url = start_server(model, args.device, Path(tmp) / "server.log")
        try:
            rows = [(size, *latency(url, predictor, data, args.repeats)) for size, data in pngs.items()]
            ran = f"{predictor.path.name} ({predictor.info.precision})"  # the server chooses the same way
            del predictor  # the load test has the machine to the server
            result = load(url, pngs[args.load_size], args.requests, args.clients) if args.requests else None
        finally:
            stop_server(proc)

    print(f"\nmodel {ran}, device {args.device}, {os.cpu_count()} CPUs; medians of {args.repeats} runs\n")
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


def main_soak(args: argparse.Namespace) -> None:
    model = args.model or BUNDLED_MODEL
    with tempfile.TemporaryDirectory(prefix="seg-bench-") as tmp:
        proc, url = start_server(model, args.device, Path(tmp) / "server.log", SEG_MAX_BYTES=str(SOAK_MAX_BYTES))
        try:
            result = soak(url, proc.pid, args.soak, args.clients)
        finally:
            stop_server(proc)
    growth = result["rss_end"] / result["rss_warm"] - 1
    print(f"\nsoak: {args.soak:.0f} s, {args.clients} clients, model {model.name}\n")
    print("| requests | 5xx | hangs | other wrong answers | RSS after warm-up | RSS at the end | growth |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    print(f"| {result['requests']} | {result['5xx']} | {result['hangs']} | {result['wrong']} "
          f"| {result['rss_warm'] / 2**20:.0f} MB | {result['rss_end'] / 2**20:.0f} MB | {100 * growth:+.1f}% |")  # fmt: skip
    for problem in sorted(set(result["problems"]))[:20]:
        print(f"  {problem}")


if __name__ == "__main__":
    main()

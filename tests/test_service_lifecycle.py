"""The service under long requests: deadlines that stop predictions, SIGTERM in the middle of one, and the
memory of /overlay. Real `seg serve` servers as in tests/test_service.py.

Long predictions come from a genuinely slow model (`build_slow_onnx`: a stack of 3x3 convolutions, a
fraction of a second per batch of tiles on a CPU) on a 4096 x 4096 mosaic of a real EM slice: a minute or
so of work, of which the tests wait for seconds.
"""

from __future__ import annotations

import io
import re
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, NamedTuple

import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import build_conv_onnx
from seg.io.images import overlay
from helpers import Server, encode, running_server, worker_peak_rss

RAW_PNG = {"content-type": "image/png"}
TIMEOUT = 4  # SEG_TIMEOUT of the deadline test's server


def build_slow_onnx(path: Path, layers: int = 6, channels: int = 32) -> Path:
    """`build_conv_onnx`'s model (metadata: 1 channel, 2 classes, tile 256) with a graph of `layers` 3x3
    convolutions of `channels` channels: about 0.2 s per batch of four 256 x 256 tiles on two cores."""
    import onnx
    from onnx import helper, numpy_helper

    build_conv_onnx(path)
    model = onnx.load(str(path))
    rng = np.random.default_rng(0)
    nodes, weights, x, width = [], [], "image", 1
    for i in range(layers):
        w = rng.normal(0, np.sqrt(2 / (9 * width)), (channels, width, 3, 3)).astype(np.float32)
        weights.append(numpy_helper.from_array(w, f"w{i}"))
        nodes += [helper.make_node("Conv", [x, f"w{i}"], [f"c{i}"], pads=[1, 1, 1, 1]),
                  helper.make_node("Tanh", [f"c{i}"], [f"t{i}"])]  # fmt: skip
        x, width = f"t{i}", channels
    weights.append(numpy_helper.from_array(rng.normal(0, 1, (2, channels, 1, 1)).astype(np.float32), "head"))
    nodes.append(helper.make_node("Conv", [x, "head"], ["logits"]))
    graph = model.graph
    model.graph.CopyFrom(helper.make_graph(nodes, "slow", list(graph.input), list(graph.output), weights))
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def slow_onnx(tmp_path_factory) -> Path:
    return build_slow_onnx(tmp_path_factory.mktemp("slow") / "slow.onnx")


@pytest.fixture(scope="module")
def mosaic_png(em_image) -> bytes:
    """A 4096 x 4096 PNG of a real EM slice, 8 x 8 times: 484 tiles, minutes of work for the slow model."""
    return encode(np.tile(em_image, (8, 8)), "PNG")


def segment(url: str, png: bytes, route: str = "/segment") -> httpx.Response:
    return httpx.post(url + route, content=png, headers=RAW_PNG, timeout=300)


def descendants(pid: int) -> set[int]:
    """The processes below `pid` (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
        except OSError:
            continue
        children.setdefault(int(fields["PPid"]), []).append(int(fields["Pid"]))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def running(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def cpu_seconds(pids: set[int]) -> float:
    """User and system CPU time of the processes, in seconds."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


class Rate(NamedTuple):
    rate: float  # CPU seconds per second
    result: Any


def cpu_rate(pids: set[int], action: Callable[[], Any]) -> Rate:
    """The processes' CPU use while `action` runs, and what it returned."""
    used, start = cpu_seconds(pids), time.monotonic()
    result = action()
    return Rate((cpu_seconds(pids) - used) / (time.monotonic() - start), result)


def log_tail(server: Server) -> str:
    return server.log.read_text()[-3000:]


def test_a_request_past_its_deadline_stops_and_frees_the_worker(slow_onnx, mosaic_png, em_image, tmp_path):
    with running_server(slow_onnx, tmp_path, SEG_TIMEOUT=str(TIMEOUT), SEG_DEVICE="cpu") as server:
        workers = descendants(server.pid)
        busy = cpu_rate(workers, lambda: segment(server.url, mosaic_png))
        late = busy.result
        assert late.status_code == 504 and "error" in late.json(), late.text
        quick = segment(server.url, encode(em_image[:64, :64], "PNG"))
        assert quick.status_code == 200, f"{quick.text}\n{log_tail(server)}"
        assert np.asarray(Image.open(io.BytesIO(quick.content))).shape == (64, 64)
        # BentoML answers 504 but leaves the endpoint's thread running: a prediction that went on would keep
        # the workers as busy as before (under the same load on the machine). The batch of tiles under way
        # at the deadline ends within a second or two.
        time.sleep(2)
        idle = cpu_rate(workers, lambda: time.sleep(2))
        assert idle.rate < busy.rate / 4, f"workers use {idle.rate:.2f} CPUs after the 504, {busy.rate:.2f} before"


def test_sigterm_during_a_long_prediction_ends_the_server(slow_onnx, mosaic_png, tmp_path):
    with running_server(slow_onnx, tmp_path, SEG_DEVICE="cpu") as server:
        tree = descendants(server.pid)
        assert tree, "no worker processes"
        answers: list[httpx.Response] = []
        client = threading.Thread(target=lambda: answers.append(segment(server.url, mosaic_png)))
        client.start()
        start = cpu_seconds(tree)
        while cpu_seconds(tree) - start < 2 and client.is_alive():  # the prediction is under way
            time.sleep(0.1)
        assert client.is_alive(), "the prediction ended before the signal"
        os.kill(server.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10  # what `docker stop` waits before SIGKILL
        while any(running(pid) for pid in {server.pid, *tree}) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = [pid for pid in {server.pid, *tree} if running(pid)]
        assert not left, f"still running 10 s after SIGTERM: {left}\n{log_tail(server)}"
        client.join(timeout=30)
        assert answers and answers[0].status_code == 503, log_tail(server)
        assert "shutting down" in answers[0].json()["error"]


@pytest.fixture(scope="module")
def fast(conv_onnx_factory, tmp_path_factory) -> Server:
    env = {"SEG_MAX_PIXELS": str(8000 * 8000), "SEG_DEVICE": "cpu"}
    with running_server(conv_onnx_factory(classes=3), tmp_path_factory.mktemp("fast"), **env) as s:
        yield s


def test_overlay_by_bands_is_the_whole_image_overlay(fast, conv_onnx_factory):
    """A 16-bit image of several bands: every band is stretched by the one display range of the image."""
    from seg.inference.predictor import Predictor

    rng = np.random.default_rng(0)
    image = (rng.gamma(2.0, 3000.0, (1500, 1400)) + np.linspace(0, 20000, 1400)).clip(0, 65535).astype(np.uint16)
    png = encode(image, "PNG")
    response = httpx.post(fast.url + "/overlay", content=png, headers=RAW_PNG, params={"alpha": 0.3}, timeout=120)
    assert response.status_code == 200, response.text
    mask = np.asarray(Image.open(io.BytesIO(segment(fast.url, png).content)))
    palette = Predictor.from_onnx(conv_onnx_factory(classes=3), device="cpu").info.palette
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(response.content))), overlay(image, mask, palette, 0.3))


@pytest.mark.slow
def test_overlay_peak_memory_is_that_of_segment(fast):
    side = 8000
    image = (np.add.outer(np.arange(side) // 37, np.arange(side) // 53) % 256).astype(np.uint8)
    png = encode(image, "PNG")
    assert segment(fast.url, png).status_code == 200
    after_segment = worker_peak_rss(fast)
    response = segment(fast.url, png, "/overlay")
    assert response.status_code == 200, response.text
    with Image.open(io.BytesIO(response.content)) as im:
        assert im.mode == "RGB" and im.size == (side, side)
    after_overlay = worker_peak_rss(fast)
    if after_segment is None:
        pytest.skip("no /proc to read the worker's peak memory from")
    # Whole-image copies in float32 RGB would cost 12 bytes per pixel each; one byte per pixel is the margin.
    grown = after_overlay - after_segment
    assert grown < side * side, f"overlay's peak is {grown / 1e6:.0f} MB over segment's {after_segment / 1e6:.0f} MB"


def request_count(metrics: str, endpoint: str) -> float:
    """BentoML's request counter for `endpoint` with status 200, summed over its label sets."""
    pattern = re.compile(r'^bentoml_service_request_total\{([^}]*)\}\s+([0-9.e+]+)$', re.M)
    return sum(float(value) for labels, value in pattern.findall(metrics)
               if f'endpoint="{endpoint}"' in labels and 'http_response_code="200"' in labels)  # fmt: skip


def test_two_workers_both_answer_and_metrics_count_across_them(conv_onnx, em_image, tmp_path):
    png = encode(em_image[:128, :128], "PNG")
    with running_server(conv_onnx, tmp_path, SEG_WORKERS="2", SEG_DEVICE="cpu") as server:
        with ThreadPoolExecutor(8) as pool:
            infos = list(pool.map(lambda _: httpx.post(server.url + "/info", json={}, timeout=30).json(), range(48)))
            assert {info["worker"] for info in infos} == {1, 2}  # both workers answer
            assert all(info["gpu"] is None and info["device"] == "cpu" for info in infos)
            codes = list(pool.map(lambda _: httpx.post(server.url + "/segment", files={"image": ("a.png", png)},
                                                       timeout=60).status_code, range(12)))  # fmt: skip
        assert codes == [200] * 12
        for _ in range(4):  # every worker's /metrics gives the sum over both
            assert request_count(httpx.get(server.url + "/metrics", timeout=30).text, "/segment") == 12

"""Hostile and careless clients against real `seg serve` servers: uploads that trickle or stall, clients that
leave, made-up paths, request fields built to break parsers, and two servers on one machine.

Servers on the tiny conv model, started once for this module:
- `trickled`: SEG_CONCURRENCY=8 and SEG_BODY_TIMEOUT=5, for the slow uploads;
- `plain`: default limits.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from typing import Iterator

import httpx
import numpy as np
import pytest
from helpers import Server, encode, running_server, send_head, worker_peak_rss

from seg.inference.runtime import BUNDLED_MODEL


@pytest.fixture(scope="module")
def trickled(conv_onnx, tmp_path_factory) -> Iterator[Server]:
    env = {"SEG_CONCURRENCY": "8", "SEG_BODY_TIMEOUT": "5", "SEG_HEADER_TIMEOUT": "5", "SEG_DEVICE": "cpu"}
    with running_server(conv_onnx, tmp_path_factory.mktemp("trickled"), **env) as s:
        yield s


@pytest.fixture(scope="module")
def plain(conv_onnx, tmp_path_factory) -> Iterator[Server]:
    with running_server(conv_onnx, tmp_path_factory.mktemp("plain"), SEG_DEVICE="cpu") as s:
        yield s


@pytest.fixture(scope="module")
def png() -> bytes:
    return encode((np.arange(128 * 128).reshape(128, 128) % 251).astype(np.uint8), "PNG")


def answer_and_close(sock: socket.socket, limit: float) -> tuple[int | None, bool]:
    """(status, closed): the status of the server's answer on `sock`, and whether the server then closed
    the connection, within `limit` seconds."""
    sock.settimeout(limit)
    reply, deadline = b"", time.monotonic() + limit
    try:
        while time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                status = int(reply.split(b" ", 2)[1]) if reply.startswith(b"HTTP/") else None
                return status, True
            reply += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return (int(reply.split(b" ", 2)[1]) if reply.startswith(b"HTTP/") else None), False


# -- 1. slow clients ----------------------------------------------------------------------------------------
def test_trickling_uploads_hold_no_slot_and_are_closed(trickled, png):
    """Eight uploads at one byte a second (as many as SEG_CONCURRENCY) do not shut out a client that sends its
    image at once, and the server answers them 408 and closes their connections."""
    head = "POST /segment HTTP/1.1\nHost: x\nContent-Type: image/png\nContent-Length: 1000000\n"
    socks = [send_head(trickled.url, head, b"\x89") for _ in range(8)]
    stop = threading.Event()

    def trickle(sock: socket.socket) -> None:
        while not stop.wait(1.0):
            try:
                sock.sendall(b"\0")
            except OSError:
                return

    threads = [threading.Thread(target=trickle, args=(s,), daemon=True) for s in socks]
    for thread in threads:
        thread.start()
    try:
        time.sleep(2)
        start = time.monotonic()
        response = httpx.post(trickled.url + "/segment", content=png, headers={"content-type": "image/png"}, timeout=30)
        assert response.status_code == 200, response.text
        assert time.monotonic() - start < 30
        results = [answer_and_close(sock, 30) for sock in socks]
    finally:
        stop.set()
        for sock in socks:
            sock.close()
    assert results == [(408, True)] * 8


def test_headers_sent_a_byte_at_a_time_are_cut_off(trickled):
    """SEG_HEADER_TIMEOUT=5: a connection still sending its request headers 5 s after it opened is closed."""
    host, port = trickled.url.removeprefix("http://").split(":")
    closed_after = None
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.settimeout(0.5)  # each read waits half a second: the pace of the bytes sent
        start = time.monotonic()
        for byte in b"POST /segment HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 60:
            try:
                sock.sendall(bytes([byte]))
                if sock.recv(1) == b"":
                    closed_after = time.monotonic() - start
                    break
            except TimeoutError:
                continue  # still open
            except OSError:  # reset by the server
                closed_after = time.monotonic() - start
                break
    assert closed_after is not None and 4.5 < closed_after < 10


def test_a_stalled_body_is_answered_408(trickled):
    head = "POST /segment HTTP/1.1\nHost: x\nContent-Type: image/png\nContent-Length: 5000\n"
    sock = send_head(trickled.url, head, b"\x89PNG" * 100)  # 400 of 5000 bytes, then nothing
    start = time.monotonic()
    with sock:
        assert answer_and_close(sock, 20) == (408, True)
    assert 4 < time.monotonic() - start < 15  # SEG_BODY_TIMEOUT=5


# -- 2. client input is a 4xx ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["a" * 246 + ".png", "細胞" * 42 + ".png", "../../etc/passwd", "a\\b.png"])
def test_any_file_name_is_taken(plain, png, name):
    response = httpx.post(plain.url + "/segment", files={"image": (name, png, "image/png")}, timeout=30)
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("fields, query", [
    ({}, {f"p{i}": "1" for i in range(1001)}),
    ({"tile": "9" * 5000}, {}),
    ({}, {"tile": "9" * 5000}),
    ({"tile": "[" * 3000 + "]" * 3000}, {}),
    ({}, {"tile": "[" * 3000 + "]" * 3000}),
], ids=["1001-query-parameters", "5000-digit-field", "5000-digit-query", "nested-field", "nested-query"])
def test_fields_built_to_break_parsers_get_400(plain, png, fields, query):
    if fields:
        response = httpx.post(plain.url + "/segment", files={"image": ("a.png", png)}, data=fields, timeout=30)
    else:
        response = httpx.post(plain.url + "/segment", params=query, content=png, timeout=30)
    assert response.status_code == 400, response.text
    assert response.headers["content-type"] == "application/json" and response.json()["error"]


def test_a_deeply_nested_json_body_gets_400(plain):
    response = httpx.post(plain.url + "/info", content=b"[" * 3000 + b"]" * 3000,
                          headers={"content-type": "application/json"}, timeout=30)  # fmt: skip
    assert response.status_code == 400 and "nested" in response.json()["error"]


def test_media_types_are_case_insensitive(plain, png):
    request = httpx.Request("POST", plain.url + "/segment", files={"image": ("a.png", png)})
    body = request.read()
    content_type = request.headers["content-type"].replace("multipart/form-data", "Multipart/Form-Data")
    response = httpx.post(plain.url + "/segment", content=body, headers={"content-type": content_type}, timeout=30)
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("method, path, status", [
    ("GET", "/no/such/page", 404), ("GET", "/segment", 405), ("DELETE", "/info", 405), ("GET", "/ui/missing.js", 404),
])  # fmt: skip
def test_404_and_405_are_json(plain, method, path, status):
    response = httpx.request(method, plain.url + path, timeout=30)
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json" and response.json()["error"]


# -- 3. a client that leaves -------------------------------------------------------------------------------
def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100  # utime + stime, in clock ticks of 1/100 s


def busiest_child(server: Server) -> int:
    children = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
            if int(fields.get("PPid", "0")) == server.pid:
                children.append(int(status.parent.name))
        except (OSError, ValueError):
            continue
    return max(children, key=cpu_seconds)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads CPU time from /proc")
def test_a_request_whose_client_left_stops_within_seconds(tmp_path):
    """A 36-megapixel image (a minute of work for the bundled model on 2 cores) from a client that gives up
    after 5 s: the worker is idle again within 5 s more, and answers the next request."""
    side = 6000
    image = encode((np.add.outer(np.arange(side) // 37, np.arange(side) // 53) % 256).astype(np.uint8), "PNG")
    with running_server(BUNDLED_MODEL, tmp_path, SEG_DEVICE="cpu", SEG_TIMEOUT="600") as server:
        with pytest.raises(httpx.TimeoutException):
            httpx.post(server.url + "/segment", content=image, headers={"content-type": "image/png"}, timeout=5)
        worker = busiest_child(server)
        time.sleep(5)
        before = cpu_seconds(worker)
        time.sleep(3)
        assert cpu_seconds(worker) - before < 0.5  # idle: the prediction stopped
        small = encode(np.zeros((64, 64), np.uint8), "PNG")
        assert httpx.post(server.url + "/segment", content=small, timeout=60).status_code == 200


# -- 4. /metrics ---------------------------------------------------------------------------------------------
def test_made_up_paths_do_not_grow_metrics(plain):
    with httpx.Client(base_url=plain.url, timeout=30) as client:
        client.get("/a-made-up-path")
        before = len(client.get("/metrics").content)
        for i in range(2000):
            client.get(f"/made-up-{i}")
        text = client.get("/metrics").text
    assert abs(len(text) - before) < 2048
    assert "made-up" not in text and 'endpoint="other"' in text


# -- 5. two servers --------------------------------------------------------------------------------------------
def request_count(url: str, endpoint: str) -> float:
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line.startswith("bentoml_service_request_total{") and f'endpoint="{endpoint}"' in line and '"200"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_two_servers_keep_their_own_metrics(conv_onnx, tmp_path):
    """Both with one BENTOML_HOME, as two `seg serve` of one user: the second's start leaves the first's
    counts alone, and each counts its own requests."""
    with running_server(conv_onnx, tmp_path, SEG_DEVICE="cpu") as first:
        for _ in range(3):
            assert httpx.post(first.url + "/info", json={}, timeout=30).status_code == 200
        with running_server(conv_onnx, tmp_path, SEG_DEVICE="cpu") as second:
            assert httpx.post(second.url + "/info", json={}, timeout=30).status_code == 200
            assert request_count(first.url, "/info") == 3
            assert request_count(second.url, "/info") == 1


# -- 6. memory per upload ----------------------------------------------------------------------------------
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads peak memory from /proc")
def test_one_large_upload_costs_at_most_one_and_a_half_times_its_size(plain):
    """The body is spooled to a temporary file as it arrives and handed on in chunks; the worker reads the
    upload once to decode it (here: not an image, so 400)."""
    body = np.random.default_rng(0).integers(0, 256, 100 << 20, dtype=np.uint8).tobytes()
    httpx.post(plain.url + "/info", json={}, timeout=30)
    before = worker_peak_rss(plain)
    response = httpx.post(plain.url + "/segment", content=body, headers={"content-type": "image/png"}, timeout=120)
    assert response.status_code == 400
    assert worker_peak_rss(plain) - before <= 1.5 * len(body)


# -- 7. what a client learns -------------------------------------------------------------------------------------
def test_no_third_party_page_and_no_server_details(plain):
    response = httpx.get(plain.url + "/", timeout=30)
    assert response.status_code == 307 and response.headers["location"] == "/ui/"
    docs = httpx.get(plain.url + "/docs.json", timeout=30).json()
    assert "bentoml" not in str(docs["info"]).lower()
    info = httpx.post(plain.url + "/info", json={}, timeout=30).json()
    assert "/" not in info["model_file"] and info["model_file"].endswith(".onnx")

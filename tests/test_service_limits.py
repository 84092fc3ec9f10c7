"""The service's input limits, content types and error wording, against real `seg serve` servers.

Two servers on the tiny conv model, each started once for this module:
- `limited`: small pixel and decode budgets (SEG_MAX_PIXELS, SEG_MAX_DECODE_BYTES) and no API key;
- `keyed`: an API key, default limits.
"""

from __future__ import annotations

import struct
import zlib
from typing import Iterator

import httpx
import numpy as np
import pytest
from helpers import KEY, Server, encode, png_chunk, read_reply, running_server, send_head

MAX_PIXELS = 1_000_000
DECODE_BYTES = 100_000
UPLOADS = ("/segment", "/segment_json", "/overlay")
# BentoML 1.4 unpickles application/vnd.bentoml+pickle bodies (serde.PickleSerde); the others are the
# usual names for pickles. None of them may reach it, in any spelling.
PICKLES = (
    "application/vnd.bentoml+pickle",
    "Application/VND.BentoML+Pickle",
    "application/vnd.bentoml+pickle; charset=utf-8",
    "application/x-pickle",
    "application/python-pickle",
    "application/x-python-pickle",
)


@pytest.fixture(scope="module")
def limited(conv_onnx, tmp_path_factory) -> Iterator[Server]:
    env = {"SEG_MAX_PIXELS": str(MAX_PIXELS), "SEG_MAX_DECODE_BYTES": str(DECODE_BYTES), "SEG_DEVICE": "cpu"}
    with running_server(conv_onnx, tmp_path_factory.mktemp("limited"), **env) as s:
        yield s


@pytest.fixture(scope="module")
def keyed(conv_onnx, tmp_path_factory) -> Iterator[Server]:
    with running_server(conv_onnx, tmp_path_factory.mktemp("keyed"), SEG_API_KEY=KEY, SEG_DEVICE="cpu") as s:
        yield s


def thin_png(width: int, height: int) -> bytes:
    """A valid grey PNG of width x height (all zero), compressed to a few hundred bytes."""
    rows = (b"\0" + b"\0" * width) * height
    head = png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + head + png_chunk(b"IDAT", zlib.compress(rows, 9)) + png_chunk(b"IEND", b"")


def raw(url: str, route: str, data: bytes, content_type: str | None = "application/octet-stream", **headers):
    if content_type is not None:
        headers["content-type"] = content_type
    return httpx.post(url + route, content=data, headers=headers, timeout=60)


def assert_error(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert isinstance(body, dict) and set(body) == {"error"} and isinstance(body["error"], str), body
    return body["error"]


# -- limits -------------------------------------------------------------------------------------------------
def test_a_side_over_the_limit_is_refused_from_the_header(limited):
    data = thin_png(70000, 1)
    assert len(data) < 1000
    error = assert_error(raw(limited.url, "/segment", data, "image/png"), 413)
    assert "SEG_MAX_SIDE" in error and "65536" in error and "70000 x 1" in error


def test_the_decode_budget_counts_bytes_per_pixel(limited):
    rgba16 = np.full((120, 120, 4), 40000, np.uint16)  # 8 bytes per pixel: 115200 bytes decoded
    error = assert_error(raw(limited.url, "/segment", encode(rgba16, "TIFF"), "image/tiff"), 413)
    assert "SEG_MAX_DECODE_BYTES" in error and "8 bytes per pixel" in error and str(DECODE_BYTES) in error

    under = raw(limited.url, "/segment", encode(rgba16[:100, :100], "TIFF"), "image/tiff")  # 80000 bytes
    assert under.status_code == 200, under.text
    grey = np.zeros((300, 300), np.uint8)  # more pixels than both, 90000 bytes at 1 byte each
    assert raw(limited.url, "/segment", encode(grey, "PNG"), "image/png").status_code == 200


def test_info_reports_the_limits(limited):
    limits = httpx.post(limited.url + "/info", json={}).json()["limits"]
    assert limits["max_decode_bytes"] == DECODE_BYTES and limits["max_side"] == 65536


def test_limit_messages_name_their_variables(limited):
    for width, height in ((2000, 600), (1500, 1500)):  # over the limit; over Pillow's bomb check (twice it)
        error = assert_error(raw(limited.url, "/segment", thin_png(width, height), "image/png"), 413)
        assert "SEG_MAX_PIXELS" in error and str(MAX_PIXELS) in error
    head = f"POST /segment HTTP/1.1\nHost: x\nContent-Type: image/png\nContent-Length: {10**10}\n"
    status, body = read_reply(send_head(limited.url, head))
    assert status == 413 and "SEG_MAX_BYTES" in body["error"]


# -- content types --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("content_type", PICKLES)
@pytest.mark.parametrize("route", [*UPLOADS, "/info"])
def test_pickle_content_types_get_415_and_never_reach_bentoml(limited, keyed, route, content_type):
    body = b"\x80\x05\x95\x05\x00\x00\x00\x00\x00\x00\x00\x8c\x01x\x94."  # pickle.dumps("x")
    for server, headers in ((limited, {}), (keyed, {"authorization": f"Bearer {KEY}"})):
        error = assert_error(raw(server.url, route, body, content_type, **headers), 415)  # BentoML answers a list
        assert "not accepted" in error
    assert_error(raw(keyed.url, route, body, content_type), 401)  # the key is checked first


@pytest.mark.parametrize(
    "route, content_type",
    [("/segment", "application/json"), ("/segment", "text/plain"), ("/overlay", "image/gif"),
     ("/info", "multipart/form-data; boundary=x"), ("/info", "application/x-www-form-urlencoded")],
)  # fmt: skip
def test_undocumented_content_types_get_415(limited, route, content_type):
    assert_error(raw(limited.url, route, b"{}", content_type), 415)


def test_two_content_type_headers_are_refused(limited):
    headers = [("content-type", "image/png"), ("content-type", "application/vnd.bentoml+pickle")]
    response = httpx.post(limited.url + "/segment", content=b"x", headers=headers, timeout=30)
    assert_error(response, 400)


def test_documented_content_types_are_accepted(limited):
    png = encode(np.zeros((64, 64), np.uint8), "PNG")
    for content_type in ("image/png", "application/octet-stream", "application/x-www-form-urlencoded", None):
        assert raw(limited.url, "/segment", png, content_type).status_code == 200, content_type
    assert httpx.post(limited.url + "/segment", files={"image": ("a.png", png)}).status_code == 200
    assert httpx.post(limited.url + "/info", json={}).status_code == 200
    assert httpx.post(limited.url + "/info").status_code == 200


# -- error messages -----------------------------------------------------------------------------------------
BAD_UPLOADS = {
    "text": b"hello, world\n" * 10,
    "gzip": zlib.compress(b"x" * 100),
    "tiff header only": encode(np.zeros((8, 8), np.uint8), "TIFF")[:8],
    "tiff magic then junk": b"II*\x00" + b"\xff" * 60,
    "bigtiff magic": b"II+\x00" + b"\0" * 20,
    "truncated bmp": encode(np.zeros((64, 64), np.uint8), "BMP")[:40],
    "truncated png": encode(np.zeros((64, 64), np.uint8), "PNG")[:60],
    "html": b"<html><body>0x41 /tmp/a</body></html>",
}


@pytest.mark.parametrize("name", BAD_UPLOADS)
@pytest.mark.parametrize("form", [False, True], ids=["raw", "multipart"])
def test_bad_upload_messages_hold_no_reprs_paths_or_tracebacks(limited, name, form):
    data = BAD_UPLOADS[name]
    if form:
        response = httpx.post(limited.url + "/segment_json", files={"image": ("a.bin", data)}, timeout=30)
    else:
        response = raw(limited.url, "/segment_json", data)
    error = assert_error(response, 400)
    assert error.startswith("image")
    for mark in ("<", "0x", "/tmp", "Traceback", "object at"):
        assert mark not in error, error


def test_validation_errors_are_one_line_strings(limited):
    png = encode(np.zeros((64, 64), np.uint8), "PNG")
    for fields, words in (({"tta": "0"}, "tta"), ({"tile": "64.0"}, "tile"), ({"alpha": "true"}, "alpha")):
        response = httpx.post(limited.url + "/overlay", files={"image": ("a.png", png)}, data=fields, timeout=30)
        error = assert_error(response, 400)
        assert error.startswith(words) and "\n" not in error
    assert assert_error(httpx.post(limited.url + "/info", json=[1]), 400).startswith("body")

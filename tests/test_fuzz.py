"""Decoder fuzz on a fixed corpus of mutated real files (tests/mutants.py, seed 0): through `seg predict` and
POST /segment, each file is segmented or refused with a message; none ends in a traceback, a 5xx or a hang.
Also the two corrupt headers that once cost hours: sizes the file's bytes cannot hold."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import tifffile

from seg.io.images import read_mask

from mutants import REPRS, mutants
from helpers import bomb_png, running_server

CORPUS = 80  # two rounds over the 10 seed files and 4 mutations


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("mutants")
    for name, data in mutants(CORPUS, seed=0):
        (folder / name).write_bytes(data)
    return folder


def seg_predict(*args: str | Path, timeout: float = 240) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "seg.cli", "predict", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def test_seg_predict_segments_or_reports_every_mutant(corpus, tmp_path):
    out = tmp_path / "out"
    done = seg_predict(corpus, "--out", out)
    assert done.returncode in (0, 1), done.stderr[-3000:]
    assert not any(mark in done.stderr for mark in REPRS), done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["images"]) == CORPUS
    failed = [e for e in summary["images"] if e["status"] == "failed"]
    assert summary["failed"] == len(failed) and (done.returncode == 1) == bool(failed)
    assert len(failed) > CORPUS // 2  # most mutants are broken; a fuzz that breaks nothing tests nothing
    for entry in summary["images"]:
        if entry["status"] == "failed":
            assert entry["error"].startswith(entry["input"] + ": ") and not any(m in entry["error"] for m in REPRS)
        else:
            assert read_mask(entry["outputs"]["mask"]).shape == (entry["height"], entry["width"])


def test_service_answers_every_mutant_with_a_4xx_or_a_mask(corpus, conv_onnx, tmp_path):
    with running_server(conv_onnx, tmp_path, SEG_DEVICE="cpu") as server, httpx.Client(timeout=60) as client:
        for path in sorted(corpus.iterdir())[:40]:
            response = client.post(f"{server.url}/segment", content=path.read_bytes(),
                                   headers={"content-type": "application/octet-stream"})  # fmt: skip
            assert response.status_code == 200 or 400 <= response.status_code < 500, (path.name, response.text)
            if response.status_code != 200:
                error = response.json()["error"]
                assert error and not any(m in error for m in (*REPRS, "/tmp", str(tmp_path))), (path.name, error)
        assert client.get(f"{server.url}/readyz").status_code == 200


def test_sizes_the_file_cannot_hold_are_refused_at_once(tmp_path):
    """A 100 B PNG that claims 100000 x 100000 pixels, and a TIFF whose height says 2^31 - 1 rows in 2^24
    strips while it lists one: the old reader decoded (or filled with zeros) and predicted all of it."""
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "bomb.png").write_bytes(bomb_png(100_000))
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, np.zeros((96, 96), np.uint8), rowsperstrip=96)
    data = bytearray(buffer.getvalue())
    with tifffile.TiffFile(io.BytesIO(bytes(data))) as tif:
        offset = tif.pages[0].tags["ImageLength"].valueoffset
        rows = tif.pages[0].tags["RowsPerStrip"].valueoffset
    data[offset : offset + 4] = struct.pack("<I", 2**31 - 1)
    data[rows : rows + 4] = struct.pack("<I", 128)
    (tmp_path / "in" / "tall.tif").write_bytes(bytes(data))
    done = seg_predict(tmp_path / "in", "--out", tmp_path / "out", timeout=60)
    assert done.returncode == 1, done.stderr
    errors = {Path(e["input"]).name: e["error"] for e in json.loads((tmp_path / "out" / "summary.json").read_text())["images"]}
    assert "more than its" in errors["bomb.png"] and "bytes can hold" in errors["bomb.png"]
    assert "corrupt or truncated" in errors["tall.tif"]

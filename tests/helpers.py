"""Helpers the test modules share: `seg` as a user runs it, a training config, real `seg serve` servers and
raw HTTP, and images made to order. (Fixtures are in conftest.py.)"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator, NamedTuple

import httpx
import numpy as np
import pytest
import tifffile
import yaml
from PIL import Image
from typer.testing import CliRunner

from seg.cli import app

EM_IMAGES = Path(__file__).resolve().parents[1] / "data" / "isbi2012" / "train" / "images"

# -- the command line ------------------------------------------------------------------------------------
SEG = [sys.executable, "-m", "seg.cli"]


def seg(*args, timeout=300):
    """`seg ARGS` in a fresh process, as a user runs it."""
    env = {**os.environ, "CI": "1", "OMP_NUM_THREADS": "2"}
    return subprocess.run([*SEG, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env)


def seg_quick(*args):
    """`seg ARGS` in this process (for commands that fail before any work)."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    return SimpleNamespace(returncode=result.exit_code, stdout=result.stdout, stderr=result.stderr)


def write_config(path: Path, data_root: Path, out: Path, **train) -> Path:
    if not {"val_every", "val_every_steps", "val_every_minutes"} & train.keys():
        train["val_every"] = 1  # tiny validation images would otherwise validate only at the end
    cfg = {
        "data": {
            "root": str(data_root), "classes": ["membrane", "cell"], "in_channels": 1, "crop_size": 64,
            "val_fraction": 0.25, "cache": True,
        },
        "model": {"arch": "unet", "encoder": "resnet18", "options": {"decoder_channels": [32, 16, 16, 8, 8]}},
        "train": {"epochs": 3, "steps_per_epoch": 2, "batch_size": 2, "lr": 0.003, "seed": 7, "threads": 2, **train},
        "output": {"dir": str(out), "tile_size": 64, "overlap": 0.25, "overlays": 1},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


# -- servers and raw HTTP ----------------------------------------------------------------------------
KEY = "test-key-0123"


class Server(NamedTuple):
    url: str
    pid: int
    log: Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(model: Path, folder: Path, **env: str) -> Iterator[Server]:
    """`seg serve MODEL` on 127.0.0.1 and a free port, ready (GET /readyz is 200) within 90 s."""
    port = free_port()
    log = folder / f"server-{port}.log"
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("SEG_")}
    environ = {**inherited, "BENTOML_HOME": str(folder / "bentoml"), "SEG_JOB_DIR": str(folder / "jobs"), **env}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "seg.cli", "serve", str(model), "--port", str(port)],
            env=environ, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server not ready in 90 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.25)
        yield Server(url, proc.pid, log)
    finally:
        workers = server_workers(proc.pid)
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # its own process group: the server
            proc.wait()
        kill_workers(workers)  # each worker has a session of its own: none outlives its test


def server_workers(pid: int) -> list[int]:
    """The worker processes of the server `pid` (Linux)."""
    workers = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            if f"\nPPid:\t{pid}\n" in status.read_text():
                workers.append(int(status.parent.name))
        except (OSError, ValueError):
            continue
    return workers


def kill_workers(pids: list[int]) -> None:
    for pid in pids:
        try:
            if b"_bentoml_impl" in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass


def send_head(url: str, head: str, body: bytes = b"") -> socket.socket:
    """A socket that has sent a request's head and `body` (possibly less than announced)."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(head.replace("\n", "\r\n").encode() + b"\r\n" + body)
    return sock


def read_reply(sock: socket.socket) -> tuple[int, dict]:
    """The status and JSON body of the response on `sock` (which is then closed)."""
    with sock:
        reply = b""
        while b"\r\n\r\n" not in reply or len(reply.split(b"\r\n\r\n", 1)[1]) < content_length(reply):
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
    status_line, _, rest = reply.partition(b"\r\n")
    return int(status_line.split()[1]), json.loads(rest.split(b"\r\n\r\n", 1)[1])


def content_length(reply: bytes) -> int:
    for line in reply.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


def worker_peak_rss(server: Server) -> int | None:
    """Peak resident memory (bytes) of the server's busiest child process (Linux), else None."""
    peaks = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
        except OSError:
            continue
        if int(fields.get("PPid", "0")) == server.pid and "VmHWM" in fields:
            peaks.append(int(fields["VmHWM"].split()[0]) * 1024)
    return max(peaks, default=None)


# -- images ----------------------------------------------------------------------------------------------
# -- images ----------------------------------------------------------------------------------------------
def encode(array: np.ndarray, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    if fmt.startswith("TIFF"):
        planar = {"photometric": "minisblack", "planarconfig": "separate"} if fmt == "TIFF-planar" else {}
        tifffile.imwrite(buffer, array, **planar, **options)
    else:
        Image.fromarray(array).save(buffer, format=fmt, **options)
    return buffer.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(side: int = 100_000) -> bytes:
    """A valid PNG header for side x side grey pixels, with a few bytes of data: only the header is honest."""
    head = png_chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + head + png_chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + png_chunk(b"IEND", b"")


def mask_of(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as im:
        assert im.format == "PNG"
        return np.asarray(im)


def em_crops_tree(root: Path, count: int) -> Path:
    """`count` 96x128 crops of real ISBI slices, some in a sub-folder."""
    sources = sorted(EM_IMAGES.glob("*.png"))
    for i in range(count):
        image = np.asarray(Image.open(sources[i % len(sources)]))[i * 7 : i * 7 + 96, :128]
        path = root / ("sub" if i % 3 == 0 else "") / f"em{i:02d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path)
    return root


# -- a kill at a set point ---------------------------------------------------------------------------
KILL_WHILE_WRITING = r"""
import os, signal, sys
from seg.io import writers
NAME = os.environ["SEG_TEST_KILL_WRITING"]
for cls in (writers.PngBandWriter, writers.TiffBandWriter):
    def init(self, path, *args, _init=cls.__init__, **kwargs):
        self.test_name = os.path.basename(str(path))
        _init(self, path, *args, **kwargs)
    def write(self, rows, _write=cls.write):
        _write(self, rows)
        if NAME in self.test_name:
            os.kill(os.getpid(), signal.SIGKILL)
    cls.__init__, cls.write = init, write
from seg.cli import main
sys.argv = ["seg", *sys.argv[1:]]
main()
"""


def seg_killed_while_writing(name: str, *args) -> int:
    """`seg ARGS` in a fresh process that SIGKILLs itself right after the first rows go into an output whose
    temporary file name contains `name`: a kill in the middle of a write, at the same point on any machine.
    Returns the exit code (-9 once killed; 0 would mean no such output was written)."""
    env = {**os.environ, "SEG_TEST_KILL_WRITING": name, "OMP_NUM_THREADS": "2"}
    command = [sys.executable, "-c", KILL_WHILE_WRITING, *map(str, args)]
    return subprocess.run(command, env=env, capture_output=True, timeout=300).returncode


def write_svs(path: Path, rgb: np.ndarray, mpp: float = 0.499) -> None:
    """An Aperio SVS as scanners lay it out: the tiled full-resolution level with the MPP in its description,
    then a smaller level."""
    import tifffile

    height, width = rgb.shape[:2]
    aperio = f"Aperio Image Library v12.0.15 \r\n{width}x{height} [0,100 {width}x{height}] (256x256) LZW|AppMag = 20|MPP = {mpp}"
    with tifffile.TiffWriter(path) as tif:
        tif.write(rgb, tile=(256, 256), compression="lzw", description=aperio, photometric="rgb", metadata=None)
        tif.write(rgb[::4, ::4], tile=(256, 256), compression="lzw", description=aperio.split("|")[0],
                  photometric="rgb", metadata=None)

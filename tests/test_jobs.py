"""Jobs over HTTP against real `seg serve` servers on the bundled model: submit, progress, result, cancel,
limits, and a server killed mid-job that finishes the job after a restart with the same mask (which then
expires after SEG_JOB_TTL).

The image: a 2048 x 2048 mosaic of real EM slices, run with `tta=flips` so that a job lasts some seconds."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import httpx
import numpy as np
import pytest
import tifffile
from helpers import KEY, Server, encode, kill_workers, running_server, server_workers, write_svs

from seg.inference.runtime import BUNDLED_MODEL


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Server]:
    env = {"SEG_DEVICE": "cpu", "SEG_JOB_QUEUE": "2", "SEG_JOB_MAX_PIXELS": str(2048 * 2048)}
    with running_server(BUNDLED_MODEL, tmp_path_factory.mktemp("jobs"), **env) as s:
        yield s


@pytest.fixture(scope="module")
def big_png(em_mosaic) -> bytes:
    return encode(np.tile(em_mosaic, (2, 2)), "PNG")


@pytest.fixture(scope="module")
def big_path(big_png, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("big") / "mosaic.png"
    path.write_bytes(big_png)
    return path


def submit(url: str, image: bytes, raw: bool = False, headers=None, **fields) -> httpx.Response:
    if raw:
        return httpx.post(f"{url}/jobs", content=image, params=fields, headers=headers, timeout=60)
    data = {k: str(v) for k, v in fields.items()}
    return httpx.post(f"{url}/jobs", files={"image": ("a.png", image)}, data=data, headers=headers, timeout=60)


def wait(url: str, job_id: str, until=("done", "failed", "cancelled"), limit: float = 240) -> tuple[dict, list[int]]:
    """The job's status once its state is in `until`, and every tiles_done seen on the way."""
    seen, deadline = [], time.monotonic() + limit
    while time.monotonic() < deadline:
        status = httpx.get(f"{url}/jobs/{job_id}", timeout=10).json()
        seen.append(status["progress"]["tiles_done"])
        if status["state"] in until:
            return status, seen
        time.sleep(0.2)
    pytest.fail(f"job {job_id} still {status['state']} after {limit} s")


def reference_mask(image: Path, out: Path, *args: str) -> np.ndarray:
    """`seg predict --format tif` of the image with the bundled model, as an array."""
    subprocess.run([sys.executable, "-m", "seg.cli", "predict", str(image), "--out", str(out), "--format", "tif",
                    "--device", "cpu", *args], check=True, capture_output=True, timeout=300)  # fmt: skip
    return tifffile.imread(out / f"{image.stem}.tif")


def test_a_job_gives_the_mask_of_seg_predict_with_monotone_progress(server, big_png, big_path, tmp_path):
    answer = submit(server.url, big_png, raw=True, format="tif", tta="flips", probabilities="true")
    assert answer.status_code == 202, answer.text
    job_id = answer.json()["id"]
    assert answer.headers["location"] == answer.json()["status_url"] == f"/jobs/{job_id}"
    early = httpx.get(f"{server.url}/jobs/{job_id}/result", timeout=10)
    assert early.status_code == 409 and "comes when it is done" in early.json()["error"]
    status, seen = wait(server.url, job_id)
    assert status["state"] == "done", status
    assert seen == sorted(seen) and seen[-1] == status["progress"]["tiles_total"] > 4
    assert (status["width"], status["height"], status["tta"]) == (2048, 2048, "flips")
    result = httpx.get(server.url + status["result_url"], timeout=60)
    assert result.status_code == 200 and result.headers["content-type"] == "image/tiff"
    (tmp_path / "job.tif").write_bytes(result.content)
    mask = tifffile.imread(tmp_path / "job.tif")
    assert np.array_equal(mask, reference_mask(big_path, tmp_path / "ref", "--tta", "flips"))
    probs = httpx.get(server.url + status["probabilities_url"], timeout=60)
    (tmp_path / "probs.tif").write_bytes(probs.content)
    assert tifffile.imread(tmp_path / "probs.tif").shape == (2048, 2048, 2)
    assert job_id in [job["id"] for job in httpx.get(f"{server.url}/jobs", timeout=10).json()["jobs"]]


def test_multipart_geojson_and_ome_zarr_jobs_and_removal(server, em_image, tmp_path):
    import zarr

    zipped = submit(server.url, encode(em_image, "PNG"), format="ome-zarr", probabilities="true").json()["id"]
    answer = submit(server.url, encode(em_image, "PNG"), format="geojson")
    assert answer.status_code == 202, answer.text
    status, _ = wait(server.url, answer.json()["id"])
    result = httpx.get(server.url + status["result_url"], timeout=30)
    assert result.headers["content-type"] == "application/geo+json"
    assert result.json()["type"] == "FeatureCollection" and result.json()["features"]

    done, _ = wait(server.url, zipped)
    result = httpx.get(server.url + done["result_url"], timeout=30)
    assert result.headers["content-type"] == "application/zip"
    (tmp_path / "m.zip").write_bytes(result.content)
    shutil.unpack_archive(tmp_path / "m.zip", tmp_path)
    labels = zarr.open_group(str(tmp_path / "mask.ome.zarr" / "labels" / "mask"), mode="r")
    assert labels["0"].shape == em_image.shape and "image-label" in labels.attrs.asdict()
    result = httpx.get(server.url + done["result_url"] + "?part=probabilities", timeout=30)
    assert result.headers["content-type"] == "application/zip"
    (tmp_path / "p.zip").write_bytes(result.content)
    shutil.unpack_archive(tmp_path / "p.zip", tmp_path)
    probs = zarr.open_group(str(tmp_path / "probabilities.ome.zarr"), mode="r")["0"]
    assert probs.shape == (2, *em_image.shape) and probs.dtype == np.uint8
    values, mask = probs[:], labels["0"][:]
    apart = values[0] != values[1]  # ties in uint8 aside, the mask is the likeliest class
    assert apart.mean() > 0.9 and np.array_equal(np.argmax(values, 0)[apart], mask[apart])
    gone = httpx.delete(f"{server.url}/jobs/{status['id']}", timeout=10)
    assert gone.json() == {"id": status["id"], "state": "removed"}
    assert httpx.get(f"{server.url}/jobs/{status['id']}", timeout=10).status_code == 404


def test_a_slide_sent_with_its_file_name_is_read_as_that_scanners_slide(server, em_mosaic, tmp_path):
    """A multipart upload named .svs keeps its suffix, so the job reads it as `seg predict` reads the file
    (through OpenSlide), to the same mask."""
    rgb = np.stack([np.tile(em_mosaic, (2, 2))[:1200, :1500]] * 3, -1)
    path = tmp_path / "slide.svs"
    write_svs(path, rgb, mpp=0.25)
    files = {"image": ("slide.svs", path.read_bytes())}
    answer = httpx.post(f"{server.url}/jobs", files=files, data={"format": "tif"}, timeout=60)
    assert answer.status_code == 202, answer.text
    status, _ = wait(server.url, answer.json()["id"])
    assert status["state"] == "done" and (status["width"], status["height"]) == (1500, 1200), status
    (tmp_path / "job.tif").write_bytes(httpx.get(server.url + status["result_url"], timeout=30).content)
    assert np.array_equal(tifffile.imread(tmp_path / "job.tif"), reference_mask(path, tmp_path / "ref"))


def test_cancel_stops_a_running_job_and_the_next_one_runs(server, big_png, em_image):
    job_id = submit(server.url, big_png, raw=True, tta="flips").json()["id"]
    wait(server.url, job_id, until=("running",))
    time.sleep(1.0)
    assert httpx.delete(f"{server.url}/jobs/{job_id}", timeout=10).json()["state"] == "cancelled"
    time.sleep(1.5)  # past the next tile batch
    before = httpx.get(f"{server.url}/jobs/{job_id}", timeout=10).json()
    time.sleep(1.5)
    after = httpx.get(f"{server.url}/jobs/{job_id}", timeout=10).json()
    assert before["state"] == after["state"] == "cancelled"
    assert after["progress"]["tiles_done"] == before["progress"]["tiles_done"] < after["progress"]["tiles_total"]
    following = submit(server.url, encode(em_image, "PNG")).json()["id"]
    assert wait(server.url, following)[0]["state"] == "done"


@pytest.mark.parametrize(
    "case, status, message",
    [
        ("not an image", 400, "unsupported format GIF"),
        ("tile too large", 400, "tile: should be from"),
        ("a form with a bad option in its query", 400, "overlap: should be at most"),
        ("unknown format", 400, "format"),
        ("unknown field", 400, "colour"),
        ("two images", 400, "Maximum number of files is 1"),
        ("over SEG_JOB_MAX_PIXELS", 413, "SEG_JOB_MAX_PIXELS"),
        ("a stack as PNG", 400, "send format=tif"),
        ("Content-Type", 415, "not accepted here"),
        ("unknown job", 404, "no job"),
        ("bad job id", 404, "no job"),
        ("no such route", 404, "not found"),
        ("wrong method", 405, "method not allowed"),
    ],
)
def test_bad_job_requests_get_a_4xx_with_a_json_error(server, em_image, case, status, message):
    png, url = encode(em_image, "PNG"), server.url
    stack = encode(np.stack([em_image] * 3), "TIFF", photometric="minisblack", metadata={"axes": "ZYX"})
    answer = {
        "not an image": lambda: submit(url, b"GIF89a" + bytes(100), raw=True),
        "tile too large": lambda: submit(url, png, tile="99999"),
        "a form with a bad option in its query": lambda: httpx.post(
            f"{url}/jobs", params={"overlap": "0.99"}, files={"image": ("a.png", png)}),
        "unknown format": lambda: submit(url, png, format="jpeg"),
        "unknown field": lambda: submit(url, png, colour="red"),
        "two images": lambda: httpx.post(f"{url}/jobs", files=[("image", ("a.png", png)), ("image", ("b.png", png))]),
        "over SEG_JOB_MAX_PIXELS": lambda: submit(url, encode(np.zeros((2049, 2048), np.uint8), "PNG"), raw=True),
        "a stack as PNG": lambda: submit(url, stack, raw=True),
        "Content-Type": lambda: httpx.post(f"{url}/jobs", content=png, headers={"content-type": "text/plain"}),
        "unknown job": lambda: httpx.get(f"{url}/jobs/{'0' * 32}"),
        "bad job id": lambda: httpx.get(f"{url}/jobs/not-a-job"),
        "no such route": lambda: httpx.get(f"{url}/jobs/..%2F..%2Fetc%2Fpasswd"),
        "wrong method": lambda: httpx.put(f"{url}/jobs/{'0' * 32}"),
    }[case]()
    assert answer.status_code == status, answer.text
    assert message in answer.json()["error"]


def test_a_full_queue_answers_429(server, big_png):
    ids = [submit(server.url, big_png, raw=True, tta="flips").json()["id"] for _ in range(2)]
    try:
        third = submit(server.url, big_png, raw=True)
        assert third.status_code == 429 and "SEG_JOB_QUEUE" in third.json()["error"]
    finally:
        for job_id in ids:
            httpx.delete(f"{server.url}/jobs/{job_id}", timeout=10)


def test_job_routes_need_the_api_key_and_bound_the_body(em_image, conv_onnx, tmp_path):
    env = {"SEG_API_KEY": KEY, "SEG_JOB_MAX_BYTES": "600000", "SEG_DEVICE": "cpu"}
    with running_server(conv_onnx, tmp_path, **env) as s:
        png = encode(em_image, "PNG")
        for request in (lambda h: submit(s.url, png, headers=h), lambda h: httpx.get(f"{s.url}/jobs", headers=h),
                        lambda h: httpx.get(f"{s.url}/jobs/{'0' * 32}/result", headers=h)):  # fmt: skip
            assert request({}).status_code == 401
        auth = {"authorization": f"Bearer {KEY}"}
        assert submit(s.url, png, raw=True, headers=auth).status_code == 202
        big = bytes(700_000)
        assert submit(s.url, big, raw=True, headers=auth).status_code == 413  # by Content-Length
        chunked = httpx.post(f"{s.url}/jobs", content=iter([big[:400_000], big[400_000:]]), headers=auth, timeout=30)
        assert chunked.status_code == 413 and "SEG_JOB_MAX_BYTES" in chunked.json()["error"]
        assert sorted(p.name for p in (tmp_path / "jobs").iterdir() if p.is_dir()) == [
            httpx.get(f"{s.url}/jobs", headers=auth).json()["jobs"][0]["id"]]  # no upload left behind


def test_a_server_killed_mid_job_finishes_it_after_a_restart(big_png, big_path, tmp_path):
    env = {"SEG_DEVICE": "cpu", "SEG_JOB_DIR": str(tmp_path / "kept")}
    (tmp_path / "first").mkdir()
    with running_server(BUNDLED_MODEL, tmp_path / "first", **env) as s:
        job_id = submit(s.url, big_png, raw=True, format="tif", tta="flips").json()["id"]
        status, _ = wait(s.url, job_id, until=("running",))
        while status["progress"]["tiles_done"] == 0:
            status = httpx.get(f"{s.url}/jobs/{job_id}", timeout=10).json()
            time.sleep(0.1)
        assert status["state"] == "running"
        workers = server_workers(s.pid)
        assert workers
        os.killpg(s.pid, signal.SIGKILL)  # the server, and its worker (in a session of its own), mid-job
        kill_workers(workers)
    (tmp_path / "second").mkdir()
    with running_server(BUNDLED_MODEL, tmp_path / "second", SEG_JOB_TTL="5", **env) as s:
        status, _ = wait(s.url, job_id)
        assert status["state"] == "done", status
        (tmp_path / "job.tif").write_bytes(httpx.get(s.url + status["result_url"], timeout=60).content)
        deadline = time.monotonic() + 30  # then it expires
        while httpx.get(f"{s.url}/jobs/{job_id}", timeout=10).status_code == 200:
            assert time.monotonic() < deadline, "an ended job outlived SEG_JOB_TTL=5 by 30 s"
            time.sleep(0.5)
        assert httpx.get(s.url + status["result_url"], timeout=10).status_code == 404
        assert not (tmp_path / "kept" / job_id).exists()
    assert np.array_equal(tifffile.imread(tmp_path / "job.tif"), reference_mask(big_path, tmp_path / "ref", "--tta", "flips"))

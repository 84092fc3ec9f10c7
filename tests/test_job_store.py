"""serving.jobs.JobStore on its own: claiming, cancelling, and what `tidy` does after a crash (a job whose
worker is gone goes back to the queue; ended jobs expire; uploads nobody owns are removed once idle)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil
import pytest

from seg.errors import SegError
from serving.jobs import JobStore


def add(store: JobStore, fmt: str = "tif") -> str:
    job_id, folder = store.new_folder()
    (folder / "input.png").write_bytes(b"x")
    store.add(job_id, {"format": fmt}, "input.png", 10, 10, 4)
    return job_id


def test_jobs_are_claimed_oldest_first_and_once(tmp_path):
    store = JobStore(tmp_path, ttl=60)
    first, second = add(store), add(store)
    assert store.waiting() == 2
    assert store.claim()["id"] == first and store.claim()["id"] == second and store.claim() is None
    assert store.get(first)["owner_pid"] == os.getpid() and store.state(first) == "running"


def test_a_job_whose_worker_died_goes_back_to_the_queue(tmp_path):
    store = JobStore(tmp_path, ttl=60)
    job_id = add(store)
    store.claim()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    started = psutil.Process(dead.pid).create_time()
    dead.wait()
    with store._db() as db:  # as if that process had claimed it and died mid-job
        db.execute("UPDATE jobs SET owner_pid = ?, owner_started = ?, tiles_done = 3 WHERE id = ?", (dead.pid, started, job_id))
    store.tidy()
    job = store.get(job_id)
    assert (job["state"], job["tiles_done"]) == ("queued", 0)
    store.claim()
    store.tidy()  # a live owner (this process) keeps its job
    assert store.state(job_id) == "running"


def test_cancel_then_remove_and_expiry(tmp_path):
    store = JobStore(tmp_path, ttl=0.5)
    running = add(store)
    store.claim()
    done = add(store)
    store.claim()
    store.end(done, "done")
    queued = add(store)
    assert store.cancel(queued) == "cancelled" and not (tmp_path / queued).exists()
    assert store.cancel(running) == "cancelled" and (tmp_path / running).exists()  # its runner removes it
    store.end(running, "failed", "too late")  # a runner ending a cancelled job does not undo the cancel
    assert store.state(running) == "cancelled"
    assert store.cancel(done) == "removed" and store.get(done) is None and not (tmp_path / done).exists()
    assert store.cancel("0" * 32) is None
    time.sleep(0.6)
    store.tidy()
    assert store.get(running) is None and store.get(queued) is None  # ended past the TTL
    assert not (tmp_path / running).exists()


def test_an_idle_folder_nobody_owns_is_removed_but_an_upload_in_progress_is_not(tmp_path):
    store = JobStore(tmp_path, ttl=60)
    _, idle = store.new_folder()
    (idle / "upload").write_bytes(b"x")
    _, arriving = store.new_folder()
    (arriving / "upload").write_bytes(b"x")
    hours_ago = time.time() - 7200
    for path in (idle, idle / "upload", arriving):
        os.utime(path, (hours_ago, hours_ago))  # the arriving upload's file was written just now
    store.tidy()
    assert not idle.exists() and arriving.exists()


def test_an_unusable_job_folder_is_one_line(tmp_path):
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(SegError, match="SEG_JOB_DIR=.*cannot keep jobs there"):
        JobStore(tmp_path / "file" / "jobs", ttl=60)

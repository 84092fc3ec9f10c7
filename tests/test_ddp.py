"""Training under torchrun: 2 gloo processes on the CPU train one model, as one process with twice the
batch would, and only rank 0 writes; validation equals single-process evaluation; a run whose rank died
resumes to where an unbroken run ends; both RefineNets train under it too."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from rich.console import Console

from seg import build_model
from seg.config import load_config
from training.evaluate import evaluate
from training.train import Trainer

from conftest import ROOT, em_crops
from helpers import write_config

PROBE = Path(__file__).with_name("ddp_probe.py")
TRAIN = {"batch_size": 1, "epochs": 2, "steps_per_epoch": None, "val_every_steps": 3, "threads": None, "num_workers": 0}


def torchrun(*args: str | Path, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CI": "1", **(env or {})}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)


def rows(run: Path) -> list[dict]:
    with open(run / "metrics.csv") as f:
        return list(csv.DictReader(f))


def notes(folder: Path) -> tuple[dict, dict]:
    return tuple(json.loads((folder / f"rank{r}.json").read_text()) for r in (0, 1))


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """6 training crops, 2 validation images; 2 processes of batch 1 each, 3 steps an epoch, 2 epochs."""
    tmp = tmp_path_factory.mktemp("ddp")
    data = em_crops(tmp / "em", 8, slice(100, 196), slice(50, 178))
    cfg = write_config(tmp / "c.yaml", data, tmp / "run", **TRAIN)
    r = torchrun(PROBE, cfg, tmp / "notes")
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp, cfg, data


def test_ranks_hold_the_same_weights_and_together_see_one_big_batch(ddp_run):
    tmp, cfg, data = ddp_run
    zero, one = notes(tmp / "notes")
    assert zero["same_weights"] == one["same_weights"] == [True] * 6  # after every step
    assert len(zero["crops"]) == len(one["crops"]) == 6
    assert all(set(a).isdisjoint(b) for a, b in zip(zero["crops"], one["crops"]))  # each rank its own crops

    # One process with batch 2 draws, step for step, the crops the two ranks drew together.
    single = write_config(tmp / "single.yaml", data, tmp / "single", **{**TRAIN, "batch_size": 2})
    trainer = Trainer(load_config(single), console=Console(quiet=True))
    seen, loss_fn = [], trainer.loss_fn
    trainer.loss_fn = lambda logits, y, *extra: seen.append(sorted(m.numpy().tobytes() for m in y)) or loss_fn(logits, y, *extra)
    trainer.fit()
    hashed = [sorted(hashlib.sha1(m).hexdigest() for m in step) for step in seen]
    assert hashed == [sorted(a + b) for a, b in zip(zero["crops"], one["crops"])]


def test_only_rank_zero_writes_and_its_checkpoints_are_the_plain_model(ddp_run):
    tmp, cfg, _ = ddp_run
    zero, one = notes(tmp / "notes")
    assert one["writes"] == []
    written = {Path(p).name for p in zero["writes"]}
    assert {"config.yaml", "last.pt", "best.pt", "metrics.csv"} <= written
    assert [int(r["step"]) for r in rows(tmp / "run")] == [3, 6]
    ckpt = torch.load(tmp / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert not any(key.startswith("module.") for key in ckpt["model"]) and ckpt["step"] == 6


def test_split_validation_equals_single_process_evaluation(ddp_run):
    tmp, cfg, _ = ddp_run
    last = rows(tmp / "run")[-1]
    result = evaluate(tmp / "run" / "checkpoints" / "last.pt", cfg, split="val", device="cpu", tta="none")
    assert result["images"] == 2
    assert float(last["val_miou"]) == pytest.approx(result["miou"], abs=1e-12)
    assert float(last["val_pixel_error"]) == pytest.approx(result["pixel_error"], abs=1e-12)


def test_a_run_whose_rank_died_resumes_to_where_an_unbroken_run_ends(ddp_run):
    tmp, cfg, data = ddp_run
    broken = write_config(tmp / "broken.yaml", data, tmp / "broken", **TRAIN)
    r = torchrun(PROBE, broken, tmp / "broken_notes", "4")  # rank 1 dies after step 4
    assert r.returncode != 0 and "ChildFailedError" in r.stderr
    run = tmp / "broken"
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"] == 3
    assert not list(run.rglob("*.tmp"))  # no half-written file

    env = {**os.environ, "OMP_NUM_THREADS": "1", "CI": "1"}
    r = subprocess.run([sys.executable, "-m", "seg", "train", str(broken), "--resume", "--nproc", "2"],
                       capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming" in r.stderr and "on each of 2 processes" in r.stderr
    a, b = rows(tmp / "run")[-1], rows(run)[-1]
    assert a["step"] == b["step"] == "6"
    for key in ("train_loss", "val_loss", "val_miou", "val_pixel_error"):
        assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-5, abs=1e-6), key
    whole = torch.load(tmp / "run" / "checkpoints" / "last.pt", weights_only=True)["model"]
    resumed = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert all(torch.allclose(whole[k].float(), resumed[k].float(), atol=1e-5) for k in whole)


@pytest.mark.parametrize("arch", ["refinenet", "refinenet_lw"])
def test_refinenets_train_under_torchrun_with_every_parameter_used(tmp_path, arch):
    """DDP runs without find_unused_parameters: a parameter outside the loss's graph would stop the
    second step. Both RefineNets, batch norm in their decoders, 2 processes, 4 steps."""
    data = em_crops(tmp_path / "em", 6, slice(100, 196), slice(50, 178))
    cfg = write_config(tmp_path / "c.yaml", data, tmp_path / "run", **{**TRAIN, "epochs": 1, "steps_per_epoch": 4})
    raw = yaml.safe_load(cfg.read_text())
    raw["model"] = {"arch": arch, "encoder": "resnet18", "options": {"channels": [64, 32, 32, 32]}}
    cfg.write_text(yaml.safe_dump(raw))
    r = torchrun(PROBE, cfg, tmp_path / "notes")
    assert r.returncode == 0, r.stderr[-3000:]
    zero, one = notes(tmp_path / "notes")
    assert zero["same_weights"] == one["same_weights"] == [True] * 4
    losses = [float(r["train_loss"]) for r in rows(tmp_path / "run")]
    assert rows(tmp_path / "run")[-1]["step"] == "4" and all(0 < x < 10 for x in losses)
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    model = build_model(arch, encoder="resnet18", classes=2, in_channels=1, channels=[64, 32, 32, 32])
    model.load_state_dict(ckpt["model"])  # the plain model's names, no "module." prefix

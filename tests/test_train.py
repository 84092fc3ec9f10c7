"""`seg train` and `seg eval` as a user runs them: real EM crops, a config file, the run folder."""

import csv
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image


from conftest import em_crops
from helpers import SEG, seg, seg_quick, write_config


@pytest.fixture(scope="module")
def em_folder(tmp_path_factory):
    """Eight 96x128 crops of real ISBI slices with their 0/255 membrane masks."""
    return em_crops(tmp_path_factory.mktemp("em"), 8, slice(100, 196), slice(50, 178))


def last_row(run: Path) -> dict:
    with open(run / "metrics.csv") as f:
        return list(csv.DictReader(f))[-1]


def test_train_writes_a_complete_run_folder_and_eval_reads_it(em_folder, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", em_folder, tmp_path / "run")
    r = seg("train", cfg)
    assert r.returncode == 0, r.stderr
    run = tmp_path / "run"
    for name in ("config.yaml", "metrics.csv", "metrics.png", "checkpoints/best.pt", "checkpoints/last.pt"):
        assert (run / name).is_file(), name
    assert len(list((run / "overlays").glob("*.png"))) == 1
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert 0 <= float(rows[-1]["val_miou"]) <= 1
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 3 and ckpt["classes"] == ["membrane", "cell"]
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["train"]["epochs"] == 3 and resolved["data"]["root"] == str(em_folder)

    r = seg("eval", run, "--data", cfg, "--tta", "none", "--out", tmp_path / "eval.json")  # as validation
    assert r.returncode == 0, r.stderr
    assert "membrane" in r.stdout and "pixel error" in r.stdout
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["images"] == 2
    assert sum(map(sum, result["confusion"])) == 2 * 96 * 128
    best = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    best_miou = max(float(r["val_miou"]) for r in rows)
    assert best["best"] == pytest.approx(best_miou)
    assert result["miou"] == pytest.approx(best_miou, abs=1e-6)

    r = seg_quick("train", cfg)  # the folder holds a run: refuse to overwrite it
    assert r.returncode == 2 and "--resume" in r.stderr


@pytest.mark.parametrize(
    "train",
    [{}, {"num_workers": 1, "ema": {"decay": 0.9}, "steps_per_epoch": 3, "val_every_steps": 5}],  # resumes mid-epoch
    ids=["per-epoch", "workers-ema-steps"],
)
def test_a_killed_run_resumes_to_the_same_result(em_folder, tmp_path, train):
    whole = write_config(tmp_path / "whole.yaml", em_folder, tmp_path / "whole", epochs=4, **train)
    broken = write_config(tmp_path / "broken.yaml", em_folder, tmp_path / "broken", epochs=4, **train)
    assert seg("train", whole).returncode == 0

    env = {**os.environ, "CI": "1", "OMP_NUM_THREADS": "2"}
    proc = subprocess.Popen([*SEG, "train", str(broken)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    metrics = tmp_path / "broken" / "metrics.csv"
    deadline = time.time() + 240
    while time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:  # header + 2 validations
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = torch.load(tmp_path / "broken" / "checkpoints" / "last.pt", weights_only=True)["epoch"]
    assert 2 <= done < 4, "the run should have been killed part-way"

    r = seg("train", broken, "--resume")
    assert r.returncode == 0, r.stderr
    assert "resuming" in r.stderr
    a, b = last_row(tmp_path / "whole"), last_row(tmp_path / "broken")
    assert a["epoch"] == b["epoch"] == "4" and a["step"] == b["step"]
    for key in ("train_loss", "val_loss", "val_miou", "val_pixel_error"):
        assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-5, abs=1e-6), key


def test_a_refinenet_run_saved_without_decoder_batch_norm_resumes_and_a_changed_model_is_one_line(em_folder, tmp_path):
    """Runs begun before RefineNet's decoder gained batch norm resume in their own layout; a run whose
    config now builds another model is refused in one line."""
    cfg = write_config(tmp_path / "c.yaml", em_folder, tmp_path / "run", epochs=1)
    raw = yaml.safe_load(cfg.read_text())
    raw["model"] = {"arch": "refinenet_lw", "encoder": "resnet18", "options": {"channels": [32, 16, 16, 16], "norm": False}}
    cfg.write_text(yaml.safe_dump(raw))
    assert seg("train", cfg).returncode == 0
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    ckpt = torch.load(last, weights_only=True)
    del ckpt["model_kwargs"]["norm"]  # as such a run's checkpoint holds it
    torch.save(ckpt, last)
    del raw["model"]["options"]["norm"]
    raw["train"]["epochs"] = 2
    cfg.write_text(yaml.safe_dump(raw))

    r = seg("train", cfg, "--resume")
    assert r.returncode == 0, r.stderr
    assert "resuming" in r.stderr and last_row(tmp_path / "run")["epoch"] == "2"
    kwargs = torch.load(last, weights_only=True)["model_kwargs"]
    assert kwargs["norm"] is False  # the run goes on in its own layout, and says so

    raw["model"]["encoder"] = "resnet34"
    raw["train"]["epochs"] = 3
    cfg.write_text(yaml.safe_dump(raw))
    r = seg("train", cfg, "--resume")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    (error,) = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert "do not fit the model the config builds" in error and len(error) < 300


@pytest.mark.parametrize(
    "edit, message",
    [
        ({"data": {"rooot": "x"}}, "data.rooot: unknown key"),
        ({"train": {"epochs": "many"}}, "train.epochs:"),
        ({"model": {"arch": "segnet"}}, "model.arch:"),
        ({"data": {"root": "does/not/exist"}}, "data.root: no such folder"),
        ({"train": {"loss": "hinge"}}, "train.loss:"),
        ({"train": {"val_every": 2, "val_every_steps": 50}}, "set one of val_every, val_every_steps"),
        ({"train": {"accumulate": 0}}, "train.accumulate:"),
        ({"train": {"ema": {"decay": 1.5}}}, "train.ema.decay:"),
    ],
)
def test_broken_config_is_one_line_naming_the_key(em_folder, tmp_path, edit, message):
    cfg = write_config(tmp_path / "c.yaml", em_folder, tmp_path / "run")
    raw = yaml.safe_load(cfg.read_text())
    for section, values in edit.items():
        raw[section].update(values)
    cfg.write_text(yaml.safe_dump(raw))
    r = seg_quick("train", cfg)
    assert r.returncode == 2
    assert message in r.stderr and str(cfg) in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_set_overrides_are_validated_too(em_folder, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", em_folder, tmp_path / "run")
    r = seg_quick("train", cfg, "--set", "train.batch_size=-3")
    assert r.returncode == 2 and "train.batch_size" in r.stderr
    r = seg_quick("train", cfg, "--set", "trainepochs")
    assert r.returncode == 2 and "key=value" in r.stderr
    r = seg_quick("train", tmp_path / "missing.yaml")
    assert r.returncode == 2 and "no such config file" in r.stderr
    r = seg_quick("train", tmp_path / "[bold]runs[1].yaml")  # printed as it is, not read as markup
    assert r.returncode == 2 and f"{tmp_path}/[bold]runs[1].yaml: no such config file" in r.stderr
    (tmp_path / "bad.yaml").write_text("data: [unclosed\n")
    r = seg_quick("train", tmp_path / "bad.yaml")
    assert r.returncode == 2 and "not valid YAML" in r.stderr


def make_bad_folder(root: Path, problem: str) -> str:
    """A small data set with one defect; returns the file name the error must mention."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8)).save(root / "images" / f"im{i}.png")
        Image.fromarray((rng.random((64, 64)) > 0.5).astype(np.uint8) * 255).save(root / "masks" / f"im{i}.png")
    if problem == "size":
        Image.fromarray(np.zeros((60, 64), np.uint8)).save(root / "masks" / "im2.png")
        return "im2.png"
    if problem == "values":
        Image.fromarray(np.full((64, 64), 7, np.uint8)).save(root / "masks" / "im1.png")
        return "im1.png"
    if problem == "corrupt":
        (root / "images" / "im3.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
        return "im3.png"
    if problem == "no mask":
        (root / "masks" / "im0.png").unlink()
        return "im0.png"
    raise ValueError(problem)


@pytest.mark.parametrize("problem", ["size", "values", "corrupt", "no mask"])
def test_bad_data_is_reported_before_training(tmp_path, problem):
    name = make_bad_folder(tmp_path / "d", problem)
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "d", tmp_path / "run")
    r = seg_quick("train", cfg)
    assert r.returncode == 2, r.stderr
    assert name in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_empty_split_and_missing_folder(tmp_path):
    (tmp_path / "d" / "images").mkdir(parents=True)
    (tmp_path / "d" / "masks").mkdir()
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "d", tmp_path / "run")
    r = seg_quick("train", cfg)
    assert r.returncode == 2 and "no images" in r.stderr
    r = seg_quick("train", cfg, "--set", "data.masks=nothing_here")
    assert r.returncode == 2 and "nothing_here" in r.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_mixed_precision_channels_last_on_cuda(em_folder, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", em_folder, tmp_path / "run", epochs=1, device="cuda", amp="auto")
    r = seg("train", cfg)
    assert r.returncode == 0, r.stderr
    assert "on cuda with bfloat16" in r.stderr or "on cuda with float16" in r.stderr
    assert float(last_row(tmp_path / "run")["val_miou"]) >= 0


@pytest.mark.parametrize("arch", ["unetplusplus", "linknet", "attention_unet"])
def test_each_skip_form_trains_exports_and_predicts(em_folder, tmp_path, arch):
    """model.arch names smp's other skip forms and the attention-gated U-Net; each goes through the same
    train, export and tiled prediction as U-Net."""
    cfg = write_config(tmp_path / "c.yaml", em_folder, tmp_path / "run", epochs=1)
    raw = yaml.safe_load(cfg.read_text())
    raw["model"] = {"arch": arch, "encoder": "resnet18"}
    cfg.write_text(yaml.safe_dump(raw))
    r = seg_quick("train", cfg)
    assert r.returncode == 0, r.stderr
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["model_kwargs"]["arch"] == arch
    r = seg_quick("export", tmp_path / "run", "--out", tmp_path / "m.onnx")
    assert r.returncode == 0, r.stderr
    image = next((em_folder / "images").iterdir())
    r = seg_quick("predict", tmp_path / "m.onnx", image, "--out", tmp_path / "pred")
    assert r.returncode == 0, r.stderr
    mask = np.asarray(Image.open(tmp_path / "pred" / f"{image.stem}.png"))
    assert mask.shape == (96, 128) and set(np.unique(mask)) <= {0, 1}


def test_train_steps_sets_the_budget_in_optimiser_steps(em_folder, tmp_path):
    """train.steps: exactly that many optimiser steps, whatever the epoch length; the run's config.yaml
    records steps and no epochs; both in one file is a one-line error, and --set of one replaces the other."""
    cfg = write_config(tmp_path / "c.yaml", em_folder, tmp_path / "run")
    raw = yaml.safe_load(cfg.read_text())
    del raw["train"]["epochs"], raw["train"]["val_every"]
    raw["train"].update(steps=5, val_every_steps=2)
    cfg.write_text(yaml.safe_dump(raw))
    r = seg_quick("train", cfg)
    assert r.returncode == 0, r.stderr
    run = tmp_path / "run"
    assert [int(row["step"]) for row in csv.DictReader(open(run / "metrics.csv"))] == [2, 4, 5]
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"] == 5
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["train"]["steps"] == 5 and "epochs" not in resolved["train"]

    raw["train"]["epochs"] = 3
    cfg.write_text(yaml.safe_dump(raw))
    r = seg_quick("train", cfg, "--set", f"output.dir={tmp_path / 'run2'}")
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "train: set steps or epochs, not both" in r.stderr
    # On the command line one replaces the other.
    r = seg_quick("train", cfg, "--set", "train.steps=2", "--set", f"output.dir={tmp_path / 'run3'}")
    assert r.returncode == 0, r.stderr
    assert torch.load(tmp_path / "run3" / "checkpoints" / "last.pt", weights_only=True)["step"] == 2

"""The Trainer's loop through its Python API: validation cadence, checkpoints, loader workers, EMA, early
stopping, gradient accumulation and callbacks, on tiny runs over real EM crops."""

import copy
import csv
import math
import os

import numpy as np
import onnxruntime as ort
import pytest
import torch
from rich.console import Console

from seg.config import load_config
from training.callbacks import Callback
from training.checkpoint import model_from_checkpoint
from training.export import export_onnx
from training.train import Trainer

from conftest import em_crops
from helpers import write_config


@pytest.fixture(scope="module")
def em_folder(tmp_path_factory):
    """Eight 96x128 crops of real ISBI slices with their 0/255 membrane masks."""
    return em_crops(tmp_path_factory.mktemp("em"), 8, slice(100, 196), slice(50, 178))


class Recorder(Callback):
    """Every hook call, by name (checkpoints as last/best, steps with their number)."""

    def __init__(self):
        self.seen: list[str] = []

    def on_train_start(self, trainer):
        self.seen.append("start")

    def on_step_end(self, trainer):
        self.seen.append(f"step {trainer.step}")

    def on_epoch_end(self, trainer, row):
        self.seen.append(f"epoch {row['epoch']}")

    def on_validation(self, trainer, row):
        self.seen.append(f"validation {row['step']}")

    def on_checkpoint(self, trainer, path, best):
        assert path.is_file()
        self.seen.append("best" if best else "last")

    def on_train_end(self, trainer):
        self.seen.append("end")


def trainer(em_folder, out, callbacks=(), **train) -> Trainer:
    cfg = load_config(write_config(out.parent / f"{out.name}.yaml", em_folder, out, **train))
    return Trainer(cfg, console=Console(stderr=True, quiet=True), callbacks=list(callbacks))


def rows(run) -> list[dict]:
    with open(run / "metrics.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def ema_run(em_folder, tmp_path_factory):
    """3 epochs of 2 steps, validating every 3 steps, with EMA and one loader process that notes its pid."""
    out = tmp_path_factory.mktemp("loop") / "run"
    recorder = Recorder()
    t = trainer(em_folder, out, [recorder], val_every_steps=3, num_workers=1, ema={"decay": 0.9})
    pids = out.parent / "pids.txt"
    load = t.train_set.load

    def noting_pid(index):
        with open(pids, "a") as f:
            f.write(f"{os.getpid()}\n")
        return load(index)

    t.train_set.load = noting_pid
    t.fit()
    return out, recorder.seen, pids.read_text().split()


def test_validation_and_last_checkpoint_follow_val_every_steps(ema_run):
    run, seen, _ = ema_run
    assert [int(r["step"]) for r in rows(run)] == [3, 6]
    assert [int(r["epoch"]) for r in rows(run)] == [2, 3]
    assert seen.count("last") == 2
    last = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert last["step"] == 6 and last["epoch"] == 3 and "optimizer" in last


def test_best_checkpoint_only_on_improvement_and_without_optimiser_state(ema_run):
    run, seen, _ = ema_run
    values = [float(r["val_miou"]) for r in rows(run)]
    improvements = [i for i, v in enumerate(values) if v > max(values[:i], default=-1)]
    assert seen.count("best") == len(improvements)
    best = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    assert best["step"] == int(rows(run)[improvements[-1]]["step"])
    assert best["best"] == pytest.approx(values[improvements[-1]])
    assert not {"optimizer", "scaler", "rng", "raw_model"} & set(best)


def test_hooks_come_in_order(ema_run):
    _, seen, _ = ema_run
    assert [s for s in seen if s != "best"] == [
        "start", "step 1", "step 2", "epoch 1", "step 3", "last", "validation 3",
        "step 4", "epoch 2", "step 5", "step 6", "epoch 3", "last", "validation 6", "end",
    ]  # fmt: skip
    assert all(seen[i - 1] == "last" for i, s in enumerate(seen) if s == "best")


def test_one_loader_process_serves_every_epoch(ema_run):
    _, _, pids = ema_run
    assert len(pids) == 6 * 2  # 6 steps of 2 crops
    assert len(set(pids)) == 1 and pids[0] != str(os.getpid())


def test_ema_weights_are_the_checkpoint_model_and_what_export_uses(ema_run, tmp_path):
    run, _, _ = ema_run
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["ema_updates"] == 6
    raw = {**ckpt, "model": ckpt["raw_model"]}
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(1, 1, 64, 64)).astype(np.float32))
    with torch.no_grad():
        ema_out = model_from_checkpoint(ckpt)(x).numpy()
        raw_out = model_from_checkpoint(raw)(x).numpy()
    assert np.abs(ema_out - raw_out).max() > 1e-2

    export_onnx(run / "checkpoints" / "last.pt", tmp_path / "m.onnx")
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    onnx_out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(onnx_out, ema_out, atol=1e-3)


def test_patience_stops_after_validations_without_improvement(em_folder, tmp_path):
    t = trainer(em_folder, tmp_path / "run", epochs=20, steps_per_epoch=1, val_every_steps=1, patience=2)
    t.fit()
    table = rows(tmp_path / "run")
    values = [float(r["val_miou"]) for r in table]
    best = values.index(max(values))
    assert len(values) < 20 and len(values) - 1 - best == 2
    assert max(values[-2:]) <= values[best]
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)["step"] == len(values)


def test_accumulated_gradient_is_the_mean_over_the_batches(em_folder, tmp_path):
    """accumulate=2: the first step's gradient is that of the mean loss of its two batches."""
    t = trainer(em_folder, tmp_path / "run", epochs=1, steps_per_epoch=1, accumulate=2, loss="ce")
    inputs, start, grads = [], {}, {}
    loss_fn = t.loss_fn

    def noting_loss(logits, y, *extra):
        inputs.append(y.clone())
        return loss_fn(logits, y, *extra)

    class Grads(Callback):
        def on_train_start(self, trainer):
            start["model"] = copy.deepcopy(trainer.model)

        def on_step_end(self, trainer):
            grads.update({n: p.grad.clone() for n, p in trainer.model.named_parameters()})

    t.loss_fn = noting_loss
    t.model.register_forward_pre_hook(lambda module, args: inputs.append(args[0].clone()) if module.training else None)
    t.callbacks.append(Grads())
    t.fit()
    assert len(inputs) == 4  # (image, mask) of two batches
    model = start["model"].train()
    loss = sum(loss_fn(model(x), y) for x, y in zip(inputs[0::2], inputs[1::2])) / 2
    loss.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_ema_warms_up_so_the_initial_weights_fade_fast():
    """decay_n = min(decay, (1 + n) / (10 + n)): after 20 updates toward weights of 1 from weights of 0 the
    average is within 1e-3 of 1, where a fixed decay of 0.99 would still be at 1 - 0.99**20 = 0.18."""
    from training.callbacks import EMA

    model = torch.nn.Linear(3, 2)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    ema = EMA(model, decay=0.99)
    ema.averaged.update_parameters(model)  # the first update copies: the average starts at the weights of 0
    expected = 0.0
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0)
    for n in range(1, 21):
        ema.averaged.update_parameters(model)
        expected = 1 - min(0.99, (1 + n) / (10 + n)) * (1 - expected)
    weight = ema.module.weight.detach()
    assert torch.allclose(weight, torch.full_like(weight, expected), atol=1e-6)
    assert expected > 0.999 and ema.updates == 21


def test_default_validation_costs_at_most_a_tenth_of_the_training(em_folder, tmp_path):
    """With no cadence set, validations are at least 6 x (validation pixels) / (crop pixels a step) steps
    apart (a validation pixel costs about 2/3 of a training pixel), and none falls within half an interval
    of the end, where the final validation comes anyway."""
    t = trainer(em_folder, tmp_path / "run", epochs=30, steps_per_epoch=1, batch_size=2, val_every=None)
    assert len(t.val_samples) == 2
    # 2 validation images of 96x128 against 2 crops of 64x64 a step: at least 18 steps apart.
    assert t.val_interval == math.ceil(6 * 2 * 96 * 128 / (2 * 64 * 64)) == 18
    t.fit()
    assert [int(r["step"]) for r in rows(tmp_path / "run")] == [18, 30]
    t = trainer(em_folder, tmp_path / "run2", epochs=24, steps_per_epoch=1, batch_size=2, val_every=None)
    t.fit()
    assert [int(r["step"]) for r in rows(tmp_path / "run2")] == [24]  # 18 is within 9 of the end


def test_start_up_reads_each_image_once_without_the_cache(em_folder, tmp_path, monkeypatch):
    """Checking the data, `foreground_crops: auto` and the validation cadence share one read of each pair."""
    import seg.data.samples as samples
    import training.data
    import training.setup

    reads, load_pair = [], samples.load_pair
    for module in (samples, training.data, training.setup):  # wherever the reader is bound
        if hasattr(module, "load_pair"):
            monkeypatch.setattr(module, "load_pair", lambda s, data: reads.append(s.name) or load_pair(s, data))
    cfg = load_config(write_config(tmp_path / "c.yaml", em_folder, tmp_path / "run", val_every=None),
                      ["data.cache=false", "data.foreground_crops=auto"])  # fmt: skip
    t = Trainer(cfg, console=Console(quiet=True))
    assert sorted(reads) == sorted(s.name for s in t.train_samples + t.val_samples)  # 8 images, once each
    assert t.cfg.data.foreground_crops == 0  # membranes are not rare
    assert t.val_interval == math.ceil(6 * 2 * 96 * 128 / (2 * 64 * 64))

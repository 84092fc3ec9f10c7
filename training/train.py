"""`seg train`: fit a model from one config file into a run folder.

The run folder holds config.yaml (resolved), checkpoints/{last,best}.pt, metrics.csv, metrics.png and
overlays/*.png. One data loader serves the whole run; each sample's order and augmentation seed come from
(seed, epoch, position), so a run resumed from its last checkpoint ends exactly where an unbroken run with
the same seed ends. The learning rate is a pure function of the run's progress (optimiser steps done, or
time spent against a time limit), so the schedule needs no state of its own. Checkpoints, metrics.csv, the
weights' moving average and early stopping hang on the hooks of `training.callbacks`.

Under torchrun (`training.distributed`) each of N processes trains the same model with DistributedDataParallel
on its own share of every step's samples: `train.batch_size` is per process, so a step sees N x batch_size
crops, the ones a single process with that batch would see. Rank 0 decides the time limit and stops, and
alone writes files; validation images are split across ranks and their confusion matrices summed.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from rich.console import Console
from torch import nn
from torch.utils.data import DataLoader

from seg.config import Config, config_to_dict
from seg.errors import SegError
from seg.inference.predictor import Predictor
from seg.io.images import atomic_path
from seg.jobs.progress import Progress
from seg.metrics import metrics_from_confusion
from training.callbacks import EMA, Callback, Checkpoint, EarlyStopping, MetricsCSV
from training.checkpoint import load_checkpoint, model_info, model_state, rng_state, save_checkpoint, set_rng_state
from training.device import amp_dtype, pick_device
from training.distributed import Dist
from training.evaluate import score_images
from training.loggers import build_loggers
from training.losses import build_loss
from training.schedule import Meter, SeededSampler, SeededSamples, build_optimizer, lr_factor
from training.setup import build_model_on, check_names, load_data, plan_length

HIGHER_IS_BETTER = {"miou": True, "dice": True, "pixel_accuracy": True, "loss": False}


class Trainer:
    """Owns one run: data, model, optimiser, the loop, checkpoints and the run folder's files.

    `callbacks` run after the built-in ones (see `training.callbacks`)."""

    def __init__(
        self, cfg: Config, resume: bool = False, console: Console | None = None, callbacks: list[Callback] | None = None
    ):
        check_names(cfg)
        self.cfg = cfg
        self.dist = Dist()
        self.console = console or Console(stderr=True)
        if not self.dist.is_main:
            self.console = Console(stderr=True, quiet=True)
        self.run_dir = Path(cfg.output.dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        last = self.ckpt_dir / "last.pt"
        if last.exists() and not resume:
            raise SegError(f"{self.run_dir} already holds a run: pass --resume, or set output.dir to a new folder")
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.device = self.dist.device(pick_device(cfg.train.device))
        self.dist.setup(self.device)
        self.amp = amp_dtype(cfg.train.amp, self.device)
        self.channels_last = cfg.train.channels_last is not False  # by default on: faster on CUDA and on CPUs

        self.train_samples, self.val_samples, self.train_set, self.val_set, survey = load_data(cfg, self.log)
        self.augment = self.train_set.transform
        saved = load_checkpoint(last) if resume and last.exists() else None
        self.model_kwargs, self.model = build_model_on(cfg, self.device, self.dist, self.channels_last, saved)
        self.train_model = self.dist.wrap(self.model, self.device)  # `model` itself stays unwrapped
        data = cfg.data
        self.loss_fn = build_loss(
            cfg.train.loss, data.ignore_index, cfg.train.class_weights, data.classes, self.train_set.masks(), self.log
        )
        self.optimizer = build_optimizer(cfg, self.model)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == torch.float16)
        t = cfg.train
        self.steps_per_epoch, self.total_steps, self.val_interval = plan_length(cfg, self.train_set, survey.splits["val"]["area"], self.dist.world)
        self.epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        self.step = 0  # optimiser steps done
        self.elapsed = 0.0  # seconds spent in training steps
        self.best: float | None = None
        self.best_step = 0
        self.improved = False  # whether the latest validation improved `best`
        self.stop = False
        self.history: list[dict[str, Any]] = []
        self.ema = EMA(self.model, t.ema.decay) if t.ema else None
        self.callbacks: list[Callback] = [self.ema] if self.ema else []
        main = self.dist.is_main  # only rank 0 writes files
        self.callbacks += [Checkpoint(), MetricsCSV()] if main else []
        self.callbacks += [EarlyStopping(t.patience)] if t.patience else []
        self.callbacks += callbacks or []
        self.callbacks += build_loggers(cfg, self.run_dir) if main else []  # output.loggers, after the caller's
        if saved is not None:
            self._restore(saved, last)
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            with atomic_path(self.run_dir / "config.yaml") as tmp:
                tmp.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))

    # -- output --------------------------------------------------------------------------------------
    def log(self, message: str) -> None:
        self.console.print(message, highlight=False, soft_wrap=True)

    # -- the loop ------------------------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        """Epochs done."""
        return self.step // self.steps_per_epoch

    @property
    def eval_model(self) -> nn.Module:
        """The weights that validation, checkpoints and export use: their moving average with train.ema."""
        return self.ema.module if self.ema else self.model

    def call(self, hook: str, *args: Any, **kwargs: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self, *args, **kwargs)

    def fit(self) -> Path:
        t = self.cfg.train
        budget = t.time_limit_minutes * 60 if t.time_limit_minutes else None
        self.log(
            f"training {self.cfg.model.arch}/{self.cfg.model.encoder} on {self.device.type}"
            f"{' with ' + str(self.amp).split('.')[-1] if self.amp else ''}: epochs {self.epoch + 1}..{self.epochs},"
            f" {self.steps_per_epoch} steps of {t.batch_size}" + (f"x{t.accumulate}" if t.accumulate > 1 else "")
            + (f" on each of {self.dist.world} processes" if self.dist.enabled else "")
            + (f", time limit {t.time_limit_minutes:g} min" if budget else "")
        )  # fmt: skip
        batches = self.batches()
        since_row, since_epoch = Meter(), Meter()
        self.call("on_train_start")
        bar = None
        while self.step < self.total_steps:
            elapsed, stop = self.dist.from_main([self.elapsed, self.stop])  # every rank takes rank 0's decision
            self.elapsed, self.stop = elapsed, bool(stop)
            if self.stop:
                break
            if budget is not None and self.elapsed >= budget:
                self.log(f"time limit reached after {self.step} steps")
                break
            if bar is None:
                bar = Progress(
                    self.console, f"epoch {self.epoch + 1}/{self.epochs}", self.steps_per_epoch,
                    "loss {task.fields[loss]:.4f}  {task.fields[rate]:.1f} img/s", loss=float("nan"), rate=0.0,
                ).start()  # fmt: skip
                bar.advance(self.step % self.steps_per_epoch, loss=float("nan"), rate=0.0)
            start = time.perf_counter()
            loss, images = self._train_step(batches, budget)
            seconds = time.perf_counter() - start
            self.elapsed += seconds
            self.step += 1
            since_row.add(loss, images, seconds)
            since_epoch.add(loss, images, seconds)
            bar.advance(loss=since_epoch.loss / since_epoch.steps, rate=since_epoch.images / since_epoch.seconds)
            self.call("on_step_end")
            if self.step % self.steps_per_epoch == 0:
                bar.stop()
                bar = None
                loss, _ = since_epoch.take()
                row = {"epoch": self.epoch, "step": self.step, "train_loss": loss, "lr": self.lr}
                self.call("on_epoch_end", {**row, "seconds": self.elapsed})
            if self._validation_due():
                self._validate(since_row)
        if bar is not None:
            bar.stop()
        if not self.history or self.history[-1]["step"] < self.step:
            self._validate(since_row)  # at the end, a time limit or a stop
        del batches  # stops the data loader's workers
        self.call("on_train_end")
        if self.dist.is_main:
            self.finish()
        self.dist.close()
        return self.run_dir

    def batches(self) -> Iterator:
        """The training batches from step `self.step` to the end: one pass, so the workers start once."""
        t = self.cfg.train
        sampler = SeededSampler(
            len(self.train_set), t.batch_size, t.accumulate, self.steps_per_epoch, self.total_steps, t.seed, self.step,
            self.dist.rank, self.dist.world,
        )  # fmt: skip
        loader = DataLoader(
            SeededSamples(self.train_set), batch_size=t.batch_size, sampler=sampler, num_workers=t.num_workers,
            pin_memory=self.device.type == "cuda", persistent_workers=t.num_workers > 0,
            generator=torch.Generator().manual_seed(t.seed),  # leaves the global generator alone
        )  # fmt: skip
        return iter(loader)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def _validation_due(self) -> bool:
        minutes = self.cfg.train.val_every_minutes
        if minutes:
            last = self.history[-1]["seconds"] if self.history else 0.0
            return bool(self.dist.from_main([self.elapsed - last >= minutes * 60])[0])  # rank 0's clock decides
        if self.step % self.val_interval:
            return False
        t = self.cfg.train
        # By default none within half an interval of the end, where the final validation comes anyway.
        return bool(t.val_every_steps or t.val_every) or self.total_steps - self.step >= self.val_interval / 2

    def _train_step(self, batches, budget: float | None) -> tuple[float, int]:
        """One optimiser step over `train.accumulate` batches: (their mean loss, images)."""
        t = self.cfg.train
        progress = self.step / self.total_steps
        if budget:
            progress = max(progress, self.elapsed / budget)
        factor = lr_factor(self.cfg, progress, self.step / self.steps_per_epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = t.lr * factor
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        total, images = 0.0, 0
        for i in range(t.accumulate):
            # Under DDP the gradients are all-reduced once a step, in the last batch's backward.
            last = i == t.accumulate - 1 or not self.dist.enabled
            sync = contextlib.nullcontext() if last else self.train_model.no_sync()
            x, y, *extra = next(batches)
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            extra = [e.to(self.device, non_blocking=True) for e in extra]  # e.g. per-pixel loss weights
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with sync:
                with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
                    loss = self.loss_fn(self.train_model(x), y, *extra)
                if not torch.isfinite(loss):
                    raise SegError(f"loss became {loss.item()} at epoch {self.epoch + 1}; lower train.lr")
                self.scaler.scale(loss / t.accumulate).backward()
            total += loss.item()
            images += x.shape[0] * self.dist.world
        self.scaler.step(self.optimizer)
        self.scaler.update()
        total = float(self.dist.sum(np.array([total]))[0]) / self.dist.world  # the mean over ranks
        return total / t.accumulate, images

    def _validate(self, since: Meter) -> None:
        """A row for metrics.csv: the training figures since the last row, and validation metrics."""
        loss, rate = since.take()
        row: dict[str, Any] = {
            "epoch": -(-self.step // self.steps_per_epoch),  # the epoch this step belongs to, from 1
            "step": self.step,
            "train_loss": loss,
            "lr": self.lr,
            "images_per_s": rate,
            "seconds": round(self.elapsed, 2),
        }
        if self.val_samples:
            row.update(self.validate())
        self.history.append(row)
        self.improved = self._is_best(row)
        self.call("on_validation", row)
        self.log(_epoch_line(row, self.epochs, self.improved))

    @torch.no_grad()
    def validate(self) -> dict[str, Any]:
        """Whole validation images through the tiled predictor; metrics from one confusion matrix."""
        self.dist.share_weights(self.eval_model)  # e.g. BatchNorm statistics, which each rank keeps
        self.eval_model.eval()
        data = self.cfg.data
        share = range(self.dist.rank, len(self.val_set), self.dist.world)  # each rank its share
        pairs = ((self.val_samples[i].name, *self.val_set.load(i)) for i in share)
        scores = score_images(self.predictor(), pairs, data.num_classes, data.ignore_index, loss=True)
        result = metrics_from_confusion(self.dist.sum(scores.confusion.matrix))
        nll, pixels = map(float, self.dist.sum(np.array([scores.nll, scores.pixels], np.float64)))
        out = {"val_loss": nll / max(pixels, 1), "val_miou": result["miou"], "val_dice": result["dice"],
               "val_pixel_accuracy": result["pixel_accuracy"], "val_pixel_error": result["pixel_error"]}
        for name, iou, dice in zip(data.classes, result["iou"], result["dice_per_class"]):
            out[f"val_iou_{name}"] = iou
            out[f"val_dice_{name}"] = dice
        return out

    def predictor(self) -> Predictor:
        """`eval_model` as it is now, behind the one predictor (the config's normalisation and tiling)."""
        from training.torch_runner import torch_predictor

        info = model_info(self.eval_model, self.model_kwargs, self.cfg, self.run_dir.name)
        return torch_predictor(self.eval_model, info, self.device, self.amp)

    def _is_best(self, row: dict[str, Any]) -> bool:
        metric = self.cfg.train.metric
        key = f"val_{metric}" if self.val_samples else "train_loss"
        value = row.get(key)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return False
        higher = HIGHER_IS_BETTER[metric] and key != "train_loss"
        if self.best is None or (value > self.best if higher else value < self.best):
            self.best, self.best_step = value, self.step
            return True
        return False

    # -- state -----------------------------------------------------------------------------------------
    def model_state(self) -> dict[str, Any]:
        """What best.pt holds: `eval_model`'s weights as "model", `model_info`'s keys, the config and progress."""
        return {
            **model_state(self.eval_model, self.model_kwargs, self.cfg),
            "config": config_to_dict(self.cfg),
            "epoch": self.epoch,
            "step": self.step,
            "elapsed": self.elapsed,
            "best": self.best,
            "best_step": self.best_step,
            "history": self.history,
        }

    def state(self) -> dict[str, Any]:
        """What last.pt holds: `model_state` and what resume needs (with train.ema, "raw_model" is the
        trained weights and "model" their average)."""
        state = {
            **self.model_state(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng_state(),
        }
        if self.ema:
            state.update(raw_model=self.model.state_dict(), ema_updates=self.ema.updates)
        return state

    def _restore(self, ckpt: dict[str, Any], path: Path) -> None:
        weights, have = ckpt.get("raw_model", ckpt["model"]), self.model.state_dict()
        misfits = sorted(have.keys() ^ weights.keys()) + [k for k in have if k in weights and have[k].shape != weights[k].shape]
        if misfits:
            raise SegError(
                f"{path}: its weights do not fit the model the config builds ({len(misfits)} tensors differ, "
                f"first {misfits[0]}); was the model section changed after the run began?"
            )
        self.model.load_state_dict(weights)
        if self.ema:
            self.ema.load(ckpt["model"], ckpt.get("ema_updates", 1))
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
        self.step = ckpt.get("step", ckpt["epoch"] * self.steps_per_epoch)
        self.elapsed, self.best, self.best_step = ckpt["elapsed"], ckpt["best"], ckpt.get("best_step", 0)
        self.history = list(ckpt["history"])
        self.log(f"resuming {self.run_dir} after step {self.step} (epoch {self.epoch})")

    def save(self, name: str, state: dict[str, Any]) -> None:
        """Write checkpoints/NAME.pt, then tell the callbacks."""
        path = self.ckpt_dir / f"{name}.pt"
        save_checkpoint(path, state)
        self.call("on_checkpoint", path, best=name == "best")

    def finish(self) -> None:
        from training.report import plot_metrics, write_overlays

        plot_metrics(self.history, self.run_dir / "metrics.png")
        if self.val_samples and self.cfg.output.overlays:
            best = self.ckpt_dir / "best.pt"
            if best.exists():
                self.eval_model.load_state_dict(load_checkpoint(best)["model"])
            self.eval_model.eval()
            predictor = self.predictor()
            write_overlays(
                self.val_samples, self.cfg.data, lambda image: predictor.predict(image).mask,
                self.run_dir / "overlays", self.cfg.output.overlays,
            )  # fmt: skip
        self.log(f"run folder: {self.run_dir}")


def _epoch_line(row: dict[str, Any], epochs: int, improved: bool) -> str:
    parts = [f"epoch {row['epoch']}/{epochs}", f"step {row['step']}", f"loss {row['train_loss']:.4f}"]
    parts.append(f"{row['images_per_s']:.1f} img/s")
    for key in ("val_loss", "val_miou", "val_dice", "val_pixel_error"):
        if key in row:
            parts.append(f"{key.replace('_', ' ', 1)} {row[key]:.4f}")
    return "  ".join(parts) + ("  (best)" if improved else "")


def train(
    cfg: Config, resume: bool = False, console: Console | None = None, callbacks: list[Callback] | None = None
) -> Path:
    """Train from a validated config; returns the run folder."""
    return Trainer(cfg, resume=resume, console=console, callbacks=callbacks).fit()


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use `seg train CONFIG`")

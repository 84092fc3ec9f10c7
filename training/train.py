"""`seg train`: fit a model from one config file into a run folder.

The run folder holds config.yaml (resolved), checkpoints/{last,best}.pt, metrics.csv, metrics.png and
overlays/*.png. Every epoch reseeds from (seed, epoch), so a run resumed from its last checkpoint ends
exactly where an unbroken run with the same seed ends. The learning rate is a pure function of the
run's progress (steps done, or time spent against a time limit), so the schedule needs no state of its own.
"""

from __future__ import annotations

import csv
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from rich.console import Console
from torch import nn
from torch.utils.data import DataLoader, RandomSampler

from seg.config import Config, config_to_dict
from seg.data import check_samples, find_samples
from seg.errors import SegError
from seg.imageio import atomic_path
from seg.metrics import ConfusionMatrix
from seg.models import build_model
from seg.progress import Progress
from seg.predictor import Predictor
from training.checkpoint import load_checkpoint, model_info, model_state, rng_state, save_checkpoint, set_rng_state
from training.data import SegmentationDataset, build_augmentation
from training.losses import build_loss

HIGHER_IS_BETTER = {"miou": True, "dice": True, "pixel_accuracy": True, "loss": False}


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise SegError("train.device is cuda but no CUDA GPU is usable")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def amp_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """Mixed precision only on CUDA: bf16 where supported, else fp16."""
    if device.type != "cuda" or setting == "off":
        return None
    if setting == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[setting]


def build_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    t = cfg.train
    if t.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    cls = torch.optim.AdamW if t.optimizer == "adamw" else torch.optim.Adam
    return cls(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)


def lr_factor(cfg: Config, progress: float, epoch_float: float) -> float:
    """The learning-rate multiplier at `progress` in [0, 1] of the run (by steps, or by time with a budget)."""
    t = cfg.train
    if t.warmup_epochs and epoch_float < t.warmup_epochs:
        return (epoch_float + 1e-3) / t.warmup_epochs
    progress = min(max(progress, 0.0), 1.0)
    if t.scheduler == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    if t.scheduler == "poly":
        return (1 - progress) ** 0.9
    return 1.0


class Trainer:
    """Owns one run: data, model, optimiser, the loop, checkpoints and the run folder's files."""

    def __init__(self, cfg: Config, resume: bool = False, console: Console | None = None):
        self.cfg = cfg
        self.console = console or Console(stderr=True)
        self.run_dir = Path(cfg.output.dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        last = self.ckpt_dir / "last.pt"
        if last.exists() and not resume:
            raise SegError(f"{self.run_dir} already holds a run: pass --resume, or set output.dir to a new folder")
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.device = pick_device(cfg.train.device)
        self.amp = amp_dtype(cfg.train.amp, self.device)
        self.channels_last = cfg.train.channels_last if cfg.train.channels_last is not None else self.device.type == "cuda"

        data = cfg.data
        self.train_samples, self.val_samples = find_samples(data)
        self.log(f"data: {len(self.train_samples)} training and {len(self.val_samples)} validation images; checking them")
        cache = check_samples(self.train_samples + self.val_samples, data)
        self.augment = build_augmentation(data, cfg.train.seed)
        self.train_set = SegmentationDataset(self.train_samples, data, self.augment, cache, cfg.train.border_weight)
        self.val_set = SegmentationDataset(self.val_samples, data, None, cache)

        torch.manual_seed(cfg.train.seed)
        self.model_kwargs = {k: (str(v) if isinstance(v, Path) else v) for k, v in cfg.model_kwargs().items()}
        self.model = build_model(**self.model_kwargs).to(self.device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.loss_fn = build_loss(
            cfg.train.loss, data.ignore_index, cfg.train.class_weights, data.classes, self.train_set.masks(), self.log
        )
        self.optimizer = build_optimizer(cfg, self.model)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == torch.float16)
        self.steps_per_epoch = cfg.train.steps_per_epoch or max(1, len(self.train_set) // cfg.train.batch_size)
        self.epoch = 0
        self.elapsed = 0.0
        self.best: float | None = None
        self.history: list[dict[str, Any]] = []
        if resume and last.exists():
            self._restore(load_checkpoint(last))
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.run_dir / "config.yaml") as tmp:
            tmp.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))

    # -- output --------------------------------------------------------------------------------------
    def log(self, message: str) -> None:
        self.console.print(message, highlight=False, soft_wrap=True)

    # -- the loop ------------------------------------------------------------------------------------
    def fit(self) -> Path:
        t = self.cfg.train
        budget = t.time_limit_minutes * 60 if t.time_limit_minutes else None
        self.log(
            f"training {self.cfg.model.arch}/{self.cfg.model.encoder} on {self.device.type}"
            f"{' with ' + str(self.amp).split('.')[-1] if self.amp else ''}: epochs {self.epoch + 1}..{t.epochs},"
            f" {self.steps_per_epoch} steps of {t.batch_size}"
            + (f", time limit {t.time_limit_minutes:g} min" if budget else "")
        )
        while self.epoch < t.epochs:
            if budget is not None and self.elapsed >= budget:
                self.log(f"time limit reached after {self.epoch} epochs")
                break
            start = time.perf_counter()
            train_loss, images = self._train_epoch(budget)
            seconds = time.perf_counter() - start
            self.elapsed += seconds
            self.epoch += 1
            row: dict[str, Any] = {
                "epoch": self.epoch,
                "train_loss": train_loss,
                "lr": self.optimizer.param_groups[0]["lr"],
                "images_per_s": images / max(seconds, 1e-9),
                "seconds": round(self.elapsed, 2),
            }
            if self.val_samples and (self.epoch % t.val_every == 0 or self.epoch == t.epochs):
                row.update(self.validate())
            self.history.append(row)
            improved = self._is_best(row)
            self._save(improved)
            self._write_metrics()
            self.log(_epoch_line(row, t.epochs, improved))
        self.finish()
        return self.run_dir

    def _train_epoch(self, budget: float | None) -> tuple[float, int]:
        t = self.cfg.train
        seed = t.seed * 100_003 + self.epoch
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        self.augment.set_random_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        sampler = RandomSampler(self.train_set, num_samples=self.steps_per_epoch * t.batch_size, generator=generator)
        loader = DataLoader(
            self.train_set, batch_size=t.batch_size, sampler=sampler, num_workers=t.num_workers,
            drop_last=True, pin_memory=self.device.type == "cuda",
            persistent_workers=False,
        )
        self.model.train()
        total, count, images = 0.0, 0, 0
        epoch_start = time.perf_counter()
        bar = Progress(
            self.console, f"epoch {self.epoch + 1}/{t.epochs}", self.steps_per_epoch,
            "loss {task.fields[loss]:.4f}  {task.fields[rate]:.1f} img/s", loss=float("nan"), rate=0.0,
        ).start()  # fmt: skip
        for step, (x, y, *extra) in enumerate(loader):
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            extra = [e.to(self.device, non_blocking=True) for e in extra]  # e.g. per-pixel loss weights
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            total_steps = t.epochs * self.steps_per_epoch
            progress = (self.epoch * self.steps_per_epoch + step) / total_steps
            if budget:
                progress = max(progress, (self.elapsed + time.perf_counter() - epoch_start) / budget)
            factor = lr_factor(self.cfg, progress, self.epoch + step / self.steps_per_epoch)
            for group in self.optimizer.param_groups:
                group["lr"] = t.lr * factor
            with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
                loss = self.loss_fn(self.model(x), y, *extra)
            if not torch.isfinite(loss):
                raise SegError(f"loss became {loss.item()} at epoch {self.epoch + 1}; lower train.lr")
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            total += loss.item()
            count += 1
            images += x.shape[0]
            bar.advance(loss=total / count, rate=images / max(time.perf_counter() - epoch_start, 1e-9))
        bar.stop()
        return total / max(count, 1), images

    @torch.no_grad()
    def validate(self) -> dict[str, Any]:
        """Whole validation images through the tiled predictor; metrics from one confusion matrix."""
        self.model.eval()
        data = self.cfg.data
        conf = ConfusionMatrix(data.num_classes, data.ignore_index)
        predictor = self.predictor()
        nll, pixels = 0.0, 0
        for i in range(len(self.val_set)):
            image, target = self.val_set.load(i)
            probs = predictor.predict(image, probabilities=True).probabilities
            conf.update(probs.argmax(0), target)
            valid = target != data.ignore_index
            picked = np.take_along_axis(probs, np.where(valid, target, 0)[None], 0)[0][valid]
            nll -= float(np.log(np.maximum(picked, 1e-8)).sum())
            pixels += int(valid.sum())
        result = conf.compute()
        out = {"val_loss": nll / max(pixels, 1), "val_miou": result["miou"], "val_dice": result["dice"],
               "val_pixel_accuracy": result["pixel_accuracy"], "val_pixel_error": result["pixel_error"]}
        for name, iou, dice in zip(data.classes, result["iou"], result["dice_per_class"]):
            out[f"val_iou_{name}"] = iou
            out[f"val_dice_{name}"] = dice
        return out

    def predictor(self) -> Predictor:
        """The model as it is now, behind the one predictor (the config's normalisation and tiling)."""
        from training.torch_runner import torch_predictor

        info = model_info(self.model, self.model_kwargs, self.cfg, self.run_dir.name)
        return torch_predictor(self.model, info, self.device, self.amp)

    def _is_best(self, row: dict[str, Any]) -> bool:
        metric = self.cfg.train.metric
        key = f"val_{metric}" if self.val_samples else "train_loss"
        value = row.get(key)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return False
        higher = HIGHER_IS_BETTER[metric] and key != "train_loss"
        if self.best is None or (value > self.best if higher else value < self.best):
            self.best = value
            return True
        return False

    # -- state -----------------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            **model_state(self.model, self.model_kwargs, self.cfg),
            "config": config_to_dict(self.cfg),
            "epoch": self.epoch,
            "elapsed": self.elapsed,
            "best": self.best,
            "history": self.history,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng_state(),
        }

    def _restore(self, ckpt: dict[str, Any]) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
        self.epoch, self.elapsed, self.best = ckpt["epoch"], ckpt["elapsed"], ckpt["best"]
        self.history = list(ckpt["history"])
        self.log(f"resuming {self.run_dir} after epoch {self.epoch}")

    def _save(self, improved: bool) -> None:
        state = self.state()
        save_checkpoint(self.ckpt_dir / "last.pt", state)
        if improved:
            save_checkpoint(self.ckpt_dir / "best.pt", state)

    def _write_metrics(self) -> None:
        keys: list[str] = []
        for row in self.history:
            keys += [k for k in row if k not in keys]
        with atomic_path(self.run_dir / "metrics.csv") as tmp:
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=keys)
                writer.writeheader()
                writer.writerows(self.history)

    def finish(self) -> None:
        from training.report import plot_metrics, write_overlays

        plot_metrics(self.history, self.run_dir / "metrics.png")
        if self.val_samples and self.cfg.output.overlays:
            best = self.ckpt_dir / "best.pt"
            if best.exists():
                self.model.load_state_dict(load_checkpoint(best)["model"])
            self.model.eval()
            predictor = self.predictor()
            write_overlays(
                self.val_samples, self.cfg.data, lambda image: predictor.predict(image).mask,
                self.run_dir / "overlays", self.cfg.output.overlays,
            )  # fmt: skip
        self.log(f"run folder: {self.run_dir}")


def _epoch_line(row: dict[str, Any], epochs: int, improved: bool) -> str:
    parts = [f"epoch {row['epoch']}/{epochs}", f"loss {row['train_loss']:.4f}", f"{row['images_per_s']:.1f} img/s"]
    for key in ("val_loss", "val_miou", "val_dice", "val_pixel_error"):
        if key in row:
            parts.append(f"{key.replace('_', ' ', 1)} {row[key]:.4f}")
    return "  ".join(parts) + ("  (best)" if improved else "")


def train(cfg: Config, resume: bool = False, console: Console | None = None) -> Path:
    """Train from a validated config; returns the run folder."""
    return Trainer(cfg, resume=resume, console=console).fit()


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use `seg train CONFIG`")

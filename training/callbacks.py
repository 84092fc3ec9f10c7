"""Hooks into `seg train`'s loop: the Trainer calls each callback's methods in order.

A callback reads the trainer's state (`trainer.step`, `trainer.epoch`, `trainer.history`, `trainer.model`,
`trainer.run_dir`) and may set `trainer.stop = True` to end the run after the current step (it then
validates and checkpoints once more).

The built-in ones come first in `trainer.callbacks`: `EMA` (with train.ema), `Checkpoint`, `MetricsCSV` and
`EarlyStopping` (with train.patience). So after a validation the checkpoints are written (each one's
`on_checkpoint` reaching every callback) before metrics.csv, and both before later callbacks see
`on_validation`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

    from training.train import Trainer


class Callback:
    """Does nothing; subclasses override the hooks they need."""

    def on_train_start(self, trainer: Trainer) -> None:
        """Before the first step (also after a resume)."""

    def on_step_end(self, trainer: Trainer) -> None:
        """After each optimiser step."""

    def on_epoch_end(self, trainer: Trainer, row: dict[str, Any]) -> None:
        """After an epoch's steps; `row` holds epoch, step, train_loss, lr, seconds."""

    def on_validation(self, trainer: Trainer, row: dict[str, Any]) -> None:
        """After a validation; `row` holds the val_* metrics beside the epoch's figures."""

    def on_checkpoint(self, trainer: Trainer, path: Path, best: bool) -> None:
        """After a checkpoint is written to `path` (`best`: it is the new checkpoints/best.pt)."""

    def on_train_end(self, trainer: Trainer) -> None:
        """After the last step and the final checkpoint."""


class Checkpoint(Callback):
    """After each validation: checkpoints/last.pt (all that resume needs), and best.pt (the model, no
    optimiser state) when `train.metric` improved."""

    def on_validation(self, trainer: Trainer, row: dict[str, Any]) -> None:
        trainer.save("last", trainer.state())
        if trainer.improved:
            trainer.save("best", trainer.model_state())


class MetricsCSV(Callback):
    """metrics.csv: one row per validation, rewritten whole (atomically) each time."""

    def on_validation(self, trainer: Trainer, row: dict[str, Any]) -> None:
        import csv

        from seg.io.images import atomic_path

        keys: list[str] = []
        for item in trainer.history:
            keys += [k for k in item if k not in keys]
        with atomic_path(trainer.run_dir / "metrics.csv") as tmp:
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=keys)
                writer.writeheader()
                writer.writerows(trainer.history)


class EarlyStopping(Callback):
    """Stops the run after `patience` validations without an improvement of `train.metric`."""

    def __init__(self, patience: int):
        self.patience = patience

    def on_train_start(self, trainer: Trainer) -> None:
        self.on_validation(trainer, {})  # a resumed run that had stopped stays stopped

    def on_validation(self, trainer: Trainer, row: dict[str, Any]) -> None:
        waited = sum(1 for item in trainer.history if item["step"] > trainer.best_step)
        if waited >= self.patience and not trainer.stop:
            trainer.stop = True
            trainer.log(f"stopping early: {trainer.cfg.train.metric} has not improved for {waited} validations")


def ema_with_warmup(decay: float):
    """AveragedModel's update for an EMA whose decay grows as min(decay, (1 + n) / (10 + n)) with the
    updates n done: with a fixed decay the random initial weights keep decay**n of the average (22% after
    150 steps at 0.99), which ruins it in runs of a few thousand steps."""
    from torch.optim.swa_utils import get_ema_multi_avg_fn

    def update(averaged: list, current: list, updates) -> None:
        n = float(updates)
        get_ema_multi_avg_fn(min(decay, (1 + n) / (10 + n)))(averaged, current, updates)

    return update


class EMA(Callback):
    """An exponential moving average of the weights after each optimiser step (torch's AveragedModel, buffers
    included); `module` is the averaged model that validation, checkpoints and export use."""

    def __init__(self, model: nn.Module, decay: float):
        from torch.optim.swa_utils import AveragedModel

        self.averaged = AveragedModel(model, multi_avg_fn=ema_with_warmup(decay), use_buffers=True)

    @property
    def module(self) -> nn.Module:
        return self.averaged.module

    @property
    def updates(self) -> int:
        return int(self.averaged.n_averaged)

    def load(self, state: dict[str, Any], updates: int) -> None:
        self.module.load_state_dict(state)
        self.averaged.n_averaged.fill_(updates)

    def on_step_end(self, trainer: Trainer) -> None:
        self.averaged.update_parameters(trainer.model)

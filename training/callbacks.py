"""Hooks into `seg train`'s loop: the Trainer calls each callback's methods in order.

A callback reads the trainer's state (`trainer.step`, `trainer.epoch`, `trainer.history`, `trainer.model`,
`trainer.run_dir`) and may set `trainer.stop = True` to end the run after the current step.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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

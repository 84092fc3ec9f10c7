"""Optional experiment loggers for `seg train` (`output.loggers`): TensorBoard and MLflow, each a Callback.

metrics.csv is always written; these send the same rows, against the global step, to their own tools.
Each library is imported only when its logger is asked for, so a missing one is a ConfigError at the
Trainer's start, not after training.
"""

from __future__ import annotations

import importlib
import logging
import math
import os
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from seg.config import Config, config_to_dict
from seg.errors import ConfigError, SegError
from seg.io.images import atomic_path
from training.callbacks import Callback

if TYPE_CHECKING:
    from training.train import Trainer

EXTRA = "pip install 'seg[loggers]'"
MODULES = {"tensorboard": "torch.utils.tensorboard", "mlflow": "mlflow"}
RUN_ID_FILE = "mlflow_run_id"


def build_loggers(cfg: Config, run_dir: Path) -> list[Callback]:
    """One callback per name in `cfg.output.loggers`; a ConfigError if its library is missing."""
    loggers: list[Callback] = []
    for name in dict.fromkeys(cfg.output.loggers):
        _require(name)
        loggers.append(TensorBoardLogger(cfg, run_dir) if name == "tensorboard" else MLflowLogger(cfg, run_dir))
    return loggers


def _require(name: str) -> Any:
    if name == "mlflow":
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # nothing leaves the machine
    try:
        return importlib.import_module(MODULES[name])
    except ImportError:
        raise ConfigError(f"output.loggers: {name} is not installed: {EXTRA}") from None


def flatten(value: Any, prefix: str = "") -> dict[str, str]:
    """A nested config as `a.b.c` keys with string values."""
    if isinstance(value, dict):
        out: dict[str, str] = {}
        for key, sub in value.items():
            out.update(flatten(sub, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): str(value)}


def _scalars(row: dict[str, Any], validation: bool) -> dict[str, float]:
    """The numeric columns of a row: for a validation its val_* ones and images_per_s, else the epoch's."""
    return {
        key: float(value) for key, value in row.items()
        if key != "step" and (key.startswith("val_") or key == "images_per_s") == validation
        and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    }  # fmt: skip


class TensorBoardLogger(Callback):
    """Event files in RUN/tensorboard: the metrics rows as scalars, the config as text. A resume appends."""

    def __init__(self, cfg: Config, run_dir: Path):
        self.cfg = cfg
        self.logdir = Path(run_dir) / "tensorboard"
        self.writer = None

    def on_train_start(self, trainer: Trainer) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step hides what a run broken off after its last checkpoint logged past that step
        self.writer = SummaryWriter(str(self.logdir), purge_step=trainer.step + 1 if trainer.step else None)
        text = yaml.safe_dump(config_to_dict(self.cfg), sort_keys=False)
        self.writer.add_text("config", "    " + text.replace("\n", "\n    "), trainer.step)

    def _log(self, trainer: Trainer, row: dict[str, Any], validation: bool) -> None:
        for key, value in _scalars(row, validation).items():
            self.writer.add_scalar(key, value, trainer.step)
        self.writer.flush()

    def on_epoch_end(self, trainer: Trainer, row: dict[str, Any]) -> None:
        self._log(trainer, row, validation=False)

    def on_validation(self, trainer: Trainer, row: dict[str, Any]) -> None:
        self._log(trainer, row, validation=True)

    def on_train_end(self, trainer: Trainer) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class MLflowLogger(Callback):
    """One MLflow run per run folder: the flattened config as params, the metrics rows per step, the run
    folder's config.yaml and metrics.csv as artifacts and the best checkpoint's path as a tag.

    The tracking URI is `output.mlflow_uri`, else a SQLite store in RUN/mlruns (artifacts beside it); the
    experiment is the run folder's name. The run id is kept in RUN/mlflow_run_id, so a resume continues
    the same MLflow run.
    """

    def __init__(self, cfg: Config, run_dir: Path):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.local = cfg.output.mlflow_uri is None
        store = self.run_dir / "mlruns"
        self.uri = f"sqlite:///{store / 'mlflow.db'}" if self.local else cfg.output.mlflow_uri
        self.artifacts = (store / "artifacts").as_uri() if self.local else None
        self.client = None
        self.run_id: str | None = None
        self.best: Path | None = None

    def on_train_start(self, trainer: Trainer) -> None:
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        for name in ("mlflow.store.db.utils", "alembic"):  # schema set-up chatter on a new store
            logging.getLogger(name).setLevel(logging.WARNING)
        if self.local:
            (self.run_dir / "mlruns").mkdir(parents=True, exist_ok=True)
        try:
            self.client = MlflowClient(tracking_uri=self.uri)
            self.run_id = self._resume() or self._create()
        except MlflowException as err:
            raise SegError(f"mlflow at {self.uri}: {_first_line(err.message)}") from None

    def _resume(self) -> str | None:
        from mlflow.exceptions import MlflowException

        path = self.run_dir / RUN_ID_FILE
        if not path.is_file():
            return None
        run_id = path.read_text().strip()
        try:
            self.client.get_run(run_id)
        except MlflowException:
            return None  # not in this store: start a new run
        self.client.update_run(run_id, status="RUNNING")
        return run_id

    def _create(self) -> str:
        from mlflow.entities import Param

        name = self.run_dir.name
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            experiment_id = self.client.create_experiment(name, artifact_location=self.artifacts)
        else:
            experiment_id = experiment.experiment_id
        run_id = self.client.create_run(experiment_id, run_name=name).info.run_id
        params = [Param(key, value[:6000]) for key, value in flatten(config_to_dict(self.cfg)).items()]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 params a batch
            self.client.log_batch(run_id, params=params[start : start + 100])
        with atomic_path(self.run_dir / RUN_ID_FILE) as tmp:
            tmp.write_text(run_id + "\n")
        return run_id

    def _log(self, trainer: Trainer, row: dict[str, Any], validation: bool) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(_metric_name(k), v, now, trainer.step) for k, v in _scalars(row, validation).items()]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def on_epoch_end(self, trainer: Trainer, row: dict[str, Any]) -> None:
        self._log(trainer, row, validation=False)

    def on_validation(self, trainer: Trainer, row: dict[str, Any]) -> None:
        self._log(trainer, row, validation=True)

    def on_checkpoint(self, trainer: Trainer, path: Path, best: bool) -> None:
        if best:
            self.best = Path(path)

    def on_train_end(self, trainer: Trainer) -> None:
        if self.client is None:
            return
        for name in ("config.yaml", "metrics.csv"):
            if (self.run_dir / name).is_file():
                self.client.log_artifact(self.run_id, str(self.run_dir / name))
        best = self.best or self.run_dir / "checkpoints" / "best.pt"
        if best.is_file():
            self.client.set_tag(self.run_id, "best_checkpoint", str(best))
        self.client.set_terminated(self.run_id, "FINISHED")
        self.client = None


def _metric_name(key: str) -> str:
    """MLflow's allowed characters (a class name may hold others)."""
    return re.sub(r"[^\w\-. :/]", "_", key)


def _first_line(text: str) -> str:
    return (str(text).strip().splitlines() or ["failed"])[0]

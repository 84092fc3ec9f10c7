"""`output.loggers`: real `seg train` runs read back with TensorBoard's and MLflow's own readers."""

import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import em_crops
from helpers import seg, seg_quick, write_config


@pytest.fixture(scope="module")
def em_folder(tmp_path_factory):
    """Eight 96x128 crops of real ISBI slices with their 0/255 membrane masks."""
    return em_crops(tmp_path_factory.mktemp("em"), 8, slice(100, 196), slice(50, 178))


def with_loggers(path: Path, loggers: list[str]) -> Path:
    raw = yaml.safe_load(path.read_text())
    raw["output"]["loggers"] = loggers
    path.write_text(yaml.safe_dump(raw))
    return path


def scalars(run: Path) -> dict[str, list[int]]:
    """The steps of each TensorBoard scalar in the run folder (all its event files)."""
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    return {tag: [event.step for event in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def mlflow_run(run: Path):
    client = MlflowClient(tracking_uri=f"sqlite:///{run / 'mlruns' / 'mlflow.db'}")
    return client, client.get_run((run / "mlflow_run_id").read_text().strip())


def test_train_logs_every_epoch_to_tensorboard_and_mlflow_and_a_resume_continues_both(em_folder, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", em_folder, tmp_path / "run", epochs=2)
    cfg = with_loggers(cfg, ["tensorboard", "mlflow"])
    r = seg("train", cfg)
    assert r.returncode == 0, r.stderr
    run = tmp_path / "run"
    assert (run / "metrics.csv").is_file()
    client, found = mlflow_run(run)
    assert found.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(found.info.run_id, "train_loss")] == [2, 4]
    first = (run / "mlflow_run_id").read_text()

    r = seg("train", cfg, "--resume", "--set", "train.epochs=3")
    assert r.returncode == 0, r.stderr
    steps = scalars(run)  # 3 epochs of 2 steps, in two event files
    for tag in ("train_loss", "lr", "images_per_s", "val_loss", "val_miou", "val_iou_membrane"):
        assert steps[tag] == [2, 4, 6], tag
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 2

    assert (run / "mlflow_run_id").read_text() == first
    client, found = mlflow_run(run)
    assert found.info.status == "FINISHED"
    assert len(client.search_runs([found.info.experiment_id])) == 1
    assert client.get_experiment(found.info.experiment_id).name == "run"
    params = found.data.params  # as the run started
    assert params["train.epochs"] == "2" and params["model.encoder"] == "resnet18"
    assert params["data.root"] == str(em_folder)
    for key in ("train_loss", "val_miou"):
        history = client.get_metric_history(found.info.run_id, key)
        assert [m.step for m in history] == [2, 4, 6], key
    assert all(0 <= m.value <= 1 for m in history)
    assert found.data.tags["best_checkpoint"] == str(run / "checkpoints" / "best.pt")
    assert {a.path for a in client.list_artifacts(found.info.run_id)} >= {"config.yaml", "metrics.csv"}


@pytest.mark.parametrize("logger, module", [("tensorboard", "torch.utils.tensorboard"), ("mlflow", "mlflow")])
def test_a_missing_library_is_one_line_naming_the_extra_before_training(
    em_folder, tmp_path, monkeypatch, logger, module
):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now fails
    cfg = with_loggers(write_config(tmp_path / "c.yaml", em_folder, tmp_path / "run"), [logger])
    r = seg_quick("train", cfg)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()  # after the data check's line
    assert lines[-1] == f"error: output.loggers: {logger} is not installed: pip install 'seg[loggers]'"
    assert "Traceback" not in r.stderr and sum(line.startswith("error:") for line in lines) == 1
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_an_unknown_logger_is_a_config_error(em_folder, tmp_path):
    cfg = with_loggers(write_config(tmp_path / "c.yaml", em_folder, tmp_path / "run"), ["wandb"])
    r = seg_quick("train", cfg)
    assert r.returncode == 2 and "output.loggers.0:" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1

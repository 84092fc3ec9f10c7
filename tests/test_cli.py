import subprocess
import sys

import pytest
from typer.testing import CliRunner

from seg.cli import app

from conftest import ROOT

runner = CliRunner()


def test_help_lists_every_command():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("train", "eval", "export", "predict", "serve", "models"):
        assert command in result.stdout


def test_models_prints_parameters_and_macs():
    result = runner.invoke(app, ["models", "--arch", "refinenet_lw", "--encoder", "resnet50", "--size", "468x625"])
    assert result.exit_code == 0, result.stderr
    row = next(line for line in result.stdout.splitlines() if "resnet50" in line)
    assert "27.4" in row  # parameters (M), as the Light-Weight RefineNet paper's 27M


def test_models_rejects_a_bad_size():
    result = runner.invoke(app, ["models", "--size", "big"])
    assert result.exit_code == 2 and "HEIGHTxWIDTH" in result.stderr


@pytest.mark.parametrize("command", [["train", "configs/unet_isbi2012.yaml"], ["models"]])
def test_training_commands_without_torch_name_the_extra(command):
    code = f"import sys; sys.modules['torch'] = None; sys.argv = ['seg', *{command!r}]; from seg.cli import app; app()"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "pip install 'seg[train]'" in done.stderr and "Traceback" not in done.stderr

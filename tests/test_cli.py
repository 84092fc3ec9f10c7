import re
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from seg.cli import app

from conftest import ROOT

runner = CliRunner()


COMMANDS = ["train", "plan", "eval", "export", "predict", "merge-summaries", "serve", "models", "data"]


def test_help_lists_every_command():
    """The help's command panel names exactly these commands, in this order (a removed or renamed command
    fails here, whatever the help sentences say)."""
    result = runner.invoke(app, ["--help"], terminal_width=120)
    assert result.exit_code == 0
    panel = result.stdout.split("Commands", 1)[1]
    listed = [m.group(1) for m in re.finditer(r"^│ ([a-z][a-z-]*)\s", panel, re.M)]
    assert listed == COMMANDS
    for name in COMMANDS[:-1]:
        assert runner.invoke(app, [name, "--help"]).exit_code == 0


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

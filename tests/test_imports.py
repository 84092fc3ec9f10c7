"""The layout: `seg` predicts and serves without torch; only its model zoo (`seg.models`) needs it."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Every module under seg/ but the model zoo, imported with torch made unimportable.
IMPORT_ALL = """
import importlib, json, sys
from pathlib import Path

import pytest
sys.modules["torch"] = None
root = Path("seg")
names = []
for path in sorted(root.rglob("*.py")):
    parts = path.with_suffix("").parts
    if parts[:2] == ("seg", "models"):
        continue
    name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    importlib.import_module(name)
    names.append(name)
print(json.dumps(names))
"""


def test_every_seg_module_but_the_model_zoo_imports_without_torch():
    result = subprocess.run([sys.executable, "-c", IMPORT_ALL], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    names = json.loads(result.stdout)
    assert {"seg.data.samples", "seg.jobs.batch", "seg.inference.predictor", "seg.jobs.progress", "seg.cli", "seg.config"} <= set(names)


def test_torch_made_unimportable_is_seen():
    """The check above would notice a torch import: the model zoo fails under it."""
    code = 'import sys; sys.modules["torch"] = None; import seg.models'
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "torch" in result.stderr


LINT_IMPORTS = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"]


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([*LINT_IMPORTS, "--no-cache"], cwd=root, env=env, capture_output=True, text=True, timeout=300)


def test_the_floor_plan_holds():
    """pyproject.toml's import contracts: seg's rooms in layers, no cycles, only the CLI reaches training."""
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "5 kept, 0 broken" in result.stdout


@pytest.mark.parametrize("module, line, broken", [
    ("seg/jobs/job.py", "from seg.jobs import batch", "no import cycles"),  # batch imports job
    ("seg/io/tiff.py", "import seg.inference.tiling", "seg/: cli > jobs"),  # I/O reaching up to inference
    ("seg/inference/predictor.py", "import torch", "import no torch"),
    ("seg/config.py", "import training.plan", "only the CLI imports them"),
])
def test_a_planted_import_breaks_the_floor_plan(tmp_path, module, line, broken):
    for folder in ("seg", "training", "serving"):
        shutil.copytree(ROOT / folder, tmp_path / folder, ignore=shutil.ignore_patterns("*.onnx", "__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    path = tmp_path / module
    path.write_text(path.read_text() + f"\n{line}  # planted\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0
    broken_lines = [l for l in result.stdout.splitlines() if l.rstrip().endswith("BROKEN")]
    assert any(broken in l for l in broken_lines), result.stdout[-3000:]


def test_the_public_names_import_from_the_top():
    code = "from seg import Predictor, SegError, TilingOptions, build_model; print(TilingOptions(tile=256).tile)"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "256", result.stderr

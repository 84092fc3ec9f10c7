"""The layout: `seg` predicts and serves without torch; only its model zoo (`seg.models`) needs it."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Every module under seg/ but the model zoo, imported with torch made unimportable.
IMPORT_ALL = """
import importlib, json, sys
from pathlib import Path
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
    assert {"seg.data", "seg.batch", "seg.predictor", "seg.progress", "seg.cli", "seg.config"} <= set(names)


def test_torch_made_unimportable_is_seen():
    """The check above would notice a torch import: the model zoo fails under it."""
    code = 'import sys; sys.modules["torch"] = None; import seg.models'
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "torch" in result.stderr

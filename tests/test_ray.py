"""`seg predict --ray`: the same job on Ray Data actors gives the local run's masks byte for byte and its
summary field by field; without Ray, --ray says how to get it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from seg.cli import app
from helpers import em_crops_tree

runner = CliRunner()
TIMING = {"seconds"}


def masks(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.png"))}


def comparable(summary: dict, out: Path) -> dict:
    """The summary without timings, with output paths relative to their folder."""
    def entry(e: dict) -> dict:
        e = {k: v for k, v in e.items() if k not in TIMING}
        e["outputs"] = {k: str(Path(v).relative_to(out)) for k, v in e["outputs"].items()}
        return e

    kept = {k: v for k, v in summary.items() if k not in TIMING | {"images", "earlier"}}
    return {**kept, "images": [entry(e) for e in summary["images"]]}


def test_ray_actors_give_the_local_masks_and_summary(tmp_path, conv_onnx):
    pytest.importorskip("ray")
    inputs = em_crops_tree(tmp_path / "in", 19)
    (inputs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")  # fails in both, without stopping either
    local, distributed = tmp_path / "local", tmp_path / "ray"
    args = ["predict", str(conv_onnx), str(inputs), "--overlay"]
    first = runner.invoke(app, [*args, "--out", str(local)])
    assert first.exit_code == 1  # one image failed
    result = runner.invoke(app, [*args, "--out", str(distributed), "--ray", "--ray-actors", "2", "--threads", "1"])
    assert result.exit_code == 1, result.output
    assert "Ray: 2 actor(s)" in result.output
    assert masks(distributed) == masks(local) and len(masks(local)) == 2 * 19
    a = json.loads((local / "summary.json").read_text())
    b = json.loads((distributed / "summary.json").read_text())
    assert (b["ok"], b["failed"], b["complete"]) == (19, 1, True)
    assert comparable(b, distributed) == comparable(a, local)

    # A rerun skips what is done, with or without Ray (nothing is left to start Ray for).
    again = runner.invoke(app, [*args, "--out", str(distributed), "--ray"])
    summary = json.loads((distributed / "summary.json").read_text())
    assert again.exit_code == 1 and (summary["skipped"], summary["failed"]) == (19, 1)


def test_without_ray_the_flag_says_how_to_get_it(tmp_path, conv_onnx, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails
    inputs = em_crops_tree(tmp_path / "in", 1)
    result = runner.invoke(app, ["predict", str(conv_onnx), str(inputs), "--out", str(tmp_path / "out"), "--ray"])
    assert result.exit_code == 2
    assert "pip install 'seg[distributed]'" in result.output

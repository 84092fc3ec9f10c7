"""`seg predict --num-parts K --part-id I`: deterministic parts whose union is one whole run, and
`seg merge-summaries` joining their summaries."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from seg.cli import app

from helpers import em_crops_tree

runner = CliRunner()


def outputs(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.png"))}


def test_parts_cover_one_whole_run_and_their_summaries_merge(tmp_path, conv_onnx):
    inputs = em_crops_tree(tmp_path / "in", 7)
    whole = tmp_path / "whole"
    assert runner.invoke(app, ["predict", str(conv_onnx), str(inputs), "--out", str(whole)]).exit_code == 0
    parts = tmp_path / "parts"
    seen: list[set[str]] = []
    for part in range(3):
        before = set(outputs(parts))
        result = runner.invoke(app, ["predict", str(conv_onnx), str(inputs), "--out", str(parts),
                                     "--num-parts", "3", "--part-id", str(part)])  # fmt: skip
        assert result.exit_code == 0, result.output
        seen.append(set(outputs(parts)) - before)
        assert json.loads((parts / f"summary.part-{part}-of-3.json").read_text())["part"] == [part, 3]
    assert not (parts / "summary.json").exists()
    assert [len(s) for s in seen] == [3, 2, 2]  # every third input, from the part's own
    assert set.union(*seen) == set(outputs(whole)) and sum(map(len, seen)) == 7  # no overlap, nothing left out
    assert outputs(parts) == outputs(whole)  # the same bytes

    result = runner.invoke(app, ["merge-summaries", str(parts)])
    assert result.exit_code == 0, result.output
    merged = json.loads((parts / "summary.json").read_text())
    one = json.loads((whole / "summary.json").read_text())
    assert (merged["ok"], merged["failed"], merged["complete"], merged["parts"]) == (7, 0, True, 3)
    drop = {"seconds", "outputs", "input"}
    strip = lambda entries, root: [{**{k: v for k, v in e.items() if k not in drop},  # noqa: E731
                                    "mask": str(Path(e["outputs"]["mask"]).relative_to(root))} for e in entries]
    assert strip(merged["images"], parts) == strip(sorted(one["images"], key=lambda e: e["input"]), whole)
    assert {k: merged[k] for k in ("model_sha256", "tile", "overlap", "tta", "format")} == {
        k: one[k] for k in ("model_sha256", "tile", "overlap", "tta", "format")}

    # A rerun of one part skips its finished images, as a whole run does.
    result = runner.invoke(app, ["predict", str(conv_onnx), str(inputs), "--out", str(parts), "--num-parts", "3", "--part-id", "1"])
    assert json.loads((parts / "summary.part-1-of-3.json").read_text())["skipped"] == 2


def test_a_missing_part_leaves_the_merge_incomplete_and_bad_ids_exit_2(tmp_path, conv_onnx):
    inputs = em_crops_tree(tmp_path / "in", 4)
    out = tmp_path / "out"
    runner.invoke(app, ["predict", str(conv_onnx), str(inputs), "--out", str(out), "--num-parts", "2", "--part-id", "0"])
    result = runner.invoke(app, ["merge-summaries", str(out)])
    assert result.exit_code == 1 and "INCOMPLETE" in result.output
    assert json.loads((out / "summary.json").read_text())["complete"] is False
    result = runner.invoke(app, ["predict", str(conv_onnx), str(inputs), "--out", str(out), "--num-parts", "2", "--part-id", "2"])
    assert result.exit_code == 2 and "--part-id 2" in result.output
    result = runner.invoke(app, ["merge-summaries", str(tmp_path / "in")])
    assert result.exit_code == 2 and "no summary.part" in result.output

"""`seg predict`'s outputs stay under --out (globs with `..`, symbolic links), record what made them, are
predicted again when that changes, and summary.json keeps up with a run that is killed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from typer.testing import CliRunner

from seg.cli import app
from seg.io.images import read_mask

from conftest import EM_IMAGES, SAMPLES
from helpers import seg_killed_while_writing

runner = CliRunner()


def predict(*args: str | Path) -> tuple[int, str]:
    result = runner.invoke(app, ["predict", *map(str, args)])
    return result.exit_code, result.output


def summary_of(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def by_name(summary: dict) -> dict[str, dict]:
    return {Path(e["input"]).name: e for e in summary["images"]}


def snapshot(root: Path) -> dict[str, tuple]:
    """Every file, folder and link under `root` (links not followed), with what would show a write."""
    seen = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            st = os.lstat(path)
            if os.path.islink(path):
                seen[path] = ("link", os.readlink(path))
            elif os.path.isdir(path):
                seen[path] = ("dir",)
            else:
                seen[path] = ("file", st.st_size, st.st_mtime_ns, st.st_ino)
    return seen


def changed_outside(before: dict, after: dict, out: Path) -> list[str]:
    """Paths added, changed or removed anywhere under the snapshot's root but not (lexically) under `out`."""
    touched = {p for p in before.keys() | after.keys() if before.get(p) != after.get(p)}
    return sorted(p for p in touched if not Path(p).is_relative_to(out))


def mtimes(out: Path, *names: str) -> list[int]:
    return [(out / name).stat().st_mtime_ns for name in names]


# ---- outputs stay under --out


@pytest.fixture
def tree(tmp_path) -> Path:
    """work/in/a.png, work/in/sub/b.png, work/x/c.png, work/top.png and tmp/up.png: real EM slices."""
    work = tmp_path / "work"
    (work / "in" / "sub").mkdir(parents=True)
    (work / "x").mkdir()
    shutil.copy(SAMPLES / "isbi_test_00.png", work / "in" / "a.png")
    shutil.copy(SAMPLES / "isbi_test_01.png", work / "in" / "sub" / "b.png")
    shutil.copy(SAMPLES / "isbi_test_02.png", work / "x" / "c.png")
    shutil.copy(EM_IMAGES / "00.png", work / "top.png")
    shutil.copy(EM_IMAGES / "01.png", tmp_path / "up.png")
    return work


def test_globs_with_dotdot_write_only_under_out(conv_onnx, tree, tmp_path):
    out = tree / "runs" / "out"
    out.parent.mkdir()
    patterns = [
        tree / "in" / "sub" / ".." / ".." / "x" / "*.png",  # .. before the wildcard: the glob's folder
        tree / "in" / "*" / ".." / ".." / "*.png",  # .. after it: in/sub/../../top.png
        tree / "in" / "**" / ".." / ".." / "*.png",  # ** over a tree, then up: in/../../up.png
        tree / "in" / "**" / "*.png",
    ]
    before = snapshot(tmp_path)

    code, output = predict(conv_onnx, *patterns, "--out", out)

    assert code == 0, output
    assert changed_outside(before, snapshot(tmp_path), out) == []
    summary = summary_of(out)
    assert summary["ok"] == 5 and summary["failed"] == 0
    for entry in summary["images"]:
        mask = Path(entry["outputs"]["mask"])
        assert mask.resolve().is_relative_to(out.resolve()) and read_mask(mask).shape == (512, 512)
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert written == ["a.png", "c.png", "sub/b.png", "summary.json", "top.png", "up.png"]


def test_relative_globs_climbing_out_of_the_working_folder(conv_onnx, tree, tmp_path):
    """The same from the input folder as working directory, as a shell user types it."""
    out = tree / "out"
    before = snapshot(tmp_path)
    cmd = [sys.executable, "-m", "seg.cli", "predict", str(conv_onnx), "*/../../*.png", "../x/*.png", "--out", "../out"]
    env = {**os.environ, "CI": "1"}
    result = subprocess.run(cmd, cwd=tree / "in", capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    assert changed_outside(before, snapshot(tmp_path), out) == []
    assert sorted(p.name for p in out.glob("*.png")) == ["c.png", "top.png"]


def test_symlinked_inputs_and_folders_write_only_under_out(conv_onnx, tree, tmp_path):
    """Links in the input folder to files and folders outside it: outputs by the link's place, under --out."""
    inputs = tree / "in"
    (inputs / "linked").symlink_to(tree / "x", target_is_directory=True)
    (inputs / "top.png").symlink_to(tree / "top.png")
    (inputs / "up.png").symlink_to(Path("..") / ".." / "up.png")
    out = tree / "out"
    before = snapshot(tmp_path)

    code, output = predict(conv_onnx, inputs, inputs / "linked" / "*.png", "--out", out)

    assert code == 0, output
    assert changed_outside(before, snapshot(tmp_path), out) == []
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert written == ["a.png", "c.png", "sub/b.png", "summary.json", "top.png", "up.png"]


def test_links_under_out_that_lead_outside_are_refused_per_image(conv_onnx, tree, tmp_path):
    """An output folder holding links to elsewhere (a folder, a file): those images fail, nothing outside changes."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "a.png").write_bytes(b"precious")
    out = tree / "out"
    out.mkdir()
    (out / "sub").symlink_to(victim, target_is_directory=True)
    (out / "a.png").symlink_to(victim / "a.png")
    (tree / "in" / "c.png").symlink_to(tree / "x" / "c.png")
    before = snapshot(tmp_path)

    code, output = predict(conv_onnx, tree / "in", "--out", out)

    assert code == 1
    assert changed_outside(before, snapshot(tmp_path), out) == []
    assert (victim / "a.png").read_bytes() == b"precious" and sorted(os.listdir(victim)) == ["a.png"]
    summary = summary_of(out)
    entries = by_name(summary)
    assert (summary["ok"], summary["failed"]) == (1, 2) and entries["c.png"]["status"] == "ok"
    for name in ("a.png", "b.png"):
        error = entries[name]["error"]
        assert entries[name]["status"] == "failed" and name in error and "outside --out" in error
        assert "\n" not in error
    assert "outside --out" in output and "2 failed" in output


# ---- what made each output


@pytest.fixture
def two_images(tmp_path) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(SAMPLES / "isbi_test_00.png", folder / "a.png")
    shutil.copy(SAMPLES / "isbi_test_01.png", folder / "b.png")
    return folder


def test_rerun_skips_only_outputs_made_the_same_way(conv_onnx, conv_onnx_factory, two_images, tmp_path):
    out = tmp_path / "out"
    assert predict(conv_onnx, two_images, "--out", out)[0] == 0
    first = summary_of(out)
    record = by_name(first)["a.png"]["made_with"]
    assert record["model_sha256"] == first["model_sha256"] and len(record["model_sha256"]) == 64
    settings = (record["tile"], record["overlap"], record["tta"], record["blend"], record["format"])
    assert settings == (256, 0.25, "none", "gaussian", "png")
    stamps = mtimes(out, "a.png", "b.png")

    def rerun(*options, model=conv_onnx) -> tuple[dict, str]:
        code, output = predict(model, two_images, "--out", out, *options)
        assert code == 0, output
        return summary_of(out), output

    # Same settings (the batch size changes no mask; the same model file under another name is the same model).
    copy = shutil.copy(conv_onnx, tmp_path / "renamed.onnx")
    for options, model in [((), conv_onnx), (("--batch-size", "1"), conv_onnx), ((), copy)]:
        summary, output = rerun(*options, model=model)
        assert summary["skipped"] == 2, options
        assert "predicting them again" not in output
        assert mtimes(out, "a.png", "b.png") == stamps

    # Other tile, overlap, TTA or model: predicted again, and recorded.
    other_model = conv_onnx_factory(tile_size=256)  # same network, another file (its name differs inside)
    for options, model, key, value in [
        (("--tile", "128"), conv_onnx, "tile", 128),
        (("--tile", "128", "--overlap", "0.5"), conv_onnx, "overlap", 0.5),
        (("--tile", "128", "--overlap", "0.5", "--tta", "flips"), conv_onnx, "tta", "flips"),
        (("--tile", "128", "--overlap", "0.5", "--tta", "d4"), conv_onnx, "tta", "d4"),
        (("--tile", "128", "--overlap", "0.5", "--tta", "d4"), other_model, "model_sha256", summary_of(out)["model_sha256"]),
    ]:
        summary, output = rerun(*options, model=model)
        assert summary["ok"] == 2 and summary["skipped"] == 0, options
        assert "2 image(s) have outputs made with other settings" in output
        now = mtimes(out, "a.png", "b.png")
        assert all(a != b for a, b in zip(now, stamps)), options
        stamps = now
        recorded = by_name(summary)["a.png"]["made_with"][key]
        assert recorded != value if key == "model_sha256" else recorded == value
        # ... and the same settings again are skipped.
        summary, _ = rerun(*options, model=model)
        assert summary["skipped"] == 2 and mtimes(out, "a.png", "b.png") == stamps


def test_outputs_without_a_record_are_predicted_again(conv_onnx, two_images, tmp_path):
    out = tmp_path / "out"
    assert predict(conv_onnx, two_images, "--out", out)[0] == 0
    stamps = mtimes(out, "a.png", "b.png")
    (out / "summary.json").unlink()

    code, output = predict(conv_onnx, two_images, "--out", out)

    assert code == 0, output
    assert summary_of(out)["ok"] == 2 and "not recorded in" in output
    assert all(a != b for a, b in zip(mtimes(out, "a.png", "b.png"), stamps))


def test_a_replaced_input_is_predicted_again(conv_onnx, two_images, tmp_path):
    out = tmp_path / "out"
    assert predict(conv_onnx, two_images, "--out", out)[0] == 0
    before = read_mask(out / "a.png")
    shutil.copy(SAMPLES / "isbi_test_02.png", two_images / "a.png")  # same name and size, other slice

    code, output = predict(conv_onnx, two_images, "--out", out)

    entries = by_name(summary_of(out))
    assert code == 0 and entries["a.png"]["status"] == "ok" and entries["b.png"]["status"] == "skipped"
    assert not np.array_equal(read_mask(out / "a.png"), before)


def test_an_extra_output_made_with_other_settings_is_not_kept(conv_onnx, two_images, tmp_path):
    """An overlay from a --tile 128 run, a mask redone at the model's tile without it: asking for the overlay again
    predicts anew rather than keeping the old overlay beside the new mask."""
    out = tmp_path / "out"
    assert predict(conv_onnx, two_images, "--out", out, "--overlay", "--tile", "128")[0] == 0
    assert predict(conv_onnx, two_images, "--out", out)[0] == 0
    overlay = mtimes(out, "a.overlay.png")

    code, output = predict(conv_onnx, two_images, "--out", out, "--overlay")

    assert code == 0 and summary_of(out)["ok"] == 2
    assert mtimes(out, "a.overlay.png") != overlay


def test_subset_runs_keep_the_records_of_other_images(conv_onnx, two_images, tmp_path):
    out = tmp_path / "out"
    assert predict(conv_onnx, two_images, "--out", out)[0] == 0
    stamps = mtimes(out, "a.png", "b.png")
    assert predict(conv_onnx, two_images / "a.png", "--out", out)[0] == 0
    summary = summary_of(out)
    assert [Path(e["input"]).name for e in summary["earlier"]] == ["b.png"]

    code, output = predict(conv_onnx, two_images, "--out", out)

    assert code == 0 and summary_of(out)["skipped"] == 2 and summary_of(out)["earlier"] == []
    assert mtimes(out, "a.png", "b.png") == stamps


# ---- summary.json as images finish


def test_killed_run_keeps_its_finished_images_in_the_summary(conv_onnx, tmp_path):
    """SIGKILL `seg predict` once its second image is being written: summary.json lists the first, and a rerun
    skips it and predicts the rest."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "in"
    folder.mkdir()
    names = [f"img{i}" for i in range(4)]
    for name in names:
        tifffile.imwrite(folder / f"{name}.tif", rng.integers(0, 256, (4000, 1500), dtype=np.uint8), rowsperstrip=64)
    out = tmp_path / "out"
    code = seg_killed_while_writing(".img1.", "predict", conv_onnx, folder, "--out", out, "--format", "tif")
    assert code == -signal.SIGKILL
    assert (out / "img0.tif").is_file() and not (out / "img1.tif").exists() and not (out / "img3.tif").exists()

    summary = summary_of(out)

    assert summary["complete"] is False
    entries = by_name(summary)
    assert entries["img0.tif"]["status"] == "ok" and "img3.tif" not in entries
    for entry in summary["images"]:  # whatever it lists is finished
        assert tifffile.imread(entry["outputs"]["mask"]).shape == (4000, 1500)
    stamp = mtimes(out, "img0.tif")

    code, output = predict(conv_onnx, folder, "--out", out, "--format", "tif")

    assert code == 0, output
    summary = summary_of(out)
    assert summary["complete"] is True and by_name(summary)["img0.tif"]["status"] == "skipped"
    assert summary["skipped"] == len(entries) and summary["ok"] == 4 - len(entries)
    assert mtimes(out, "img0.tif") == stamp

"""bench/accuracy.py's and bench/architectures.py's parts: the generated data sets, the bare smp loop on the
real sets' file types, the template as a user edits it, equal steps for `seg train`, the architecture table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import accuracy  # noqa: E402
import make_data  # noqa: E402


def read(folder: Path) -> list[np.ndarray]:
    return [np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))]


@pytest.mark.parametrize("kind, values", [("blobs", {0, 1, 2}), ("scene", {0, 1, 2, 3, 4, 5, 255})])
def test_generated_sets_are_deterministic_and_labelled(tmp_path, kind, values):
    for name in ("a", "b"):
        make_data.make_generated(tmp_path / name, kind, train=3, test=1, size=128)
    a, b = read(tmp_path / "a" / "train" / "images"), read(tmp_path / "b" / "train" / "images")
    assert len(a) == 3 and all(x.shape == (128, 128, 3) and np.array_equal(x, y) for x, y in zip(a, b))
    masks = read(tmp_path / "a" / "train" / "masks") + read(tmp_path / "a" / "test" / "masks")
    found = set(np.unique(np.concatenate([m.ravel() for m in masks])).tolist())
    assert found <= values and len(found) >= 3
    assert (255 in found) == (kind == "scene")


def test_bare_loop_trains_and_scores_the_test_images(tmp_path):
    make_data.make_generated(tmp_path, "blobs", train=4, test=2, size=96)
    out = tmp_path / "bare.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bare_loop.py"), str(tmp_path / "train"), str(tmp_path / "test"),
         "--classes", "3", "--steps", "2", "--encoder", "resnet18", "--crop", "64", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["steps"] == 2 and np.isfinite(result["loss"])
    assert result["pixels"] == 2 * 96 * 96 and 0 <= result["miou"] <= 1


def test_bare_loop_reads_16_bit_tiff_and_binary_masks(tmp_path):
    """The real sets' files: 16-bit TIFF images (scaled by each image's maximum) and 0/255 PNG masks,
    read as classes 0 and 1."""
    import tifffile

    isbi = ROOT / "data" / "isbi2012" / "train"
    for split, ids in (("train", range(3)), ("test", range(3, 5))):
        (tmp_path / split / "images").mkdir(parents=True)
        (tmp_path / split / "masks").mkdir()
        for i in ids:
            image = np.asarray(Image.open(isbi / "images" / f"{i:02d}.png"))[:96, :128].astype(np.uint16) * 4 + 900
            tifffile.imwrite(tmp_path / split / "images" / f"s{i}.tif", image)
            Image.open(isbi / "labels" / f"{i:02d}.png").crop((0, 0, 128, 96)).save(tmp_path / split / "masks" / f"s{i}.png")
    out = tmp_path / "bare.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bare_loop.py"), str(tmp_path / "train"), str(tmp_path / "test"),
         "--classes", "2", "--in-channels", "1", "--steps", "2", "--encoder", "resnet18", "--crop", "64",
         "--seed", "3", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["seed"] == 3 and result["pixels"] == 2 * 96 * 128  # no pixel read as the ignore index
    assert len(result["iou"]) == 2


@pytest.mark.parametrize("steps", [4, 100])
def test_seg_train_gets_the_template_with_the_users_lines_and_the_steps(tmp_path, monkeypatch, steps):
    make_data.make_isbi(tmp_path / "lucchi_pp")  # a set laid out as the real ones: train/ and test/
    monkeypatch.setattr(accuracy, "DATA", tmp_path)
    config = accuracy.template_config(tmp_path, "lucchi_pp", tmp_path / "run")
    written = yaml.safe_load(config.read_text())
    template = yaml.safe_load(accuracy.TEMPLATE.read_text())
    assert written["data"].pop("root") == str(tmp_path / "lucchi_pp" / "train")
    assert written["data"].pop("classes") == ["background", "mitochondrion"]
    assert written["data"].pop("in_channels") == 1 and written["output"].pop("dir") == str(tmp_path / "run")
    for key in ("root", "classes", "in_channels"):
        template["data"].pop(key)
    template["output"].pop("dir")
    assert written == template
    assert accuracy.step_overrides(steps)[-1] == f"train.steps={steps}"
    from seg.config import load_config

    cfg = load_config(config, accuracy.step_overrides(steps))
    assert cfg.train.steps == steps and cfg.train.time_limit_minutes is None


def test_architecture_table_takes_the_unet_from_the_template_rows_and_gives_mean_and_spread(tmp_path):
    import architectures

    def template_row(name, seed, iou, minutes=None):
        return {"set": name, "seed": seed, "steps": 100, "minutes": minutes,
                "seg": {"train_seconds": 1000.0, "iou": iou}, "bare": {"iou": 0.0}}  # fmt: skip

    baseline = tmp_path / "accuracy.json"
    baseline.write_text(json.dumps([template_row("horses", 0, 0.6), template_row("horses", 1, 0.7),
                                    template_row("horses", 0, 0.1, minutes=15), template_row("ph2", 0, 0.5),
                                    {**template_row("ph2", 1, 0.2), "superseded": "an older template"}]))  # fmt: skip
    unet = architectures.unet_rows(baseline, ["horses"], [0, 1], 100)
    assert [(r["arch"], r["seed"], r["iou"]) for r in unet] == [("unet", 0, 0.6), ("unet", 1, 0.7)]
    trained_here = [{"set": "horses", "seed": 0, "arch": "unet", "steps": 100, "iou": 0.65}]
    assert architectures.unet_rows(baseline, ["ph2"], [1], 100) == []  # not today's template
    assert architectures.unet_rows(baseline, ["horses", "ph2"], [0], 100, trained_here) == [
        {"set": "ph2", "seed": 0, "arch": "unet", "steps": 100, "train_seconds": 1000.0, "iou": 0.5}]  # horses' own U-Net stands
    rows = unet + [{"set": "horses", "seed": s, "arch": "refinenet_lw", "steps": 100, "train_seconds": 2000.0,
                    "iou": iou} for s, iou in ((0, 0.5), (1, 0.6))]  # fmt: skip
    lines = architectures.table(rows, {"horses": {"unet": 1.25, "refinenet_lw": 0.5}, "ph2": {"unet": 9.0}}).splitlines()
    assert lines[2] == "| horses | unet | 2 | 0.650 ± 0.071 | 10.00 | 1.25 |"
    assert lines[3] == "| horses | refinenet_lw | 2 | 0.550 ± 0.071 | 20.00 | 0.50 |"
    rows += [{"set": "horses", "seed": s, "arch": "refinenet", "steps": 100, "train_seconds": t, "iou": 0.4, "loaded": loaded}
             for s, t, loaded in ((0, 9000.0, True), (1, 3000.0, False))]  # fmt: skip
    rows += [{"set": "horses", "seed": 0, "arch": "refinenet", "steps": 100, "train_seconds": 4000.0, "iou": 0.4, "loaded": True}]
    lines = architectures.table(rows, {}).splitlines()
    assert lines[3].split(" | ")[4] == "30.00"  # the run that had the cores to itself
    only_loaded = [r for r in rows if r["arch"] != "refinenet" or r.get("loaded")]
    assert architectures.table(only_loaded, {}).splitlines()[3].split(" | ")[4] == "65.00 *"
    rows += [{"set": "horses", "seed": 0, "arch": "linknet", "steps": 100, "train_seconds": 1500.0, "iou": 0.3}]
    assert [line.split(" | ")[1] for line in architectures.table(rows, {}).splitlines()[2:]] == [
        "unet", "linknet", "refinenet", "refinenet_lw"]  # skip forms first, in the order of the docs


def test_architectures_bench_refuses_an_unknown_architecture():
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "architectures.py"), "--archs", "linknet,segformer"],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode != 0
    assert "unknown architecture 'segformer'" in done.stderr and "unetplusplus" in done.stderr


def test_accuracy_table_gives_template_only_rows_without_bare_loop_columns():
    def row(seed, iou, bare):
        return {"set": "ph2", "seed": seed, "steps": 150, "minutes": 15.0, "seg": {"train_seconds": 900.0, "iou": iou},
                "bare": {"train_seconds": 450.0, "iou": bare} if bare is not None else None}  # fmt: skip

    def cells(rows):
        return [c.strip() for c in accuracy.table(rows).splitlines()[2].strip("|").split("|")]

    compared = cells([row(0, 0.6, 0.5), row(1, 0.8, 0.7)])
    assert compared[3:10] == ["0.700 ± 0.141", "0.600 ± 0.141", "0.100 ± 0.000", "150", "6.00", "3.00", "2.00x"]
    ablation = cells([row(0, 0.6, None), row(1, 0.8, None)])
    assert ablation[3:10] == ["0.700 ± 0.141", "", "", "150", "6.00", "", ""]


def test_one_tile_bench_runs_both_grids_side_by_side(tmp_path):
    out = tmp_path / "one_tile.json"
    subprocess.run([sys.executable, str(ROOT / "bench" / "one_tile.py"), "--repeats", "1", "--sizes", "512x512,1024x1024",
                    "--json", str(out)], check=True, capture_output=True, timeout=300)  # fmt: skip
    small, control = json.loads(out.read_text())["speed"]
    assert small["tiles"] == [1, 4] and control["tiles"] == [9, 9]  # 1024² and its margin fit no batch of 4
    assert small["agreement"] > 0.98 and control["agreement"] == 1.0
    assert small["one_tile_s"] > 0 and small["tiled_s"] > 0


def test_learning_curves_take_todays_template_and_the_bare_loop_at_each_budget(tmp_path):
    def row(seed, iou, bare, steps=100, minutes=None, extra=(), **more):
        return {"set": "horses", "seed": seed, "steps": steps, "minutes": minutes, "overrides": [
                f"train.seed={seed}", "train.threads=1", *extra], "seg": {"iou": iou},
                "bare": None if bare is None else {"iou": bare}, **more}  # fmt: skip

    rows = [row(0, 0.60, 0.40), row(1, 0.62, None), row(0, 0.70, 0.60, 320, 15.0), row(1, 0.74, 0.62, 316, 15.0),
            row(0, 0.80, None, 640, 30.0), row(1, 0.78, None, 650, 30.0),
            row(0, 0.10, 0.20, 300, 15.0, ["data.kind=em"]), row(1, 0.30, 0.45, superseded="the old default")]
    results = tmp_path / "rows.json"
    results.write_text(json.dumps(rows))
    out = tmp_path / "curves.png"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "curves.py"), "--results", str(results), "--sets", "horses",
                           "--out", str(out)], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[2:] == [
        "| horses | 100 steps | 2 | 100 | 0.610 ± 0.014 | 0.425 ± 0.035 |",  # seed 1's bare loop from the older row
        "| horses | 15 min | 2 | 318 | 0.720 ± 0.028 | 0.610 ± 0.014 |",
        "| horses | 30 min | 2 | 645 | 0.790 ± 0.014 |  |",
    ]
    assert Image.open(out).size[0] > 300

"""Accuracy of `seg train` on the config template against the bare smp loop, on real data sets.

For each set of ../shared/data (lucchi_pp: EM; bbbc039: 16-bit fluorescence TIFF; ph2: RGB dermoscopy
JPEG; horses: RGB photographs JPEG), laid out as NAME/{train,test}/{images,masks}, and each seed:

(i) `seg train` on configs/custom_folder.yaml with only the lines a user edits changed (data.root,
    data.classes, data.in_channels, output.dir) plus train.seed, then `seg eval` of the run on the test
    split (no TTA: the bare loop has none). The template holds out data.val_fraction of the train split
    for validation and picks its checkpoint there, as it does for a user; the test split is never seen.
(ii) bench/bare_loop.py (same encoder, crop, batch and optimiser steps, same seed) on the whole train
    split, scored on the test split by the same metrics code.

Budgets: `--steps N` (both get N optimiser steps) or `--minutes M` (`seg train` gets
train.time_limit_minutes=M; the bare loop then gets the template's step count). Wall times are whole
processes. With --parallel, both run at once on one thread each, so they share the machine's load alike
(with --minutes the bare loop still follows, as it needs the template's step count). Rows are written to
--out as they finish, so a stopped run keeps what it measured.

    python bench/accuracy.py --steps 100 --seeds 0,1 --out bench/accuracy_results.json
    python bench/accuracy.py --minutes 15 --sets lucchi_pp --seeds 0,1
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TEMPLATE = ROOT / "configs" / "custom_folder.yaml"
BIN = Path(sys.executable).parent
DATA = Path(os.environ.get("SEG_REAL_DATA", ROOT.parent / "shared" / "data"))
SETS = {  # the object's name and the image channels; every set is binary (masks 0 / 255)
    "lucchi_pp": ("mitochondrion", 1),
    "bbbc039": ("nucleus", 1),
    "ph2": ("lesion", 3),
    "horses": ("horse", 3),
}
# Published figures, for scale (full-length GPU training, other splits): foreground Jaccard index.
PUBLISHED = {"lucchi_pp": (0.90, "2D U-Net, Casser et al. 2020")}


def template_config(tmp: Path, name: str, run_dir: Path) -> Path:
    """The template with only the lines a user edits changed, written to tmp/RUN.yaml."""
    raw = yaml.safe_load(TEMPLATE.read_text())
    obj, channels = SETS[name]
    raw["data"].update(root=str(DATA / name / "train"), classes=["background", obj], in_channels=channels)
    raw["output"]["dir"] = str(run_dir)
    path = tmp / f"{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def step_overrides(steps: int) -> list[str]:
    """--set overrides that make `seg train` run exactly `steps` optimiser steps (they replace the
    template's time limit and epochs)."""
    return ["train.time_limit_minutes=null", f"train.steps={steps}"]


def start(command: list[str], log: Path, threads: int | None = None) -> tuple[subprocess.Popen, float]:
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    with open(log, "w") as f:
        return subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env), time.perf_counter()


def finish(started: tuple[subprocess.Popen, float], log: Path) -> float:
    """Wait for a process from `start`; its wall seconds."""
    proc, began = started
    if proc.wait():
        tail = log.read_text().strip().splitlines()[-1:] or ["no output"]
        sys.exit(f"error: {' '.join(map(str, proc.args[:2]))} failed (exit {proc.returncode}): {tail[0]}")
    return time.perf_counter() - began


def run(command: list[str], log: Path, threads: int | None = None) -> float:
    return finish(start(command, log, threads), log)


def headline(metrics: dict) -> dict:
    """The object's IoU (Jaccard) and Dice, mIoU, pixel error."""
    return {"iou": metrics["iou"][1], "dice": metrics["dice_per_class"][1], "miou": metrics["miou"],
            "pixel_error": metrics["pixel_error"]}


def steps_done(run_dir: Path) -> int:
    with open(run_dir / "metrics.csv") as f:
        return int(float(list(csv.DictReader(f))[-1]["step"]))


def compare(name: str, seed: int, steps: int | None, minutes: float | None, encoder: str, tmp: Path,
            extra: list[str], parallel: bool = False, bare_loop: bool = True) -> dict:  # fmt: skip
    run_dir = tmp / f"{name}_s{seed}_run"
    config = template_config(tmp, name, run_dir)
    extra = [f"train.seed={seed}", *([f"model.encoder={encoder}"] if encoder != "resnet34" else []), *extra]
    if parallel:
        extra.append("train.threads=1")
    if minutes:
        sets = [*extra, *step_overrides(100000), f"train.time_limit_minutes={minutes}"]
    else:
        sets = [*extra, *step_overrides(steps)]
    threads = 1 if parallel else None
    bare_json = tmp / f"{run_dir.name}_bare.json"
    bare_log = tmp / f"{run_dir.name}_bare.log"

    def bare_cmd(n: int) -> list[str]:
        return [sys.executable, str(ROOT / "bench" / "bare_loop.py"), str(DATA / name / "train"),
                str(DATA / name / "test"), "--classes", "2", "--in-channels", str(SETS[name][1]),
                "--steps", str(n), "--encoder", encoder, "--seed", str(seed), "--out", str(bare_json)]  # fmt: skip

    bare_started = start(bare_cmd(steps), bare_log, threads) if parallel and not minutes else None
    train_cmd = [str(BIN / "seg"), "train", str(config)] + [a for s in sets for a in ("--set", s)]
    seg_train = run(train_cmd, tmp / f"{run_dir.name}_train.log", threads)
    steps = steps_done(run_dir) if minutes else steps
    eval_json = tmp / f"{run_dir.name}_eval.json"
    seg_eval = run([str(BIN / "seg"), "eval", str(run_dir), "--data", str(DATA / name / "test"), "--tta", "none",
                    "--out", str(eval_json)], tmp / f"{run_dir.name}_eval.log", threads)
    ours = json.loads(eval_json.read_text())
    row = {
        "set": name, "seed": seed, "steps": steps, "minutes": minutes, "encoder": encoder, "overrides": sets,
        "parallel": parallel,
        "seg": {"train_seconds": round(seg_train, 1), "s_per_step": round(seg_train / steps, 2),
                "eval_seconds": round(seg_eval, 1), **headline(ours)},
        "bare": None,
    }
    if not bare_loop:
        return row
    bare_wall = finish(bare_started, bare_log) if bare_started else run(bare_cmd(steps), bare_log, threads)
    bare = json.loads(bare_json.read_text())
    bare_train = bare_wall - bare["predict_seconds"]
    row["bare"] = {"train_seconds": round(bare_train, 1), "s_per_step": round(bare_train / steps, 2),
                   "eval_seconds": bare["predict_seconds"], **headline(bare)}
    return row


def spread(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def table(rows: list[dict]) -> str:
    """Per set and budget: mean ± sample standard deviation over seeds of the object's IoU, and time."""
    lines = ["| set | budget | seeds | template IoU | bare loop IoU | template - bare | steps | s/step seg | "
             "s/step bare | time ratio | published |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["set"], r["minutes"] or f"{r['steps']} steps"), []).append(r)
    for (name, budget), group in groups.items():
        seg_iou = [r["seg"]["iou"] for r in group]
        seg_t = sum(r["seg"]["train_seconds"] for r in group)
        steps = sum(r["steps"] for r in group)
        budget = f"{budget} min" if isinstance(budget, (int, float)) else budget
        if any(r["bare"] is None for r in group):  # --template-only: an ablation of the template
            lines.append(f"| {name} | {budget} | {len(group)} | {spread(seg_iou)} | | | {steps / len(group):.0f} | "
                         f"{seg_t / steps:.2f} | | | |")
            continue
        bare_iou = [r["bare"]["iou"] for r in group]
        diff = [a - b for a, b in zip(seg_iou, bare_iou)]
        bare_t = sum(r["bare"]["train_seconds"] for r in group)
        published = PUBLISHED.get(name)
        lines.append(
            f"| {name} | {budget} | {len(group)} | {spread(seg_iou)} | {spread(bare_iou)} | {spread(diff)} | "
            f"{steps / len(group):.0f} | {seg_t / steps:.2f} | {bare_t / steps:.2f} | {seg_t / bare_t:.2f}x | "
            + (f"{published[0]:.2f} ({published[1]})" if published else "") + " |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=int, default=100)
    budget.add_argument("--minutes", type=float, help="a time limit for `seg train` instead of a step count")
    parser.add_argument("--sets", default=",".join(SETS))
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--encoder", default="resnet34")
    parser.add_argument("--set", dest="extra", action="append", default=[],
                        help="an extra override for `seg train` only, e.g. to try a template default")
    parser.add_argument("--parallel", action="store_true",
                        help="run `seg train` and the bare loop at once, one thread each (same load on both)")
    parser.add_argument("--template-only", action="store_true",
                        help="no bare loop: an ablation of the template (with --set), its rows in their own --out")
    parser.add_argument("--keep", type=Path, help="keep the runs and logs in this folder")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    names = args.sets.split(",")
    unknown = [n for n in names if n not in SETS]
    if unknown:
        sys.exit(f"error: --sets: unknown set {unknown[0]!r} (choose from {', '.join(SETS)})")
    missing = [n for n in names if not (DATA / n / "train" / "images").is_dir()]
    if missing:
        sys.exit(f"error: {DATA / missing[0]}: no train/images (set SEG_REAL_DATA to the folder of the sets)")
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = json.loads(args.out.read_text()) if args.out and args.out.exists() else []
    done = {(r["set"], r["seed"], r["minutes"], r["steps"] if not r["minutes"] else None) for r in rows}
    with tempfile.TemporaryDirectory(prefix="seg_accuracy_") as tmp:
        tmp = Path(args.keep or tmp)
        tmp.mkdir(parents=True, exist_ok=True)
        for seed in seeds:  # every set at the first seed before any at the second
            for name in names:
                if (name, seed, args.minutes, None if args.minutes else args.steps) in done:
                    continue
                rows.append(compare(name, seed, args.steps, args.minutes, args.encoder, tmp, args.extra, args.parallel,
                                    bare_loop=not args.template_only))  # fmt: skip
                r = rows[-1]
                bare = f"bare {r['bare']['iou']:.4f} ({r['bare']['s_per_step']} s/step)" if r["bare"] else "no bare loop"
                print(f"{name} seed {seed}: template IoU {r['seg']['iou']:.4f} ({r['seg']['s_per_step']} s/step), {bare}",
                      file=sys.stderr, flush=True)
                if args.out:
                    args.out.write_text(json.dumps(rows, indent=2))
    print(table(rows))


if __name__ == "__main__":
    main()

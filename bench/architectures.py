"""U-Net against the other skip forms (U-Net++, LinkNet, attention-gated U-Net) and the two RefineNets on the
real sets: accuracy, training time per step and prediction speed, side by side.

Every run is `seg train` on configs/custom_folder.yaml edited only where a user edits it (as in
bench/accuracy.py) plus `model.arch`, the seed and the step budget, then `seg eval` on the set's test split
(no TTA). Runs go two at a time on one thread each, so every architecture trains under the same load as
accuracy.py's template and bare loop. The U-Net column is the template's rows of accuracy.py's results
(same config, seeds and steps), unless `--archs unet` trains it here too, beside the others under the same
load; then this file's own U-Net rows stand for that set.

Prediction speed (`--speed`, kept per set): the seed-0 run of each of `--archs` on the first set is exported
(`seg export`) and runs `Predictor` on one 1024 x 1024 image made of that set's test images, fp32, both
cores; the architectures take turns, best of `--repeats`. With `--unet-runs DIR` (accuracy.py's --keep folder) the
U-Net's run is exported too.

    python bench/architectures.py --sets lucchi_pp,horses --seeds 0,1 --out bench/architectures_results.json \
        --speed --unet-runs /tmp/acc_runs
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from accuracy import BIN, DATA, SETS, finish, headline, spread, start, step_overrides, template_config  # noqa: E402
from seg.models import ARCHS as REGISTERED  # noqa: E402

ARCHS = ("refinenet", "refinenet_lw")  # the default --archs
ORDER = tuple(REGISTERED)  # the registry's order: unet first, then the other skip forms, then the RefineNets
SPEED_SIDE = 1024


def launch(name: str, seed: int, arch: str, steps: int, tmp: Path) -> dict:
    """Start `seg train` for one (set, seed, arch) on one thread; returns what `complete` needs."""
    run_dir = tmp / f"{name}_s{seed}_{arch}"
    config = template_config(tmp, name, run_dir)
    sets = [f"model.arch={arch}", f"train.seed={seed}", "train.threads=1", *step_overrides(steps)]
    command = [str(BIN / "seg"), "train", str(config)] + [a for s in sets for a in ("--set", s)]
    log = tmp / f"{run_dir.name}_train.log"
    return {"set": name, "seed": seed, "arch": arch, "steps": steps, "run": run_dir, "log": log,
            "started": start(command, log, threads=1)}  # fmt: skip


def complete(job: dict, tmp: Path) -> dict:
    """Wait for a run, score it on the test split (one thread) and give its row."""
    train_seconds = finish(job["started"], job["log"])
    run_dir, name = job["run"], job["set"]
    eval_json = tmp / f"{run_dir.name}_eval.json"
    command = [str(BIN / "seg"), "eval", str(run_dir), "--data", str(DATA / name / "test"), "--tta", "none",
               "--out", str(eval_json)]  # fmt: skip
    eval_seconds = finish(start(command, tmp / f"{run_dir.name}_eval.log", threads=1), tmp / f"{run_dir.name}_eval.log")
    return {"set": name, "seed": job["seed"], "arch": job["arch"], "steps": job["steps"], "run": str(run_dir),
            "train_seconds": round(train_seconds, 1), "s_per_step": round(train_seconds / job["steps"], 2),
            "eval_seconds": round(eval_seconds, 1), **headline(json.loads(eval_json.read_text()))}  # fmt: skip


def unet_rows(baseline: Path, names: list[str], seeds: list[int], steps: int, rows: list[dict] = ()) -> list[dict]:
    """The template's rows of accuracy.py's results (of today's template, not a superseded one), as U-Net rows,
    for the sets that `rows` has no U-Net of."""
    own = {r["set"] for r in rows if r["arch"] == "unet"}
    template = json.loads(baseline.read_text()) if baseline.exists() else []
    return [{"set": r["set"], "seed": r["seed"], "arch": "unet", "steps": r["steps"], **r["seg"]}
            for r in template if r["set"] in names and r["set"] not in own and r["seed"] in seeds
            and r["steps"] == steps and not r["minutes"] and not r.get("superseded")]  # fmt: skip


def speed_image(name: str) -> np.ndarray:
    """A SPEED_SIDE square image tiled from the set's first test image, in the set's channels."""
    from seg.io.images import read_image

    first = sorted((DATA / name / "test" / "images").iterdir())[0]
    image = read_image(first)
    reps = (-(-SPEED_SIDE // image.shape[0]), -(-SPEED_SIDE // image.shape[1])) + (1,) * (image.ndim - 2)
    return np.tile(image, reps)[:SPEED_SIDE, :SPEED_SIDE]


def speeds(runs: dict[str, Path], name: str, tmp: Path, repeats: int) -> dict[str, float]:
    """Megapixels per second of each architecture's exported run, fp32 on the CPU, best of `repeats`."""
    from seg.inference.predictor import Predictor

    predictors = {}
    for arch, run in runs.items():
        onnx = tmp / f"speed_{arch}.onnx"
        log = tmp / f"speed_{arch}_export.log"
        finish(start([str(BIN / "seg"), "export", str(run), "--out", str(onnx)], log), log)
        predictors[arch] = Predictor.from_onnx(onnx, device="cpu", threads=2, precision="fp32")
    image = speed_image(name)
    best = {arch: float("inf") for arch in runs}
    for arch, predictor in predictors.items():
        predictor.predict(image)  # warm up
    for _ in range(repeats):
        for arch, predictor in predictors.items():
            began = time.perf_counter()
            predictor.predict(image)
            best[arch] = min(best[arch], time.perf_counter() - began)
    return {arch: round(SPEED_SIDE**2 / 1e6 / seconds, 3) for arch, seconds in best.items()}


def table(rows: list[dict], speed: dict[str, dict]) -> str:
    """Per set and architecture: the object's IoU (mean ± sd over seeds), s/step (from the runs not marked
    `loaded`; from the loaded ones, marked *, when all are), and prediction MP/s (`speed`: set -> arch -> MP/s)."""
    lines = ["| set | arch | seeds | test IoU | s/step (train) | predict MP/s |", "|---|---|---:|---:|---:|---:|"]
    groups: dict[tuple, list[dict]] = {}
    for r in sorted(rows, key=lambda r: (r["set"], ORDER.index(r["arch"]))):
        groups.setdefault((r["set"], r["arch"]), []).append(r)
    for (name, arch), group in groups.items():
        timed = [r for r in group if not r.get("loaded")] or group  # runs that shared the cores count only alone
        seconds = f"{sum(r['train_seconds'] for r in timed) / sum(r['steps'] for r in timed):.2f}"
        seconds += " *" if timed[0].get("loaded") else ""
        mps = speed.get(name, {}).get(arch)
        lines.append(f"| {name} | {arch} | {len(group)} | {spread([r['iou'] for r in group])} | {seconds} | "
                     + (f"{mps:.2f}" if mps else "") + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", default="lucchi_pp,horses")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--archs", default=",".join(ARCHS), help=f"from {', '.join(ORDER)}")
    parser.add_argument("--baseline", type=Path, default=ROOT / "bench" / "accuracy_results.json",
                        help="accuracy.py's results: the template's rows are the U-Net column")
    parser.add_argument("--speed", action="store_true", help="also measure prediction megapixels/s")
    parser.add_argument("--unet-runs", type=Path, help="accuracy.py's --keep folder, for the U-Net's speed")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--keep", type=Path, help="keep the runs and logs in this folder")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    names, seeds = args.sets.split(","), [int(s) for s in args.seeds.split(",")]
    archs = args.archs.split(",")
    unknown = [n for n in names if n not in SETS]
    if unknown:
        sys.exit(f"error: --sets: unknown set {unknown[0]!r} (choose from {', '.join(SETS)})")
    unknown = [a for a in archs if a not in ORDER]
    if unknown:
        sys.exit(f"error: --archs: unknown architecture {unknown[0]!r} (choose from {', '.join(ORDER)})")
    saved = json.loads(args.out.read_text()) if args.out and args.out.exists() else {"rows": [], "speed": {}}
    rows, speed = saved["rows"], saved["speed"]
    done = {(r["set"], r["seed"], r["arch"], r["steps"]) for r in rows}
    todo = [(n, s, a) for s in seeds for n in names for a in archs if (n, s, a, args.steps) not in done]
    with tempfile.TemporaryDirectory(prefix="seg_archs_") as tmp:
        tmp = Path(args.keep or tmp)
        tmp.mkdir(parents=True, exist_ok=True)
        for i in range(0, len(todo), 2):  # two runs at a time, one thread each
            jobs = [launch(n, s, a, args.steps, tmp) for n, s, a in todo[i : i + 2]]
            for job in jobs:
                rows.append(complete(job, tmp))
                r = rows[-1]
                print(f"{r['set']} seed {r['seed']} {r['arch']}: IoU {r['iou']:.4f}, {r['s_per_step']} s/step",
                      file=sys.stderr, flush=True)  # fmt: skip
                if args.out:
                    args.out.write_text(json.dumps({"rows": rows, "speed": speed}, indent=2))
        if args.speed:
            first = names[0]
            runs = {r["arch"]: Path(r["run"]) for r in rows
                    if r["set"] == first and r["seed"] == seeds[0] and r["arch"] in archs}  # fmt: skip
            if args.unet_runs:
                runs = {"unet": args.unet_runs / f"{first}_s{seeds[0]}_run", **runs}
            speed[first] = {"side": SPEED_SIDE, **speeds(runs, first, tmp, args.repeats)}
            if args.out:
                args.out.write_text(json.dumps({"rows": rows, "speed": speed}, indent=2))
    print(table(unet_rows(args.baseline, names, seeds, args.steps, rows) + rows, speed))


if __name__ == "__main__":
    main()

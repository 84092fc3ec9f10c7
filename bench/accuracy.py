"""Test accuracy of `seg train` on the config template against the bare smp loop, at equal steps.

For each data set of bench/make_data.py: (i) `seg train` on configs/custom_folder.yaml with only
data.root, data.classes, data.in_channels and output.dir changed, then `seg eval` of the run on the test
folder; (ii) bench/bare_loop.py (same encoder, crop 256, batch 8) on the same train folder. The template
holds out data.val_fraction of the train folder for validation, as it does for a user; the bare loop
trains on all of it. Equal steps: the template's epoch is one pass over its training images (N // 8
batches), so train.epochs is set to steps / that; when it does not divide, train.steps_per_epoch is set
to the divisor of the steps nearest to it. Both run as child processes, one after the other; wall times
are whole processes (start-up, data, validation and checkpoints for `seg train`).

    python bench/accuracy.py [--steps 100] [--sets isbi,blobs,scene] [--encoder resnet34] [--out acc.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from make_data import DEFAULT_OUT, SETS, make_set  # noqa: E402

TEMPLATE = ROOT / "configs" / "custom_folder.yaml"
BIN = Path(sys.executable).parent


def template_config(tmp: Path, data_root: Path, classes: list[str], in_channels: int, run_dir: Path) -> Path:
    """The template with only the lines a user edits changed, written to tmp/NAME.yaml."""
    raw = yaml.safe_load(TEMPLATE.read_text())
    raw["data"].update(root=str(data_root), classes=classes, in_channels=in_channels)
    raw["output"]["dir"] = str(run_dir)
    path = tmp / f"{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def step_overrides(config: Path, steps: int, extra: list[str]) -> list[str]:
    """--set overrides that make `seg train` run exactly `steps` optimiser steps."""
    from seg.config import load_config
    from seg.data import find_samples

    cfg = load_config(config, extra)
    train, _ = find_samples(cfg.data)
    per_epoch = max(1, len(train) // cfg.train.batch_size)
    sets = []
    if steps % per_epoch:
        per_epoch = min((d for d in range(1, steps + 1) if steps % d == 0), key=lambda d: abs(d - per_epoch))
        sets.append(f"train.steps_per_epoch={per_epoch}")
    return sets + [f"train.epochs={steps // per_epoch}"]


def run(command: list[str], log: Path) -> float:
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    if proc.returncode:
        tail = log.read_text().strip().splitlines()[-1:] or ["no output"]
        sys.exit(f"error: {Path(command[0]).name} {command[1]} failed (exit {proc.returncode}): {tail[0]}")
    return time.perf_counter() - start


def headline(name: str, metrics: dict) -> dict:
    """mIoU, the mean Dice of the non-background classes, pixel error."""
    fg = [d for d in metrics["dice_per_class"][1:] if d is not None]
    return {"miou": metrics["miou"], "fg_dice": sum(fg) / len(fg) if fg else float("nan"),
            "pixel_error": metrics["pixel_error"]}


def compare(name: str, root: Path, steps: int, encoder: str, tmp: Path, extra: list[str]) -> dict:
    spec = SETS[name]
    run_dir = tmp / f"{name}_run"
    config = template_config(tmp, root / "train", spec["classes"], spec["in_channels"], run_dir)
    extra = [f"model.encoder={encoder}", *extra] if encoder != "resnet34" else list(extra)
    sets = step_overrides(config, steps, extra) + extra
    train_cmd = [str(BIN / "seg"), "train", str(config)] + [a for s in sets for a in ("--set", s)]
    seg_train = run(train_cmd, tmp / f"{name}_train.log")
    eval_json = tmp / f"{name}_eval.json"
    seg_eval = run([str(BIN / "seg"), "eval", str(run_dir), "--data", str(root / "test"), "--tta", "none",
                    "--out", str(eval_json)], tmp / f"{name}_eval.log")  # no TTA: the bare loop has none
    ours = json.loads(eval_json.read_text())
    bare_json = tmp / f"{name}_bare.json"
    bare_wall = run([sys.executable, str(ROOT / "bench" / "bare_loop.py"), str(root / "train"), str(root / "test"),
                     "--classes", str(len(spec["classes"])), "--in-channels", str(spec["in_channels"]),
                     "--steps", str(steps), "--encoder", encoder, "--out", str(bare_json)], tmp / f"{name}_bare.log")
    bare = json.loads(bare_json.read_text())
    bare_train = bare_wall - bare["predict_seconds"]
    return {
        "set": name, "metric": spec["metric"], "steps": steps, "encoder": encoder, "overrides": sets,
        "seg": {"train_seconds": round(seg_train, 1), "s_per_step": round(seg_train / steps, 2),
                "eval_seconds": round(seg_eval, 1), **headline(name, ours)},
        "bare": {"train_seconds": round(bare_train, 1), "s_per_step": round(bare_train / steps, 2),
                 "eval_seconds": bare["predict_seconds"], **headline(name, bare)},
    }


def table(rows: list[dict]) -> str:
    lines = ["| set | metric | steps | seg train s | s/step | bare s | s/step | time ratio | seg metric | bare metric |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        s, b, m = r["seg"], r["bare"], r["metric"]
        ratio = s["train_seconds"] / max(b["train_seconds"], 1e-9)
        lines.append(f"| {r['set']} | {m} | {r['steps']} | {s['train_seconds']:.0f} | {s['s_per_step']:.2f} | "
                     f"{b['train_seconds']:.0f} | {b['s_per_step']:.2f} | {ratio:.2f}x | {s[m]:.4f} | {b[m]:.4f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--sets", default="isbi,blobs,scene")
    parser.add_argument("--encoder", default="resnet34")
    parser.add_argument("--data", type=Path, default=DEFAULT_OUT, help="where the data sets are made")
    parser.add_argument("--set", dest="extra", action="append", default=[],
                        help="an extra override for `seg train` only, e.g. to try a template default")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    names = args.sets.split(",")
    unknown = [n for n in names if n not in SETS]
    if unknown:
        sys.exit(f"error: --sets: unknown set {unknown[0]!r} (choose from {', '.join(SETS)})")
    rows = []
    with tempfile.TemporaryDirectory(prefix="seg_accuracy_") as tmp:
        for name in names:
            rows.append(compare(name, make_set(args.data, name), args.steps, args.encoder, Path(tmp), args.extra))
            print(table(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))
    print(table(rows))


if __name__ == "__main__":
    main()

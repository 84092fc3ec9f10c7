"""Learning curves of the config template on the real sets: test IoU against optimiser steps at each budget
measured (`bench/accuracy.py`'s rows: 100 steps, 15 and 30 minutes on 2 CPU cores), the bare smp loop
beside it where it ran. Rows of a template other than today's (extra `--set` overrides, or marked
"superseded") are left out, but at a step budget their bare loops stand in for a template-only row's.
Prints the table and draws one panel a set.

    python bench/curves.py --sets lucchi_pp,horses --out bench/learning_curves.png
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from accuracy import spread  # noqa: E402

RESULTS = [ROOT / "bench" / "accuracy_results.json", ROOT / "bench" / "accuracy_ablations.json"]
RUN_ONLY = ("train.seed=", "train.threads=", "train.time_limit_minutes=", "train.steps=")  # not a recipe


def points(rows: list[dict], name: str) -> list[dict]:
    """Per budget of one set, in order of steps: the template's (and the bare loop's) IoU over seeds."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        recipe = [o for o in r["overrides"] if not o.startswith(RUN_ONLY)]
        if r["set"] != name or recipe or r.get("superseded"):
            continue
        groups.setdefault(f"{r['minutes']:g} min" if r["minutes"] else f"{r['steps']} steps", []).append(r)
    # The bare loop has no recipe: at a step budget, a template-only row takes the bare loop of another
    # template's row of the same steps and seed.
    bare_at = {(r["steps"], r["seed"]): r["bare"]["iou"] for r in rows
               if r["set"] == name and not r["minutes"] and r.get("bare")}
    out = []
    for budget, group in groups.items():
        bare = [r["bare"]["iou"] if r.get("bare") else None if r["minutes"] else bare_at.get((r["steps"], r["seed"]))
                for r in group]
        bare = [b for b in bare if b is not None]
        out.append({
            "budget": budget, "seeds": sorted(r["seed"] for r in group),
            "steps": statistics.mean(r["steps"] for r in group),
            "template": [r["seg"]["iou"] for r in group], "bare": bare if len(bare) == len(group) else [],
        })  # fmt: skip
    return sorted(out, key=lambda p: p["steps"])


def table(curves: dict[str, list[dict]]) -> str:
    lines = ["| set | budget | seeds | steps | template IoU | bare loop IoU |", "|---|---|---:|---:|---:|---:|"]
    for name, pts in curves.items():
        for p in pts:
            lines.append(f"| {name} | {p['budget']} | {len(p['seeds'])} | {p['steps']:.0f} | {spread(p['template'])} |"
                         f" {spread(p['bare']) if p['bare'] else ''} |")
    return "\n".join(lines)


def draw(curves: dict[str, list[dict]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(2, len(curves))
    rows = -(-len(curves) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.flat[len(curves):]:
        ax.set_axis_off()
    for ax, (name, pts) in zip(axes.flat, curves.items()):
        for key, style, label in (("template", "o-", "seg train (template)"), ("bare", "s--", "bare smp loop")):
            shown = [p for p in pts if p[key]]
            if not shown:
                continue
            x = [p["steps"] for p in shown]
            y = [statistics.mean(p[key]) for p in shown]
            low = [m - min(p[key]) for m, p in zip(y, shown)]
            high = [max(p[key]) - m for m, p in zip(y, shown)]
            ax.errorbar(x, y, yerr=[low, high], fmt=style, capsize=3, label=label)
        for p in pts:
            ax.annotate(p["budget"], (p["steps"], statistics.mean(p["template"])), textcoords="offset points",
                        xytext=(4, -12), fontsize=8)
        ax.set(title=name, xlabel="optimiser steps (mean over seeds)", ylabel="test IoU (range of seeds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(out)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", nargs="+", type=Path, default=RESULTS)
    parser.add_argument("--sets", default="lucchi_pp,horses")
    parser.add_argument("--out", type=Path, help="a PNG with one panel a set")
    args = parser.parse_args()
    rows = [r for path in args.results for r in json.loads(path.read_text())]
    curves = {name: points(rows, name) for name in args.sets.split(",")}
    print(table(curves))
    if args.out:
        draw(curves, args.out)


if __name__ == "__main__":
    main()

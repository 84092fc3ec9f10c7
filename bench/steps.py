"""The template's training step against the bare loop's, alternated in one process: seconds a step.

`accuracy.py --minutes` times `seg train` and then the bare loop, one after the other, so a drift of the
machine between the two runs lands in their ratio. Here both train on the same real set in one process:
`seg train`'s own step (`Trainer._train_step`: its model, Dice + CE, AdamW, batches from its data loader
and its two workers) and the bare loop's (`bare_loop.step`: smp U-Net, CE, Adam, batches cut in the loop),
in blocks of `--block` steps taken in turn `--rounds` times. Prints the mean and best seconds a step of
each, their ratio, and how long `seg train`'s step waited for its batch. Validations, start-up and
checkpoints are not in these figures (they are in accuracy.py's).

    python bench/steps.py --set ph2 --rounds 4 --block 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import bare_loop  # noqa: E402
from accuracy import DATA, SETS, step_overrides, template_config  # noqa: E402


def timed(batches, waits: list[float]):
    """`batches`, with the seconds each one took to arrive appended to `waits`."""
    while True:
        start = time.perf_counter()
        item = next(batches)
        waits.append(time.perf_counter() - start)
        yield item


def compare(name: str, rounds: int, block: int, seed: int = 0) -> dict:
    from seg.config import load_config
    from training.train import Trainer

    steps = 1 + rounds * block
    _, channels = SETS[name]
    with tempfile.TemporaryDirectory() as tmp:
        config = template_config(Path(tmp), name, Path(tmp) / "run")
        trainer = Trainer(load_config(config, [*step_overrides(steps), f"train.seed={seed}"]))
        waits: list[float] = []
        batches = timed(trainer.batches(), waits)
        cfg = trainer.cfg  # the bare loop gets the template's encoder, classes, crop and batch
        torch.manual_seed(seed)
        model, optimizer = bare_loop.build(cfg.model.encoder, channels, cfg.data.num_classes, "cpu")
        pairs = bare_loop.load(DATA / name / "train", channels, cfg.data.num_classes)
        rng = np.random.default_rng(seed)

        def seg_step() -> None:
            trainer._train_step(batches, None)

        def bare_step() -> None:
            bare_loop.step(model, optimizer, *bare_loop.batch(pairs, cfg.data.crop_size, rng, cfg.train.batch_size))

        times: dict[str, list[float]] = {"seg": [], "bare": []}
        seg_step(), bare_step()  # warm-up, not counted
        waits.clear()
        for _ in range(rounds):
            for key, fn in (("seg", seg_step), ("bare", bare_step)):
                for _ in range(block):
                    start = time.perf_counter()
                    fn()
                    times[key].append(time.perf_counter() - start)
        del batches
    seg, bare = times["seg"], times["bare"]
    return {
        "set": name, "steps": len(seg), "threads": torch.get_num_threads(),
        "seg": {"mean": statistics.mean(seg), "best": min(seg), "data_wait": statistics.mean(waits)},
        "bare": {"mean": statistics.mean(bare), "best": min(bare)},
        "ratio_mean": statistics.mean(seg) / statistics.mean(bare), "ratio_best": min(seg) / min(bare),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", default="ph2", choices=sorted(SETS))
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--block", type=int, default=5)
    args = parser.parse_args()
    r = compare(args.set, args.rounds, args.block)
    print(f"{r['set']}: {r['steps']} steps each, {r['threads']} threads; seconds a step, mean / best")
    print(f"  seg train  {r['seg']['mean']:.3f} / {r['seg']['best']:.3f}  (waiting for data {r['seg']['data_wait']:.3f})")
    print(f"  bare loop  {r['bare']['mean']:.3f} / {r['bare']['best']:.3f}")
    print(f"  ratio      {r['ratio_mean']:.2f}x / {r['ratio_best']:.2f}x")


if __name__ == "__main__":
    main()

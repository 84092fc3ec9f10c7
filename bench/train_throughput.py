"""Images/s of seg's trainer against a bare smp training loop: same model, data, batch, loss, optimiser.

Both run in this process, alternating rounds so that machine noise hits them alike. The trainer's
overhead is (bare rate / trainer rate - 1).

    python bench/train_throughput.py [--rounds 3] [--steps 10]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from torch.utils.data import DataLoader, RandomSampler

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from seg.config import load_config  # noqa: E402
from seg.models import build_model  # noqa: E402
from training.losses import build_loss  # noqa: E402
from training.train import Trainer  # noqa: E402


def bare_loop(trainer: Trainer, steps: int) -> float:
    """The textbook loop on the trainer's own dataset: returns images/s."""
    cfg = trainer.cfg
    model = build_model(**trainer.model_kwargs)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    loss_fn = build_loss(cfg.train.loss, cfg.data.ignore_index)
    sampler = RandomSampler(trainer.train_set, num_samples=steps * cfg.train.batch_size)
    loader = DataLoader(trainer.train_set, batch_size=cfg.train.batch_size, sampler=sampler, drop_last=True)
    start = time.perf_counter()
    images = 0
    for x, y in loader:
        loss = loss_fn(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        images += x.shape[0]
    return images / (time.perf_counter() - start)


def trainer_epoch(trainer: Trainer) -> float:
    start = time.perf_counter()
    _, images = trainer._train_epoch(None)
    trainer.epoch += 1
    return images / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "unet_isbi2012.yaml"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(args.config, [f"output.dir={tmp}", f"train.steps_per_epoch={args.steps}", "train.epochs=1000"])
        trainer = Trainer(cfg, console=Console(stderr=True, quiet=True))
        bare_loop(trainer, 2)  # warm-up both paths
        trainer_epoch(trainer)
        ours, bare = [], []
        for _ in range(args.rounds):
            ours.append(trainer_epoch(trainer))
            bare.append(bare_loop(trainer, args.steps))
    o, b = statistics.median(ours), statistics.median(bare)
    print(f"model {cfg.model.arch}/{cfg.model.encoder}, batch {cfg.train.batch_size}, crop {cfg.data.crop_size}, "
          f"{args.steps} steps x {args.rounds} rounds, {torch.get_num_threads()} threads")
    print(f"{'loop':<12}{'images/s (median)':>20}{'rounds':>40}")
    print(f"{'seg train':<12}{o:>20.2f}{'  '.join(f'{v:.2f}' for v in ours):>40}")
    print(f"{'bare smp':<12}{b:>20.2f}{'  '.join(f'{v:.2f}' for v in bare):>40}")
    print(f"trainer overhead: {100 * (b / o - 1):+.1f}%")


if __name__ == "__main__":
    main()

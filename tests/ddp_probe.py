"""Run by tests/test_ddp.py under torchrun: one `Trainer.fit` per process, noting what each rank did.

    torchrun --standalone --nproc_per_node 2 tests/ddp_probe.py CONFIG NOTES_DIR [DIE_AT_STEP]

Writes NOTES_DIR/rank{R}.json: per step whether all ranks held identical weights after it, the SHA-1 of
each mask crop the rank trained on, and every file the rank wrote. With DIE_AT_STEP, rank 1 exits
abruptly after that step (a rank that dies).
"""

import hashlib
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch.distributed as dist  # noqa: E402
from rich.console import Console  # noqa: E402

import training.train as train_module  # noqa: E402
from seg.config import load_config  # noqa: E402
from seg.io import images as imageio  # noqa: E402
from training.callbacks import Callback  # noqa: E402

config, notes = Path(sys.argv[1]), Path(sys.argv[2])
die_at = int(sys.argv[3]) if len(sys.argv) > 3 else None
writes: list[str] = []


def noting(write):
    def wrapper(path, *args, **kwargs):
        writes.append(str(path))
        return write(path, *args, **kwargs)

    return wrapper


train_module.save_checkpoint = noting(train_module.save_checkpoint)
train_module.atomic_path = noting(train_module.atomic_path)
imageio.atomic_path = noting(imageio.atomic_path)  # metrics.csv


class Probe(Callback):
    def __init__(self):
        self.same: list[bool] = []

    def on_step_end(self, trainer):
        digest = hashlib.sha1(b"".join(p.detach().numpy().tobytes() for p in trainer.model.parameters())).hexdigest()
        every = [None] * trainer.dist.world
        dist.all_gather_object(every, digest)
        self.same.append(len(set(every)) == 1)
        if trainer.step == die_at and trainer.dist.rank == 1:
            os._exit(3)


probe = Probe()
trainer = train_module.Trainer(load_config(config), console=Console(stderr=True, quiet=True), callbacks=[probe])
crops: list[list[str]] = []
loss_fn = trainer.loss_fn


def recording(logits, target, *extra):
    crops.append([hashlib.sha1(mask.numpy().tobytes()).hexdigest() for mask in target])
    return loss_fn(logits, target, *extra)


trainer.loss_fn = recording
rank = trainer.dist.rank
trainer.fit()
notes.mkdir(parents=True, exist_ok=True)
(notes / f"rank{rank}.json").write_text(json.dumps({"same_weights": probe.same, "crops": crops, "writes": writes}))

"""Training on several processes under `torchrun` (PyTorch's DistributedDataParallel).

`torchrun --nproc_per_node=N -m seg train CONFIG` starts N processes with RANK, LOCAL_RANK and WORLD_SIZE
set; `Dist` reads them. NCCL on CUDA (one GPU per local rank), gloo on the CPU. Without those variables
(a plain `seg train`) every method is a no-op, so the Trainer has one code path.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from seg.errors import SegError


class Dist:
    """This process's place in the job (`rank` of `world`) and the few collectives the Trainer needs."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes files and prints."""
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        """One GPU per local rank on CUDA; the CPU stays the CPU."""
        if not self.enabled or device.type != "cuda":
            return device
        if self.local_rank >= torch.cuda.device_count():
            raise SegError(f"local rank {self.local_rank} has no GPU: {torch.cuda.device_count()} visible; lower --nproc_per_node")
        torch.cuda.set_device(self.local_rank)
        return torch.device("cuda", self.local_rank)

    def setup(self, device: torch.device) -> None:
        if self.enabled and not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """The module that trains: DDP around `model` (which stays the unwrapped one, for checkpoints)."""
        if not self.enabled:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def from_main(self, values: Sequence[float]) -> list[float]:
        """Rank 0's values on every rank (the time spent, a stop), so all ranks take the same decisions."""
        if not self.enabled:
            return list(values)
        tensor = torch.tensor(list(values), dtype=torch.float64)
        dist.broadcast(tensor, 0)
        return tensor.tolist()

    def sum(self, array: np.ndarray) -> np.ndarray:
        """The element-wise sum of `array` over ranks."""
        if not self.enabled:
            return array
        tensor = torch.from_numpy(np.ascontiguousarray(array))
        dist.all_reduce(tensor)
        return tensor.numpy()

    def share_weights(self, module: nn.Module) -> None:
        """Rank 0's parameters and buffers (BatchNorm statistics) on every rank."""
        if not self.enabled:
            return
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, 0)


def sync_batchnorm(model: nn.Module, device: torch.device, d: Dist) -> nn.Module:
    """BatchNorm statistics over all ranks on CUDA (SyncBatchNorm raises on CPU tensors)."""
    if d.enabled and device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def launch(nproc: int, args: Sequence[str]) -> int:
    """Run `seg ARGS` under torchrun on `nproc` local processes; returns torchrun's exit code.

    On the CPU each process gets an equal share of the cores as its threads (OMP_NUM_THREADS), unless set.
    """
    if nproc < 1:
        raise SegError(f"--nproc {nproc}: must be at least 1")
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "seg", *args]
    return subprocess.run(command, env=env).returncode

"""Data-parallel training with torch.distributed, started by torchrun:

    torchrun --nproc-per-node 2 -m cifar4 train --preset fast
    torchrun --nnodes 2 --node-rank R --master-addr HOST --nproc-per-node 4 -m cifar4 train ...

Each process takes its share of every global batch (rank r takes rows r, r + world, ...), so the
batch size, the learning-rate schedule and the number of epochs mean what they mean in one
process; DistributedDataParallel averages the gradients (gloo on the CPU, NCCL on CUDA). Data
order and augmentation come from the same seeded generator on every rank, so the processes see
exactly the batches one process would. Only rank 0 writes the run folder, the state and the
metrics; every rank validates (the same numbers), so early stopping decides alike everywhere.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime as _dt
import os
import sys
from dataclasses import dataclass
from typing import Any, NoReturn

import torch
import torch.distributed as dist

from ..device import fix_threads


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    local_rank: int
    local_size: int

    @property
    def main(self) -> bool:
        return self.rank == 0


SINGLE = World(0, 1, 0, 1)


def world() -> World:
    """This process's place: from torchrun's environment once `setup` ran, else one process."""
    if not (dist.is_available() and dist.is_initialized()):
        return SINGLE
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)),
                 int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def setup() -> World:
    """Join torchrun's process group when started by it (WORLD_SIZE > 1); a no-op otherwise."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return SINGLE
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=_dt.timedelta(minutes=30))
    w = world()
    if not torch.cuda.is_available():  # the machine's cores shared among its processes
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        fix_threads(cores // w.local_size)
    return w


def teardown() -> bool:
    """Leave torchrun's process group; True when this process had joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        return True
    return False


def exit_process(code: int) -> NoReturn:
    """End a process that joined a process group, skipping the interpreter's shutdown.

    DistributedDataParallel leaves references to the gloo process group behind that
    destroy_process_group cannot drop, so gloo's worker threads outlive the Python code. A worker
    that releases a finished collective's tensors while the interpreter shuts down needs the GIL,
    cannot take it, and aborts the whole process ("terminate called without an active
    exception", SIGABRT or SIGSEGV); torchrun then reports a failed run whose folder is complete,
    and stops the other ranks. So such a process runs its atexit handlers, flushes the standard
    streams and ends at once: nothing of its own is left unwritten, and no worker thread can
    wake up in a dying interpreter."""
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed or broken pipe: nothing to write to
            stream.flush()
    os._exit(code)


def broadcast(obj: Any) -> Any:
    """Rank 0's value of `obj` on every rank."""
    if world().size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_tensors(*values: torch.Tensor) -> None:
    """Rank 0's values of the tensors on every rank (in place)."""
    if world().size > 1:
        for v in values:
            dist.broadcast(v, src=0)


def all_sum(*values: torch.Tensor) -> list[torch.Tensor]:
    """Element-wise sums over the ranks (in place; returned for convenience)."""
    if world().size > 1:
        for v in values:
            dist.all_reduce(v, op=dist.ReduceOp.SUM)
    return list(values)


def device_for(name: str, w: World) -> str:
    """Each rank its own GPU under torchrun."""
    if w.size > 1 and name in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{w.local_rank}"
    return name

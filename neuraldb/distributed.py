"""Scale-out over processes with torch.distributed, as ``torchrun`` launches them.

One idea: the target residuals of a batch of facts are independent of each other, so the
batches :func:`neuraldb.targets.optimize` forms are dealt out to the ranks (batch ``i`` to rank
``i mod world``), each rank optimises its own against the same base model, and every rank then
gathers all of them (:func:`gather`), so every rank holds the same edits and goes on identically.
Only rank 0 writes files (:func:`is_main`; :mod:`neuraldb.files` asks it) and prints.

A batch is computed exactly as one process computes it (same facts, same shapes), so the result
is the one-process result bit for bit when each process runs with the same number of threads.
Without ``torchrun`` (``WORLD_SIZE`` unset or 1) everything here is a no-op.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def launched() -> bool:
    """True in a process ``torchrun`` started with more than one process in the job."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: str = "cpu") -> None:
    """Join the job ``torchrun`` started (gloo on CPU, nccl on CUDA); nothing without torchrun."""
    if not launched() or dist.is_initialized():
        return
    cuda = device.startswith("cuda") and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend="nccl" if cuda else "gloo")


def finish() -> None:
    """Leave the job (every rank waits for the others first)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def wait_for_main() -> None:
    """Every rank waits here until all reach it (after rank 0 wrote something the others read)."""
    if dist.is_initialized():
        dist.barrier()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """True in the process that writes files and prints (rank 0, or the only process)."""
    if dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def device_for_rank(device: str) -> str:
    """``cuda`` becomes this process's own GPU (``cuda:LOCAL_RANK``) under torchrun."""
    return f"cuda:{local_rank()}" if device == "cuda" and launched() else device


def mine(n: int) -> list[int]:
    """The indices of ``n`` work items this rank computes: ``rank, rank + world, …``."""
    return list(range(rank(), n, world_size()))


def gather(n: int, compute: Callable[[int], T], done: Callable[[int], None] | None = None) -> list[T]:
    """``[compute(0), …, compute(n − 1)]`` on every rank, each item computed by one rank only
    (:func:`mine`) and sent to the others; ``done(i)`` is called for every item, own or received."""
    if world_size() == 1:
        out = []
        for i in range(n):
            out.append(compute(i))
            if done:
                done(i)
        return out
    own: dict[int, T] = {}
    for i in mine(n):
        own[i] = compute(i)
        if done:
            done(i)
    parts: list[dict[int, T] | None] = [None] * world_size()
    dist.all_gather_object(parts, own)
    merged: dict[int, T] = {}
    for part in parts:
        merged.update(part or {})
    if done:
        for i in sorted(set(merged) - set(own)):
            done(i)
    return [merged[i] for i in range(n)]


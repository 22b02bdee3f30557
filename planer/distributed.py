"""Data parallelism under torchrun: one process per device, gradients averaged every step.

`torchrun --nproc-per-node N -m planer build ...` (or `train`) starts N processes;
each reads its own share of the batch's streams, and averaging the gradients
makes every step the step one process would take on the whole batch, so all
processes hold the same weights and architecture logits throughout. Latency is a
property of one engine on one machine: rank 0 alone profiles, exports and times,
writes every file, and broadcasts what it measured, so that every process makes
the same decisions. Without torchrun everything here is a no-op.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def setup() -> None:
    """Join the process group torchrun describes (gloo on CPUs, NCCL on GPUs)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


def main_writes(write: Callable[[], object]) -> None:
    """Rank 0 calls `write`; then every rank waits until it has, so that what it wrote may be read. The one
    pattern for files a multi-process stage shares (in a single process: just the call)."""
    if is_main():
        write()
    barrier()


def broadcast(value: T) -> T:
    """Rank 0's `value` on every rank (for small Python values: measurements, choices, tables)."""
    if not active():
        return value
    box = [value if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def same_start(module: torch.nn.Module) -> None:
    """Give every rank rank 0's parameters and buffers. Ranks seed alike, but rank 0 alone also exports and
    times, which draws random numbers, so a module created afterwards would start differently elsewhere."""
    if not active():
        return
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            dist.broadcast(t.data, src=0)


def average_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """Average gradients over ranks. A parameter no rank used keeps grad None (as in one process, so the
    optimiser leaves it alone); one used somewhere gets the average, counting unused ranks as zero."""
    if not active():
        return
    params = list(params)
    used = torch.tensor([p.grad is not None for p in params], dtype=torch.float32)
    dist.all_reduce(used, op=dist.ReduceOp.MAX)
    live = [p for p, u in zip(params, used.tolist()) if u]
    if not live:
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in live])
    dist.all_reduce(flat)
    flat /= world()
    offset = 0
    for p in live:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


def mean(value: float) -> float:
    """The average of a number over ranks."""
    if not active():
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t) / world()


def share(batch: int) -> slice:
    """The streams of a batch of `batch` this rank reads."""
    if batch % world():
        raise ValueError(f"a batch of {batch} streams does not split over {world()} processes; "
                         f"use a batch divisible by {world()}")
    part = batch // world()
    return slice(rank() * part, (rank() + 1) * part)


def gather_streams(tensors: list[torch.Tensor] | None) -> list[torch.Tensor] | None:
    """Every rank's share of per-stream tensors (batch first), concatenated in stream order."""
    if not active() or tensors is None:
        return tensors
    out = []
    for t in tensors:
        parts = [torch.empty_like(t) for _ in range(world())]
        dist.all_gather(parts, t.contiguous())
        out.append(torch.cat(parts))
    return out


__all__ = ["active", "average_gradients", "barrier", "broadcast", "gather_streams", "is_main", "mean", "rank",
           "same_start", "setup", "share", "world"]


"""Tiny collective helpers that degrade to identities in a single process."""

from __future__ import annotations

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` outside distributed training."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce(values, op: str = "sum") -> torch.Tensor:
    """All-reduce a list/tensor of numbers (``sum``, ``max`` or ``min``) and return a float64 tensor."""
    t = torch.as_tensor(values, dtype=torch.float64).clone()
    if world()[1] > 1:
        ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
        dev = (
            torch.device("cuda", torch.cuda.current_device())
            if dist.get_backend() == "nccl"
            else torch.device("cpu")
        )
        t = t.to(dev)
        dist.all_reduce(t, op=ops[op])
        t = t.cpu()
    return t


def all_gather_objects(obj) -> list:
    """Every rank's ``obj``, in rank order (``[obj]`` in a single process)."""
    if world()[1] == 1:
        return [obj]
    out = [None] * world()[1]
    dist.all_gather_object(out, obj)
    return out


def gather_objects(obj, dst: int = 0) -> list | None:
    """Every rank's ``obj`` in rank order on rank ``dst``, ``None`` on the others (``[obj]`` in one process):
    for state only one rank writes (at 128 ranks an all-gather would copy it to every rank)."""
    rank, ws = world()
    if ws == 1:
        return [obj]
    out = [None] * ws if rank == dst else None
    dist.gather_object(obj, out, dst=dst)
    return out

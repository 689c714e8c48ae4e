"""Collective helpers (spear_lit/training/dist.py) on 2 real gloo processes."""

from __future__ import annotations

import datetime
import os
import socket

import torch
import torch.multiprocessing as mp


def _rank(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist = torch.distributed  # a mismatched collective fails within a minute instead of hanging
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
    from spear_lit.training.dist import all_gather_objects, gather_objects

    got = {"gather": gather_objects({"rank": rank}), "all_gather": all_gather_objects(rank)}
    torch.save(got, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_gather_objects_reaches_only_the_writing_rank(tmp_path):
    """The data module's checkpoint state (every rank's queue and replay rows) is gathered to rank 0, the
    one that writes it, not copied to all 128 ranks as an all-gather would."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_rank, args=(port, str(tmp_path)), nprocs=2, start_method="spawn", join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{k}.pt") for k in (0, 1))
    assert r0["gather"] == [{"rank": 0}, {"rank": 1}] and r1["gather"] is None
    assert r0["all_gather"] == r1["all_gather"] == [0, 1]

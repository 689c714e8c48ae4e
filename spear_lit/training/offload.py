"""Parameters, gradients and optimizer state kept on the host between uses (FSDP2 CPU offload), as the
paper's AIME runs did ("parameter and optimizer offload", SPEAR_SPEC §12).

``trainer.strategy.cpu_offload=true`` (:class:`spear_lit.training.strategies.FSDP2Strategy`, Lightning's
``ModelParallelStrategy`` with that key) gives every ``fully_shard`` a ``CPUOffloadPolicy``: each rank's fp32 parameter shards,
their gradients and AdamW's ``exp_avg``/``exp_avg_sq`` live in host memory (pinned on a GPU host); FSDP2
copies a layer's shards to the GPU for its all-gather and the gradients back after the reduce-scatter, and
the optimizer step runs on the CPU. Buffers (the rotary ``inv_freq``) are not offloaded: they go to the
device as usual. What it costs is host-device traffic per layer and a CPU optimizer step; what it buys is
GPU memory: 16 bytes per parameter shard (fp32 weight, gradient, two Adam moments) leave the GPU.

On this project's CPU test machines the "device" is the host itself, so offload moves nothing, but the
path runs: FSDP2's offloaded parameter handling, the CPU optimizer step, the sharded start-up into host
memory, checkpoints and weight sync (each shard is moved to the GPU before it is gathered). What only a
GPU can show, the memory freed and the transfer time, is not measured here.
"""

from __future__ import annotations

import torch


def offload_policy(strategy) -> torch.distributed.fsdp.OffloadPolicy | None:
    """FSDP2's ``CPUOffloadPolicy`` when ``strategy`` asks for offload, else None. Pinned host memory
    (faster copies) only where there is a CUDA device to copy to."""
    if not getattr(strategy, "cpu_offload", False):
        return None
    from torch.distributed.fsdp import CPUOffloadPolicy

    return CPUOffloadPolicy(pin_memory=torch.cuda.is_available())

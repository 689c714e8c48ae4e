"""Start-up that fits a node: under FSDP2 the policy's weights are read once per job, on global rank 0,
and reach every other rank's shards by broadcast.

Why: the old start-up ran ``from_pretrained`` on every rank and deep-copied the result for the KL
reference before sharding, so a node held ranks-per-node full copies at once (8 × 131 GB for a 32B policy
in fp32). Now (:func:`build_policy` with a mesh and more than one rank):

1. global rank 0 loads the model (:meth:`PolicySource.model`); every other rank builds the same model on
   the meta device (:meth:`PolicySource.meta_model`: no weight read or allocated);
2. every rank applies the same ``fully_shard`` (:func:`shard`); the meta ranks then allocate only their
   own shards (``to_empty``, on the device of the mesh: CPU under gloo, the rank's GPU under NCCL);
3. ``set_model_state_dict(full_state_dict=True, broadcast_from_rank0=True)`` sends rank 0's full tensors
   one at a time; each rank keeps its slice;
4. the buffers that are not in the state dict (non-persistent, e.g. the rotary ``inv_freq``) are
   broadcast from rank 0 as well, so every rank holds rank 0's values bit for bit;
5. the reference copy is built on the meta device on every rank, sharded alike, and its local shards are
   copied from the policy's (same mesh, same layout): no second read, no second broadcast, and no second
   full copy on rank 0.

Tied embeddings stay tied: ``lm_head.weight`` and ``embed_tokens.weight`` are one parameter in the meta
model as in the loaded one, FSDP2 shards it once, and the load copies into the existing shard instead of
assigning new tensors. Rank 0 peaks at one full model plus its shard; the others at their shard plus the
largest single tensor.
"""

from __future__ import annotations

import copy
import logging
import time

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

from spear_lit.training.dist import world

log = logging.getLogger(__name__)


def build_policy(
    source,
    mesh=None,
    *,
    reference: bool = False,
    mp_policy=None,
    offload_policy=None,
    every_rank_reads: bool = False,
):
    """``(model, ref)``: the policy of ``source`` and, with ``reference``, a frozen copy of it (eval mode,
    ``requires_grad`` off); ``ref`` is None without ``reference``.

    Args:
        source: a :class:`spear_lit.policy.PolicySource`.
        mesh: the data-parallel ``DeviceMesh`` of FSDP2 (Lightning's ``ModelParallelStrategy``): both models
            are sharded on it (:func:`shard`), and with more than one rank only global rank 0 reads the
            weights (see the module docstring). ``None`` (single process, DDP, which broadcasts rank 0's
            parameters itself, DeepSpeed): every process builds the whole model and the reference is a
            deep copy, as before.
        mp_policy: FSDP2's ``MixedPrecisionPolicy`` for every ``fully_shard`` (None: compute in the
            parameters' dtype).
        offload_policy: FSDP2's ``CPUOffloadPolicy`` (:mod:`spear_lit.training.offload`) or None: the
            shards are then allocated, and stay, in host memory.
        every_rank_reads: the old FSDP2 start-up (every rank reads the whole checkpoint, then shards it),
            for a before/after measurement. Also what a meta ``source`` (nothing to read) and a
            single rank get.
    """
    if mesh is None or every_rank_reads or source.meta or world()[1] == 1:
        model = source.model()
        ref = copy.deepcopy(model).eval().requires_grad_(False) if reference else None
        for m in (model, ref) if mesh is not None else ():
            if m is not None:
                shard(m, mesh, mp_policy, offload_policy)
        return model, ref
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict  # 1 s import

    start = time.perf_counter()
    rank, ranks = world()
    model = source.model() if rank == 0 else source.meta_model()
    full = model.state_dict() if rank == 0 else {}  # rank 0's full tensors outlive the sharding below
    shard(model, mesh, mp_policy, offload_policy)
    device = torch.device("cpu") if offload_policy is not None else _device(mesh)
    if rank != 0:
        model.to_empty(device=device)  # this rank's shards only, uninitialised until the broadcast
    set_model_state_dict(
        model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    )
    del full
    _broadcast_non_persistent_buffers(model)
    ref = None
    if reference:
        ref = source.meta_model().eval().requires_grad_(False)
        shard(ref, mesh, mp_policy, offload_policy)
        ref.to_empty(device=device)
        copy_local_shards(model, ref)
    for m in (model, ref):
        _check_materialised(m)
    if rank == 0:
        log.info(
            "policy read once on rank 0 and broadcast to %d ranks' shards in %.1f s",
            ranks,
            time.perf_counter() - start,
        )
    return model, ref


def shard(model: torch.nn.Module, mesh, mp_policy=None, offload_policy=None) -> None:
    """``fully_shard`` each decoder layer, then the root (embeddings, final norm, LM head), on ``mesh``."""
    mp = {"mp_policy": mp_policy} if mp_policy is not None else {}
    if offload_policy is not None:
        mp["offload_policy"] = offload_policy
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, **mp)
    fully_shard(model, mesh=mesh, **mp)


def copy_local_shards(src: torch.nn.Module, dst: torch.nn.Module) -> None:
    """Copy every parameter and buffer of ``src`` into ``dst``, two models of one architecture sharded alike:
    each rank copies its own shards, no communication."""
    with torch.no_grad():
        theirs = {**dict(src.named_parameters()), **dict(src.named_buffers())}
        ours = {**dict(dst.named_parameters()), **dict(dst.named_buffers())}
        if ours.keys() != theirs.keys():
            raise ValueError(f"copy_local_shards: different tensors: {sorted(ours.keys() ^ theirs.keys())}")
        for name, t in ours.items():
            _local(t).copy_(_local(theirs[name]))


def _broadcast_non_persistent_buffers(model: torch.nn.Module) -> None:
    """Rank 0's values of the buffers ``state_dict`` leaves out (same modules, same order on every rank)."""
    with torch.no_grad():
        for module in model.modules():
            for name in sorted(module._non_persistent_buffers_set):
                if (buf := module._buffers.get(name)) is not None:
                    dist.broadcast(buf, src=0)


def _check_materialised(model: torch.nn.Module | None) -> None:
    # Lightning would silently re-initialise whatever is left on the meta device (reset_parameters)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta] if model else []
    if left:
        raise RuntimeError(f"sharded load left tensors on the meta device: {left[:5]}")


def _device(mesh) -> torch.device:
    """The device FSDP2 keeps this rank's shards on: CPU for a gloo mesh, the current accelerator else."""
    if mesh.device_type == "cpu":
        return torch.device("cpu")
    return torch.device(mesh.device_type, getattr(torch, mesh.device_type).current_device())


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (what this rank stores), else the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t

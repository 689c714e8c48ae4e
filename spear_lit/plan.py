"""Will it fit? The per-GPU memory plan of a training configuration, computed on a laptop before launch.

    python -m spear_lit.plan +experiment=aime_32b model.path=<dir with config.json> [--device-gib 80]

takes ``train.py``'s overrides and prints, per GPU, the training step's peak and its parts, vLLM's share
awake and asleep, host memory per node, and a verdict against the device memory; the last line is one
JSON object with the figures (GiB).

**How.** The training side is simulated, not estimated by a formula: the policy (and the KL reference) is
built by the same :class:`~spear_lit.policy.PolicySource` on the meta device, sharded by the same
``fully_shard`` calls as ``train.py`` (:func:`spear_lit.training.sharded_load.shard`, with the recipe's
mixed-precision and offload policies), and materialised as fake tensors (``FakeTensorMode``: shapes and
dtypes, no storage) on a fake process group of the recipe's world size (rank 0 of it). The learner built
from the recipe's ``learner`` config then runs its own :meth:`~spear_lit.training.module.PolicyModule.token_stats`
(packing, sequence parallelism, chunked log-probs, gradient checkpointing: what the recipe turns on) on the
largest micro-batch the recipe allows, with backward, under PyTorch's ``FSDPMemTracker``, which counts every
tensor's bytes by category. The old-log-prob pass (no gradient, eval mode) is tracked the same way. Every
large new tensor (FSDP2's all-gather buffers included) is fake too (:func:`fake_allocations`); only the small
host-side index tensors are real. The 32B recipe's 64 layers at 18432 tokens take ~40 s of one core and
~0.5 GB of memory.

**What the tracker does not see, added as stated constants** (not measured here; override with flags):
the CUDA context and cuBLAS workspace (``--cuda-context-gib``), NCCL's buffers (``--nccl-gib``) and the
caching allocator's fragmentation (``--fragmentation``, a fraction of the tracked peak).

**What is computed, not simulated.** The optimizer step (the tracker over-counts inside
``clip_grad_norm_``/``optimizer.step()`` under fake tensors, where DTensor's sharding propagation makes
global-shape temporaries): fp32 shards + gradients + AdamW's two moments + one moment-sized temporary
(foreach AdamW's ``sqrt(exp_avg_sq)``), from the simulated shards' sizes. vLLM's share: it takes
``gpu_memory_utilization`` of the device while awake (bf16 weights per tensor-parallel rank, the KV cache
in the rest); asleep at level 2 it keeps nothing but its CUDA context, at level 1 its weights go to host
memory. The weight sync: vLLM's weights awake (its KV cache not yet), one parameter gathered in full in
bf16 at a time, the trainer's shards and AdamW state resident. Host memory per node: global rank 0 reads
the whole policy in ``model.dtype`` (spear_lit/training/sharded_load.py), each process adds a stated
constant (``--host-per-rank-gib``), offloaded shards and a level-1-asleep vLLM's weights are added. The loss
terms' own arithmetic (a few ``[n, T]`` per-token tensors) is not run: < 0.1 % of the step.

:func:`run_step` with ``fake=False`` runs the same step on real weights and tensors, tracked alike:
tests/test_plan.py compares the two on 2 gloo ranks (within 10 %).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

GIB = 2**30
CONF = Path(__file__).resolve().parent.parent / "conf"


@dataclass
class Constants:
    """What the memory tracker cannot see (stated, not measured here)."""

    cuda_context_gib: float = 0.6  # CUDA context + cuBLAS workspace, per process (H100, lazy module loading)
    nccl_gib: float = 1.0  # NCCL communicators' buffers, per process (a few communicators x channels x 4 MiB)
    fragmentation: float = 0.10  # caching allocator: reserved over allocated at the peak
    vllm_asleep_gib: float = 0.5  # what a sleeping vLLM keeps besides the context (CUDA graphs' pool)
    host_per_rank_gib: float = (
        3.0  # a GPU training process's host memory: libraries, CUDA/NCCL, vLLM's host side
    )


@dataclass
class Setup:
    """What the plan reads from the composed config."""

    nodes: int
    gpus_per_node: int
    fsdp: bool
    precision: str
    sequence_parallel: int
    offload: bool
    row_tokens: int  # the longest row: prompt + response
    micro_tokens: int  # positions through the model in the largest micro-batch
    micro_rows: int
    packed: bool
    tensor_parallel: int
    gpu_memory_utilization: float | None
    sleep_level: int
    vllm: bool

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node


def compose(overrides: list[str]):
    """``train.py``'s config for ``overrides`` (the same Hydra config tree)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides))


def setup_of(cfg, model_config) -> Setup:
    from omegaconf import OmegaConf

    get = lambda key, default=None: OmegaConf.select(cfg, key, default=default)  # noqa: E731
    strategy = str(get("trainer.strategy._target_", get("trainer.strategy", "")))
    if "DeepSpeed" in strategy or "deepspeed" in strategy:
        raise SystemExit("spear_lit.plan: DeepSpeed is not modelled (FSDP2, DDP and single process are)")
    response = int(get("max_response_len"))
    max_model_len = get("rollout.max_model_len")
    prompt = get("data.agent.max_prompt_len")
    if max_model_len:
        row = int(max_model_len)
    elif prompt:
        row = int(prompt) + response
    else:
        row = int(getattr(model_config, "max_position_embeddings", response))
    budget = get("data.micro_batch_tokens")
    rows = int(get("data.micro_batch_rows"))
    if budget:
        # rows packed up to the budget; a longer row goes alone
        micro_tokens, micro_rows = max(int(budget), row), max(1, math.ceil(max(int(budget), row) / row))
    else:
        micro_tokens, micro_rows = rows * row, rows
    vllm = "vllm" in str(get("rollout._target_", "")).lower()
    return Setup(
        nodes=int(get("trainer.num_nodes", 1)),
        gpus_per_node=int(get("trainer.devices", 1)),
        fsdp="FSDP2Strategy" in strategy or "ModelParallel" in strategy,
        precision=str(get("trainer.precision", "32-true")),
        sequence_parallel=int(get("trainer.strategy.sequence_parallel_size", 1) or 1),
        offload=bool(get("trainer.strategy.cpu_offload", False)),
        row_tokens=row,
        micro_tokens=micro_tokens,
        micro_rows=micro_rows,
        packed=bool(budget),
        tensor_parallel=int(get("rollout.tensor_parallel_size", 1) or 1) if vllm else 1,
        gpu_memory_utilization=float(get("rollout.gpu_memory_utilization")) if vllm else None,
        sleep_level=int(get("rollout.sleep_level", 1) or 0) if vllm else 0,
        vllm=vllm,
    )


def micro_batch(s: Setup, vocab: int, seed: int = 0):
    """The largest micro-batch: ``micro_rows`` rows of ``row_tokens`` (the last one cut to the budget),
    each an eighth prompt; real token ids (their values do not matter to memory)."""
    import torch

    from spear_lit.batch import TokenBatch

    g = torch.Generator().manual_seed(seed)
    rows, left = [], s.micro_tokens
    for _ in range(s.micro_rows):
        n = min(s.row_tokens, left)
        left -= n
        p = max(1, n // 8)
        ids = torch.randint(0, vocab, (n,), generator=g)
        rows.append({"prompt_ids": ids[:p], "response_ids": ids[p:], "response_mask": torch.ones(n - p)})
    return TokenBatch.from_rows(rows, pad_id=0)


def tiny_batch(vocab: int):
    from spear_lit.batch import TokenBatch

    ids = list(range(1, 9))
    return TokenBatch.from_rows(
        [{"prompt_ids": ids[:4], "response_ids": ids[4:], "response_mask": [1.0] * 4}], pad_id=0
    )


def _bytes(tensors) -> int:
    out = 0
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        out += t.numel() * t.element_size()
    return out


_FACTORIES = ("empty.memory_format", "empty_strided.default", "zeros.default", "ones.default", "full.default")
_NEW = (
    "new_empty.default",
    "new_zeros.default",
    "new_ones.default",
    "new_full.default",
    "new_empty_strided.default",
)


def fake_allocations(mode, min_numel: int = 1 << 16):
    """A dispatch mode under which every new tensor of at least ``min_numel`` elements made from a size
    (``torch.empty``/``zeros``/``full``/``new_empty``...: FSDP2's all-gather buffers, activations' zeros)
    is a fake tensor of ``mode``: the simulation then allocates nothing large, while the small host-side
    index tensors (row boundaries, masks) stay real, so the code that reads their values runs as usual."""
    from torch._subclasses.fake_tensor import FakeTensor
    from torch.utils._python_dispatch import TorchDispatchMode

    class FakeAllocations(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            name = f"{func._opname}.{func._overloadname}"
            size = args[0] if name in _FACTORIES else args[1] if name in _NEW else None
            if size is not None and math.prod(size) >= min_numel:
                with mode:
                    if name in _NEW and not isinstance(args[0], FakeTensor):
                        args = (mode.from_tensor(args[0]), *args[1:])
                    return func(*args, **kwargs)
            return func(*args, **kwargs)

    return FakeAllocations()


def build(cfg, s: Setup, fake: bool):
    """``(learner, optimizer, fake mode or None)`` as ``train.py`` builds them; with ``fake``, on fake
    tensors of a fake process group already initialised with the recipe's world size."""
    import torch
    from hydra.utils import instantiate
    from torch.distributed.device_mesh import init_device_mesh

    from spear_lit.training import offload, precision, sequence_parallel
    from spear_lit.training.sharded_load import build_policy, shard

    learner = instantiate(cfg.learner, _convert_="all")
    strategy = instantiate(cfg.trainer.strategy) if s.fsdp else None
    mp = precision.fsdp_mp_policy(s.precision) if s.fsdp else None
    off = offload.offload_policy(strategy)
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("data_parallel",)) if s.fsdp else None
    if fake:
        from torch._subclasses.fake_tensor import FakeTensorMode

        mode = FakeTensorMode(allow_non_fake_inputs=True)
        models = []
        for _ in range(2 if learner.reference else 1):
            m = learner.policy_source.meta_model()
            if mesh is not None:
                shard(m, mesh, mp, off)
            with mode:
                m.to_empty(device="cpu")
            models.append(m)
        model, ref = models[0], (models[1].eval().requires_grad_(False) if learner.reference else None)
    else:
        model, ref = build_policy(
            learner.policy_source, mesh, reference=learner.reference, mp_policy=mp, offload_policy=off
        )
    model.train()
    for m in filter(None, (model, ref)):
        m.compute_dtype = precision.compute_dtype(s.precision, m.dtype)
    learner.model, learner.ref_model = model, ref
    learner.sp = sequence_parallel.group_of(strategy, model) if s.fsdp else None
    learner.pack_rows = s.packed
    return learner, learner.configure_optimizers(), mode if fake else None


def _autocast(s: Setup):
    import torch

    from spear_lit.training import precision

    dtype = precision.MIXED.get(s.precision)
    return torch.autocast("cpu", dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _micro_step(learner, b, s: Setup) -> None:
    """The learner's forward and backward of one micro-batch: its own ``token_stats`` (policy, and the
    reference's without gradient) and a loss on them."""
    import torch

    with _autocast(s):
        logp, ent = learner.token_stats(b)
        loss = (logp * b.response_mask).sum()
        if ent is not None and ent.requires_grad:
            loss = loss + (ent * b.response_mask).sum()
        if learner.ref_model is not None:
            with torch.no_grad():
                ref, _ = learner.token_stats(b, model=learner.ref_model, entropy=False)
            loss = loss + ((logp - ref) * b.response_mask).sum()
    loss.backward()


def _tracker(learner, opt, fsdp: bool):
    if fsdp:
        from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

        t = FSDPMemTracker(learner.model, opt)
    else:
        from torch.distributed._tools.mem_tracker import MemTracker

        t = MemTracker()
        t.track_external(learner.model, opt)
    if learner.ref_model is not None:
        t.track_external(learner.ref_model)
    return t


def _peak(tracker) -> dict[str, float]:
    """The tracker's peak snapshot: bytes by category, summed over devices (all ``cpu`` here)."""
    out: dict[str, float] = {}
    for per_device in tracker.get_tracker_snapshot("peak").values():
        for k, v in per_device.items():
            name = k if isinstance(k, str) else k.value
            out[name] = out.get(name, 0.0) + v
    return out


def run_step(cfg, s: Setup, fake: bool) -> dict:
    """The simulated (or, without ``fake``, real) training step's memory in bytes per rank: the tracked
    micro-step (in steady state: optimizer state and previous micro-batches' gradients resident), the
    old-log-prob pass, and the optimizer step computed from the shards."""
    import torch

    learner, opt, mode = build(cfg, s, fake)
    # sizes while everything is sharded (FSDP2 leaves the root unsharded after a forward)
    params = _bytes(learner.model.parameters())
    ref = _bytes(learner.ref_model.parameters()) if learner.ref_model is not None else 0
    num_params = sum(p.numel() for p in learner.model.parameters())  # a DTensor's numel is the global one
    largest = max(p.numel() for p in learner.model.parameters())  # the weight sync gathers one at a time
    fakes = (lambda: fake_allocations(mode)) if fake else contextlib.nullcontext
    vocab = learner.model.get_output_embeddings().weight.shape[0]
    with fakes():  # steady state: AdamW's state exists (one tiny step), gradients are being accumulated
        _micro_step(learner, tiny_batch(vocab), s)
        opt.step()
        opt.zero_grad(set_to_none=True)
        _micro_step(learner, tiny_batch(vocab), s)
    b = micro_batch(s, vocab)
    train = _tracker(learner, opt, s.fsdp)
    with fakes(), train:
        _micro_step(learner, b, s)
    opt.zero_grad(set_to_none=True)
    old = _tracker(learner, opt, s.fsdp)
    learner.model.eval()
    with fakes(), old, torch.no_grad(), _autocast(s):
        learner.token_stats(b)
    learner.model.train()
    moments = sum(
        _bytes([v for v in st.values() if torch.is_tensor(v) and v.dim()]) for st in opt.state.values()
    )
    return {
        "train": _peak(train),
        "old_logp": _peak(old),
        "params": params,
        "grads": params,  # fp32, like the shards
        "moments": moments,
        "reference": ref,
        "optimizer_step": 2 * params + moments + moments / 2 + ref,
        "num_params": num_params,
        "largest_param": largest,
    }


def simulate(cfg, s: Setup) -> dict:
    """:func:`run_step` on fake tensors, as rank 0 of a fake process group of ``s.world`` ranks."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=s.world if s.fsdp else 1)
    try:
        return run_step(cfg, s, fake=True)
    finally:
        dist.destroy_process_group()


def vllm_share(s: Setup, config, num_params: float, device_gib: float, c: Constants) -> dict:
    """vLLM's GPU memory per rank awake and asleep, and what it puts in host memory while asleep."""
    if not s.vllm:
        return {
            "awake": 0.0,
            "asleep": 0.0,
            "weights": 0.0,
            "kv_cache": 0.0,
            "kv_tokens": 0,
            "host_asleep": 0.0,
        }
    cfg = config.get_text_config()
    weights = 2.0 * num_params / s.tensor_parallel / GIB  # bf16, split over the replica's ranks
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    per_rank_kv = max(1, kv_heads // s.tensor_parallel)  # fewer KV heads than ranks: replicated
    kv_per_token = 2 * cfg.num_hidden_layers * per_rank_kv * head_dim * 2 / GIB  # K and V, bf16
    awake = s.gpu_memory_utilization * device_gib
    kv = max(0.0, awake - weights)
    return {
        "awake": awake,
        "asleep": c.vllm_asleep_gib,
        "weights": weights,
        "kv_cache": kv,
        "kv_tokens": int(kv / kv_per_token),
        "host_asleep": weights if s.sleep_level == 1 else 0.0,
    }


def instantiate_source(cfg):
    """The recipe's :class:`~spear_lit.policy.PolicySource` (reads ``config.json`` only)."""
    from hydra.utils import instantiate

    return instantiate(cfg.model)


def make_plan(cfg, device_gib: float = 80.0, c: Constants | None = None) -> dict:
    """The plan of a composed config: every figure in GiB per GPU (host figures per node)."""
    c = c or Constants()
    source = instantiate_source(cfg)
    config = source.config()
    s = setup_of(cfg, config)
    step = simulate(cfg, s)
    g = lambda b: b / GIB  # noqa: E731
    t, o = step["train"], step["old_logp"]
    on_host = (step["params"] + step["grads"] + step["moments"] + step["reference"]) if s.offload else 0.0
    train_peak, old_peak = g(t["Total"] - on_host), g(o["Total"] - on_host)
    opt_peak = 0.0 if s.offload else g(step["optimizer_step"])
    tracked = max(train_peak, old_peak, opt_peak)
    overhead = c.cuda_context_gib + c.nccl_gib + c.fragmentation * tracked
    v = vllm_share(s, config, step["num_params"], device_gib, c)
    # Resident through a rollout (vLLM awake): the shards and AdamW's state the trainer keeps on the GPU
    resident = 0.0 if s.offload else g(step["params"] + step["moments"] + step["reference"])
    training = tracked + overhead + v["asleep"]
    rollout = v["awake"] + resident + c.cuda_context_gib + c.nccl_gib
    # weight sync (vllm_engine.sync_weights): vLLM's weights awake, its KV cache not yet; each parameter
    # gathered in full in bf16, one at a time; the trainer's gradients already freed
    sync = (
        (v["weights"] + g(2 * step["largest_param"]) + resident + c.cuda_context_gib + c.nccl_gib)
        if s.vllm
        else 0.0
    )
    full_model_host = g(step["num_params"] * source.dtype.itemsize)  # rank 0 reads the whole policy
    host_base = s.gpus_per_node * c.host_per_rank_gib + s.gpus_per_node * g(on_host)
    plan = {
        "world": s.world,
        "setup": asdict(s),
        "device_gib": device_gib,
        "train": {
            "sharded_params": g(t.get("Sharded Param", t.get("Parameter", 0.0))) if not s.offload else 0.0,
            "gradients": g(t.get("Sharded Grad", 0.0) + t.get("Unsharded Grad", 0.0) + t.get("Gradient", 0.0))
            if not s.offload
            else 0.0,
            "optimizer_state": g(t.get("OptState", t.get("Optstate", 0.0))) if not s.offload else 0.0,
            "reference": g(step["reference"]) if not s.offload else 0.0,
            "unsharded_layers": g(
                t.get("Unsharded Param", 0.0) + t.get("All Gather", 0.0) + t.get("Reduce Scatter", 0.0)
            ),
            "activations": g(t.get("Activation", 0.0)),
            "temporaries": g(t.get("Temp", 0.0)),
            "micro_step_peak": train_peak,
            "old_logp_pass_peak": old_peak,
            "optimizer_step_peak": opt_peak,
            "tracked_peak": tracked,
            "overhead": overhead,
            "peak": training,
        },
        "vllm": v,
        "rollout_peak": rollout,
        "weight_sync_peak": sync,
        "host_per_node": {
            "start_up_node0": host_base + full_model_host,
            "start_up_other": host_base,
            "asleep": host_base + s.gpus_per_node * v["host_asleep"],
        },
    }
    peak = max(training, rollout, sync)
    plan["peak"] = peak
    plan["margin"] = device_gib - peak
    plan["fits"] = peak <= device_gib
    return plan


def render(plan: dict) -> str:
    t, v, s = plan["train"], plan["vllm"], plan["setup"]
    rows = [
        ("sharded parameters (fp32)", t["sharded_params"]),
        ("gradients", t["gradients"]),
        ("optimizer state (AdamW moments)", t["optimizer_state"]),
        ("KL reference shards", t["reference"]),
        ("unsharded layers in flight", t["unsharded_layers"]),
        ("saved activations", t["activations"]),
        ("temporaries (log-prob/entropy chunks, backward)", t["temporaries"]),
        ("= micro-step peak (tracked)", t["micro_step_peak"]),
        ("old-log-prob pass peak (tracked)", t["old_logp_pass_peak"]),
        ("optimizer step peak (computed)", t["optimizer_step_peak"]),
        ("+ CUDA context, NCCL, fragmentation (stated)", t["overhead"]),
        ("+ vLLM asleep", v["asleep"]),
        ("= training phase peak", t["peak"]),
        (
            f"vLLM awake (gpu_memory_utilization x device; weights {v['weights']:.1f}, "
            f"KV cache {v['kv_cache']:.1f} = {v['kv_tokens']} tokens)",
            v["awake"],
        ),
        ("= rollout phase peak (vLLM + resident shards and state)", plan["rollout_peak"]),
        ("weight sync peak (vLLM weights + one full bf16 tensor + resident)", plan["weight_sync_peak"]),
    ]
    h = plan["host_per_node"]
    lines = [
        f"memory plan: {plan['world']} ranks ({s['nodes']} x {s['gpus_per_node']}), {s['precision']}, "
        f"micro-batch {s['micro_tokens']} tokens in {s['micro_rows']} row(s) ({'packed' if s['packed'] else 'padded'}), "
        f"sequence parallel {s['sequence_parallel']}, offload {'on' if s['offload'] else 'off'}, "
        f"vLLM TP {s['tensor_parallel']}",
        "",
        "| per GPU | GiB |",
        "| --- | ---: |",
        *(f"| {name} | {value:.2f} |" for name, value in rows),
        "",
        f"host memory per node: start-up {h['start_up_node0']:.1f} GiB (node 0, reads the policy) / "
        f"{h['start_up_other']:.1f} GiB (others); vLLM asleep {h['asleep']:.1f} GiB",
        f"verdict: {'FITS' if plan['fits'] else 'DOES NOT FIT'} in {plan['device_gib']:.0f} GiB: peak "
        f"{plan['peak']:.1f} GiB, margin {plan['margin']:+.1f} GiB",
    ]
    return "\n".join(lines)


def summary(plan: dict) -> dict:
    """The JSON line: the figures in GiB, rounded."""
    r = lambda x: round(x, 3) if isinstance(x, float) else x  # noqa: E731
    return {
        "peak_gib": r(plan["peak"]),
        "margin_gib": r(plan["margin"]),
        "fits": plan["fits"],
        "device_gib": plan["device_gib"],
        "train": {k: r(v) for k, v in plan["train"].items()},
        "vllm": {k: r(v) for k, v in plan["vllm"].items()},
        "rollout_peak_gib": r(plan["rollout_peak"]),
        "weight_sync_peak_gib": r(plan["weight_sync_peak"]),
        "host_per_node_gib": {k: r(v) for k, v in plan["host_per_node"].items()},
    }


def check_at_start(cfg) -> None:
    """``train.py``'s start-up check (``plan.check``): on GPU runs, and on any run given ``plan.device_gib``,
    the plan against the device's memory; a configuration that does not fit is refused with the plan's
    table (:class:`~spear_lit.config_check.ConfigError`), before any process reads a weight. Every rank
    computes the same plan (deterministic, no communication)."""
    import logging

    from omegaconf import OmegaConf

    from spear_lit.config_check import ConfigError

    if not OmegaConf.select(cfg, "plan.check", default=True):
        return
    device_gib = OmegaConf.select(cfg, "plan.device_gib")
    if device_gib is None:
        import torch

        accelerator = str(OmegaConf.select(cfg, "trainer.accelerator", default="cpu"))
        on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
        if not on_gpu:
            return
        device_gib = torch.cuda.get_device_properties(0).total_memory / GIB
    plan = make_plan(cfg, float(device_gib))
    if not plan["fits"]:
        raise ConfigError(
            f"the memory plan does not fit {float(device_gib):.1f} GiB per GPU (peak {plan['peak']:.1f} GiB):\n"
            f"{render(plan)}\nchange the sizes above, or skip this check with plan.check=false"
        )
    logging.getLogger("spear_lit").info(
        "memory plan: peak %.1f GiB of %.1f per GPU (margin %.1f)", plan["peak"], device_gib, plan["margin"]
    )


FLAGS = ("cuda_context_gib", "nccl_gib", "fragmentation", "host_per_rank_gib")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m spear_lit.plan", description=__doc__.split("\n\n")[0])
    p.add_argument("--device-gib", type=float, default=80.0, help="GPU memory to plan against (default 80)")
    for f in FLAGS:
        p.add_argument("--" + f.replace("_", "-"), type=float, default=getattr(Constants, f))
    args, overrides = p.parse_known_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    cfg = compose(overrides)
    c = Constants(**{f: getattr(args, f) for f in FLAGS})
    plan = make_plan(cfg, args.device_gib, c)
    print(render(plan))
    print(json.dumps(summary(plan)))
    return 0 if plan["fits"] else 1


if __name__ == "__main__":
    sys.exit(main())

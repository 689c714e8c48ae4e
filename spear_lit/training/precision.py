"""Mixed precision: fp32 master weights and optimizer state, bf16 compute, and a metric that shows it works.

Why: at the paper's lr 1e-6 an AdamW update (~1e-6 per step) is far below half a bf16 ULP of a typical
weight (~1e-4 at |w| ≈ 0.02), so a policy whose parameters (and hence AdamW's ``exp_avg``/``exp_avg_sq``)
are bf16 barely moves (measured: 100 steps changed 2 % of the weights; with an fp32 master, 87 %). Every
recipe that trains in half precision therefore keeps parameters, gradients' reduction and optimizer
state in fp32 and computes in bf16:

* single process and DDP: Lightning's ``trainer.precision=bf16-mixed`` (autocast over fp32 parameters);
* FSDP2 (``ModelParallelStrategy``): the same key also gives every ``fully_shard`` a
  ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`` (:func:`fsdp_mp_policy`): the all-gathered
  parameters are bf16, the sharded fp32 parameters are what AdamW updates, gradients are reduce-scattered
  in fp32 (verl's choice as well).

:func:`half_precision_weights` is the start-up refusal of a configuration that would keep AdamW state in
half precision (``model.dtype`` bf16/fp16 or ``trainer.precision`` ``*-true``), unless the user opts in
with ``learner.allow_half_precision_weights=true``. :class:`UpdateRatio` measures one optimizer step's
parameter change relative to the parameters (``policy/update_ratio``): ~lr for a healthy Adam run, ~0 for a
policy that does not move.
"""

from __future__ import annotations

import contextlib

import torch

from spear_lit.training.dist import all_reduce

HALF_DTYPES = ("bfloat16", "float16")
HALF_TRUE = ("bf16-true", "16-true", "bf16", "16", "half")
MIXED = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """Run a block with ``dtype`` as torch's default (restored after): the data module builds an iteration's
    old log-probs, masks and advantages in fp32 even inside Lightning's ``HalfPrecision`` step context, which
    sets a bf16 default (−12.34 would be stored as −12.3125)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def fsdp_mp_policy(precision: str | None):
    """FSDP2's ``MixedPrecisionPolicy`` for Lightning's precision flag: ``bf16-mixed`` → compute in bf16,
    reduce gradients in fp32, over parameters kept in their own (fp32) dtype; ``None`` for other flags."""
    dtype = MIXED.get(str(precision))
    if dtype is None:
        return None
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)


def compute_dtype(precision: str | None, param_dtype: torch.dtype) -> torch.dtype:
    """The dtype the policy's forward computes in: the mixed-precision dtype, else the parameters' own."""
    return MIXED.get(str(precision), param_dtype)


def half_precision_weights(model_dtype: str | None, precision: str | None) -> str | None:
    """Why the optimizer would keep half-precision weights and state under this config, or ``None``."""
    if str(precision) in HALF_TRUE:
        return f"trainer.precision={precision} casts the parameters to half precision"
    if model_dtype in HALF_DTYPES:
        return f"model.dtype={model_dtype} loads the parameters in half precision"
    return None


def check_optimizer_params(params, allow: bool) -> None:
    """Refuse half-precision parameters in the optimizer (AdamW keeps its state in their dtype)."""
    half = {str(p.dtype) for p in params if p.dtype in (torch.bfloat16, torch.float16)}
    if half and not allow:
        raise ValueError(
            f"the optimizer would update {', '.join(sorted(half))} parameters: an lr-1e-6 AdamW step is below "
            "half a bf16 ULP of the weights. Train with model.dtype=float32 trainer.precision=bf16-mixed "
            "(fp32 master weights, bf16 compute), or opt in with learner.allow_half_precision_weights=true"
        )


def _local(p: torch.Tensor) -> torch.Tensor:
    """The tensor the optimizer updates on this rank: an FSDP2 DTensor's local shard, else the parameter."""
    return p.to_local() if hasattr(p, "to_local") else p


class UpdateRatio:
    """``RMS(Δθ) / RMS(θ)`` of one optimizer step, over the parameters as the optimizer stores them (fp32
    shards under FSDP2), summed over all ranks: FSDP2 shards add up to the whole model, and DDP's replicas
    give the same ratio summed or not. A collective (every rank measures every step). Costs one copy of
    this rank's parameters during the step.
    """

    def __init__(self, params):
        self.params = [p for p in params if p.requires_grad]
        self.value = float("nan")

    @contextlib.contextmanager
    def measure(self):
        """Wrap ``optimizer.step()``; afterwards :attr:`value` holds the step's update ratio."""
        with torch.no_grad():
            before = [_local(p).detach().clone() for p in self.params]
        yield
        with torch.no_grad():
            delta2 = sum(
                float((_local(p).double() - b.double()).pow(2).sum()) for p, b in zip(self.params, before)
            )
            norm2 = sum(float(b.double().pow(2).sum()) for b in before)
        d, n = all_reduce([delta2, norm2], "sum").tolist()
        self.value = (d / n) ** 0.5 if n > 0 else float("nan")

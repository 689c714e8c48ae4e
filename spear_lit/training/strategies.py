"""Lightning strategies the project adds: FSDP2 with CPU offload and sequence parallelism
(:class:`FSDP2Strategy`), and DeepSpeed ZeRO on CPU processes (gloo), for tests and laptops.

Lightning's ``DeepSpeedStrategy`` refuses anything but CUDA (``setup_environment``) and validates CUDA
device indices (``setup_distributed``). DeepSpeed itself runs ZeRO-2/3 on CPU (its CPU accelerator, a
gloo process group); :class:`CPUDeepSpeedStrategy` only lifts those two checks and reports ``cpu`` as
the root device. On GPUs use Lightning's own ``DeepSpeedStrategy`` (``conf/trainer/deepspeed.yaml``).
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Generator

import torch
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, ModelParallelStrategy


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    """``DeepSpeedStrategy`` on CPU processes (``accelerator: cpu``, gloo; precision ``32-true``).

    Same arguments as Lightning's (``stage``, ``config``, ...). ZeRO-3 partitions the parameters when
    DeepSpeed wraps the model, not while it is built: the policy is loaded whole with ``from_pretrained``
    (which cannot fill parameters that ``deepspeed.zero.Init`` has already partitioned), then sharded.
    """

    strategy_name = "deepspeed_cpu"

    def setup_environment(self) -> None:
        DDPStrategy.setup_environment(self)  # skips DeepSpeedStrategy's CUDA-only check

    def setup_distributed(self) -> None:
        reset_seed()
        self.set_world_ranks()
        self._process_group_backend = "gloo"
        self._init_deepspeed_distributed()

    def _get_process_group_backend(self) -> str:
        return "gloo"

    @property
    def root_device(self) -> torch.device:
        return torch.device("cpu")

    def _setup_model_and_optimizer(self, model, optimizer, lr_scheduler=None):
        import deepspeed

        # Lightning passes root_device.index as DeepSpeed's device rank: None on CPU, which DeepSpeed compares
        # with 0. The process's local rank is what DeepSpeed's CPU accelerator expects.
        engine, ds_optimizer, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=self.local_rank),
            config=self.config,
            model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            dist_init_required=False,
        )
        return engine, ds_optimizer

    @contextlib.contextmanager
    def model_sharded_context(self) -> Generator[None, None, None]:
        yield  # no deepspeed.zero.Init: build whole, partition at deepspeed.initialize


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` (FSDP2) with optional CPU offload and sequence parallelism.

    Args:
        cpu_offload: keep parameter shards, gradients and optimizer state in host memory
            (``torch.distributed.fsdp.CPUOffloadPolicy``); default off.
        sequence_parallel_size: ranks per Ulysses sequence-parallel group
            (:mod:`spear_lit.training.sequence_parallel`); 1 = off. Needs ``data.micro_batch_tokens``.
        **kwargs: ``ModelParallelStrategy``'s (``data_parallel_size``, ``tensor_parallel_size``,
            ``save_distributed_checkpoint``, ...).
    """

    strategy_name = "fsdp2"

    def __init__(self, *, cpu_offload: bool = False, sequence_parallel_size: int = 1, **kwargs):
        super().__init__(**kwargs)
        self.cpu_offload = bool(cpu_offload)
        if int(sequence_parallel_size) < 1:
            raise ValueError(
                f"trainer.strategy.sequence_parallel_size={sequence_parallel_size}: must be >= 1"
            )
        self.sequence_parallel_size = int(sequence_parallel_size)

    def model_to_device(self) -> None:
        if not self.cpu_offload:
            return super().model_to_device()
        # FSDP2 owns the offloaded parameters' placement; Module.to would move them to the device
        for module in self.model.modules():
            for name, buf in module._buffers.items():
                if buf is not None:
                    module._buffers[name] = buf.to(self.root_device)


def is_deepspeed(module) -> bool:
    """``module`` (a LightningModule) is trained by a DeepSpeed strategy."""
    try:
        return isinstance(module.trainer.strategy, DeepSpeedStrategy)
    except RuntimeError:  # not attached to a trainer
        return False


def deepspeed_micro_step(engine, last: bool) -> None:
    """Before each micro-batch's forward, what ``DeepSpeedEngine.forward`` would do if the micro-batch went
    through it (Lightning calls it once per ``training_step``, around all micro-batches): start a new
    micro-step (ZeRO-3 counts micro-steps there and would otherwise *overwrite* the partitioned gradient
    with each backward, keeping only the last micro-batch's), and mark only the last backward as the
    gradient-accumulation boundary (every backward is one unless told otherwise)."""
    from deepspeed.runtime.base_optimizer import ZeROOptimizer

    if isinstance(engine.optimizer, ZeROOptimizer):  # as DeepSpeedEngine.forward tests it
        engine.optimizer.clear_backward_seen_flag()
    engine.set_gradient_accumulation_boundary(last)


def is_model_parallel(module) -> bool:
    """``module`` (a LightningModule) is trained by FSDP2 (``ModelParallelStrategy`` or a subclass)."""
    try:
        return isinstance(module.trainer.strategy, ModelParallelStrategy)
    except RuntimeError:  # not attached to a trainer
        return False

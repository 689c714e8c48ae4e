"""Lightning strategies the project adds: DeepSpeed ZeRO on CPU processes (gloo), for tests and laptops.

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
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy


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

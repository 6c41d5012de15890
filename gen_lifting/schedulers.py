"""nerfstudio's exponential-decay scheduler, its rate multiplier cast to a Python float (for the ``camera_opt`` group).

Why not nerfstudio's ``ExponentialDecayScheduler`` as is: its multiplier is a numpy float, ``LambdaLR`` keeps it in its
state (``_last_lr``) and in the optimizer's ``lr``, and nerfstudio saves both in the checkpoint, which
``torch.load(..., weights_only=True)`` then refuses ("Unsupported global numpy.core.multiarray.scalar"). The curve
itself is nerfstudio's: this class calls it and only casts its value, except after the warm-up with ``lr_final = None``
(a constant rate), where nerfstudio's ``exp(log(lr)) / lr`` is 1 only up to rounding (1.0000000000000007 at 3e-3) and
this class returns exactly 1, so that listing the scheduler leaves the rate bit-identical to listing none.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Type

from nerfstudio.engine.schedulers import ExponentialDecayScheduler, ExponentialDecaySchedulerConfig
from torch.optim import Optimizer, lr_scheduler


@dataclass
class FloatExponentialDecaySchedulerConfig(ExponentialDecaySchedulerConfig):
    """nerfstudio's ``ExponentialDecaySchedulerConfig`` (same fields) whose scheduler state holds Python floats only."""

    _target: Type = field(default_factory=lambda: FloatExponentialDecayScheduler)


class FloatExponentialDecayScheduler(ExponentialDecayScheduler):
    """``ExponentialDecayScheduler`` with a float multiplier, so its state loads with ``weights_only=True``."""

    config: FloatExponentialDecaySchedulerConfig

    def get_scheduler(self, optimizer: Optimizer, lr_init: float) -> lr_scheduler.LRScheduler:
        # nerfstudio's LambdaLR (built once to take its multiplier; the new LambdaLR below resets the rate it set)
        numpy_multiplier = super().get_scheduler(optimizer, lr_init).lr_lambdas[0]
        constant_after_warmup = self.config.lr_final is None

        def multiplier(step: int) -> float:
            if constant_after_warmup and step >= self.config.warmup_steps:
                return 1.0
            return float(numpy_multiplier(step))

        return lr_scheduler.LambdaLR(optimizer, lr_lambda=multiplier)

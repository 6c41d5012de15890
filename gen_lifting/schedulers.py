"""nerfstudio's exponential-decay scheduler, its rate multiplier cast to a Python float (for the ``camera_opt`` group).

Why not nerfstudio's ``ExponentialDecayScheduler`` as is: its multiplier is a numpy float, ``LambdaLR`` keeps it in its
state (``_last_lr``) and in the optimizer's ``lr``, and nerfstudio saves both in the checkpoint, which
``torch.load(..., weights_only=True)`` then refuses ("Unsupported global numpy.core.multiarray.scalar"). The curve
itself is nerfstudio's: this class calls it and only casts its value.
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
        return lr_scheduler.LambdaLR(optimizer, lr_lambda=lambda step: float(numpy_multiplier(step)))

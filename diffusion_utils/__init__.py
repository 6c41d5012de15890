"""Small diffusion utilities shared by ``gen_lifting`` and ``factorized_seg``.

This package imports neither half and never imports nerfstudio, so ``factorized_seg`` stays light.
"""

from diffusion_utils.schedule import DiffusionSchedule, DiffusionScheduleConfig

__all__ = ["DiffusionSchedule", "DiffusionScheduleConfig"]

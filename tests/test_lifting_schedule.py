"""gen-lifting's noise schedule reaches noise; the shared DDPM maths is unchanged for everyone else."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from diffusion_utils.schedule import DiffusionScheduleConfig
from gen_lifting.datamanager import GenLiftingDataManagerConfig


def test_gen_lifting_schedule_ends_near_pure_noise():
    """T = 100 with linear betas 1e-4..0.02 ended at alpha_bar = 0.36 (x_T = 0.60 x_0 + 0.80 eps), while ``sample``
    starts from N(0, I); the default now scales the betas by 1000 / T."""
    schedule = GenLiftingDataManagerConfig().diffusion.setup()
    assert schedule.num_timesteps == 100
    assert schedule.alphas_cumprod[-1] < 1e-4
    assert schedule.betas[0].item() == pytest.approx(1e-3) and schedule.betas[-1].item() == pytest.approx(0.2)
    old = DiffusionScheduleConfig(num_timesteps=100, scale_betas_to_num_timesteps=False).setup()  # the flag
    assert old.alphas_cumprod[-1].item() == pytest.approx(0.3636, abs=1e-3)


def test_default_schedule_is_unchanged_for_segmentation():
    """factorized-seg builds the same class with T = 1000 and the default flags: still diffusers' linear schedule."""
    schedule = DiffusionScheduleConfig().setup()
    reference = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
    assert torch.equal(schedule.betas, reference.betas.float())
    assert torch.equal(schedule.alphas_cumprod, reference.alphas_cumprod.float())
    scaled = DiffusionScheduleConfig(scale_betas_to_num_timesteps=True).setup()  # 1000 / T = 1 at T = 1000
    assert torch.equal(scaled.betas, schedule.betas)


def test_scaled_betas_must_stay_below_one():
    with pytest.raises(ValueError, match="below 1"):
        DiffusionScheduleConfig(num_timesteps=20, scale_betas_to_num_timesteps=True).setup()

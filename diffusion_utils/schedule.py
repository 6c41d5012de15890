"""DDPM maths: linear beta schedule, forward noising with per-sample t, x0/eps conversions, posterior step.

The schedule itself comes from diffusers' ``DDPMScheduler`` (so ``betas`` / ``alphas_cumprod`` are the
library's). diffusers' ``step`` only takes one scalar timestep for the whole batch, while both halves of this
package need a different t per sample (training) and x0-predicting models (gen_lifting), so the per-sample
conversions and the posterior step are written out here and tested against diffusers' ``step``.

Timesteps are 0-indexed like diffusers: ``t = 0`` is the least noisy level (beta_1 in the paper's notation).
Images are in [-1, 1] everywhere in this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch
from diffusers import DDPMScheduler
from jaxtyping import Float, Int
from torch import Tensor


@dataclass
class DiffusionScheduleConfig:
    """Configuration of the forward (noising) process."""

    num_timesteps: int = 1000
    """T, the number of diffusion steps (paper: 1000 for segmentation, 100 for lifting)."""
    beta_start: float = 1e-4
    """Smallest noise variance beta_1 of the linear schedule."""
    beta_end: float = 0.02
    """Largest noise variance beta_T of the linear schedule."""
    scale_betas_to_num_timesteps: bool = False
    """Multiply ``beta_start`` and ``beta_end`` by 1000 / T (improved-diffusion's linear schedule for T != 1000), so
    that a short schedule still ends near pure noise (T = 100: betas 1e-3 .. 0.2, alpha_bar_T = 2e-5). Off: the betas
    as given (T = 100 then ends at alpha_bar_T = 0.36). For T = 1000 both are the same."""

    def betas_range(self) -> tuple[float, float]:
        """(beta_start, beta_end) actually used, after the optional 1000 / T scaling."""
        scale = 1000.0 / self.num_timesteps if self.scale_betas_to_num_timesteps else 1.0
        return self.beta_start * scale, self.beta_end * scale

    def setup(self) -> "DiffusionSchedule":
        return DiffusionSchedule(self)


def _gather(values: Float[Tensor, "T"], t: Int[Tensor, "batch"], ndim: int) -> Tensor:
    """Pick ``values[t]`` per sample and shape it to broadcast against a tensor of ``ndim`` dimensions."""
    out = values.to(t.device)[t]
    return out.reshape(t.shape[0], *([1] * (ndim - 1)))


class DiffusionSchedule:
    """Closed-form quantities of a DDPM with a linear beta schedule; the model is passed in, never owned."""

    def __init__(self, config: DiffusionScheduleConfig) -> None:
        if config.num_timesteps < 1:
            raise ValueError(f"num_timesteps must be >= 1, got {config.num_timesteps}")
        self.config = config
        beta_start, beta_end = config.betas_range()
        if beta_end >= 1.0:
            raise ValueError(f"beta_end scaled by 1000 / T = {beta_end:g} must stay below 1 "
                             f"(T = {config.num_timesteps}); use more timesteps or a smaller beta_end")
        self.scheduler = DDPMScheduler(
            num_train_timesteps=config.num_timesteps,
            beta_start=beta_start,
            beta_end=beta_end,
            beta_schedule="linear",
            clip_sample=False,
        )
        self.betas: Float[Tensor, "T"] = self.scheduler.betas.float()
        self.alphas: Float[Tensor, "T"] = self.scheduler.alphas.float()
        self.alphas_cumprod: Float[Tensor, "T"] = self.scheduler.alphas_cumprod.float()
        prev = torch.cat([torch.ones(1), self.alphas_cumprod[:-1]])
        self.alphas_cumprod_prev: Float[Tensor, "T"] = prev
        # beta_tilde_t = (1 - abar_{t-1}) / (1 - abar_t) * beta_t (DDPM eq. 7), "fixed_small" in diffusers.
        self.posterior_variance: Float[Tensor, "T"] = (1.0 - prev) / (1.0 - self.alphas_cumprod) * self.betas

    @property
    def num_timesteps(self) -> int:
        return self.config.num_timesteps

    def sample_timesteps(
        self, batch: int, device: torch.device | str = "cpu", generator: Optional[torch.Generator] = None,
        t_max: Optional[int] = None, power: float = 1.0,
    ) -> Int[Tensor, "batch"]:
        """t ~ U{0, ..., t_max - 1} (default t_max = T), one per sample; with ``power`` p != 1, t = floor(t_max u^p),
        u ~ U[0, 1), so p > 1 draws small t more often."""
        high = self.num_timesteps if t_max is None else max(1, min(t_max, self.num_timesteps))
        if power == 1.0:
            return torch.randint(0, high, (batch,), generator=generator, device="cpu").to(device)
        u = torch.rand(batch, generator=generator)
        return (high * u.pow(power)).long().clamp(0, high - 1).to(device)

    def add_noise(
        self, x0: Float[Tensor, "batch *rest"], t: Int[Tensor, "batch"], noise: Float[Tensor, "batch *rest"]
    ) -> Float[Tensor, "batch *rest"]:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps."""
        abar = _gather(self.alphas_cumprod, t, x0.ndim).to(x0)
        return abar.sqrt() * x0 + (1.0 - abar).sqrt() * noise

    def x0_from_eps(
        self, x_t: Float[Tensor, "batch *rest"], t: Int[Tensor, "batch"], eps: Float[Tensor, "batch *rest"]
    ) -> Float[Tensor, "batch *rest"]:
        abar = _gather(self.alphas_cumprod, t, x_t.ndim).to(x_t)
        return (x_t - (1.0 - abar).sqrt() * eps) / abar.sqrt()

    def eps_from_x0(
        self, x_t: Float[Tensor, "batch *rest"], t: Int[Tensor, "batch"], x0: Float[Tensor, "batch *rest"]
    ) -> Float[Tensor, "batch *rest"]:
        abar = _gather(self.alphas_cumprod, t, x_t.ndim).to(x_t)
        return (x_t - abar.sqrt() * x0) / (1.0 - abar).sqrt()

    def posterior_mean(
        self, x0: Float[Tensor, "batch *rest"], x_t: Float[Tensor, "batch *rest"], t: Int[Tensor, "batch"]
    ) -> Float[Tensor, "batch *rest"]:
        """Mean of q(x_{t-1} | x_t, x_0) (DDPM eq. 7)."""
        n = x_t.ndim
        abar = _gather(self.alphas_cumprod, t, n).to(x_t)
        abar_prev = _gather(self.alphas_cumprod_prev, t, n).to(x_t)
        beta = _gather(self.betas, t, n).to(x_t)
        alpha = _gather(self.alphas, t, n).to(x_t)
        coef_x0 = abar_prev.sqrt() * beta / (1.0 - abar)
        coef_xt = alpha.sqrt() * (1.0 - abar_prev) / (1.0 - abar)
        return coef_x0 * x0 + coef_xt * x_t

    def step(
        self,
        model_output: Float[Tensor, "batch *rest"],
        t: Int[Tensor, "batch"],
        x_t: Float[Tensor, "batch *rest"],
        prediction: Literal["epsilon", "sample"] = "epsilon",
        generator: Optional[torch.Generator] = None,
        clip_x0: bool = False,
    ) -> tuple[Float[Tensor, "batch *rest"], Float[Tensor, "batch *rest"]]:
        """One ancestral DDPM step x_t -> x_{t-1}; returns (x_{t-1}, x0_hat). No noise is added where t == 0.

        ``prediction="epsilon"``: model_output is eps_hat; ``"sample"``: model_output is x0_hat (gen_lifting's
        render), and the step is the posterior mean of q(x_{t-1} | x_t, x0_hat) plus noise.
        """
        if prediction == "epsilon":
            x0_hat = self.x0_from_eps(x_t, t, model_output)
        elif prediction == "sample":
            x0_hat = model_output
        else:
            raise ValueError(f"prediction must be 'epsilon' or 'sample', got {prediction!r}")
        if clip_x0:
            x0_hat = x0_hat.clamp(-1.0, 1.0)
        mean = self.posterior_mean(x0_hat, x_t, t)
        var = _gather(self.posterior_variance, t, x_t.ndim).to(x_t)
        z = torch.randn(x_t.shape, generator=generator, device="cpu" if generator is None else generator.device)
        z = z.to(x_t)
        nonzero = (t > 0).to(x_t).reshape(-1, *([1] * (x_t.ndim - 1)))
        return mean + nonzero * var.sqrt() * z, x0_hat


def to_model_range(images01: Float[Tensor, "*shape"]) -> Float[Tensor, "*shape"]:
    """[0, 1] (nerfstudio / image files) -> [-1, 1] (diffusion)."""
    return images01 * 2.0 - 1.0


def to_image_range(x: Float[Tensor, "*shape"]) -> Float[Tensor, "*shape"]:
    """[-1, 1] (diffusion) -> [0, 1] (nerfstudio / image files)."""
    return (x + 1.0) * 0.5

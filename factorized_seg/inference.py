"""Using a trained model: segment real images (noise to a small t, one forward pass) and generate images with
their masks (ancestral DDPM, or diffusers' DDIM / DPM-Solver for fewer steps)."""

from __future__ import annotations

from typing import Literal, Optional, Sequence, Tuple

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
from jaxtyping import Float, Int
from torch import Tensor
from tqdm import tqdm

from diffusion_utils.schedule import DiffusionSchedule
from factorized_seg.model import FactorizedUNet

Sampler = Literal["ddpm", "ddim", "dpm"]


def resolve_device(device: str) -> torch.device:
    """``--device`` as a torch.device; one-line ValueError for a malformed name or a device that is not here."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {device!r} is not a torch device name (cpu, cuda, cuda:1, mps)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device is available here; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {device}: MPS is not available here; use --device cpu")
    return dev


def check_class_label(class_label: Optional[int], classes: Sequence[str], num_classes: int) -> None:
    """``--class-label`` must be None or an index the (class-conditional) model knows."""
    if class_label is None:
        return
    if num_classes == 0:
        raise ValueError(f"--class-label {class_label}: the model was trained without class labels; drop the flag")
    if not 0 <= class_label < num_classes:
        names = f" ({', '.join(f'{i}={c}' for i, c in enumerate(classes))})" if classes else ""
        raise ValueError(f"--class-label must lie in 0..{num_classes - 1}{names}, got {class_label}")


def per_image_noise(shape: Sequence[int], seeds: Sequence[int]) -> Float[Tensor, "batch channels height width"]:
    """One noise tensor per image from its own seed, so results do not depend on batching."""
    return torch.stack([torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(s))) for s in seeds])


@torch.no_grad()
def segment_tensor(
    model: FactorizedUNet, schedule: DiffusionSchedule, x0: Float[Tensor, "batch channels height width"],
    t: int, seeds: Sequence[int], labels: Optional[Int[Tensor, "batch"]] = None,
) -> Float[Tensor, "batch k height width"]:
    """Soft masks of real images in [-1, 1]: x_t = noise(x0, t), one forward pass."""
    if model.config.num_masks == 0:
        raise ValueError("the plain scheme has no masks: segment needs a factorized model")
    if not 0 <= t < schedule.num_timesteps:
        raise ValueError(f"t must lie in 0..{schedule.num_timesteps - 1}, got {t}")
    noise = per_image_noise(x0.shape[1:], seeds).to(x0)
    tt = torch.full((x0.shape[0],), t, dtype=torch.long, device=x0.device)
    out = model(schedule.add_noise(x0, tt, noise), tt, labels)
    return out.masks


def _fast_scheduler(schedule: DiffusionSchedule, sampler: Sampler):
    cfg = schedule.scheduler.config
    if sampler == "ddim":
        return DDIMScheduler.from_config(cfg, timestep_spacing="trailing")
    return DPMSolverMultistepScheduler.from_config(cfg, timestep_spacing="trailing")


@torch.no_grad()
def sample_images(
    model: FactorizedUNet, schedule: DiffusionSchedule, num: int, resolution: int, seed: int,
    sampler: Sampler = "ddpm", steps: int = 50, labels: Optional[Int[Tensor, "batch"]] = None,
    device: torch.device | str = "cpu", progress: bool = True,
) -> Tuple[Float[Tensor, "batch channels height width"], Optional[Float[Tensor, "batch k height width"]]]:
    """Images in [-1, 1] from noise, and the masks the model gave at the last reverse step.

    ``ddpm``: the ancestral sampler with all T steps (``steps`` is ignored); ``ddim`` / ``dpm``: diffusers'
    DDIMScheduler (eta = 0) or DPMSolverMultistepScheduler with ``steps`` steps.
    """
    gen = torch.Generator().manual_seed(seed)
    c = model.config.image_channels
    x = torch.randn((num, c, resolution, resolution), generator=gen).to(device)
    masks = None
    if sampler == "ddpm":
        timesteps = list(range(schedule.num_timesteps - 1, -1, -1))
    else:
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        sched = _fast_scheduler(schedule, sampler)
        sched.set_timesteps(steps)
        timesteps = [int(s) for s in sched.timesteps]
    for t in tqdm(timesteps, desc=f"sampling ({sampler})", disable=not progress, leave=False):
        tt = torch.full((num,), t, dtype=torch.long, device=device)
        out = model(x, tt, labels)
        masks = out.masks
        if sampler == "ddpm":
            x, _ = schedule.step(out.eps, tt, x, generator=gen)
        else:
            x = sched.step(out.eps, t, x).prev_sample
    return x.clamp(-1, 1), masks

"""``factorized-seg sample``: generate images and their masks from noise."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from diffusion_utils.schedule import to_image_range
from factorized_seg.inference import Sampler, sample_images
from factorized_seg.trainer import load_for_inference
from factorized_seg.viz import atomic_save_image, colour_masks, image_mask_grid, save_tensor_image, to_uint8


@dataclass(frozen=True)
class SampleConfig:
    """``factorized-seg sample``: reverse diffusion from noise; the masks of the last step segment the sample."""

    run: Path
    """Run folder made by 'factorized-seg train' or a checkpoint file."""
    output_dir: Path = Path("outputs/sample")
    """Where grid.png, images/, masks/ (label PNGs) and mask_colours/ go."""
    num: int = 16
    """Number of images."""
    sampler: Sampler = "ddim"
    """ddpm: ancestral sampler with all T steps; ddim / dpm: diffusers' DDIM (eta 0) / DPM-Solver++ multistep."""
    steps: int = 50
    """Steps of the ddim / dpm samplers (ddpm always uses T)."""
    seed: int = 0
    """Noise seed."""
    class_label: Optional[int] = None
    """Class index for a class-conditional model (None = the 'no class' embedding)."""
    batch_size: int = 64
    """Images generated together."""
    device: str = "cpu"
    """torch device."""
    progress: bool = True
    """Show a progress bar."""


def run_sample(cfg: SampleConfig) -> Path:
    """Generate; returns the grid's path."""
    if cfg.num < 1:
        raise ValueError(f"--num must be >= 1, got {cfg.num}")
    model, schedule, meta = load_for_inference(cfg.run, cfg.device)
    res = int(meta["resolution"])
    xs, ms = [], []
    for start in range(0, cfg.num, cfg.batch_size):
        n = min(cfg.batch_size, cfg.num - start)
        labels = (torch.full((n,), cfg.class_label, dtype=torch.long, device=cfg.device)
                  if cfg.class_label is not None else None)
        x, m = sample_images(model, schedule, n, res, seed=cfg.seed + start, sampler=cfg.sampler, steps=cfg.steps,
                             labels=labels, device=cfg.device, progress=cfg.progress)
        xs.append(to_image_range(x).float().cpu())
        ms.append(None if m is None else m.float().cpu())
    images = torch.cat(xs)
    masks = None if ms[0] is None else torch.cat(ms)
    out = Path(cfg.output_dir)
    for i in range(cfg.num):
        save_tensor_image(images[i], out / "images" / f"sample_{i:04d}.png")
        if masks is not None:
            atomic_save_image(masks[i].argmax(0).numpy().astype("uint8"), out / "masks" / f"sample_{i:04d}.png")
            save_tensor_image(colour_masks(masks[i:i + 1])[0], out / "mask_colours" / f"sample_{i:04d}.png")
    grid = out / "grid.png"
    atomic_save_image(to_uint8(image_mask_grid(images, masks, nrow=min(8, cfg.num))), grid)
    return grid

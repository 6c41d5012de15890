"""``factorized-seg sample``: generate images and their masks from noise."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from diffusion_utils.schedule import to_image_range
from factorized_seg.checkpoints import load_for_inference, remove_stale_temporaries
from factorized_seg.data import SegDataError, check_output_dir
from factorized_seg.inference import Sampler, check_class_label, resolve_device, sample_images
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
    """Generate; returns the grid's path. Every input is checked before anything is written."""
    for flag, value, ok in (("--num", cfg.num, cfg.num >= 1), ("--batch-size", cfg.batch_size, cfg.batch_size >= 1),
                            ("--steps", cfg.steps, cfg.steps >= 1 or cfg.sampler == "ddpm"),
                            ("--seed", cfg.seed, cfg.seed >= 0)):
        if not ok:
            raise SegDataError(f"{flag} must be >= {0 if flag == '--seed' else 1}, got {value}")
    out = check_output_dir(cfg.output_dir)
    device = resolve_device(cfg.device)
    model, schedule, meta = load_for_inference(cfg.run, device)
    check_class_label(cfg.class_label, meta.get("classes", []), model.config.num_classes)
    res = int(meta["resolution"])
    xs, ms = [], []
    for start in range(0, cfg.num, cfg.batch_size):
        n = min(cfg.batch_size, cfg.num - start)
        labels = (torch.full((n,), cfg.class_label, dtype=torch.long, device=device)
                  if cfg.class_label is not None else None)
        x, m = sample_images(model, schedule, n, res, seed=cfg.seed + start, sampler=cfg.sampler, steps=cfg.steps,
                             labels=labels, device=device, progress=cfg.progress)
        xs.append(to_image_range(x).float().cpu())
        ms.append(None if m is None else m.float().cpu())
    images = torch.cat(xs)
    masks = None if ms[0] is None else torch.cat(ms)
    remove_stale_temporaries(out / sub for sub in ("", "images", "masks", "mask_colours"))
    for i in range(cfg.num):
        save_tensor_image(images[i], out / "images" / f"sample_{i:04d}.png")
        if masks is not None:
            atomic_save_image(masks[i].argmax(0).numpy().astype("uint8"), out / "masks" / f"sample_{i:04d}.png")
            save_tensor_image(colour_masks(masks[i:i + 1])[0], out / "mask_colours" / f"sample_{i:04d}.png")
    grid = out / "grid.png"
    atomic_save_image(to_uint8(image_mask_grid(images, masks, nrow=min(8, cfg.num))), grid)
    return grid

"""Tiny synthetic segmentation data made on the fly: one coloured shape (disc, square or diamond) at a random
place and size on a textured background whose colour differs from the shape's, with its ground-truth mask
(255 shape, 0 background).

Variants (``variant=``):
- ``default``: shape and background of independent random colours (at least 120 apart), the background a smooth
  colour field with pixel noise (std 20).
- ``light``: the shape is lighter than its own background (by 50-90 grey levels), both of random hue and of
  overlapping grey levels across images, on a mildly noisy background (std 12). Which region is the shape is
  decided inside each image (the lighter one), not by a colour rule: the best fixed colour rule, fitted on
  ground truth, scores strict IoU ~0.46 (tests/test_seg_golden.py), well under per-image 2-means.
"""

from __future__ import annotations

from pathlib import Path
from typing import Tuple

import numpy as np
from PIL import Image


VARIANTS = ("default", "light")


def shape_image(rng: np.random.Generator, size: int, variant: str = "default") -> Tuple[np.ndarray, np.ndarray]:
    """One image (uint8, size x size x 3) and its boolean foreground mask."""
    if variant == "light":
        return light_shape_image(rng, size)
    if variant != "default":
        raise ValueError(f"unknown shapes variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    base = rng.uniform(0, 255, 3)
    coarse = (base + rng.uniform(-40, 40, (3, 3, 3))).clip(0, 255)  # smooth colour field around a base colour
    yy, xx = np.mgrid[:size, :size] / (size - 1) * 2
    y0, x0 = np.floor(yy).clip(0, 1).astype(int), np.floor(xx).clip(0, 1).astype(int)
    fy, fx = (yy - y0)[..., None], (xx - x0)[..., None]
    bg = ((1 - fy) * (1 - fx) * coarse[y0, x0] + (1 - fy) * fx * coarse[y0, x0 + 1]
          + fy * (1 - fx) * coarse[y0 + 1, x0] + fy * fx * coarse[y0 + 1, x0 + 1])
    bg = bg + rng.normal(0, 20, (size, size, 3))  # texture
    fg = random_shape(rng, size, 0.15, 0.3)
    colour = rng.uniform(0, 255, 3)
    while np.linalg.norm(colour - base) < 120:  # the shape stands out from the background by colour
        colour = rng.uniform(0, 255, 3)
    shade = colour + rng.normal(0, 8, (size, size, 3))
    img = np.where(fg[..., None], shade, bg)
    return img.clip(0, 255).astype(np.uint8), fg


def random_shape(rng: np.random.Generator, size: int, rmin: float, rmax: float) -> np.ndarray:
    """Boolean mask of a disc, square or diamond of radius U[rmin, rmax] x size, wholly inside the image."""
    r = rng.uniform(rmin, rmax) * size
    cy, cx = rng.uniform(r, size - r, 2)
    yy, xx = np.mgrid[:size, :size] + 0.5
    kind = rng.integers(3)
    if kind == 0:
        return np.hypot(yy - cy, xx - cx) < r
    if kind == 1:
        return (np.abs(yy - cy) < r * 0.85) & (np.abs(xx - cx) < r * 0.85)
    return np.abs(yy - cy) + np.abs(xx - cx) < r * 1.2


def light_shape_image(rng: np.random.Generator, size: int) -> Tuple[np.ndarray, np.ndarray]:
    """The ``light`` variant: a shape 50-90 grey levels lighter than its background, both of random hue."""
    grey_bg = rng.uniform(30, 165)
    grey_fg = grey_bg + rng.uniform(50, 90)
    base = grey_bg + rng.uniform(-25, 25, 3)
    colour = grey_fg + rng.uniform(-25, 25, 3)
    fg = random_shape(rng, size, 0.15, 0.3)
    bg = base + rng.normal(0, 12, (size, size, 3))
    shade = colour + rng.normal(0, 4, (size, size, 3))
    img = np.where(fg[..., None], shade, bg)
    return img.clip(0, 255).astype(np.uint8), fg


def make_shapes(root: Path, n: int = 64, size: int = 32, seed: int = 0,
                variant: str = "default") -> Tuple[Path, Path]:
    """Write n images to root/images and their masks to root/masks; returns both folders."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img, fg = shape_image(rng, size, variant)
        Image.fromarray(img).save(root / "images" / f"s{i:04d}.png")
        Image.fromarray((fg * 255).astype(np.uint8)).save(root / "masks" / f"s{i:04d}.png")
    return root / "images", root / "masks"

"""Colour-coded masks, overlays, image grids and atomic image writes."""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from jaxtyping import Float
from PIL import Image
from torch import Tensor
from torchvision.utils import make_grid

PALETTE = torch.tensor([
    [230, 25, 75], [60, 180, 75], [0, 130, 200], [255, 225, 25], [145, 30, 180], [70, 240, 240],
    [245, 130, 48], [240, 50, 230], [210, 245, 60], [250, 190, 212], [0, 128, 128], [170, 110, 40],
], dtype=torch.float32) / 255.0


def colour_masks(masks: Float[Tensor, "batch k height width"]) -> Float[Tensor, "batch 3 height width"]:
    """Soft masks -> RGB in [0, 1]: each region's colour weighted by its mask (argmax colours if masks are hard)."""
    k = masks.shape[1]
    pal = PALETTE[torch.arange(k) % len(PALETTE)].to(masks)
    return torch.einsum("bkhw,kc->bchw", masks, pal)


def overlay(images01: Float[Tensor, "batch 3 height width"], masks: Float[Tensor, "batch k height width"],
            alpha: float = 0.5) -> Float[Tensor, "batch 3 height width"]:
    """Image blended with the colour of each pixel's argmax region."""
    hard = torch.nn.functional.one_hot(masks.argmax(1), masks.shape[1]).permute(0, 3, 1, 2).to(masks)
    return (1 - alpha) * images01 + alpha * colour_masks(hard)


def image_mask_grid(images01: Float[Tensor, "batch 3 height width"],
                    masks: Float[Tensor, "batch k height width"] | None, nrow: int = 8, min_size: int = 64) -> Tensor:
    """Rows of images, each row followed by a row of their colour-coded soft masks (tiles enlarged, nearest
    neighbour, to at least ``min_size`` pixels so 32x32 runs stay readable)."""
    scale = max(1, -(-min_size // images01.shape[-1]))
    if scale > 1:
        images01 = torch.nn.functional.interpolate(images01, scale_factor=scale, mode="nearest")
        masks = None if masks is None else torch.nn.functional.interpolate(masks, scale_factor=scale, mode="nearest")
    rows = []
    for start in range(0, images01.shape[0], nrow):
        rows.append(images01[start:start + nrow])
        if masks is not None:
            rows.append(colour_masks(masks[start:start + nrow]))
    return make_grid(torch.cat(rows), nrow=nrow, padding=1, pad_value=1.0)


def to_uint8(img01: Float[Tensor, "3 height width"]) -> np.ndarray:
    return (img01.clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255 + 0.5).astype(np.uint8)


TEMP_PREFIX = ".tmp-"
"""Prefix of the temporaries of atomic writes (a killed writer's leftovers are removed by name)."""


def temporary_file(folder: Path, suffix: str = "") -> Path:
    """A new empty ``.tmp-*`` file in ``folder`` with the usual permissions (the umask applies; tempfile.mkstemp
    would make every output private to its owner)."""
    folder.mkdir(parents=True, exist_ok=True)
    while True:
        path = folder / f"{TEMP_PREFIX}{secrets.token_hex(8)}{suffix}"
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return path
        except FileExistsError:
            continue


def atomic_save_image(array: np.ndarray | Image.Image, path: Path) -> None:
    """PIL save to a temp file in the same folder, then os.replace (no half-written PNGs)."""
    path = Path(path)
    img = array if isinstance(array, Image.Image) else Image.fromarray(array)
    tmp = temporary_file(path.parent, path.suffix)
    try:
        img.save(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_tensor_image(img01: Float[Tensor, "3 height width"], path: Path) -> None:
    atomic_save_image(to_uint8(img01), path)


def atomic_save_npz(path: Path, **arrays: np.ndarray) -> None:
    path = Path(path)
    tmp = temporary_file(path.parent, ".npz")
    try:
        np.savez_compressed(tmp, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def label_names(names: Sequence[str]) -> list:
    return [Path(n).stem for n in names]

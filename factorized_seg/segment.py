"""``factorized-seg segment``: images -> label PNGs (argmax region), optional soft masks (npz) and overlays."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from diffusion_utils.schedule import to_model_range
from factorized_seg.checkpoints import load_for_inference, remove_stale_temporaries
from factorized_seg.data import SegDataError, check_output_dir, list_images, load_images, read_rgb, resolve_data
from factorized_seg.inference import check_class_label, resolve_device, segment_tensor
from factorized_seg.viz import atomic_save_image, atomic_save_npz, overlay, to_uint8


@dataclass(frozen=True)
class SegmentConfig:
    """``factorized-seg segment``: noise each image to a small t, one forward pass, argmax over the K masks."""

    run: Path
    """Run folder made by 'factorized-seg train' (the EMA weights of its last checkpoint) or a checkpoint file."""
    images: str
    """An image file, a folder of images, a glob pattern ('photos/*.jpg') or a bundled dataset name."""
    output_dir: Path = Path("outputs/segment")
    """Where masks/ (label PNGs, original size), overlays/ and soft/ go."""
    t: int = 30
    """Diffusion timestep the images are noised to before the forward pass (0-indexed)."""
    batch_size: int = 32
    """Images per forward pass."""
    seed: int = 0
    """Noise seed; image i of the sorted list uses seed + i, so results do not depend on batch size."""
    class_label: Optional[int] = None
    """Class index for a class-conditional model (None = the 'no class' embedding)."""
    save_soft: bool = False
    """Also write soft masks (float16, model resolution) as soft/NAME.npz (key 'masks', shape k x h x w)."""
    save_overlays: bool = True
    """Write overlays/NAME.png (image blended with the region colours)."""
    device: str = "cpu"
    """torch device."""
    progress: bool = True
    """Show a progress bar."""


def run_segment(cfg: SegmentConfig) -> List[Path]:
    """Segment every image; returns the written label PNG paths. Every input is checked before anything is
    written."""
    if cfg.batch_size < 1:
        raise SegDataError(f"--batch-size must be >= 1, got {cfg.batch_size}")
    if cfg.seed < 0:
        raise SegDataError(f"--seed must be >= 0, got {cfg.seed}")
    out = check_output_dir(cfg.output_dir)
    device = resolve_device(cfg.device)
    model, schedule, meta = load_for_inference(cfg.run, device)
    if not 0 <= cfg.t < schedule.num_timesteps:
        raise SegDataError(f"--t must lie in 0..{schedule.num_timesteps - 1} (the model's T is "
                           f"{schedule.num_timesteps}), got {cfg.t}")
    if model.config.num_masks == 0:
        raise SegDataError(f"{cfg.run} is a plain DDPM (scheme 'plain', no masks): segment needs a factorized model")
    check_class_label(cfg.class_label, meta.get("classes", []), model.config.num_classes)
    try:
        source: str | Path = resolve_data(cfg.images)
    except SegDataError:
        source = cfg.images  # a glob pattern (or a missing path, which list_images reports)
    files = list_images(source)
    res = int(meta["resolution"])
    stems = [f.stem for f in files]
    if len(set(stems)) != len(stems):
        raise SegDataError("two input images share a file name stem; their masks would overwrite each other")
    images = load_images(files, res, progress=False)  # reads all first: an unreadable file stops before writing
    sizes = [read_rgb(f).size for f in files]
    remove_stale_temporaries(out / sub for sub in ("masks", "overlays", "soft"))
    written = []
    for start in tqdm(range(0, len(files), cfg.batch_size), desc="segment", disable=not cfg.progress):
        sl = slice(start, start + cfg.batch_size)
        x0 = to_model_range(images[sl].float().div(255)).to(device)
        labels = (torch.full((x0.shape[0],), cfg.class_label, dtype=torch.long, device=device)
                  if cfg.class_label is not None else None)
        masks = segment_tensor(model, schedule, x0, cfg.t, seeds=range(cfg.seed + start, cfg.seed + start + len(x0)),
                               labels=labels).float().cpu()
        for j, f in enumerate(files[sl]):
            w, h = sizes[start + j]
            full = F.interpolate(masks[j:j + 1], size=(h, w), mode="bilinear", align_corners=False)
            label = full[0].argmax(0).numpy().astype(np.uint8)
            path = out / "masks" / f"{f.stem}.png"
            atomic_save_image(label, path)
            written.append(path)
            if cfg.save_overlays:
                img = torch.from_numpy(np.array(read_rgb(f))).permute(2, 0, 1).float() / 255
                atomic_save_image(to_uint8(overlay(img[None], full)[0]), out / "overlays" / f"{f.stem}.png")
            if cfg.save_soft:
                atomic_save_npz(out / "soft" / f"{f.stem}.npz", masks=masks[j].numpy().astype(np.float16))
    return written

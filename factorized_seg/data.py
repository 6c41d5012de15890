"""Image folders, bundled datasets, class-label files, mask folders and training augmentation."""

from __future__ import annotations

import glob as globlib
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float, UInt8
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from tqdm import tqdm

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"


class SegDataError(ValueError):
    """Bad input data; the message is one line naming the problem and the fix."""


def bundled_names() -> List[str]:
    return sorted(p.name for p in BUNDLED_DIR.iterdir() if p.is_dir()) if BUNDLED_DIR.is_dir() else []


def resolve_data(name_or_path: str) -> Path:
    """A folder path, or the name of a bundled dataset (e.g. ``flowers17``) -> its image folder."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        if path.is_dir() and (path / "images").is_dir():
            return path / "images"
        return path
    if "/" not in name_or_path and name_or_path in bundled_names():
        return BUNDLED_DIR / name_or_path / "images"
    raise SegDataError(
        f"--data {name_or_path!r} is neither an existing folder nor a bundled dataset "
        f"(bundled: {', '.join(bundled_names()) or 'none'})"
    )


def bundled_masks(name: str) -> Optional[Path]:
    """Mask folder of a bundled dataset, if it has one."""
    p = BUNDLED_DIR / name / "masks"
    return p if p.is_dir() else None


def list_images(spec: str | Path) -> List[Path]:
    """Image files from a file, a folder (not recursive) or a glob pattern, sorted by name."""
    spec = str(spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        files = [p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES]
    elif path.is_file():
        files = [path]
    else:
        files = [Path(p) for p in globlib.glob(spec) if Path(p).suffix.lower() in IMAGE_SUFFIXES]
        if not files and not any(ch in spec for ch in "*?["):
            raise SegDataError(f"{spec} does not exist: give an image file, a folder of images or a glob pattern")
    if not files:
        raise SegDataError(f"no images ({'/'.join(IMAGE_SUFFIXES)}) found in {spec}: point to a folder with images")
    return sorted(files)


WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
"""Pillow modes of 16-bit greyscale PNGs ("I" in older Pillow); ``convert`` would clip them at 255."""


def _wide_to_uint8(im: Image.Image, path: Path, what: str) -> np.ndarray:
    """A 16-bit greyscale image at its real range (0..65535 -> 0..255, rounded)."""
    values = np.asarray(im).astype(np.int64)
    if values.size and (values.min() < 0 or values.max() > 65535):
        raise SegDataError(f"{what} {path} has values outside 0..65535 (mode {im.mode}): save it as an 8- or 16-bit "
                           "PNG")
    return ((values * 255 + 32767) // 65535).astype(np.uint8)


def _open(path: Path, what: str):
    try:
        im = Image.open(path)
        im.load()
        return im
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise SegDataError(f"cannot read {what} {path} ({type(err).__name__}): remove or replace the file") from None


def read_rgb(path: Path) -> Image.Image:
    """An image as 8-bit RGB. 16-bit images keep their real range (scaled to 0..255, never clipped); 16-bit
    RGB PNGs already open as 8-bit RGB in Pillow (the high byte)."""
    with _open(path, "image") as im:
        if im.mode in WIDE_MODES:
            return Image.fromarray(_wide_to_uint8(im, path, "image")).convert("RGB")
        if im.mode == "F":
            raise SegDataError(f"image {path} holds floating-point values: save it as an 8- or 16-bit PNG or a JPEG")
        return im.convert("RGB")


def load_images(
    files: Sequence[Path], resolution: int, progress: bool = True
) -> UInt8[Tensor, "batch 3 height width"]:
    """Every image resized (whole image, aspect not kept) to resolution x resolution, as uint8."""
    out = torch.empty(len(files), 3, resolution, resolution, dtype=torch.uint8)
    for i, f in enumerate(tqdm(files, desc="loading images", disable=not progress, leave=False)):
        im = read_rgb(f).resize((resolution, resolution), Image.BICUBIC)
        out[i] = torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)
    return out


def read_labels(path: Path, files: Sequence[Path]) -> Tuple[torch.Tensor, List[str]]:
    """Class-label file: one ``filename label`` (or ``filename,label``) per line; labels are names or integers.

    Returns one class index per file (in ``files`` order) and the sorted class names.
    """
    if not path.is_file():
        raise SegDataError(f"label file {path} does not exist")
    table: Dict[str, str] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.replace(",", " ").split()
        if len(parts) != 2:
            raise SegDataError(f"{path}:{n}: expected 'filename label', got {line!r}")
        table[Path(parts[0]).name] = parts[1]
        table.setdefault(Path(parts[0]).stem, parts[1])
    missing = [f.name for f in files if f.name not in table and f.stem not in table]
    if missing:
        raise SegDataError(f"label file {path} has no label for {len(missing)} image(s), e.g. {missing[0]}")
    names = [table.get(f.name, table.get(f.stem)) for f in files]
    classes = sorted(set(names), key=lambda c: (not c.isdigit(), int(c) if c.isdigit() else 0, c))
    index = {c: i for i, c in enumerate(classes)}
    return torch.tensor([index[c] for c in names], dtype=torch.long), classes


def read_mask(path: Path) -> np.ndarray:
    """A ground-truth mask PNG as uint8 (0 background, 255 foreground, anything else ignored). A 16-bit mask is
    scaled to 8 bits (65535 -> 255, 32896 -> 128), never clipped."""
    with _open(path, "mask") as im:
        if im.mode in WIDE_MODES:
            return _wide_to_uint8(im, path, "mask")
        return np.asarray(im.convert("L"))


def read_label_map(path: Path) -> np.ndarray:
    """A predicted label PNG (values 0..K-1) as integers: single-channel images (8-bit, 16-bit, palette) are read
    as stored, never rescaled; colour images through their luminance (equal channels keep their value)."""
    with _open(path, "prediction") as im:
        if im.mode in WIDE_MODES + ("L", "P", "1"):
            return np.asarray(im).astype(np.int64)
        return np.asarray(im.convert("L")).astype(np.int64)


def check_output_dir(path: Path, flag: str = "--output-dir") -> Path:
    """An output folder that exists or can be made (not an existing file); nothing is created here."""
    path = Path(path)
    for parent in (path, *path.parents):
        if parent.exists():
            if not parent.is_dir():
                raise SegDataError(f"{flag} {path}: {parent} is a file, not a folder")
            break
    return path


def augment(
    x: Float[Tensor, "batch 3 height width"], generator: torch.Generator, flip: bool, min_crop: float,
    max_shift: int,
) -> Float[Tensor, "batch 3 height width"]:
    """Random horizontal flip, random crop (area fraction in [min_crop, 1], resized back) and random shift
    (reflect-padded translation by up to ``max_shift`` pixels). All per sample."""
    batch, _, h, w = x.shape
    out = []
    r = torch.rand(batch, 5, generator=generator)
    for i in range(batch):
        img = x[i:i + 1]
        if min_crop < 1.0:
            scale = min_crop + (1.0 - min_crop) * r[i, 0].item()
            ch, cw = max(1, round(h * scale ** 0.5)), max(1, round(w * scale ** 0.5))
            top = int(r[i, 1].item() * (h - ch + 1))
            left = int(r[i, 2].item() * (w - cw + 1))
            img = img[..., top:top + ch, left:left + cw]
            if (ch, cw) != (h, w):
                img = F.interpolate(img, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
        if max_shift > 0:
            dy = int(r[i, 3].item() * (2 * max_shift + 1)) - max_shift
            dx = int(r[i, 4].item() * (2 * max_shift + 1)) - max_shift
            p = max_shift
            img = F.pad(img, (p, p, p, p), mode="reflect")[..., p + dy:p + dy + h, p + dx:p + dx + w]
        out.append(img)
    x = torch.cat(out)
    if flip:
        fl = torch.rand(batch, generator=generator) < 0.5
        x = torch.where(fl[:, None, None, None], x.flip(-1), x)
    return x

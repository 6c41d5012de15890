"""Checks run before training so bad scene folders fail with one line naming the problem and the fix."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, List, Tuple

import numpy as np
from PIL import Image

from gen_lifting.datasets import DataNotFoundError, resolve_data

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_TO_RGB = "convert them to RGB, e.g. PIL: Image.open(p).convert('RGB').save(p)"


class SceneDataError(ValueError):
    """A scene folder that cannot be trained on; the message is one line with the problem and the fix."""


def check_image_folder_consistency(paths: Iterable[Path], allow_alpha: bool = True) -> Tuple[int, int]:
    """Decode every image; require RGB (or RGBA if ``allow_alpha``) and one common size; return (width, height)."""
    sizes: dict = {}
    for path in paths:
        if not path.is_file():
            raise SceneDataError(f"image {path} is missing; restore it or drop its entry from the scene's pose file")
        try:
            with Image.open(path) as image:
                image.load()  # full decode: catches truncated files that the header alone does not reveal
                mode, size = image.mode, image.size
        except (OSError, SyntaxError, ValueError) as err:
            raise SceneDataError(f"image {path} is corrupt or not an image ({err}); re-export or replace it") from None
        if mode in ("1", "L", "LA", "I", "I;16", "F"):
            raise SceneDataError(f"image {path} is grayscale (mode {mode}); {_TO_RGB}")
        if mode == "RGBA" and not allow_alpha:
            raise SceneDataError(f"image {path} has an alpha channel, not supported for this format; {_TO_RGB}")
        if mode not in ("RGB", "RGBA"):
            raise SceneDataError(f"image {path} has unsupported mode {mode}; {_TO_RGB}")
        sizes.setdefault(size, path)
    if not sizes:
        raise SceneDataError("no images found; put the scene's images next to its pose file")
    if len(sizes) > 1:
        (size_a, path_a), (size_b, path_b) = list(sizes.items())[:2]
        raise SceneDataError(
            f"images have mixed sizes: {path_a} is {size_a[0]}x{size_a[1]} but {path_b} is {size_b[0]}x{size_b[1]}; "
            "resize them all to one size"
        )
    return next(iter(sizes))


def _blender_images(root: Path) -> List[Path]:
    paths = []
    for split_file in sorted(root.glob("transforms_*.json")):
        try:
            frames = json.loads(split_file.read_text())["frames"]
            # nerfstudio's blender parser appends ".png" to every file_path, so we check exactly that file
            paths += [root / (frame["file_path"].replace("./", "") + ".png") for frame in frames]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise SceneDataError(f"{split_file} is not a Blender transforms file ({err!r}); fix or re-export it") from None
    return paths


def _llff_images(root: Path) -> List[Path]:
    try:
        poses_bounds = np.load(root / "poses_bounds.npy")
    except (OSError, ValueError) as err:
        raise SceneDataError(f"{root / 'poses_bounds.npy'} cannot be read ({err}); regenerate it with LLFF's imgs2poses.py") from None
    if poses_bounds.ndim != 2 or poses_bounds.shape[1] != 17:
        raise SceneDataError(f"{root / 'poses_bounds.npy'} has shape {poses_bounds.shape}, expected [num_images, 17]")
    folders = sorted(p for p in root.glob("images*") if p.is_dir())
    if not folders:
        raise SceneDataError(f"{root} has poses_bounds.npy but no images/ or images_N/ folder; add the images")
    paths = []
    for folder in folders:
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if len(files) != len(poses_bounds):
            raise SceneDataError(
                f"{folder} has {len(files)} images but poses_bounds.npy has {len(poses_bounds)} poses; they must match"
            )
        check_image_folder_consistency(files, allow_alpha=False)  # sizes may differ between folders
        paths += files
    return paths


def validate_scene(path: str | Path) -> str:
    """Return the scene format ("blender" | "llff") after checking its files, or raise SceneDataError."""
    try:
        root = resolve_data(path)
    except DataNotFoundError as err:
        raise SceneDataError(str(err)) from None
    if not root.is_dir():
        raise SceneDataError(f"--data {root} is a file; pass the scene folder that holds the pose file and images")
    if (root / "transforms_train.json").is_file():
        check_image_folder_consistency(_blender_images(root))
        return "blender"
    if (root / "poses_bounds.npy").is_file():
        _llff_images(root)
        return "llff"
    raise SceneDataError(
        f"{root} has neither transforms_train.json (Blender) nor poses_bounds.npy (LLFF); point --data at a scene folder"
    )

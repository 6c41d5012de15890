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
_HIGH_BIT_TO_RGB = (
    "save it as 8-bit RGB with its range kept, e.g. Image.fromarray((np.asarray(Image.open(p)) // 257)"
    ".astype('uint8')).convert('RGB').save(p) (Image.open(p).convert('RGB') would clip it to white)"
)
# 16-bit RGB(A) PNGs need nothing: Pillow decodes them to 8 bits with their range (the high byte of each value), so
# every loader here and nerfstudio's read them right. 16-bit grayscale has no such decoding: convert("RGB") clips it
# to 255 and nerfstudio's np.array(image, dtype="uint8") wraps it, so it is refused with the fix that keeps the range.


def is_high_bit_depth_grayscale(mode: str) -> bool:
    """Pillow modes of 16-bit grayscale PNGs ("I;16", "I;16B", ...; "I" from older Pillow)."""
    return mode.startswith("I;16") or mode == "I"


def high_bit_depth_message(path: Path, mode: str) -> str:
    return f"image {path} is a 16-bit grayscale image (mode {mode}), not supported; {_HIGH_BIT_TO_RGB}"


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
        if is_high_bit_depth_grayscale(mode):
            raise SceneDataError(high_bit_depth_message(path, mode))
        if mode in ("1", "L", "LA", "F"):
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


def scene_kind(root: Path) -> str | None:
    """"blender" | "llff" from the pose file a scene folder holds (no image is read); None if neither."""
    if (root / "transforms_train.json").is_file():
        return "blender"
    if (root / "poses_bounds.npy").is_file():
        return "llff"
    return None


_KINDS = {"blender": "a Blender (360) scene (transforms_train.json)",
          "llff": "an LLFF (forward-facing) scene (poses_bounds.npy)"}


def check_scene_kind(data: str | Path | None, dataparser_config: object, oracle: bool = False) -> None:
    """Refuse a scene of the other kind than the method's dataparser reads, naming the method to use instead.

    ``ns-train gen-lifting --data fern`` would otherwise fail deep in nerfstudio's Blender parser with a
    FileNotFoundError, and ``gen-lifting-single --data lego`` in the LLFF parser. Scenes of neither kind and
    dataparsers other than Blender / LLFF are left to ``validate_scene`` and the dataparser.
    """
    from nerfstudio.data.dataparsers.blender_dataparser import BlenderDataParserConfig

    from gen_lifting.llff_dataparser import LLFFDataParserConfig

    if isinstance(dataparser_config, LLFFDataParserConfig):
        reads = "llff"
    elif isinstance(dataparser_config, BlenderDataParserConfig):
        reads = "blender"
    else:
        return
    name = data if data is not None else getattr(dataparser_config, "data", None)
    if name is None:
        return
    try:
        root = resolve_data(name)
    except DataNotFoundError:
        return  # validate_scene names the problem
    kind = scene_kind(root)
    if kind is None or kind == reads:
        return
    suffix = "-oracle" if oracle else ""
    method = {"blender": f"gen-lifting{suffix}", "llff": f"gen-lifting-single{suffix}"}[kind]
    reads_what = {"blender": "Blender scenes (transforms_*.json)", "llff": "LLFF scenes (poses_bounds.npy)"}[reads]
    raise SceneDataError(f"--data {name} is {_KINDS[kind]}, but this method reads {reads_what}; "
                         f"use ns-train {method} --data {name}")

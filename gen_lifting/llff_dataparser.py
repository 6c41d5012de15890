"""LLFF (``poses_bounds.npy`` + ``images_N/``) dataparser for forward-facing scenes such as fern.

nerfstudio 1.1.5 has no LLFF parser. This one reads the images, the intrinsics (the focal length of
``poses_bounds.npy``; gen-lifting assumes known intrinsics, as the paper does) and the dataset poses; every
``test_every``-th image is held out.

Nothing derived from the dataset poses or their depth bounds shapes training: the scene box and the near/far
planes come from flags, a prior the user states in the units of the reconstruction (``near_plane``,
``far_plane``, ``camera_spread``; the box is the frustum of a reference camera at the origin looking down -z,
where gen-lifting-single's cameras start). The dataset poses themselves (which gen-lifting never reads; they feed
evaluation and the true-pose upper bound gen-lifting-single-oracle) follow the original NeRF loader
(load_llff.py): converted from LLFF's [down, right, back] camera axes to OpenGL/nerfstudio [right, up, back],
recentred on the average pose, and scaled so that the nearest depth bound becomes ``1 / bd_factor``, which puts
them in a frame where the same prior holds.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Tuple, Type

import numpy as np
import torch
from jaxtyping import Float
from PIL import Image

from gen_lifting.compat import project_cache_dir
from gen_lifting.data_checks import (IMAGE_SUFFIXES, SceneDataError, high_bit_depth_message,
                                     is_high_bit_depth_grayscale)
from gen_lifting.datasets import resolve_data
from nerfstudio.cameras.cameras import Cameras, CameraType
from nerfstudio.data.dataparsers.base_dataparser import DataParser, DataParserConfig, DataparserOutputs
from nerfstudio.data.scene_box import SceneBox


@dataclass
class LLFFDataParserConfig(DataParserConfig):
    """LLFF forward-facing scene: ``poses_bounds.npy`` and an ``images_N`` folder."""

    _target: Type = field(default_factory=lambda: LLFFDataParser)
    """Target class to instantiate."""
    data: Path = Path("fern")
    """Scene folder (poses_bounds.npy + images_N/) or a bundled dataset name such as fern."""
    images_downscale: int = 8
    """Which stored image folder to read: images_{N}; 1 reads images/."""
    downscale_factor: int = 1
    """Extra on-the-fly downscale of that folder (resized copies are cached, --data is never written)."""
    near_plane: float = 1.0
    """Nearest depth of the scene in front of the cameras (a prior you state; with ``far_plane`` it fixes the scene
    box and the scale of the reconstruction). 1 fits LLFF scenes normalised as ``bd_factor`` does."""
    far_plane: float = 7.0
    """Farthest depth of the scene in front of the cameras (a prior you state, same units as ``near_plane``)."""
    camera_spread: float = 0.5
    """How far the cameras may sit from the reference camera (same units): the scene box is the reference camera's
    frustum between the near and far planes, widened by this on every side."""
    recenter: bool = True
    """Recentre the dataset poses on their average pose (original NeRF; evaluation and the oracle only)."""
    bd_factor: Optional[float] = 0.75
    """Scale the dataset poses so the nearest depth bound becomes 1/bd_factor (original NeRF; evaluation and the
    oracle only); None: keep scale."""
    test_every: int = 8
    """Images 0, N, 2N, ... are the test/val split (LLFF convention); the rest are train."""


def llff_to_opengl(poses: Float[np.ndarray, "num_images 3 4"]) -> Float[np.ndarray, "num_images 3 4"]:
    """LLFF camera axes [down, right, back] -> OpenGL/nerfstudio [right, up, back]; translation unchanged."""
    return np.concatenate([poses[:, :, 1:2], -poses[:, :, 0:1], poses[:, :, 2:4]], axis=2)


def average_pose(poses: Float[np.ndarray, "num_images 3 4"]) -> Float[np.ndarray, "3 4"]:
    """Mean centre, mean viewing axis and mean up vector, orthonormalised (NeRF's ``poses_avg``)."""
    back = _unit(poses[:, :, 2].sum(0))
    right = _unit(np.cross(poses[:, :, 1].sum(0), back))
    up = _unit(np.cross(back, right))
    return np.stack([right, up, back, poses[:, :, 3].mean(0)], axis=1)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def _to4x4(pose: np.ndarray) -> np.ndarray:
    return np.concatenate([pose, np.broadcast_to([0.0, 0.0, 0.0, 1.0], (*pose.shape[:-2], 1, 4))], axis=-2)


@dataclass
class LLFFDataParser(DataParser):
    """Reads LLFF scenes into nerfstudio cameras (see module docstring for the conventions)."""

    config: LLFFDataParserConfig

    def _generate_dataparser_outputs(self, split: str = "train") -> DataparserOutputs:
        cfg = self.config
        if cfg.test_every < 2 or cfg.downscale_factor < 1:
            raise SceneDataError("--test-every must be >= 2 and --downscale-factor >= 1")
        if not 0 < cfg.near_plane < cfg.far_plane or cfg.camera_spread < 0:
            raise SceneDataError("the depth prior needs 0 < --near-plane < --far-plane and --camera-spread >= 0")
        root = resolve_data(cfg.data)
        poses_bounds = _load_poses_bounds(root)
        files = _image_files(root, cfg.images_downscale, expected=len(poses_bounds))
        if cfg.downscale_factor > 1:
            files = _downscaled_copies(files, cfg.downscale_factor)
        width, height = Image.open(files[0]).size

        poses = llff_to_opengl(poses_bounds[:, :15].reshape(-1, 3, 5)[:, :, :4])
        full_h, full_w, full_focal = poses_bounds[0, :15].reshape(3, 5)[:, 4]
        # the dataset poses' frame (evaluation and the oracle only; training reads none of this)
        transform = np.linalg.inv(_to4x4(average_pose(poses)))[:3] if cfg.recenter else np.eye(4)[:3]
        poses = transform @ _to4x4(poses)
        scale = 1.0 if cfg.bd_factor is None else 1.0 / (poses_bounds[:, 15:17].min() * cfg.bd_factor)
        poses[:, :, 3] *= scale

        indices = np.arange(len(poses))
        test = indices[:: cfg.test_every]
        chosen = test if split in ("val", "test") else np.setdiff1d(indices, test)
        c2w = torch.from_numpy(poses).float()
        fx, fy = full_focal * width / full_w, full_focal * height / full_h
        cameras = Cameras(
            camera_to_worlds=c2w[chosen], fx=float(fx), fy=float(fy), cx=width / 2.0, cy=height / 2.0,
            width=width, height=height, camera_type=CameraType.PERSPECTIVE,
        )
        reference = torch.eye(4)[None, :3]  # the prior's camera: at the origin, looking down -z
        box = _frustum_aabb(reference, fx, fy, width, height, cfg.near_plane, cfg.far_plane)
        return DataparserOutputs(
            image_filenames=[files[i] for i in chosen],
            cameras=cameras,
            scene_box=SceneBox(aabb=box + torch.tensor([[-1.0], [1.0]]) * cfg.camera_spread),
            dataparser_transform=torch.from_numpy(transform).float(),
            dataparser_scale=float(scale),
            metadata={"near_plane": cfg.near_plane, "far_plane": cfg.far_plane},
        )


def _load_poses_bounds(root: Path) -> np.ndarray:
    path = root / "poses_bounds.npy"
    if not path.is_file() and (root / "transforms_train.json").is_file():
        raise SceneDataError(f"{root} is a Blender (360) scene (transforms_train.json), not an LLFF scene; train it "
                             "with ns-train gen-lifting, or read it with the blender-data dataparser")
    if not path.is_file():
        raise SceneDataError(f"{root} has no poses_bounds.npy; an LLFF scene needs it (for Blender data use blender-data)")
    array = np.load(path)
    if array.ndim != 2 or array.shape[1] != 17:
        raise SceneDataError(f"{path} has shape {array.shape}, expected [num_images, 17]; regenerate it with LLFF's imgs2poses.py")
    return array.astype(np.float64)


def _image_files(root: Path, images_downscale: int, expected: int) -> List[Path]:
    folder = root / ("images" if images_downscale == 1 else f"images_{images_downscale}")
    if not folder.is_dir():
        found = sorted(p.name for p in root.glob("images*") if p.is_dir()) or ["none"]
        raise SceneDataError(f"{folder} not found (have: {', '.join(found)}); set --images-downscale to match a folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if len(files) != expected:
        raise SceneDataError(f"{folder} has {len(files)} images but poses_bounds.npy has {expected} poses; they must match")
    for path in files:  # header only: nerfstudio's loader would wrap 16-bit grayscale values to 8 bits
        with Image.open(path) as image:
            if is_high_bit_depth_grayscale(image.mode):
                raise SceneDataError(high_bit_depth_message(path, image.mode))
    return files


def _downscaled_copies(files: List[Path], factor: int) -> List[Path]:
    """Box-filtered copies at 1/factor size in the package cache, rebuilt when the source is newer."""
    key = hashlib.sha1(f"{files[0].parent.resolve()}:{factor}".encode()).hexdigest()[:16]
    out_dir = project_cache_dir() / "llff_downscaled" / key
    out_dir.mkdir(parents=True, exist_ok=True)
    outs = []
    for src in files:
        out = out_dir / f"{src.stem}.png"
        if not out.exists() or out.stat().st_mtime < src.stat().st_mtime:
            with Image.open(src) as image:
                small = image.convert("RGB").resize(
                    (image.width // factor, image.height // factor), Image.Resampling.BOX
                )
            tmp = out.with_name(f".{out.stem}.{os.getpid()}.png")
            small.save(tmp)
            os.replace(tmp, out)
        outs.append(out)
    return outs


def _frustum_aabb(
    c2w: Float[torch.Tensor, "num_images 3 4"], fx: float, fy: float, width: int, height: int, near: float, far: float
) -> Float[torch.Tensor, "2 3"]:
    """Axis-aligned box around every camera's view frustum between the near and far planes."""
    corners = torch.tensor(
        [[sx * width / (2 * fx), sy * height / (2 * fy), -1.0] for sx in (-1, 1) for sy in (-1, 1)],
        dtype=c2w.dtype,
    )
    points: Tuple[torch.Tensor, ...] = tuple(
        c2w[:, None, :, 3] + depth * torch.einsum("nij,cj->nci", c2w[:, :, :3], corners) for depth in (near, far)
    )
    everything = torch.cat(points, dim=1).reshape(-1, 3)
    return torch.stack([everything.min(0).values, everything.max(0).values])

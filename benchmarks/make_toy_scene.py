"""A procedurally rendered 360 scene in NeRF-synthetic (Blender) format, for robustness checks of gen-lifting on a
scene nothing was tuned on.

    python benchmarks/make_toy_scene.py --out /tmp/table --size 64
    python benchmarks/make_toy_scene.py --scene blocks --out /tmp/blocks --size 64

"table": a four-legged table (near four-fold symmetric) carrying two small coloured blocks at one corner, so the
rotation about the vertical axis is decided by small details only; checker-textured top, Lambert shading, RGBA
with a transparent background (the Blender parser composites it on white, as for lego). "blocks": six boxes of
different sizes, heights and colours on a checkered base plate, placed with no symmetry, so every view's pose is
decided by coarse structure (a scene poseable in principle, unlike the table). Cameras as lego's: centres
on a sphere of radius 4.03, elevation uniform in 8..90 degrees, azimuth uniform, looking at the origin, lego's
field of view. 100 train, 20 val, 100 test views, fixed seed. Written by a tiny numpy ray caster (ray / box slabs),
so the scene needs no Blender, no download and has no licence attached.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import List, Tuple

import numpy as np
from PIL import Image

CAMERA_ANGLE_X = 0.6911112070083618  # lego's
RADIUS = 4.031128875572952

Box = Tuple[np.ndarray, np.ndarray, np.ndarray, bool]  # lo, hi, rgb in [0, 1], checker texture


def table_scene() -> List[Box]:
    boxes: List[Box] = [(np.array([-0.9, -0.9, 0.25]), np.array([0.9, 0.9, 0.4]), np.array([0.80, 0.62, 0.38]), True)]
    for sx in (-1, 1):
        for sy in (-1, 1):
            c = np.array([0.72 * sx, 0.72 * sy])
            boxes.append((np.array([c[0] - 0.1, c[1] - 0.1, -0.9]), np.array([c[0] + 0.1, c[1] + 0.1, 0.25]),
                          np.array([0.45, 0.30, 0.18]), False))
    boxes.append((np.array([0.3, 0.3, 0.4]), np.array([0.7, 0.7, 0.75]), np.array([0.85, 0.15, 0.12]), False))
    boxes.append((np.array([0.35, -0.15, 0.4]), np.array([0.55, 0.15, 0.95]), np.array([0.15, 0.35, 0.85]), False))
    return boxes


def blocks_scene() -> List[Box]:
    boxes: List[Box] = [(np.array([-1.1, -1.1, -0.6]), np.array([1.1, 1.1, -0.5]), np.array([0.70, 0.70, 0.70]), True)]
    for (x0, y0, x1, y1, height), colour, checker in (
            ((-0.8, 0.2, -0.45, 0.55, 0.9), (0.85, 0.15, 0.12), False),   # tall red tower
            ((0.0, -0.75, 0.85, -0.45, -0.2), (0.15, 0.35, 0.85), True),   # long low blue bar
            ((0.35, 0.3, 0.75, 0.7, 0.0), (0.20, 0.70, 0.25), True),       # green cube
            ((-0.5, -0.8, -0.2, -0.3, 0.3), (0.95, 0.80, 0.15), False),    # yellow pillar
            ((-0.1, -0.1, 0.15, 0.15, -0.3), (0.55, 0.20, 0.70), False),   # small purple block
            ((-0.2, 0.6, 0.2, 0.9, 0.5), (0.95, 0.55, 0.20), True)):      # orange post
        boxes.append((np.array([x0, y0, -0.5]), np.array([x1, y1, height]), np.array(colour), checker))
    return boxes


SCENES = {"table": table_scene, "blocks": blocks_scene}


def look_at(centre: np.ndarray) -> np.ndarray:
    """Blender / NeRF camera-to-world (x right, y up, camera looks along -z) looking at the origin, z up."""
    forward = -centre / np.linalg.norm(centre)
    right = np.cross(forward, [0.0, 0.0, 1.0])
    if np.linalg.norm(right) < 1e-6:  # straight down: any right vector
        right = np.array([1.0, 0.0, 0.0])
    right /= np.linalg.norm(right)
    up = np.cross(right, forward)
    c2w = np.eye(4)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = right, up, -forward, centre
    return c2w


def render(c2w: np.ndarray, size: int, boxes: List[Box]) -> np.ndarray:
    focal = 0.5 * size / np.tan(0.5 * CAMERA_ANGLE_X)
    j, i = np.meshgrid(np.arange(size) + 0.5, np.arange(size) + 0.5)
    dirs = np.stack([(j - size / 2) / focal, -(i - size / 2) / focal, -np.ones_like(j)], -1) @ c2w[:3, :3].T
    dirs /= np.linalg.norm(dirs, axis=-1, keepdims=True)
    origin = c2w[:3, 3]
    best = np.full(dirs.shape[:2], np.inf)
    rgba = np.zeros(dirs.shape[:2] + (4,))
    light = np.array([0.4, 0.3, 0.87]) / np.linalg.norm([0.4, 0.3, 0.87])
    with np.errstate(divide="ignore", invalid="ignore"):
        for lo, hi, colour, checker in boxes:
            t0, t1 = (lo - origin) / dirs, (hi - origin) / dirs
            tmin, tmax = np.minimum(t0, t1), np.maximum(t0, t1)
            near, far = tmin.max(-1), tmax.min(-1)
            hit = (near <= far) & (near > 0) & (near < best)
            if not hit.any():
                continue
            axis = tmin.argmax(-1)
            normal = np.zeros(dirs.shape)
            np.put_along_axis(normal, axis[..., None], -np.sign(np.take_along_axis(dirs, axis[..., None], -1)), -1)
            shade = 0.45 + 0.55 * np.clip(normal @ light, 0, 1)
            rgb = colour[None, None] * shade[..., None]
            if checker:
                p = origin + near[..., None] * dirs
                cells = (np.floor(p[..., 0] / 0.3) + np.floor(p[..., 1] / 0.3)) % 2
                rgb = rgb * (0.75 + 0.25 * cells[..., None])
            best = np.where(hit, near, best)
            rgba[hit, :3], rgba[hit, 3] = rgb[hit], 1.0
    return (rgba.clip(0, 1) * 255 + 0.5).astype(np.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scene", choices=sorted(SCENES), default="table", help="which procedural scene to render")
    parser.add_argument("--out", type=Path, required=True, help="scene folder to write")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0, help="camera sampling seed")
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    boxes = SCENES[args.scene]()
    for split, count in (("train", 100), ("val", 20), ("test", 100)):
        (args.out / split).mkdir(parents=True, exist_ok=True)
        frames = []
        for k in range(count):
            elev, azim = np.deg2rad(rng.uniform(8, 90)), rng.uniform(0, 2 * np.pi)
            centre = RADIUS * np.array([np.cos(elev) * np.cos(azim), np.cos(elev) * np.sin(azim), np.sin(elev)])
            c2w = look_at(centre)
            Image.fromarray(render(c2w, args.size, boxes)).save(args.out / split / f"r_{k}.png")
            frames.append({"file_path": f"./{split}/r_{k}", "transform_matrix": c2w.tolist()})
        (args.out / f"transforms_{split}.json").write_text(json.dumps(
            {"camera_angle_x": CAMERA_ANGLE_X, "frames": frames}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""Rebuild the small datasets bundled with the package from the full-size copies in ../shared/data.

    python tools/bundle_data.py --shared ../shared/data

lego: NeRF-synthetic Lego downscaled to 64x64 (all 100 train / 100 val / 200 test views, RGBA, Lanczos).
fern: LLFF Fern images_8 (504x378) and poses_bounds.npy, copied as they are.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def bundle_lego(src: Path, dst: Path, size: int) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val", "test"):
        meta = json.loads((src / f"transforms_{split}.json").read_text())
        (dst / split).mkdir(exist_ok=True)
        for frame in meta["frames"]:
            rel = frame["file_path"].lstrip("./") + ".png"
            img = Image.open(src / rel).convert("RGBA").resize((size, size), Image.LANCZOS)
            img.save(dst / rel, optimize=True)
        (dst / f"transforms_{split}.json").write_text(json.dumps(meta, indent=1))
    (dst / "LICENSE.txt").write_text(
        "NeRF-synthetic 'lego' scene, downscaled to %dx%d for CPU use.\n"
        "Source: Mildenhall et al., NeRF: Representing Scenes as Neural Radiance Fields (ECCV 2020).\n"
        "Lego model by Heinzelnisse (BlendSwap), CC-BY-NC. Non-commercial use only.\n" % (size, size)
    )


def bundle_fern(src: Path, dst: Path) -> None:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src / "images_8", dst / "images_8")
    shutil.copy(src / "poses_bounds.npy", dst / "poses_bounds.npy")
    (dst / "LICENSE.txt").write_text(
        "LLFF 'fern' scene, images_8 (504x378) and poses_bounds.npy.\n"
        "Source: Mildenhall et al., Local Light Field Fusion (SIGGRAPH 2019). Research use.\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--lego-size", type=int, default=64, help="side of the square lego views (64 = bundled)")
    parser.add_argument("--out", type=Path, default=REPO / "gen_lifting" / "bundled",
                        help="output folder (default: the package's bundled data; e.g. data/lego128 for the GPU preset)")
    args = parser.parse_args()
    out = args.out
    bundle_lego(args.shared / "nerf_synthetic" / "lego", out / "lego", args.lego_size)
    bundle_fern(args.shared / "nerf_llff" / "fern", out / "fern")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

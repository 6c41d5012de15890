"""Rebuild this bundled copy of Oxford 17 Flowers from the full-size copy in ../shared/data.

    python factorized_seg/bundled/flowers17/make_bundle.py --src ../shared/data/seg/flowers17 --size 64

Images: bicubic resize to size x size, JPEG quality 95. Masks (255 flower, 0 background, 128 uncertain border):
nearest-neighbour resize, PNG, so the three values stay exact.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", type=Path, required=True, help="folder with images/ and masks/")
    parser.add_argument("--size", type=int, default=64, help="output side length in pixels")
    args = parser.parse_args()
    for sub in ("images", "masks"):
        (HERE / sub).mkdir(exist_ok=True)
    for f in sorted((args.src / "images").glob("*.jpg")):
        Image.open(f).convert("RGB").resize((args.size, args.size), Image.BICUBIC).save(
            HERE / "images" / f.name, quality=95)
    for f in sorted((args.src / "masks").glob("*.png")):
        Image.open(f).convert("L").resize((args.size, args.size), Image.NEAREST).save(
            HERE / "masks" / f.name, optimize=True)


if __name__ == "__main__":
    main()

"""README pictures of gen-lifting from a finished ``gen-lifting demo`` folder (docs/images/lifting_*.png).

    python tools/lifting_readme_pictures.py outputs/demo docs/images

Loads the demo's run from its checkpoint (as ``ns-eval`` would), redraws the camera plots (``cameras.png``, and
``cameras_refined.png`` when the run refined its poses), and tiles six held-out views (every 34th test view:
photo / render at the encoder's pose / render at the refined pose when the demo wrote one) and the orbit, each
upscaled 2x with nearest-neighbour so the 64x64 resolution stays visible.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image


def upscale(image: np.ndarray, factor: int = 2) -> Image.Image:
    pil = Image.fromarray(image)
    return pil.resize((pil.width * factor, pil.height * factor), Image.NEAREST)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("demo_dir", type=Path, help="the --output-dir of a finished gen-lifting demo")
    parser.add_argument("out_dir", type=Path, help="where lifting_*.png go (docs/images)")
    args = parser.parse_args()
    from gen_lifting.inference import load_pipeline
    from gen_lifting.scripts.cli import write_camera_plots

    demo, out = args.demo_dir, args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    saved = json.loads((demo / "metrics.json").read_text())
    pipeline = load_pipeline(Path(saved["config"]), test_mode="test")
    for plot in write_camera_plots(pipeline, saved["metrics"], demo):
        shutil.copyfile(plot, out / f"lifting_{plot.name}")
    renders = demo / "test_renders"
    columns = []
    for i in range(0, len(list(renders.glob("eval_img_*.png"))), 34):
        pair = np.array(Image.open(renders / f"eval_img_{i:04d}.png"))  # photo | render, side by side
        w = pair.shape[1] // 2
        rows = [pair[:, :w], pair[:, w:]]
        refined = renders / f"eval_refined_img_{i:04d}.png"
        if refined.is_file():
            rows.append(np.array(Image.open(refined))[:, w:])
        columns.append(np.concatenate(rows, axis=0))
    upscale(np.concatenate(columns, axis=1)).save(out / "lifting_test_views.png")
    upscale(np.array(Image.open(demo / "orbit.png"))).save(out / "lifting_orbit.png")
    print(f"wrote {out}/lifting_*.png")


if __name__ == "__main__":
    main()

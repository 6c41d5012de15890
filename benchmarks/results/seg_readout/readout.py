"""Issue 13, row 26 (docs/seg_emergence.md): read-out variants of a trained factorized-seg model on Flowers-17.

    python benchmarks/results/seg_readout/readout.py RUN TAG t:n:res [t:n:res ...] [--out DIR]

Each variant noises the 846 masked images (resized to ``res``) to ``t``, averages the soft masks of ``n`` noise
draws (draw d of image i uses seed 1000 d + i, so n = 1 is ``factorized-seg segment --seed 0``), takes the argmax
at the original size and scores it as ``benchmarks/seg.py`` does (strict / IEM IoU, pos.only). The results of
readout_sweep.txt came from two earlier copies of this loop (one for t and n, one for t and the input size).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[3]
sys.path[:0] = [str(REPO / "benchmarks"), str(REPO)]
import seg as S  # noqa: E402
from diffusion_utils.schedule import to_model_range  # noqa: E402
from factorized_seg.checkpoints import load_for_inference  # noqa: E402
from factorized_seg.data import load_images, read_rgb  # noqa: E402
from factorized_seg.inference import segment_tensor  # noqa: E402
from factorized_seg.viz import atomic_save_image  # noqa: E402


def soft_masks(model, schedule, x0: torch.Tensor, t: int, draws: int, chunk: int = 128) -> torch.Tensor:
    """Soft masks averaged over ``draws`` noise draws (summed: the argmax is the same)."""
    total = 0
    for d in range(draws):
        with torch.no_grad():
            total = total + torch.cat([segment_tensor(model, schedule, x0[i:i + chunk], t,
                                                      seeds=range(1000 * d + i, 1000 * d + i + len(x0[i:i + chunk])))
                                       for i in range(0, len(x0), chunk)])
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="factorized-seg run folder (its EMA weights)")
    parser.add_argument("tag", help="name of this model in the output")
    parser.add_argument("variants", nargs="+", help="t:n:res, e.g. 30:1:32 (the preset's read-out)")
    parser.add_argument("--out", type=Path, default=Path("readout"), help="predictions and TAG.json go here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    image_dir, mask_dir = S.dataset_dirs("flowers17")
    files = S.masked_files(image_dir, mask_dir)
    model, schedule, _ = load_for_inference(args.run)
    sizes = [read_rgb(f).size for f in files]
    results = {}
    for variant in args.variants:
        t, n, res = (int(v) for v in variant.split(":"))
        x0 = to_model_range(load_images(files, res, progress=False).float().div(255))
        masks = soft_masks(model, schedule, x0, t, n)
        pred = args.out / f"{args.tag}_t{t}_n{n}_r{res}" / "pred"
        shutil.rmtree(pred, ignore_errors=True)
        pred.mkdir(parents=True)
        for j, f in enumerate(files):
            w, h = sizes[j]
            full = F.interpolate(masks[j:j + 1], size=(h, w), mode="bilinear", align_corners=False)
            atomic_save_image(full[0].argmax(0).numpy().astype(np.uint8), pred / f"{f.stem}.png")
        r = S.score(pred, mask_dir)
        r["pos_only"] = S.position_only_share(pred, files)
        results[variant] = r
        print(args.tag, t, n, res, round(100 * r["strict"]["iou"], 1), round(100 * r["iem"]["iou"], 1),
              round(r["pos_only"], 2), flush=True)
    (args.out / f"{args.tag}.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

"""Emergence experiments for factorized-seg: does a recipe make the masks follow objects, and how early?

    OMP_NUM_THREADS=1 python benchmarks/seg_levers.py --recipe soft-bal-eq --seeds 0 1 2 --steps 1200 \
        --eval-every 200 --set mask_losses.balance_loss_mult=0.1 mask_losses.equivariance_loss_mult=1.0

Each (recipe, seed) trains with the product trainer (``factorized_seg.trainer.train``, the ``--preset`` plus the
``--set`` overrides) and is stopped every ``--eval-every`` steps and resumed (same step, optimiser, EMA and RNG
state), so one run gives a learning curve. At every stop the EMA model segments every Flowers-17 image that has a
mask (noise to t = 30, one forward pass, as ``factorized-seg segment``: per-image noise seeds, bilinear upsampling
of the soft masks to the mask's size, argmax) and is scored with ``factorized_seg.metrics`` (strict: one
assignment chosen on a random 10%, scored on the rest; IEM). Also reported: ``pos.only`` (share of pixels whose
label equals that pixel's most common label over the dataset, at 32x32) of the prediction, of the ground truth and
of a random labelling with the same label shares, and the entropy of the predicted label shares. Budgets are in
steps (wall time is recorded) so that a shared, loaded CPU does not change the result.

Writes ``--out`` (JSON: machine, commit, command, every curve point) and ``<out stem>_<recipe>_seed<N>.png``
(the 12 fixed images, their ground truth and the predicted labels at each stop).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Dict, List

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from diffusion_utils.schedule import to_model_range  # noqa: E402
from factorized_seg.data import load_images, read_mask  # noqa: E402
from factorized_seg.inference import segment_tensor  # noqa: E402
from factorized_seg.metrics import count_labels, iem_scores, strict_scores  # noqa: E402
from factorized_seg.presets import PRESETS  # noqa: E402
from factorized_seg.trainer import atomic_write_text, load_for_inference, train  # noqa: E402
from factorized_seg.viz import atomic_save_image, colour_masks, to_uint8  # noqa: E402
from seg import commit, dataset_dirs, machine, masked_files, parse_value, with_overrides  # noqa: E402

FIGURE_IMAGES = 12


def position_only(labels: np.ndarray) -> float:
    """Share of pixels whose label equals that pixel's most common label over the dataset ([n, h, w] ints)."""
    k = int(labels.max()) + 1
    counts = np.stack([(labels == c).sum(0) for c in range(k)])
    return float(counts.max(0).sum() / labels.size)


def small(labels: List[np.ndarray], size: int = 32) -> np.ndarray:
    import cv2

    return np.stack([cv2.resize(lab.astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST)
                     for lab in labels]).astype(np.int64)


class FlowersEval:
    """The masked Flowers-17 images at the model resolution, their masks, and the fitting split (seed 0)."""

    def __init__(self, dataset: str, resolution: int) -> None:
        image_dir, mask_dir = dataset_dirs(dataset)
        self.files = masked_files(image_dir, mask_dir)
        self.images = load_images(self.files, resolution, progress=False)
        self.masks = [read_mask(mask_dir / f"{f.stem}.png") for f in self.files]
        rng = np.random.default_rng(0)  # the same split as factorized-seg eval --fit-fraction 0.1 --seed 0
        chosen = set(rng.choice(len(self.files), size=max(1, round(0.1 * len(self.files))), replace=False).tolist())
        self.fit = [i in chosen for i in range(len(self.files))]
        self.figure_idx = np.linspace(0, len(self.files) - 1, FIGURE_IMAGES).astype(int)
        gt = small([(m == 255).astype(np.uint8) for m in self.masks])
        self.gt_pos_only = position_only(gt)

    @torch.no_grad()
    def labels(self, run: Path, t: int = 30, batch: int = 64) -> List[np.ndarray]:
        model, schedule, _ = load_for_inference(run)
        out = []
        for start in range(0, len(self.files), batch):
            x0 = to_model_range(self.images[start:start + batch].float().div(255))
            soft = segment_tensor(model, schedule, x0, t, seeds=range(start, start + len(x0))).float()
            for j in range(len(x0)):
                h, w = self.masks[start + j].shape
                full = F.interpolate(soft[j:j + 1], size=(h, w), mode="bilinear", align_corners=False)
                out.append(full[0].argmax(0).numpy().astype(np.uint8))
        return out

    def score(self, labels: List[np.ndarray], k: int) -> Dict[str, object]:
        counts = [count_labels(p, g, k) for p, g in zip(labels, self.masks)]
        strict, assignment = strict_scores(counts, self.fit, k)
        lab32 = small(labels)
        shares = np.bincount(lab32.ravel(), minlength=k) / lab32.size
        rng = np.random.default_rng(0)
        random = rng.choice(k, size=lab32.shape, p=shares)
        nz = shares[shares > 0]
        return {"strict": strict, "strict_foreground_labels": list(assignment), "iem": iem_scores(counts, k),
                "pos_only": position_only(lab32), "pos_only_gt": self.gt_pos_only,
                "pos_only_random": position_only(random), "label_shares": shares.tolist(),
                "usage_entropy": float(-(nz * np.log(nz)).sum() / np.log(k))}

    def figure_row(self, labels: List[np.ndarray], size: int = 48) -> np.ndarray:
        tiles = []
        for i in self.figure_idx:
            lab = torch.from_numpy(labels[i].astype(np.int64))
            hard = F.one_hot(lab, 3).permute(2, 0, 1)[None].float()
            hard = F.interpolate(hard, size=(size, size), mode="nearest")
            tiles.append(to_uint8(colour_masks(hard)[0]))
        return np.concatenate(tiles, axis=1)

    def figure_header(self, size: int = 48) -> np.ndarray:
        """Two rows: the images and their ground-truth foreground (white)."""
        imgs = F.interpolate(self.images[self.figure_idx].float(), size=(size, size), mode="bilinear",
                             align_corners=False).clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
        fg = torch.stack([torch.from_numpy((self.masks[i] == 255).astype(np.float32)) for i in self.figure_idx])
        fg = F.interpolate(fg[:, None], size=(size, size), mode="nearest")[:, 0].numpy()
        gts = np.repeat((fg * 255).astype(np.uint8)[..., None], 3, axis=-1)
        return np.concatenate([np.concatenate(list(imgs), axis=1), np.concatenate(list(gts), axis=1)], axis=0)


def run_recipe(args, seed: int, evaluator: FlowersEval, overrides: Dict[str, object]) -> Dict[str, object]:
    work = Path(args.work_dir) / args.recipe / f"seed{seed}"
    if work.exists() and not args.reuse:
        import shutil

        shutil.rmtree(work)
    image_dir, _ = dataset_dirs(args.dataset)
    base = with_overrides(PRESETS[args.preset], overrides)
    curve = []
    rows = [evaluator.figure_header()]
    train_s = 0.0
    stops = list(range(args.eval_every, args.steps + 1, args.eval_every))
    if not stops or stops[-1] != args.steps:
        stops.append(args.steps)
    for stop in stops:
        ckpt = work / "run" / "checkpoints" / "latest.pt"
        cfg = dataclasses.replace(base, data=str(image_dir), output_dir=work / "run", max_steps=stop, seed=seed,
                                  threads=args.threads, progress=False, sample_every=0, checkpoint_every=0,
                                  resume=ckpt.is_file())
        result = train(cfg)
        train_s += result.train_s
        labels = evaluator.labels(work / "run")
        point = {"step": result.step, "train_s": train_s, "loss": result.last_loss,
                 **evaluator.score(labels, max(2, base.model.num_masks))}
        curve.append(point)
        rows.append(evaluator.figure_row(labels))
        fig = Path(args.out).with_name(f"{Path(args.out).stem}_{args.recipe}_seed{seed}.png")
        atomic_save_image(np.concatenate(rows, axis=0), fig)  # redrawn at every stop: a look while it runs
        print(f"  [{args.recipe} seed {seed}] step {result.step:5d} {train_s:6.0f}s strict IoU "
              f"{100 * point['strict']['iou']:5.1f} IEM IoU {100 * point['iem']['iou']:5.1f} pos.only "
              f"{point['pos_only']:.2f} (gt {point['pos_only_gt']:.2f}, random {point['pos_only_random']:.2f}) "
              f"shares {np.round(point['label_shares'], 2).tolist()}", flush=True)
    return {"curve": curve, "figure": str(fig.relative_to(REPO)) if fig.is_relative_to(REPO) else str(fig)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", required=True, help="name of this recipe (key in the JSON, figure file name)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="TrainConfig overrides on top of --preset, e.g. mask_losses.balance_loss_mult=0.1")
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=1200, help="training steps per run")
    parser.add_argument("--eval-every", type=int, default=200, help="stop, segment and score every N steps")
    parser.add_argument("--dataset", default="flowers17")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work-dir", default=str(REPO / "runs" / "seg-levers"))
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "seg_levers.json"),
                        help="result JSON; an existing file gets this recipe's entry added or replaced")
    parser.add_argument("--reuse", action="store_true", help="continue runs found in --work-dir")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    code_commit = commit()
    overrides = {k: parse_value(v) for k, v in (s.split("=", 1) for s in args.set)}
    base = with_overrides(PRESETS[args.preset], overrides)
    evaluator = FlowersEval(args.dataset, base.resolution)
    runs = {}
    for seed in args.seeds:
        start = time.time()
        runs[str(seed)] = run_recipe(args, seed, evaluator, overrides)
        runs[str(seed)]["wall_s"] = time.time() - start
    entry = {"machine": machine(), "commit": code_commit, "command": " ".join(["python"] + sys.argv),
             "preset": args.preset, "overrides": args.set, "steps": args.steps, "threads": args.threads,
             "dataset": args.dataset, "seeds": runs}
    out = Path(args.out)
    data = json.loads(out.read_text()) if out.is_file() else {}
    data[args.recipe] = entry
    atomic_write_text(out, json.dumps(data, indent=1))
    last = [r["curve"][-1] for r in runs.values()]
    print(f"{args.recipe}: strict IoU {[round(100 * p['strict']['iou'], 1) for p in last]}, "
          f"pos.only {[round(p['pos_only'], 2) for p in last]} -> {out}")


if __name__ == "__main__":
    main()

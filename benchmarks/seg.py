"""Segmentation benchmark: factorized diffusion (CPU preset, K=2 / K=3), the concat / mask_mid ablations, the plain
DDPM + per-image k-means on its decoder features, GrabCut and colour k-means, on Flowers-17 and ECSSD.

    OMP_NUM_THREADS=1 python benchmarks/seg.py --budget-s 300 --datasets flowers17 ecssd

Every trained model gets the same wall-clock budget (``--budget-s``, training only) on one thread by default.
Trained models segment each image with masks (noise to t=30, one pass); scores: ``factorized-seg eval``'s strict
protocol (one channel->foreground assignment chosen on a random 10% of the masked images, scored on the other
90%) and the IEM protocol (per image best assignment). Writes a JSON (machine, commit, command, budget) and,
with ``--figure``, a picture of images, ground truth, predicted masks and generated samples.

``--set key=value`` overrides TrainConfig fields of the trained models (dotted for nested ones, e.g.
``--set model.padding_mode=zeros augment.max_shift=2``): used for the emergence experiments.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402
from sklearn.cluster import KMeans  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from diffusion_utils.schedule import to_image_range, to_model_range  # noqa: E402
from factorized_seg.data import BUNDLED_DIR, list_images, load_images, read_mask, read_rgb  # noqa: E402
from factorized_seg.evaluate import EvalConfig, evaluate  # noqa: E402
from factorized_seg.inference import per_image_noise, sample_images  # noqa: E402
from factorized_seg.presets import PRESETS  # noqa: E402
from factorized_seg.segment import SegmentConfig, run_segment  # noqa: E402
from factorized_seg.trainer import atomic_write_text, load_for_inference, train  # noqa: E402
from factorized_seg.viz import atomic_save_image, colour_masks, to_uint8  # noqa: E402
from lifting import git_commit  # noqa: E402  (one commit record for every benchmark)

SHARED = REPO.parent / "shared" / "data" / "seg"
TRAINED = {
    "factorized-k2": {"model.num_regions": 2},
    "factorized-k3": {"model.num_regions": 3},
    "concat": {"model.scheme": "concat", "model.num_regions": 2},
    "mask_mid": {"model.scheme": "mask_mid", "model.num_regions": 2},
    "unshared": {"model.scheme": "unshared", "model.num_regions": 2},
    "plain-kmeans": {"model.scheme": "plain"},
    "plain-kmeans-k3": {"model.scheme": "plain"},
}
SHARED_RUN = {"plain-kmeans-k3": "plain-kmeans"}
"""Rows read from another row's trained model: plain-kmeans-k3 clusters the same plain DDPM's features into 3."""
CLUSTERS = {"plain-kmeans": 2, "plain-kmeans-k3": 3, "kmeans-colour": 2, "kmeans-colour-k3": 3}
"""k of the k-means rows: the K=3 model is compared with 3-cluster baselines under the same protocol."""
CLASSICAL = ("grabcut", "kmeans-colour", "kmeans-colour-k3", "centre-disc")
ALL_MODELS = tuple(TRAINED) + CLASSICAL
DEFAULT_MODELS = ("factorized-k2", "factorized-k3", "concat", "mask_mid", "plain-kmeans", "grabcut", "kmeans-colour",
                  "centre-disc")


def dataset_dirs(name: str) -> Optional[tuple]:
    """(training image folder, mask folder) for a dataset; the shared full-size copy when present."""
    if (SHARED / name / "images").is_dir():
        return SHARED / name / "images", SHARED / name / "masks"
    if (BUNDLED_DIR / name / "images").is_dir():
        return BUNDLED_DIR / name / "images", BUNDLED_DIR / name / "masks"
    return None


def with_overrides(cfg, overrides: Dict[str, object]):
    """dataclasses.replace on dotted keys (configs are frozen; every variant is a new object)."""
    nested: Dict[str, Dict[str, object]] = {}
    flat = {}
    for key, value in overrides.items():
        head, _, rest = key.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            flat[head] = value
    for head, sub in nested.items():
        flat[head] = with_overrides(getattr(cfg, head), sub)
    return dataclasses.replace(cfg, **flat)


def parse_value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def masked_files(image_dir: Path, mask_dir: Path) -> List[Path]:
    stems = {p.stem for p in mask_dir.glob("*.png")}
    return [f for f in list_images(image_dir) if f.stem in stems]


def order_by_border(labels: np.ndarray, k: int) -> np.ndarray:
    """Relabel clusters so that label 0 covers the most border pixels (a fixed, data-free rule that lets the
    strict protocol's one assignment mean something for per-image clusterings)."""
    border = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    share = [np.mean(border == c) for c in range(k)]
    order = np.argsort(share)[::-1]
    remap = np.empty(k, dtype=np.uint8)
    remap[order] = np.arange(k, dtype=np.uint8)
    return remap[labels]


def kmeans_labels(features: np.ndarray, k: int, seed: int) -> np.ndarray:
    return KMeans(n_clusters=k, n_init=3, random_state=seed).fit_predict(features)


def write_labels(pred_dir: Path, files: List[Path], label_fn) -> None:
    for f in files:
        atomic_save_image(label_fn(f).astype(np.uint8), pred_dir / f"{f.stem}.png")


def grabcut_label(f: Path) -> np.ndarray:
    img = cv2.cvtColor(np.asarray(read_rgb(f)), cv2.COLOR_RGB2BGR)
    h, w = img.shape[:2]
    rect = (int(0.1 * w), int(0.1 * h), max(1, int(0.8 * w)), max(1, int(0.8 * h)))
    mask = np.zeros((h, w), np.uint8)
    bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    cv2.setRNGSeed(0)
    cv2.grabCut(img, mask, rect, bgd, fgd, 5, cv2.GC_INIT_WITH_RECT)
    return np.isin(mask, (cv2.GC_FGD, cv2.GC_PR_FGD)).astype(np.uint8)


def colour_kmeans_label(f: Path, k: int = 2) -> np.ndarray:
    img = np.asarray(read_rgb(f))
    lab = cv2.cvtColor(img, cv2.COLOR_RGB2LAB).reshape(-1, 3).astype(np.float32)
    return order_by_border(kmeans_labels(lab, k, 0).reshape(img.shape[:2]), k)


def centre_disc_label(f: Path) -> np.ndarray:
    """Image-independent prior: an ellipse centred in the image, semi-axes 35% of width / height."""
    w, h = read_rgb(f).size
    yy, xx = np.mgrid[:h, :w]
    return ((((xx + 0.5) / w - 0.5) / 0.35) ** 2 + (((yy + 0.5) / h - 0.5) / 0.35) ** 2 <= 1).astype(np.uint8)


def plain_kmeans_labels(run: Path, files: List[Path], pred_dir: Path, t: int = 30, seed: int = 0, k: int = 2) -> None:
    """DatasetDDPM-unsup baseline: per image, k-means on the plain DDPM's decoder features at t (model res)."""
    model, schedule, meta = load_for_inference(run)
    res = int(meta["resolution"])
    images = load_images(files, res, progress=False)
    for i, f in enumerate(files):
        x0 = to_model_range(images[i:i + 1].float().div(255))
        tt = torch.full((1,), t, dtype=torch.long)
        x_t = schedule.add_noise(x0, tt, per_image_noise(x0.shape[1:], [seed + i]))
        feat = model.decoder_features(x_t, tt)[0]  # (feat, res, res)
        feat = F.normalize(feat, dim=0).permute(1, 2, 0).reshape(-1, feat.shape[0]).numpy()
        lab = order_by_border(kmeans_labels(feat, k, seed).reshape(res, res), k)
        w, h = read_rgb(f).size
        full = cv2.resize(lab, (w, h), interpolation=cv2.INTER_NEAREST)
        atomic_save_image(full.astype(np.uint8), pred_dir / f"{f.stem}.png")


def position_only_share(pred_dir: Path, files: List[Path], size: int = 32) -> float:
    """How much of the labelling a fixed per-pixel map explains: share of pixels (all images, at size x size)
    whose label equals that pixel's most common label over the dataset. 1.0 = the same mask for every image
    (a purely positional split); GrabCut / colour k-means give lower values."""
    labs = np.stack([cv2.resize(read_mask(pred_dir / f"{f.stem}.png"), (size, size), interpolation=cv2.INTER_NEAREST)
                     for f in files]).astype(np.int64)
    mode = np.apply_along_axis(lambda v: np.bincount(v).argmax(), 0, labs)
    return float(np.mean(labs == mode[None]))


def score(pred_dir: Path, mask_dir: Path) -> dict:
    r = evaluate(EvalConfig(pred=pred_dir, masks=str(mask_dir), output=pred_dir.parent / "eval.json",
                            fit_fraction=0.1, seed=0))
    return {"strict": {k: r["strict"][k] for k in ("acc", "iou", "dice")},
            "strict_foreground_labels": r["strict"]["foreground_labels"],
            "iem": r["iem"], "num_eval_strict": r["num_eval"], "num_images": r["num_images"]}


def run_model(name: str, ds: str, args, overrides: Dict[str, object]) -> dict:
    image_dir, mask_dir = dataset_dirs(ds)
    files = masked_files(image_dir, mask_dir)
    work = Path(args.work_dir) / ds / name
    pred_dir = work / "pred"
    if pred_dir.exists():
        shutil.rmtree(pred_dir)
    row: dict = {}
    t0 = time.time()
    if name in TRAINED:
        shared = name in SHARED_RUN  # reads the trained model of another row (trained here if it has none yet)
        run = Path(args.work_dir) / ds / SHARED_RUN[name] / "run" if shared else work / "run"
        if run.exists() and not args.reuse and not shared:
            shutil.rmtree(run)
        if not ((args.reuse or shared) and (run / "checkpoints" / "ema.pt").is_file()):
            shutil.rmtree(run, ignore_errors=True)
            cfg = with_overrides(PRESETS[args.preset], {**TRAINED[name], **overrides})
            max_steps = args.max_steps_for.get(SHARED_RUN.get(name, name), args.max_steps)
            cfg = dataclasses.replace(cfg, data=str(image_dir), output_dir=run, time_budget_s=args.budget_s,
                                      max_steps=max_steps, threads=args.threads, device=args.device,
                                      progress=args.progress, sample_every=0, checkpoint_every=0)
            result = train(cfg)
            row.update(train_s=result.train_s, steps=result.step, final_loss=result.last_loss)
        else:  # a reused run: its step count from its checkpoint (its training time was recorded when it trained)
            row["steps"] = int(torch.load(run / "checkpoints" / "latest.pt", map_location="cpu",
                                          weights_only=True)["step"])
        if name in CLUSTERS:
            plain_kmeans_labels(run, files, pred_dir, k=CLUSTERS[name])
        else:
            tmp = work / "segment"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            for f in files:  # segment only the images that have masks
                os.symlink(f.resolve(), tmp / f.name)
            run_segment(SegmentConfig(run=run, images=str(tmp), output_dir=work, t=30, batch_size=64,
                                      save_overlays=False, device=args.device, progress=False))
            shutil.move(str(work / "masks"), str(pred_dir))
    elif name == "grabcut":
        write_labels(pred_dir, files, grabcut_label)
    elif name in ("kmeans-colour", "kmeans-colour-k3"):
        write_labels(pred_dir, files, functools.partial(colour_kmeans_label, k=CLUSTERS[name]))
    elif name == "centre-disc":
        write_labels(pred_dir, files, centre_disc_label)
    row.update(score(pred_dir, mask_dir))
    row["position_only_share"] = position_only_share(pred_dir, files)
    row["total_s"] = time.time() - t0
    return row


def make_figure(args, results: dict, path: Path, ds: str = "flowers17", n: int = 6) -> None:
    """Rows: images, ground truth, each model's predicted labels; then generated images and their masks."""
    image_dir, mask_dir = dataset_dirs(ds)
    files = masked_files(image_dir, mask_dir)[:: max(1, len(masked_files(image_dir, mask_dir)) // n)][:n]
    size = 64
    rows = [[np.asarray(read_rgb(f).resize((size, size))) for f in files]]
    rows.append([np.repeat(cv2.resize(read_mask(mask_dir / f"{f.stem}.png"), (size, size),
                                      interpolation=cv2.INTER_NEAREST)[..., None], 3, -1) for f in files])
    names = [m for m in results.get(ds, {}) if (Path(args.work_dir) / ds / m / "pred").is_dir()]
    for m in names:
        row = []
        for f in files:
            lab = read_mask(Path(args.work_dir) / ds / m / "pred" / f"{f.stem}.png")
            lab = cv2.resize(lab, (size, size), interpolation=cv2.INTER_NEAREST)
            hard = F.one_hot(torch.from_numpy(lab.astype(np.int64)), 3).permute(2, 0, 1)[None].float()
            row.append(to_uint8(colour_masks(hard)[0]))
        rows.append(row)
    for m in ("factorized-k2", "factorized-k3"):
        run = Path(args.work_dir) / ds / m / "run"
        if (run / "checkpoints" / "ema.pt").is_file():
            model, schedule, meta = load_for_inference(run, args.device)
            x, masks = sample_images(model, schedule, n, int(meta["resolution"]), seed=0, sampler="ddim", steps=50,
                                     device=args.device, progress=False)
            up = lambda t: F.interpolate(t.float().cpu(), size=(size, size), mode="nearest")  # noqa: E731
            rows.append([to_uint8(im) for im in up(to_image_range(x))])
            rows.append([to_uint8(im) for im in colour_masks(up(masks))])
    labels = ["images", "ground truth"] + names + [f"{m} {w}" for m in ("factorized-k2", "factorized-k3")
                                                   for w in ("samples (DDIM 50)", "sample masks")
                                                   if (Path(args.work_dir) / ds / m / "run" / "checkpoints").is_dir()]
    grid = np.concatenate([np.concatenate(r, axis=1) for r in rows], axis=0)
    label_w = 150
    canvas = Image.new("RGB", (label_w + grid.shape[1], grid.shape[0]), "white")
    canvas.paste(Image.fromarray(grid), (label_w, 0))
    draw = ImageDraw.Draw(canvas)
    for i, text in enumerate(labels):
        draw.text((4, i * size + size // 2 - 6), text, fill="black")
    atomic_save_image(canvas, path)
    print(f"figure rows (top to bottom): {', '.join(labels)} -> {path}")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{platform.system()} {cpu}, {os.cpu_count()} cores{gpu}, torch {torch.__version__}"


def commit() -> str:
    """The code's commit as every benchmark records it (``lifting.git_commit``: ``-dirty`` when tracked files differ,
    BENCH_COMMIT on a copy without .git); "unknown" outside a git checkout."""
    return git_commit() or "unknown"


def print_table(results: dict) -> None:
    print(f"{'dataset':<10} {'model':<15} {'strict Acc':>10} {'IoU':>6} {'DICE':>6} | {'IEM Acc':>8} {'IoU':>6} "
          f"{'DICE':>6} | {'train s':>7} {'steps':>6} {'pos.only':>8}")
    for ds, rows in results.items():
        for m, r in rows.items():
            s, i = r["strict"], r["iem"]
            train_s = f"{r['train_s']:.0f}" if "train_s" in r else "-"  # reused runs: timed when they trained
            print(f"{ds:<10} {m:<15} {100 * s['acc']:10.1f} {100 * s['iou']:6.1f} {100 * s['dice']:6.1f} | "
                  f"{100 * i['acc']:8.1f} {100 * i['iou']:6.1f} {100 * i['dice']:6.1f} | "
                  f"{train_s:>7} {r.get('steps', ''):>6} {r.get('position_only_share', 0):8.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["flowers17", "ecssd"], help="flowers17 and/or ecssd")
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), choices=ALL_MODELS)
    parser.add_argument("--preset", default="cpu", help="training preset the trained models start from")
    parser.add_argument("--budget-s", type=float, default=300.0, help="training seconds per trained model")
    parser.add_argument("--max-steps", type=int, default=10**9, help="also stop training after this many steps")
    parser.add_argument("--max-steps-for", nargs="*", default=[], metavar="MODEL=STEPS",
                        help="per-model step budgets, e.g. plain-kmeans=2640 (equal compute: a plain step costs ~1/3.3 "
                             "of a K=3 factorized one, benchmarks/results/seg_step_cost.json)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: share the machine)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="TrainConfig overrides for the trained models, e.g. model.padding_mode=zeros")
    parser.add_argument("--work-dir", default=str(REPO / "runs" / "bench-seg"), help="runs and predictions")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "seg_flowers17.json"), help="result JSON")
    parser.add_argument("--figure", default=None, help="write the example picture here (PNG)")
    parser.add_argument("--reuse", action="store_true", help="reuse trained runs found in --work-dir")
    parser.add_argument("--progress", action="store_true", help="show training progress bars")
    parser.add_argument("--figure-only", action="store_true",
                        help="only redraw --figure from the runs in --work-dir and the JSON at --out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    code_commit = commit()  # the code that runs, read before the (long) run
    if args.figure_only:
        make_figure(args, json.loads(Path(args.out).read_text())["datasets"], Path(args.figure))
        return
    overrides = {k: parse_value(v) for k, v in (s.split("=", 1) for s in args.set)}
    try:
        args.max_steps_for = {k: int(v) for k, v in (s.split("=", 1) for s in args.max_steps_for)}
    except ValueError:
        parser.error(f"--max-steps-for takes MODEL=STEPS pairs, got {' '.join(args.max_steps_for)}")
    own_runs = [m for m in TRAINED if m not in SHARED_RUN]  # a SHARED_RUN row trains nothing of its own
    unknown = set(args.max_steps_for) - set(own_runs)
    if unknown:
        parser.error(f"--max-steps-for: {', '.join(sorted(unknown))} does not train a model of its own (those that do: "
                     f"{', '.join(own_runs)}; {', '.join(f'{a} reads {b}' for a, b in SHARED_RUN.items())})")
    results: Dict[str, Dict[str, dict]] = {}
    for ds in args.datasets:
        if dataset_dirs(ds) is None:
            print(f"skipping {ds}: not found in {SHARED} or the bundled data")
            continue
        results[ds] = {}
        for m in args.models:
            print(f"[{time.strftime('%H:%M:%S')}] {ds} / {m} ...", flush=True)
            results[ds][m] = run_model(m, ds, args, overrides)
            r = results[ds][m]
            print(f"    strict IoU {r['strict']['iou']:.3f}  IEM IoU {r['iem']['iou']:.3f}  "
                  f"steps {r.get('steps', '-')}  {r['total_s']:.0f} s", flush=True)
    print_table(results)
    out = {"machine": machine(), "commit": code_commit, "command": " ".join(["python"] + sys.argv),
           "budget_s": args.budget_s, "threads": args.threads, "preset": args.preset, "overrides": args.set,
           "protocol": "strict: one assignment chosen on a random 10% of the masked images (seed 0), scored on the "
                       "other 90%; iem: per image best assignment, all masked images",
           "datasets": results}
    atomic_write_text(Path(args.out), json.dumps(out, indent=2))
    print(f"wrote {args.out}")
    if args.figure and "flowers17" in results:
        make_figure(args, results, Path(args.figure))


if __name__ == "__main__":
    main()

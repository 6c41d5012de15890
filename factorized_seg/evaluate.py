"""``factorized-seg eval``: Acc / IoU / DICE of predicted label PNGs against a ground-truth mask folder."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np

from factorized_seg.checkpoints import atomic_write_text
from factorized_seg.data import BUNDLED_DIR, SegDataError, bundled_masks, check_output_dir, read_label_map, read_mask
from factorized_seg.metrics import count_labels, iem_scores, scores_for, strict_scores


@dataclass(frozen=True)
class EvalConfig:
    """``factorized-seg eval``: score label maps (from 'segment') against masks, strict and IEM protocols."""

    pred: Path
    """Folder of predicted label PNGs (values 0..K-1), e.g. the masks/ folder written by 'segment'."""
    masks: str
    """Ground-truth mask folder (0 background, 255 foreground, 128 ignored) or a bundled dataset name."""
    output: Optional[Path] = None
    """JSON file for the scores (default: <pred>/../eval.json)."""
    num_labels: Optional[int] = None
    """K; default: the largest predicted label + 1 (at least 2)."""
    fit_names: Optional[Path] = None
    """Strict protocol: text file of image names (one per line) on which the channel-to-foreground assignment is
    chosen; those images are then left out of the strict scores. Overrides --fit-fraction."""
    fit_fraction: float = 0.1
    """Strict protocol: fraction of the images (random, --seed) on which the assignment is chosen; the remaining
    images are scored."""
    seed: int = 0
    """Seed of the random fitting split."""


MAX_LABELS = 16
"""Largest K scored: the strict and IEM protocols try every subset of labels (2^K - 2 of them)."""


def resolve_masks(spec: str) -> Path:
    path = Path(spec).expanduser()
    if path.is_dir():
        return path / "masks" if (path / "masks").is_dir() else path
    if "/" not in spec and bundled_masks(spec) is not None:
        return bundled_masks(spec)
    names = sorted(p.name for p in BUNDLED_DIR.iterdir() if (p / "masks").is_dir()) if BUNDLED_DIR.is_dir() else []
    raise SegDataError(f"--masks {spec!r} is neither a folder nor a bundled dataset with masks "
                       f"(bundled: {', '.join(names) or 'none'})")


def load_pairs(pred_dir: Path, mask_dir: Path) -> Tuple[list, list, list, list]:
    """(names, predictions, masks, skipped) for every ground-truth mask; errors on missing or differently sized
    ones. ``skipped``: names of the predictions that have no ground-truth mask (not scored)."""
    if not pred_dir.is_dir():
        raise SegDataError(f"prediction folder {pred_dir} does not exist: run 'factorized-seg segment' first")
    gt_files = sorted(p for p in mask_dir.iterdir() if p.suffix.lower() == ".png")
    if not gt_files:
        raise SegDataError(f"no mask PNGs in {mask_dir}")
    preds = {p.stem: p for p in pred_dir.iterdir() if p.suffix.lower() == ".png"}
    if not preds:
        raise SegDataError(f"no predicted label PNGs in {pred_dir}")
    missing = [g.stem for g in gt_files if g.stem not in preds]
    if len(missing) == len(gt_files):
        raise SegDataError(f"none of the {len(gt_files)} masks in {mask_dir} has a prediction in {pred_dir} "
                           "(file names must match)")
    if missing:
        raise SegDataError(f"{len(missing)} mask(s) in {mask_dir} have no prediction in {pred_dir}, e.g. "
                           f"{missing[0]}: segment those images too")
    gt_stems = {g.stem for g in gt_files}
    skipped = sorted(stem for stem in preds if stem not in gt_stems)
    names, p_list, g_list = [], [], []
    for g in gt_files:
        gt = read_mask(g)
        pr = read_label_map(preds[g.stem])
        if pr.shape != gt.shape:
            raise SegDataError(f"mask {g.name} is {gt.shape[1]}x{gt.shape[0]} but its prediction is "
                               f"{pr.shape[1]}x{pr.shape[0]}: segment the images the masks belong to")
        names.append(g.stem)
        p_list.append(pr)
        g_list.append(gt)
    return names, p_list, g_list, skipped


def evaluate(cfg: EvalConfig) -> Dict:
    """Scores under both protocols; writes the JSON atomically and returns it."""
    if not 0.0 < cfg.fit_fraction < 1.0:
        raise SegDataError(f"--fit-fraction must lie in (0, 1), got {cfg.fit_fraction}")
    if cfg.num_labels is not None and not 1 <= cfg.num_labels <= MAX_LABELS:
        raise SegDataError(f"--num-labels must lie in 1..{MAX_LABELS}, got {cfg.num_labels}")
    if cfg.fit_names is not None and not Path(cfg.fit_names).is_file():
        raise SegDataError(f"--fit-names {cfg.fit_names} does not exist: give a text file of image names")
    if cfg.seed < 0:
        raise SegDataError(f"--seed must be >= 0, got {cfg.seed}")
    out = Path(cfg.output or Path(cfg.pred).parent / "eval.json")
    check_output_dir(out.parent, "--output")
    if out.is_dir():
        raise SegDataError(f"--output {out} is a folder: give a .json file name")
    names, preds, gts, skipped = load_pairs(Path(cfg.pred), resolve_masks(cfg.masks))
    lowest, highest = min(int(p.min()) for p in preds), max(int(p.max()) for p in preds)
    if lowest < 0:
        raise SegDataError(f"predictions in {cfg.pred} hold negative labels ({lowest}): give label PNGs (0..K-1)")
    if highest >= MAX_LABELS:
        worst = next(n for n, p in zip(names, preds) if int(p.max()) == highest)
        raise SegDataError(f"prediction {worst} in {cfg.pred} holds label {highest}, above {MAX_LABELS - 1}: give the "
                           "label PNGs written by 'segment' (values 0..K-1), not images or masks")
    k = cfg.num_labels or max(2, highest + 1)
    if highest >= k:
        worst = next(n for n, p in zip(names, preds) if int(p.max()) == highest)
        raise SegDataError(f"--num-labels {k} is too small: prediction {worst} holds label {highest} (labels must "
                           f"lie in 0..K-1)")
    counts = [count_labels(p, g, k) for p, g in zip(preds, gts)]
    if cfg.fit_names is not None:
        wanted = {Path(line.strip()).stem for line in Path(cfg.fit_names).read_text().splitlines() if line.strip()}
        fit = [n in wanted for n in names]
    else:
        rng = np.random.default_rng(cfg.seed)
        n_fit = max(1, int(round(cfg.fit_fraction * len(names))))
        chosen = set(rng.choice(len(names), size=n_fit, replace=False).tolist())
        fit = [i in chosen for i in range(len(names))]
    if all(fit) or not any(fit):
        raise SegDataError("the fitting split must hold some but not all images (check --fit-names / --fit-fraction)")
    strict, assignment = strict_scores(counts, fit, k)
    result = {
        "num_images": len(names), "num_fit": int(sum(fit)), "num_eval": int(len(fit) - sum(fit)), "num_labels": k,
        "num_scored": len(names), "num_skipped_no_mask": len(skipped), "skipped_no_mask": skipped,
        "strict": {**strict, "foreground_labels": list(assignment)},
        "iem": iem_scores(counts, k),
        "iem_on_strict_images": iem_scores([c for c, f in zip(counts, fit) if not f], k),
    }
    atomic_write_text(out, json.dumps(result, indent=2))
    return result


def format_table(result: Dict) -> str:
    lines = [f"{'protocol':<8} {'Acc':>6} {'IoU':>6} {'DICE':>6}  images"]
    lines.append(f"{'strict':<8} {100 * result['strict']['acc']:6.1f} {100 * result['strict']['iou']:6.1f} "
                 f"{100 * result['strict']['dice']:6.1f}  {result['num_eval']} (assignment {result['strict']['foreground_labels']} "
                 f"chosen on {result['num_fit']} others)")
    lines.append(f"{'iem':<8} {100 * result['iem']['acc']:6.1f} {100 * result['iem']['iou']:6.1f} "
                 f"{100 * result['iem']['dice']:6.1f}  {result['num_images']}")
    skipped = result["num_skipped_no_mask"]
    lines.append(f"scored {result['num_scored']} predictions; skipped {skipped} without a ground-truth mask"
                 + (f" (e.g. {result['skipped_no_mask'][0]})" if skipped else ""))
    return "\n".join(lines)


__all__ = ["EvalConfig", "evaluate", "format_table", "scores_for"]

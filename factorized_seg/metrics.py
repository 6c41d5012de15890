"""Foreground Acc / IoU / DICE of unsupervised label maps, under the strict and the IEM protocols.

A prediction is a label map with values 0..K-1; the ground truth is 0 (background), 255 (foreground), any other
value (128 in the datasets here) ignored. An *assignment* is the set of labels called foreground.

- strict: ONE assignment for the whole dataset, the one with the best mean IoU on a fitting split; the scores
  are the means over the *other* images (never the ones the assignment was chosen on).
- iem: per image, the best assignment (for K = 2: the mask or its inverse, as in the IEM paper; for K > 2 the
  best of all non-empty proper label subsets).

Scores are per-image means (as ReDO / IEM report them). Per-label pixel counts are tallied once per image with
``np.bincount`` so every assignment's confusion counts are sums of those; ``tests/test_seg_metrics.py`` checks
the result against torchmetrics' ``binary_jaccard_index``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import numpy as np

METRICS = ("acc", "iou", "dice")


def assignments(num_labels: int) -> List[Tuple[int, ...]]:
    """Every non-empty proper subset of labels (for one label: that label)."""
    if num_labels <= 1:
        return [(0,)]
    return [s for r in range(1, num_labels) for s in itertools.combinations(range(num_labels), r)]


@dataclass
class LabelCounts:
    """Per image: pixels of each label on ground-truth foreground / background (ignored pixels left out)."""

    fg: np.ndarray  # (num_labels,)
    bg: np.ndarray  # (num_labels,)


def count_labels(pred: np.ndarray, gt: np.ndarray, num_labels: int) -> LabelCounts:
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and mask {gt.shape} differ in size")
    pred = pred.astype(np.int64).ravel()
    gt = gt.ravel()
    if pred.size and (pred.min() < 0 or pred.max() >= num_labels):
        raise ValueError(f"prediction labels must lie in 0..{num_labels - 1}")
    fg = np.bincount(pred[gt == 255], minlength=num_labels)
    bg = np.bincount(pred[gt == 0], minlength=num_labels)
    return LabelCounts(fg=fg, bg=bg)


def scores_for(counts: LabelCounts, assignment: Sequence[int]) -> Dict[str, float]:
    """Acc / IoU / DICE of one image when ``assignment`` is called foreground."""
    idx = list(assignment)
    tp = float(counts.fg[idx].sum())
    fp = float(counts.bg[idx].sum())
    fn = float(counts.fg.sum()) - tp
    tn = float(counts.bg.sum()) - fp
    total = tp + fp + fn + tn
    union = tp + fp + fn
    return {
        "acc": (tp + tn) / total if total else 1.0,
        "iou": tp / union if union else 1.0,
        "dice": 2 * tp / (2 * tp + fp + fn) if union else 1.0,
    }


def _mean(rows: List[Dict[str, float]]) -> Dict[str, float]:
    return {m: float(np.mean([r[m] for r in rows])) for m in METRICS}


def strict_scores(
    counts: Sequence[LabelCounts], fit: Sequence[bool], num_labels: int
) -> Tuple[Dict[str, float], Tuple[int, ...]]:
    """Best assignment by mean IoU over the ``fit`` images, scored on the others. Returns (scores, assignment)."""
    fit_idx = [i for i, f in enumerate(fit) if f]
    eval_idx = [i for i, f in enumerate(fit) if not f]
    if not fit_idx or not eval_idx:
        raise ValueError("strict protocol needs at least one fitting image and one evaluated image")
    best = max(assignments(num_labels),
               key=lambda a: np.mean([scores_for(counts[i], a)["iou"] for i in fit_idx]))
    return _mean([scores_for(counts[i], best) for i in eval_idx]), best


def iem_scores(counts: Sequence[LabelCounts], num_labels: int) -> Dict[str, float]:
    """Per image, the best assignment by IoU."""
    rows = []
    for c in counts:
        rows.append(max((scores_for(c, a) for a in assignments(num_labels)), key=lambda s: s["iou"]))
    return _mean(rows)

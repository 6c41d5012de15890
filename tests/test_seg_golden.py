"""Can our segmentation scores tell segmentation from the shortcuts we have seen (collapse to one region, a
fixed positional split)? On tiny synthetic shapes (a coloured disc, square or diamond at a random place and size on
a textured background, tests/seg_shapes.py), ``factorized-seg eval`` must score the true masks near 1, a per-image
colour 2-means well above the shortcuts, and one region or a centred disc low.

Not here yet: a golden *training* test. The `cpu` preset trained on these shapes for 300 steps (32 px, one thread,
~500-700 s on the loaded 2-core machine) scored strict IoU 0.35 (IEM 0.49), barely above the centred disc (0.31);
the previous preset 0.32. The shapes are too few and too simple for the recipe that segments Flowers-17
(docs/seg_emergence.md), and a Flowers-17 run long enough to separate it from the centred ellipse takes minutes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.cluster import KMeans

sys.path.insert(0, str(Path(__file__).parent))
from seg_shapes import make_shapes  # noqa: E402

from factorized_seg.evaluate import EvalConfig, evaluate  # noqa: E402

N, SIZE = 48, 32


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes(tmp_path_factory.mktemp("shapes"), n=N, size=SIZE, seed=0)


def _score(tmp_path: Path, masks: Path, labels) -> float:
    pred = tmp_path / "pred"
    pred.mkdir()
    for name, lab in labels:
        Image.fromarray(lab.astype(np.uint8)).save(pred / name)
    return evaluate(EvalConfig(pred=pred, masks=str(masks), output=tmp_path / "eval.json"))["strict"]["iou"]


def _names(masks: Path):
    return sorted(p.name for p in masks.iterdir())


def test_true_masks_score_one(shapes, tmp_path):
    _, masks = shapes
    labels = [(n, np.asarray(Image.open(masks / n)) > 127) for n in _names(masks)]
    assert _score(tmp_path, masks, labels) > 0.99


def test_shortcuts_score_low_and_colour_clustering_high(shapes, tmp_path):
    images, masks = shapes
    names = _names(masks)
    one_region = [(n, np.zeros((SIZE, SIZE))) for n in names]
    yy, xx = np.mgrid[:SIZE, :SIZE] + 0.5
    disc = np.hypot(yy - SIZE / 2, xx - SIZE / 2) < SIZE * 0.3
    centred = [(n, disc) for n in names]
    kmeans = []
    for n in names:
        rgb = np.asarray(Image.open(images / n), dtype=np.float32).reshape(-1, 3)
        lab = KMeans(2, n_init=4, random_state=0).fit_predict(rgb).reshape(SIZE, SIZE)
        if lab[0, 0] == 1:  # the corner is background in almost every image: label it 0, like a consistent model
            lab = 1 - lab
        kmeans.append((n, lab))
    scores = {}
    for key, labels in (("one", one_region), ("centred", centred), ("kmeans", kmeans)):
        sub = tmp_path / key
        sub.mkdir()
        scores[key] = _score(sub, masks, labels)
    assert scores["one"] < 0.3 and scores["centred"] < 0.4, scores
    assert scores["kmeans"] > 0.7, scores
    assert scores["kmeans"] - max(scores["one"], scores["centred"]) > 0.3, scores

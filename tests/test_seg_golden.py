"""Can our segmentation scores tell segmentation from the shortcuts we have seen (collapse to one region, a
fixed positional split, a fixed colour rule)? On tiny synthetic shapes (a disc, square or diamond at a random place
and size, tests/seg_shapes.py), ``factorized-seg eval`` must score the true masks near 1, a per-image 2-means well
above the shortcuts, and one region, a centred disc, a half-image split or a colour rule low.

The golden *training* test is the last one here (``test_golden_training_segments_the_light_shapes``): a plain run,
then the recipe with ``--init-from`` it. Cold starts, measured at commit 6343e78 (train -> segment.run_segment ->
evaluate.evaluate, the functions the CLI calls; one thread on the shared 2-core machine, ~1.5x slower than idle;
strict IoU on the 48 ``light`` images of the test below, read at t=30; the shortcuts there: one region 0.16,
centred disc 0.33, half split 0.15, fixed colour rule 0.41):

| ``--preset cpu`` overrides (16 px, 48 images)  | train s | seed 0 | seed 1 | seed 2 | seed 3 |
|------------------------------------------------|---------|--------|--------|--------|--------|
| ``--model.base-channels 8 --max-steps 500``    | 90-180  | 0.67   | 0.69   | 0.31   | 0.67   |
| ``--max-steps 400`` (C = 16)                   | 136     | 0.42   | 0.55   | 0.64   |        |

The recipe's options (reflect padding, pooled masks, balance 0.1, equivariance 1.0 with same_noise) beat every
shortcut on most seeds but not on all: seed 2's masks follow the diffusion noise, not the shape, and stay there at
750 steps (0.25), with 128 images (0.31) or with batch 48 (0.29); with K=2, the preset's K then (the same today with
``--model.num-regions 2`` at commit 1bc67ff: seeds 0 / 2 / 4 / 5 0.670 / 0.308 / 0.684 / 0.256). A cold-start test
would pass or fail by the seed's luck; the golden test starts from a plain run instead, which passed on all 6 seeds
tried. On the ``default`` shapes (random colours) 300 steps gave 0.25 at 16 px and 0.35 at 32 px (centred disc 0.33
/ 0.31); with the shape only textured differently from its background (same colour law for both), the labels
followed colour (strict 0.20-0.40, per-image IoU 0.55). The balance term charges ~0.04 for a split as unequal as a
shape (16 %) and its background, which a split by noise or colour avoids.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.cluster import KMeans

sys.path.insert(0, str(Path(__file__).parent))
from seg_shapes import make_shapes  # noqa: E402

from factorized_seg.cli import main  # noqa: E402
from factorized_seg.evaluate import EvalConfig, evaluate  # noqa: E402

N, SIZE = 48, 32
LIGHT_SIZE = 16


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes(tmp_path_factory.mktemp("shapes"), n=N, size=SIZE, seed=0)


@pytest.fixture(scope="module")
def light_shapes(tmp_path_factory):
    """The ``light`` variant (the shape is the lighter region of its image) and a second set to fit rules on."""
    root = tmp_path_factory.mktemp("light")
    scored = make_shapes(root / "scored", n=N, size=LIGHT_SIZE, seed=0, variant="light")
    fitting = make_shapes(root / "fitting", n=N, size=LIGHT_SIZE, seed=1, variant="light")
    return scored, fitting


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


def _rgb(images: Path, names) -> np.ndarray:
    return np.stack([np.asarray(Image.open(images / n).convert("RGB")) for n in names])


def light_scores(light_shapes, tmp_path: Path, extra: dict = ()) -> dict:
    """Strict IoU on the scored ``light`` set of: one region, a centred disc, a half-image split, the best fixed colour
    rule (fitted on the second set's ground truth), per-image 2-means' lighter cluster, and any ``extra`` labels."""
    (images, masks), (fit_images, fit_masks) = light_shapes
    names, size = _names(masks), LIGHT_SIZE
    yy, xx = np.mgrid[:size, :size] + 0.5
    disc = np.hypot(yy - size / 2, xx - size / 2) < size * 0.3
    # best fixed colour rule: 8x8x8 RGB bins, foreground where the bin is mostly foreground on the fitting set
    fit_rgb = _rgb(fit_images, _names(fit_masks)) // 32
    fit_gt = np.stack([np.asarray(Image.open(fit_masks / n)) > 127 for n in _names(fit_masks)])
    fit_bins = fit_rgb[..., 0] * 64 + fit_rgb[..., 1] * 8 + fit_rgb[..., 2]
    share = np.bincount(fit_bins[fit_gt], minlength=512) / np.maximum(np.bincount(fit_bins.ravel(), minlength=512), 1)
    rgb = _rgb(images, names)
    bins = (rgb // 32)[..., 0] * 64 + (rgb // 32)[..., 1] * 8 + (rgb // 32)[..., 2]
    lighter = []
    for n, im in zip(names, rgb):
        lab = KMeans(2, n_init=4, random_state=0).fit_predict(im.reshape(-1, 3).astype(np.float32))
        lab = lab.reshape(size, size)
        lighter.append((n, lab == np.argmax([im[lab == k].mean() for k in range(2)])))
    candidates = {
        "one": [(n, np.zeros((size, size))) for n in names],
        "centred": [(n, disc) for n in names],
        "half": [(n, xx < size / 2) for n in names],
        "colour_rule": [(n, share[b] > 0.5) for n, b in zip(names, bins)],
        "lighter_cluster": lighter,
        **dict(extra),
    }
    scores = {}
    for key, labels in candidates.items():
        sub = tmp_path / key
        sub.mkdir(parents=True)
        scores[key] = _score(sub, masks, labels)
    return scores


SHORTCUTS = ("one", "centred", "half", "colour_rule")


def test_light_variant_shortcuts_score_low_and_lighter_cluster_high(light_shapes, tmp_path):
    """The ``light`` variant cannot be solved by position or by a fixed colour rule, only inside each image."""
    scores = light_scores(light_shapes, tmp_path)
    shortcuts = max(scores[k] for k in SHORTCUTS)
    assert scores["one"] < 0.25 and scores["centred"] < 0.4 and scores["half"] < 0.25, scores
    assert scores["colour_rule"] < 0.55, scores
    assert scores["lighter_cluster"] > 0.8 and scores["lighter_cluster"] - shortcuts > 0.3, scores


GOLDEN_TRAIN = ["--preset", "cpu", "--resolution", str(LIGHT_SIZE), "--model.base-channels", "8",
                "--model.num-regions", "2", "--seed", "2", "--threads", "1", "--device", "cpu", "--no-progress",
                "--sample-every", "0", "--checkpoint-every", "0"]
"""The cpu recipe (reflect padding, masks pooled by 2, balance 0.1, equivariance 1.0 with same_noise) at the size of
these images: 16 px, C=8, K=2. Seed 2 is the seed whose cold start fails (0.31, docstring above)."""


def test_golden_training_segments_the_light_shapes(light_shapes, tmp_path):
    """Golden end-to-end test, as a user runs it: ``factorized-seg train`` a plain DDPM (500 steps), ``train
    --init-from`` it with the recipe (250 steps), ``segment`` (t = 30), ``eval``: the masks must beat every shortcut.

    Why the warm start: started cold, the recipe fails on 2 of 6 seeds here (seeds 2 and 5: 0.31, 0.26; masks that
    follow the diffusion noise). Started from the plain run, seeds 0-5 gave 0.644 / 0.564 / 0.667 / 0.678 / 0.707 /
    0.586 (each 117-173 s on the shared machine; docs/seg_emergence.md, row 24), against 0.41 for the best shortcut
    (the fitted colour rule), 0.33 (centred disc), 0.16 (one region). The bound below (0.5, and 0.1 above the best
    shortcut of this very image set) holds for every seed measured, with 0.06 to spare on the worst. The warm start
    does NOT help on Flowers-17 (docs/seg_emergence.md, row 23), so the ``cpu`` preset starts cold."""
    (images, masks), _ = light_shapes
    plain, run, seg = tmp_path / "plain", tmp_path / "run", tmp_path / "seg"
    assert main(["train", "--data", str(images), "--output-dir", str(plain), *GOLDEN_TRAIN, "--model.scheme", "plain",
                 "--max-steps", "500"]) == 0
    assert main(["train", "--data", str(images), "--output-dir", str(run), *GOLDEN_TRAIN, "--init-from", str(plain),
                 "--max-steps", "250"]) == 0
    assert main(["segment", "--run", str(run), "--images", str(images), "--output-dir", str(seg), "--no-progress",
                 "--no-save-overlays"]) == 0
    assert main(["eval", "--pred", str(seg / "masks"), "--masks", str(masks),
                 "--output", str(tmp_path / "eval.json")]) == 0
    strict = json.loads((tmp_path / "eval.json").read_text())["strict"]["iou"]
    scores = light_scores(light_shapes, tmp_path / "shortcuts")
    best_shortcut = max(scores[k] for k in SHORTCUTS)
    print(f"golden seg: strict IoU {strict:.3f}; shortcuts {', '.join(f'{k} {scores[k]:.3f}' for k in SHORTCUTS)}")
    assert strict > 0.5 and strict - best_shortcut > 0.1, (strict, scores)

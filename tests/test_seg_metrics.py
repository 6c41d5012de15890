"""Acc / IoU / DICE on hand-made masks, and the strict vs IEM protocols."""

import numpy as np
import pytest
import torch
from torchmetrics.functional.classification import binary_jaccard_index

from factorized_seg.metrics import assignments, count_labels, iem_scores, scores_for, strict_scores


def test_known_iou_dice_acc_with_ignored_pixels():
    gt = np.zeros((4, 4), np.uint8)
    gt[:, :2] = 255  # 8 foreground pixels
    gt[3, 3] = 128  # ignored
    pred = np.zeros((4, 4), np.uint8)
    pred[:, :3] = 1  # 12 pixels called label 1: 8 tp + 4 fp
    c = count_labels(pred, gt, 2)
    s = scores_for(c, (1,))
    # tp 8, fp 4, fn 0, tn 3 (one background pixel ignored) -> 15 scored pixels
    assert s["iou"] == pytest.approx(8 / 12)
    assert s["dice"] == pytest.approx(16 / 20)
    assert s["acc"] == pytest.approx(11 / 15)
    inv = scores_for(c, (0,))
    assert inv["iou"] == pytest.approx(0.0)
    # Same IoU as torchmetrics with the ignore value.
    tm = binary_jaccard_index(torch.from_numpy(pred == 1).long(), torch.from_numpy(np.where(gt == 255, 1, np.where(
        gt == 0, 0, -1))).long(), ignore_index=-1)
    assert float(tm) == pytest.approx(s["iou"])


def test_random_maps_match_torchmetrics():
    rng = np.random.default_rng(0)
    gt = rng.choice([0, 128, 255], size=(32, 32)).astype(np.uint8)
    pred = rng.integers(0, 3, size=(32, 32)).astype(np.uint8)
    c = count_labels(pred, gt, 3)
    for a in assignments(3):
        fg = np.isin(pred, a)
        tgt = np.where(gt == 255, 1, np.where(gt == 0, 0, -1))
        tm = binary_jaccard_index(torch.from_numpy(fg).long(), torch.from_numpy(tgt).long(), ignore_index=-1)
        assert scores_for(c, a)["iou"] == pytest.approx(float(tm), abs=1e-6)


def test_assignments():
    assert assignments(1) == [(0,)]
    assert assignments(2) == [(0,), (1,)]
    assert len(assignments(3)) == 6


def test_strict_never_fits_on_evaluated_images_while_iem_does_per_image():
    gt = np.zeros((4, 4), np.uint8)
    gt[:2] = 255
    flipped = np.where(gt == 255, 1, 0).astype(np.uint8)  # label 1 = foreground
    normal = 1 - flipped  # label 0 = foreground
    counts = [count_labels(normal, gt, 2)] * 3 + [count_labels(flipped, gt, 2)] * 2
    fit = [True, True, True, False, False]
    strict, assignment = strict_scores(counts, fit, 2)
    assert assignment == (0,)  # chosen on the fitting images
    assert strict["iou"] == pytest.approx(0.0)  # ... and wrong on the evaluated ones
    assert iem_scores(counts, 2)["iou"] == pytest.approx(1.0)


def test_size_mismatch_and_bad_labels_raise():
    with pytest.raises(ValueError, match="differ"):
        count_labels(np.zeros((2, 2)), np.zeros((3, 3), np.uint8), 2)
    with pytest.raises(ValueError, match="labels"):
        count_labels(np.full((2, 2), 5), np.zeros((2, 2), np.uint8), 2)

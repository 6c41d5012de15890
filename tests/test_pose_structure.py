"""benchmarks/pose_structure.py: the statistics that tell a mirrored or rotated pose set from one with no structure."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from pose_structure import structure  # noqa: E402


def _centres(n: int = 60, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    azimuth, elevation = rng.uniform(-np.pi, np.pi, n), rng.uniform(0.15, 1.4, n)
    return 4.0 * np.stack([np.cos(elevation) * np.cos(azimuth), np.cos(elevation) * np.sin(azimuth),
                           np.sin(elevation)], axis=1)


def test_rotated_mirrored_and_scrambled_sets():
    true = _centres()
    turn = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # 90 deg about z
    rotated = structure(true @ turn.T, true)
    assert rotated["elevation_corr"] == pytest.approx(1.0)
    assert rotated["azimuth_same_sense_median_residual_deg"] < 1e-6
    assert rotated["centre_after_best_rotation_median_deg"] < 1e-4
    mirrored = structure(true * np.array([1.0, -1.0, 1.0]), true)  # y -> -y: azimuth -> -azimuth
    assert mirrored["azimuth_mirrored_median_residual_deg"] < 1e-6
    assert mirrored["centre_after_best_reflection_median_deg"] < 1e-4
    assert mirrored["centre_after_best_rotation_median_deg"] > 10.0
    scrambled = structure(_centres(seed=1), true)
    assert abs(scrambled["elevation_corr"]) < 0.5
    assert min(scrambled["centre_after_best_rotation_median_deg"],
               scrambled["centre_after_best_reflection_median_deg"]) > 20.0


def test_mean_pairwise_angle():
    """gen_lifting.diagnostics.mean_pairwise_angle_deg: the true cameras' spread this script prints."""
    import torch

    from gen_lifting.diagnostics import mean_pairwise_angle_deg

    square = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 0.0]], dtype=torch.float64)  # 90, 180, 90
    assert mean_pairwise_angle_deg(3.0 * square) == pytest.approx(120.0)
    assert mean_pairwise_angle_deg(torch.ones(4, 3, dtype=torch.float64)) == pytest.approx(0.0, abs=1e-4)

"""Is a failed gen-lifting run's pose set a symmetric confusion or no structure at all? (docs/lifting.md, "Discovery
is a lottery per run")

    python benchmarks/pose_structure.py --load-config RUN/config.yml --out structure.json

For the training photos' predicted camera centres (the encoder's; a 360 scene, cameras about the origin) against the
dataset's: the correlation of elevations, the best azimuth map of each orientation (a = +-a_true + offset: a mirror
shows as a good fit with -1), and the median angle after the best rotation and the best reflection of the sphere
(orthogonal Procrustes on unit centres). Ground truth is read only to score. Also the ground-truth-free collapse
statistics of ``gen_lifting.diagnostics.camera_spread`` (``top_spread_deg`` next to the true cameras'
``true_spread_deg``, and ``candidate_dependence_deg``). Prints the numbers and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Dict

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def spherical(centres: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Azimuth and elevation (deg) of camera centres [n, 3] seen from the origin (z up)."""
    radius = np.linalg.norm(centres, axis=1)
    return np.degrees(np.arctan2(centres[:, 1], centres[:, 0])), np.degrees(np.arcsin(centres[:, 2] / radius))


def structure(pred: np.ndarray, true: np.ndarray) -> Dict[str, float]:
    """The statistics of the module docstring for predicted and true centres [n, 3]."""
    pa, pe = spherical(pred)
    ta, te = spherical(true)
    out: Dict[str, float] = {"elevation_corr": float(np.corrcoef(pe, te)[0, 1])}
    for sign, name in ((1, "azimuth_same_sense"), (-1, "azimuth_mirrored")):
        diff = np.radians(pa - sign * ta)
        offset = math.atan2(np.sin(diff).mean(), np.cos(diff).mean())
        residual = np.degrees(np.abs(np.angle(np.exp(1j * (diff - offset)))))
        out[f"{name}_median_residual_deg"] = float(np.median(residual))
    p = pred / np.linalg.norm(pred, axis=1, keepdims=True)
    t = true / np.linalg.norm(true, axis=1, keepdims=True)
    u, _, vt = np.linalg.svd(t.T @ p)
    det = np.linalg.det(u @ vt)
    for sign, name in ((det, "rotation"), (-det, "reflection")):
        fit = u @ np.diag([1.0, 1.0, sign]) @ vt  # det(fit) = +1 for the rotation, -1 for the reflection
        angle = np.degrees(np.arccos(np.clip(((p @ fit.T) * t).sum(axis=1), -1.0, 1.0)))
        out[f"centre_after_best_{name}_median_deg"] = float(np.median(angle))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load-config", type=Path, required=True, help="config.yml of a trained gen-lifting run")
    parser.add_argument("--out", type=Path, default=Path("pose_structure.json"), help="JSON written here")
    args = parser.parse_args()
    import torch

    from gen_lifting.diagnostics import camera_spread, mean_pairwise_angle_deg
    from gen_lifting.inference import load_pipeline

    pipe = load_pipeline(args.load_config, test_mode="val")
    pred = pipe.show_predicted_poses()["train"][:, :3, 3].double().cpu().numpy()
    true = pipe.datamanager.dataset_camera_to_worlds("train")[:, :3, 3].double().cpu().numpy()
    result = structure(pred, true)
    # the ground-truth-free collapse statistics (gen_lifting/diagnostics.camera_spread), next to the true cameras' spread
    result.update(camera_spread(pipe))
    result["true_spread_deg"] = mean_pairwise_angle_deg(torch.from_numpy(true))
    for key, value in result.items():
        print(f"{key:42s} {value:8.3f}")
    args.out.write_text(json.dumps({"config": str(args.load_config), **result}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

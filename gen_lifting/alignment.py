"""Pose evaluation in an arbitrary learned frame: align predicted cameras to ground truth, then measure errors.

The learned world frame of a pose-free model is only defined up to a rotation (360 scenes, cameras around
the origin) or a similarity transform, so predicted camera centres are first registered to the ground-truth
centres (Umeyama/Kabsch, from roma), the same transform is applied to the predicted rotations, and only then
are angles compared. Poses are camera-to-world, ``[N, 3, 4]`` or ``[N, 4, 4]``, in one camera convention
(OpenGL/nerfstudio) for both inputs.
"""

from __future__ import annotations

from typing import Dict, Literal, Optional, Tuple

import roma
import torch
from jaxtyping import Bool, Float
from torch import Tensor

AlignMode = Literal["similarity", "rotation", "orientation"]


def umeyama(
    src: Float[Tensor, "num_points 3"], dst: Float[Tensor, "num_points 3"], with_scale: bool = True
) -> Tuple[Float[Tensor, "3 3"], Float[Tensor, "3"], Float[Tensor, ""]]:
    """(R, t, s) minimising sum ||s R src_i + t - dst_i||^2 (s = 1 when ``with_scale`` is False)."""
    if src.shape != dst.shape or src.shape[0] < 3:
        raise ValueError(f"umeyama needs two matching [N>=3, 3] point sets, got {tuple(src.shape)} and {tuple(dst.shape)}")
    if with_scale:
        return roma.rigid_points_registration(src, dst, compute_scaling=True)
    rotation, translation = roma.rigid_points_registration(src, dst, compute_scaling=False)
    return rotation, translation, torch.ones((), dtype=src.dtype, device=src.device)


def fit_alignment(
    pred_centers: Float[Tensor, "num_cams 3"], gt_centers: Float[Tensor, "num_cams 3"], mode: AlignMode = "similarity"
) -> Tuple[Float[Tensor, "3 3"], Float[Tensor, "3"], Float[Tensor, ""]]:
    """Transform (R, t, s) taking predicted camera centres onto ground truth.

    ``similarity``: rotation, translation and scale (Umeyama). ``rotation``: a rotation about the origin only
    (t = 0, s = 1), for 360 scenes whose learned and true frames are both centred on the object.
    """
    if mode == "similarity":
        return umeyama(pred_centers, gt_centers, with_scale=True)
    if mode == "rotation":
        # orthogonal Procrustes without centring: argmax_R tr(R^T sum_i gt_i pred_i^T)
        rotation = roma.special_procrustes(gt_centers.T @ pred_centers)
        return rotation, torch.zeros(3, dtype=pred_centers.dtype, device=pred_centers.device), torch.ones((), dtype=pred_centers.dtype, device=pred_centers.device)
    raise ValueError(f"alignment mode must be 'similarity' or 'rotation', got {mode!r}")


def fit_orientation_alignment(
    pred: Float[Tensor, "num_cams 3 4"], gt: Float[Tensor, "num_cams 3 4"]
) -> Tuple[Float[Tensor, "3 3"], Float[Tensor, "3"], Float[Tensor, ""]]:
    """(R, t, s) with R from the camera *orientations* (R = argmin sum ||R R_pred_i - R_gt_i||, Procrustes),
    then s and t by least squares on the centres. For forward-facing rigs, whose nearly coplanar centres make a
    rotation fitted on centres ill-conditioned."""
    rotation = roma.special_procrustes((gt[:, :, :3] @ pred[:, :, :3].transpose(1, 2)).sum(dim=0))
    src = pred[:, :, 3] @ rotation.T
    src_c, dst_c = src - src.mean(dim=0), gt[:, :, 3] - gt[:, :, 3].mean(dim=0)
    scale = (src_c * dst_c).sum() / src_c.pow(2).sum().clamp_min(1e-12)
    translation = gt[:, :, 3].mean(dim=0) - scale * src.mean(dim=0)
    return rotation, translation, scale


Alignment = Tuple[Float[Tensor, "3 3"], Float[Tensor, "3"], Float[Tensor, ""]]
"""(R, t, s): a point x of the predicted frame is s R x + t in the ground-truth frame."""


def fit_camera_alignment(
    pred_c2w: Float[Tensor, "num_cams rows 4"], gt_c2w: Float[Tensor, "num_cams rows 4"], mode: AlignMode = "similarity"
) -> Alignment:
    """The transform taking predicted cameras onto ground truth: fitted on camera centres, or on orientations with
    ``mode="orientation"``."""
    pred, gt = pred_c2w[:, :3, :4], gt_c2w[:, :3, :4]
    if mode == "orientation":
        return fit_orientation_alignment(pred, gt)
    return fit_alignment(pred[:, :, 3], gt[:, :, 3], mode)


def fit_camera_alignment_inliers(
    pred_c2w: Float[Tensor, "num_cams rows 4"],
    gt_c2w: Float[Tensor, "num_cams rows 4"],
    mode: AlignMode = "similarity",
    inlier_deg: float = 15.0,
    max_rounds: int = 10,
) -> Tuple[Alignment, Bool[Tensor, "num_cams"]]:
    """``fit_camera_alignment`` refitted on its inliers: the views whose aligned rotation error is within
    ``inlier_deg``, until that set stops changing (at most ``max_rounds`` refits; kept at the previous set when fewer
    than 3 views would remain). Returns the alignment and the inlier mask.

    Why: the least-squares fit weighs every view alike, so a few flipped cameras (a pose-free model's typical failure)
    tilt it and every good view inherits the tilt; on lego's true cameras with 1 deg of noise, 6 views of 100 turned
    by 106 deg raise the median error from 0.9 to 2.2 deg. This is the usual inlier refit of SfM evaluations (as
    RANSAC would end); it is fitted on the views it is given only, so held-out views still judge it."""
    pred, gt = pred_c2w[:, :3, :4], gt_c2w[:, :3, :4]
    inliers = torch.ones(pred.shape[0], dtype=torch.bool, device=pred.device)
    alignment = fit_camera_alignment(pred, gt, mode)
    for _ in range(max_rounds):
        aligned = apply_alignment(pred, alignment)
        within = torch.rad2deg(roma.rotmat_geodesic_distance(aligned[:, :, :3], gt[:, :, :3])) <= inlier_deg
        if int(within.sum()) < 3 or torch.equal(within, inliers):
            break
        inliers = within
        alignment = fit_camera_alignment(pred[inliers], gt[inliers], mode)
    return alignment, inliers


def apply_alignment(pred_c2w: Float[Tensor, "num_cams rows 4"], alignment: Alignment) -> Float[Tensor, "num_cams 3 4"]:
    """Predicted cameras expressed in the ground-truth frame."""
    rotation, translation, scale = alignment
    pred = pred_c2w[:, :3, :4]
    rotations = rotation @ pred[:, :, :3]
    centers = scale * pred[:, :, 3] @ rotation.T + translation
    return torch.cat([rotations, centers[:, :, None]], dim=2)


def align_cameras(
    pred_c2w: Float[Tensor, "num_cams rows 4"], gt_c2w: Float[Tensor, "num_cams rows 4"], mode: AlignMode = "similarity"
) -> Float[Tensor, "num_cams 3 4"]:
    """Predicted cameras expressed in the ground-truth frame, with the alignment fitted on these same cameras."""
    return apply_alignment(pred_c2w, fit_camera_alignment(pred_c2w, gt_c2w, mode))


def _mean_median(prefix: str, values: Tensor) -> Dict[str, float]:
    return {f"{prefix}_mean": values.mean().item(), f"{prefix}_median": torch.quantile(values, 0.5).item()}


def direction_angle_deg(a: Float[Tensor, "*batch 3"], b: Float[Tensor, "*batch 3"]) -> Float[Tensor, "*batch"]:
    """Angle (deg) between the directions ``a`` and ``b`` (the cosine clamped to [-1, 1] against rounding)."""
    cosine = torch.nn.functional.cosine_similarity(a, b, dim=-1).clamp(-1.0, 1.0)
    return torch.rad2deg(torch.arccos(cosine))


def pose_errors(
    pred_c2w: Float[Tensor, "num_cams rows 4"],
    gt_c2w: Float[Tensor, "num_cams rows 4"],
    mode: AlignMode = "similarity",
    threshold_deg: float = 15.0,
    scene_center: Optional[Float[Tensor, "3"]] = None,
    alignment: Optional[Alignment] = None,
) -> Dict[str, float]:
    """Errors after alignment: rotation geodesic angle, share within ``threshold_deg``, camera-centre errors.

    The alignment is fitted on these cameras (``mode``) unless ``alignment`` is given: held-out views are scored with
    the transform fitted on the training views (``fit_camera_alignment``), so nothing is fitted on what is judged.
    Keys: rot_err_mean_deg, rot_err_median_deg, within_{threshold}deg (e.g. within_15deg), center_angle_err_mean_deg
    / _median_deg (angle between aligned and true centre seen from ``scene_center``, default the origin), and
    center_dist_mean / _median (in ground-truth units).
    """
    pred, gt = pred_c2w.double(), gt_c2w.double()[:, :3, :4]
    if alignment is None:
        alignment = fit_camera_alignment(pred, gt, mode)
    aligned = apply_alignment(pred, tuple(x.to(pred) for x in alignment))
    rot_err = torch.rad2deg(roma.rotmat_geodesic_distance(aligned[:, :, :3], gt[:, :, :3]))
    center = torch.zeros(3, dtype=torch.float64, device=pred.device) if scene_center is None else scene_center.to(pred)
    pred_dir, gt_dir = aligned[:, :, 3] - center, gt[:, :, 3] - center
    center_angle = direction_angle_deg(pred_dir, gt_dir)
    errors = {
        **{k + "_deg": v for k, v in _mean_median("rot_err", rot_err).items()},
        f"within_{threshold_deg:g}deg": (rot_err <= threshold_deg).double().mean().item(),
        **{k + "_deg": v for k, v in _mean_median("center_angle_err", center_angle).items()},
        **_mean_median("center_dist", torch.linalg.norm(aligned[:, :, 3] - gt[:, :, 3], dim=1)),
    }
    return errors

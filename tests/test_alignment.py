"""Umeyama alignment and pose errors in an arbitrary learned frame."""

from __future__ import annotations

import math

import pytest
import roma
import torch

from gen_lifting.alignment import align_cameras, fit_alignment, pose_errors, umeyama


def _look_at_origin(centers: torch.Tensor) -> torch.Tensor:
    """OpenGL c2w [N, 4, 4] for cameras at ``centers`` looking at the origin (world z up)."""
    back = centers / centers.norm(dim=1, keepdim=True)
    right = torch.linalg.cross(torch.tensor([0.0, 0.0, 1.0], dtype=centers.dtype).expand_as(back), back)
    right = right / right.norm(dim=1, keepdim=True)
    up = torch.linalg.cross(back, right)
    c2w = torch.eye(4, dtype=centers.dtype).repeat(len(centers), 1, 1)
    c2w[:, :3, :3] = torch.stack([right, up, back], dim=2)
    c2w[:, :3, 3] = centers
    return c2w


def _gt_cameras(n: int = 12, radius: float = 4.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    azimuth = torch.rand(n, generator=g, dtype=torch.float64) * 2 * math.pi
    elevation = torch.rand(n, generator=g, dtype=torch.float64) * 1.2 + 0.1
    dirs = torch.stack([elevation.cos() * azimuth.cos(), elevation.cos() * azimuth.sin(), elevation.sin()], 1)
    return _look_at_origin(radius * dirs)


def _to_other_frame(c2w: torch.Tensor, rotation: torch.Tensor, translation: torch.Tensor, scale: float):
    """The same cameras seen in a frame x' = scale * rotation @ x + translation."""
    out = c2w.clone()
    out[:, :3, :3] = rotation @ c2w[:, :3, :3]
    out[:, :3, 3] = scale * c2w[:, :3, 3] @ rotation.T + translation
    return out


def test_umeyama_recovers_a_known_similarity():
    torch.manual_seed(0)
    src = torch.randn(20, 3, dtype=torch.float64)
    rotation = roma.random_rotmat(dtype=torch.float64)
    translation, scale = torch.tensor([0.3, -2.0, 1.5], dtype=torch.float64), 2.7
    dst = scale * src @ rotation.T + translation
    r, t, s = umeyama(src, dst, with_scale=True)
    assert torch.allclose(r, rotation, atol=1e-10) and torch.allclose(t, translation, atol=1e-10)
    assert s.item() == pytest.approx(scale, rel=1e-10)
    r, t, s = umeyama(src, src @ rotation.T + translation, with_scale=False)
    assert torch.allclose(r, rotation, atol=1e-10) and torch.allclose(t, translation, atol=1e-10) and s == 1


@pytest.mark.parametrize("rows", [3, 4])
def test_aligned_copies_have_zero_error(rows):
    gt = _gt_cameras()
    pred = _to_other_frame(gt, roma.random_rotmat(dtype=torch.float64), torch.tensor([1.0, 2.0, 3.0]).double(), 0.4)
    aligned = align_cameras(pred[:, :rows], gt[:, :rows])
    assert aligned.shape == (12, 3, 4) and torch.allclose(aligned, gt[:, :3], atol=1e-9)
    errors = pose_errors(pred[:, :rows].float(), gt[:, :rows].float())
    assert errors["rot_err_mean_deg"] < 1e-2 and errors["center_angle_err_mean_deg"] < 1e-2
    assert errors["within_15deg"] == 1.0 and errors["center_dist_mean"] < 1e-4


def test_one_perturbed_view_gives_its_known_rotation_error():
    gt = _gt_cameras()
    pred = _to_other_frame(gt, roma.random_rotmat(dtype=torch.float64), torch.zeros(3).double(), 1.5)
    twist = roma.rotvec_to_rotmat(torch.tensor([0.0, 0.0, math.radians(30.0)], dtype=torch.float64))
    pred[4, :3, :3] = pred[4, :3, :3] @ twist  # 30 deg about its own optical axis; centre unchanged
    errors = pose_errors(pred, gt)
    assert errors["rot_err_mean_deg"] == pytest.approx(30.0 / 12, abs=1e-6)
    assert errors["rot_err_median_deg"] == pytest.approx(0.0, abs=1e-6)
    assert errors["within_15deg"] == pytest.approx(11 / 12)
    assert pose_errors(pred, gt, threshold_deg=31.0)["within_31deg"] == 1.0


def test_rotation_mode_aligns_about_the_origin_without_scale():
    gt = _gt_cameras(radius=4.0)
    pred = _to_other_frame(gt, roma.random_rotmat(dtype=torch.float64), torch.zeros(3).double(), 0.5)  # radius 2
    rotation, translation, scale = fit_alignment(pred[:, :3, 3], gt[:, :3, 3], mode="rotation")
    assert translation.abs().max() == 0 and scale == 1
    errors = pose_errors(pred, gt, mode="rotation")
    assert errors["rot_err_mean_deg"] < 1e-6
    assert errors["center_angle_err_median_deg"] < 1e-5
    assert errors["center_dist_mean"] == pytest.approx(2.0, abs=1e-9)  # radius 2 vs 4: only the distance differs


def test_wrong_inputs_raise():
    gt = _gt_cameras()
    with pytest.raises(ValueError, match="similarity' or 'rotation"):
        align_cameras(gt, gt, mode="affine")
    with pytest.raises(ValueError, match="N>=3"):
        align_cameras(gt[:2], gt[:2])


def test_orientation_alignment_recovers_similarity_with_coplanar_centres():
    import roma

    torch.manual_seed(0)
    n = 12
    gt_rot = roma.rotvec_to_rotmat(torch.randn(n, 3, dtype=torch.float64) * 0.1)  # forward-facing-like
    gt_ctr = torch.cat([torch.randn(n, 2, dtype=torch.float64), torch.zeros(n, 1, dtype=torch.float64)], dim=1)
    gt = torch.cat([gt_rot, gt_ctr[:, :, None]], dim=2)
    frame = roma.rotvec_to_rotmat(torch.tensor([0.3, -1.0, 0.5], dtype=torch.float64))
    scale, shift = 2.5, torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    # prediction = ground truth expressed in another frame: x_pred = frame^T (x_gt - shift) / scale
    pred_rot = frame.T @ gt_rot
    pred_ctr = (gt_ctr - shift) @ frame / scale
    pred = torch.cat([pred_rot, pred_ctr[:, :, None]], dim=2)
    errors = pose_errors(pred, gt, mode="orientation")
    assert errors["rot_err_median_deg"] < 1e-4 and errors["center_dist_mean"] < 1e-6


def test_held_out_views_use_the_alignment_fitted_on_training_views():
    """A frame transform fitted on the training views maps held-out views exactly; a held-out view that is wrong
    stays wrong (nothing is refitted on the views being judged)."""
    from gen_lifting.alignment import fit_camera_alignment

    gt = _gt_cameras(n=16)
    rotation = roma.random_rotmat(dtype=torch.float64)
    pred = _to_other_frame(gt, rotation, torch.zeros(3, dtype=torch.float64), 1.0)
    train, test = slice(0, 12), slice(12, 16)
    alignment = fit_camera_alignment(pred[train], gt[train], mode="rotation")
    assert pose_errors(pred[test], gt[test], alignment=alignment)["rot_err_median_deg"] < 1e-6
    wrong = pred[test].clone()
    wrong[:, :3, :3] = roma.rotvec_to_rotmat(torch.tensor([0.0, 0.0, 0.5], dtype=torch.float64)) @ wrong[:, :3, :3]
    wrong[:, :3, 3] = wrong[:, :3, 3] @ roma.rotvec_to_rotmat(torch.tensor([0.0, 0.0, 0.5], dtype=torch.float64)).T
    held_out = pose_errors(wrong, gt[test], alignment=alignment)
    assert held_out["rot_err_median_deg"] == pytest.approx(math.degrees(0.5), abs=1e-6)
    assert pose_errors(wrong, gt[test], mode="rotation")["rot_err_median_deg"] < 1e-6  # refitting would hide it


@pytest.mark.parametrize("mode", ["rotation", "similarity"])
def test_inlier_refit_removes_the_tilt_a_few_flipped_views_give_the_least_squares_fit(mode):
    """100 cameras, each 1 deg off, in another frame; 6 of them turned by ~110 deg (flipped). The least-squares fit
    is tilted by them (every good view's error rises well above 1 deg); the inlier refit keeps exactly the 94 good
    views and scores them near 1 deg. Without outliers the refit keeps every view and equals the plain fit."""
    from gen_lifting.alignment import fit_camera_alignment, fit_camera_alignment_inliers

    gt = _gt_cameras(100)
    g = torch.Generator().manual_seed(1)
    noise = roma.rotvec_to_rotmat(torch.nn.functional.normalize(torch.randn(100, 3, generator=g, dtype=torch.float64),
                                                                dim=1) * math.radians(1.0))
    flipped = torch.zeros(100, dtype=torch.bool)
    flipped[torch.randperm(100, generator=g)[:6]] = True
    noise[flipped] = roma.rotvec_to_rotmat(torch.nn.functional.normalize(
        torch.randn(6, 3, generator=g, dtype=torch.float64), dim=1) * math.radians(110.0))
    pred = gt.clone()
    pred[:, :3, :3] = noise @ gt[:, :3, :3]
    pred[:, :3, 3] = (noise @ gt[:, :3, 3:])[..., 0]  # the camera moves with its turn (an orbit camera's error)
    frame = roma.rotvec_to_rotmat(torch.tensor([0.3, -0.5, 0.2], dtype=torch.float64))
    pred = _to_other_frame(pred, frame, torch.zeros(3, dtype=torch.float64), 1.0)

    plain = pose_errors(pred[~flipped], gt[~flipped], alignment=fit_camera_alignment(pred, gt, mode))
    alignment, inliers = fit_camera_alignment_inliers(pred, gt, mode)
    robust = pose_errors(pred[~flipped], gt[~flipped], alignment=alignment)
    assert torch.equal(inliers, ~flipped)
    assert plain["rot_err_median_deg"] > 1.8  # the tilt
    assert robust["rot_err_median_deg"] == pytest.approx(1.0, abs=0.1)

    clean = pred.clone()
    clean[flipped] = _to_other_frame(gt[flipped], frame, torch.zeros(3, dtype=torch.float64), 1.0)
    alignment, inliers = fit_camera_alignment_inliers(clean, gt, mode)
    assert bool(inliers.all())
    assert all(torch.allclose(a, b) for a, b in zip(alignment, fit_camera_alignment(clean, gt, mode)))

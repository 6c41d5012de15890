"""Draw the *predicted* camera of every training image in the viser viewer, coloured by candidate.

nerfstudio's viewer places one frustum (with the image thumbnail) per training camera at the pose of the dataset's
camera, and moves it only for models with a CameraOptimizer. gen-lifting's pipeline keeps those cameras at the
predicted poses (``GenLiftingPipeline.show_predicted_poses``), so a standalone ``ns-viewer`` draws them there;
during training this callback refreshes them, moves the viewer's frustums to the new poses and adds a small frustum
coloured by the winning candidate, the way ``ViewerState.update_camera_poses`` does for the camera optimizer.
"""

from __future__ import annotations

import colorsys

import numpy as np
import torch

VISER_NERFSTUDIO_SCALE_RATIO = 10.0  # nerfstudio.viewer.viewer's scene scale


def candidate_colour(index: int, count: int) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(index / max(count, 1), 0.85, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


@torch.no_grad()
def update_viewer_frustums(pipeline, viewer_state) -> int:
    """Move/draw frustums at the predicted poses; returns how many were drawn (0 without a viewer)."""
    server = getattr(viewer_state, "viser_server", None)
    if server is None or pipeline.uses_dataset_poses:  # the oracle's frustums are its (true) poses already
        return 0
    import viser.transforms as vtf

    model = pipeline.model
    pipeline.show_predicted_poses()  # the dataset cameras the viewer (and ns-render) read; one encoder pass
    cands = pipeline.train_candidates.cpu().tolist()
    # the training photos' cameras as shown everywhere else: the encoder's poses, or the refined ones once
    # training-time pose refinement has started (gen_lifting/refinement.py); colour = the encoder's winner
    c2ws = model.view_poses["train"].detach().cpu().numpy()
    k = model.pose_encoder.num_candidates
    fx, _, cx, cy = model.intrinsics[:4].tolist()
    handles = getattr(viewer_state, "camera_handles", {}) or {}
    for i, (c2w, cand) in enumerate(zip(c2ws, cands)):
        rot = vtf.SO3.from_matrix(c2w[:3, :3]) @ vtf.SO3.from_x_radians(np.pi)
        position = c2w[:3, 3] * VISER_NERFSTUDIO_SCALE_RATIO
        if i in handles:  # the viewer's thumbnail frustum of this training image
            handles[i].position = position
            handles[i].wxyz = rot.wxyz
        server.scene.add_camera_frustum(
            name=f"/gen_lifting/predicted/cam_{i:05d}", fov=float(2 * np.arctan(cx / fx)), aspect=cx / cy,
            scale=0.05, color=candidate_colour(cand, k), wxyz=rot.wxyz, position=position,
        )
    return len(cands)

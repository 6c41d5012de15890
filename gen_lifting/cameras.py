"""Candidate camera parameterisation (thesis ch. 3).

360 scenes: every candidate looks at the origin from a sphere of fixed radius r. Candidate i owns an octant
sign vector o_i in {+1, -1}^3 and its position is r * normalize(o_i * sigmoid(v_i)), v_i being three numbers
predicted by the pose encoder, so a candidate can never leave its octant. The rotation is the look-at
rotation with a fixed world-up and zero in-plane roll. Forward-facing scenes use one camera per image from an
axis-angle rotation and a translation (roma's Rodrigues formula).

Cameras follow nerfstudio's (OpenGL) convention: c2w columns are the camera's right (x), up (y) and back
(z) axes; the camera looks along -z.
"""

from __future__ import annotations

import itertools
from typing import Literal

import roma
import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

CandidateLayout = Literal["upper", "sphere"]


def octant_signs(layout: CandidateLayout, num_candidates: int) -> Float[Tensor, "cand 3"]:
    """Sign vectors of the candidates: the 4 upper quadrants (z > 0) or all 8 octants, each repeated evenly."""
    if layout == "upper":
        bases = [(sx, sy, 1.0) for sx, sy in itertools.product((1.0, -1.0), repeat=2)]
    elif layout == "sphere":
        bases = [tuple(s) for s in itertools.product((1.0, -1.0), repeat=3)]
    else:
        raise ValueError(f"candidate layout must be 'upper' or 'sphere', got {layout!r}")
    if num_candidates < 1 or num_candidates % len(bases) != 0:
        raise ValueError(
            f"num_candidates={num_candidates} must be a positive multiple of {len(bases)} for layout {layout!r}"
        )
    reps = num_candidates // len(bases)
    return torch.tensor([b for b in bases for _ in range(reps)])


def candidate_positions(
    raw: Float[Tensor, "*batch cand 3"], signs: Float[Tensor, "cand 3"], radius: float
) -> Float[Tensor, "*batch cand 3"]:
    """Camera centres r * normalize(o * sigmoid(v)): on the sphere, inside each candidate's octant."""
    return radius * F.normalize(signs.to(raw) * torch.sigmoid(raw), dim=-1)


def look_at_origin(
    positions: Float[Tensor, "*batch 3"], up: tuple[float, float, float] | Float[Tensor, "3"] = (0.0, 0.0, 1.0)
) -> Float[Tensor, "*batch 3 4"]:
    """Camera-to-world matrices of cameras at ``positions`` looking at the origin with zero roll about ``up``.

    nerfstudio's ``camera_utils.viewmatrix`` builds the same frame but only for one camera in float64-free
    code paths; this version is batched and differentiable.
    """
    back = F.normalize(positions, dim=-1)  # camera +z points away from the target
    world_up = torch.as_tensor(up, dtype=positions.dtype, device=positions.device).expand_as(back)
    right = F.normalize(torch.cross(world_up, back, dim=-1), dim=-1)
    cam_up = torch.cross(back, right, dim=-1)
    rot = torch.stack([right, cam_up, back], dim=-1)
    return torch.cat([rot, positions.unsqueeze(-1)], dim=-1)


def rotvec_translation_to_c2w(
    rotvec: Float[Tensor, "*batch 3"], translation: Float[Tensor, "*batch 3"]
) -> Float[Tensor, "*batch 3 4"]:
    """Single-camera variant: c2w = [R(rotvec) | t] (Rodrigues via roma)."""
    return torch.cat([roma.rotvec_to_rotmat(rotvec), translation.unsqueeze(-1)], dim=-1)


def fit_world_up(c2w: Float[Tensor, "num 3 4"]) -> Float[Tensor, "3"]:
    """The world-up about which cameras have the least roll: the unit vector most orthogonal to every camera's right
    axis (the smallest eigenvector of sum x_i x_i^T; exactly orthogonal for zero-roll look-at cameras), signed toward
    +z. For refined cameras, whose field may sit tilted against the candidates' fixed up (pose_encoder.world_up)."""
    right = c2w[:, :3, 0].double()
    up = torch.linalg.eigh(right.T @ right).eigenvectors[:, 0]
    return (up * (1.0 if up[2] >= 0 else -1.0)).to(c2w.dtype)

"""Self-labelled views for the pose encoder (ours, beyond the thesis; off by default).

During pose refinement (gen_lifting/refinement.py) the field learns from the refined training cameras, and those are
far more precise than the encoder's own poses (about 1-2 deg against 6-16 on lego). The encoder, however, learns
poses only from the training photos, and pulling it toward their refined poses lowered its error on those photos but
not on held-out ones (docs/lifting.md, "Teaching the encoder the refined poses"): it does not generalise from ~100
views. Here the field renders a bank of views at cameras *between* the photos: directions of refined training cameras
jittered on the sphere (by a fixed angle, or by a multiple of the photos' even spacing where that is wider:
``jitter_for``), looking at the origin with zero roll about the candidates' world-up like the encoder's candidates
(gen_lifting/cameras.py).
Each render's camera is its label, known by construction; no dataset pose is read. The encoder then also learns, on
noised copies of those renders, to put its nearest candidate on the render's direction and to score that candidate
highest (``nearest_candidate_loss``). The bank is re-rendered every few hundred steps as the field sharpens; it is not
saved with a checkpoint (a resumed run renders it again at its first step).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Tuple

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from gen_lifting.cameras import look_at_origin


@dataclass
class SyntheticViews:
    """Rendered images and the unit direction (camera centre / radius) each was rendered from."""

    images: Float[Tensor, "num height width 3"]
    directions: Float[Tensor, "num 3"]
    max_angle_deg: float
    """The jitter they were drawn with."""


def even_spacing_deg(count: int, upper: bool) -> float:
    """The spacing (deg) of ``count`` cameras spread evenly over the area the candidates cover, sqrt(area / count):
    the upper hemisphere (2 pi sr) or the sphere. 100 photos on the upper hemisphere: 14.4 deg; 25: 28.7.
    (Measured from the count alone: the cameras' own spread early in refinement is the encoder's, which clusters
    its answers; lego's demo: 2.8 deg median neighbour angle at the snapshot, 6.5 once refined.)"""
    area = 2 * math.pi if upper else 4 * math.pi
    return math.degrees(math.sqrt(area / max(count, 1)))


def jitter_for(count: int, upper: bool, floor_deg: float, spacing_mult: float) -> float:
    """The synthetic views' jitter: ``floor_deg``, or ``spacing_mult`` x the photos' even spacing when that is larger
    (sparse photo sets leave wider holes between the photos), at most 180 deg. ``spacing_mult`` 0: ``floor_deg``."""
    if spacing_mult <= 0:
        return floor_deg
    return min(180.0, max(floor_deg, spacing_mult * even_spacing_deg(count, upper)))


def jitter_directions(
    directions: Float[Tensor, "num 3"], max_angle_deg: float, generator: torch.Generator, upper: bool
) -> Float[Tensor, "num 3"]:
    """Move each unit direction by an angle up to ``max_angle_deg`` (uniform over the spherical cap's area) toward a
    random side; with ``upper`` a direction pushed below the horizon is mirrored back above it (the candidates of the
    'upper' layout cannot go there)."""
    d = F.normalize(directions, dim=-1)
    n = d.shape[0]
    random = torch.randn(n, 3, generator=generator).to(d)
    side = F.normalize(random - (random * d).sum(-1, keepdim=True) * d, dim=-1)  # a random unit tangent at d
    angle = math.radians(max_angle_deg) * torch.rand(n, 1, generator=generator).to(d).sqrt()
    moved = torch.cos(angle) * d + torch.sin(angle) * side
    if upper:
        moved = torch.cat([moved[:, :2], moved[:, 2:].abs()], dim=-1)
    return F.normalize(moved, dim=-1)


@torch.no_grad()
def render_synthetic_views(
    model, refined_c2w: Float[Tensor, "num_images 3 4"], count: int, max_angle_deg: float,
    generator: torch.Generator,
) -> SyntheticViews:
    """``count`` whole-image renders of ``model``'s field at jittered directions of random refined training cameras.

    Rendered in eval mode (no stratified jitter) and with the global random state forked, so that the training
    stream draws exactly what it draws without this bank."""
    encoder = model.pose_encoder.config
    pick = torch.randint(0, refined_c2w.shape[0], (count,), generator=generator)
    directions = jitter_directions(refined_c2w[pick.to(refined_c2w.device), :3, 3].float().cpu(), max_angle_deg,
                                   generator, upper=encoder.layout == "upper")
    c2w = look_at_origin(encoder.radius * directions.to(refined_c2w.device), up=model.pose_encoder.world_up)
    cameras = model.cameras_from_c2w(c2w)
    was_training = model.training
    devices = [model.device] if torch.device(model.device).type == "cuda" else []
    images = []
    with torch.random.fork_rng(devices=devices):
        model.eval()
        try:
            for i in range(count):
                images.append(model.get_outputs_for_camera(cameras[i:i + 1])["rgb"].clamp(0, 1))
        finally:
            model.train(was_training)
    return SyntheticViews(images=torch.stack(images), directions=directions.to(refined_c2w.device),
                          max_angle_deg=max_angle_deg)


def nearest_candidate_loss(
    candidates: Float[Tensor, "batch cand 3 4"], directions: Float[Tensor, "batch 3"], alpha_bar: Float[Tensor, "batch"]
) -> Tuple[Float[Tensor, ""], Int[Tensor, "batch"], Float[Tensor, "batch"]]:
    """The alpha_bar-weighted mean of the squared chord between each image's nearest candidate direction and its
    label (~ the angle squared, in radians), the nearest candidate (the score's target) and its angle in degrees.

    alpha_bar(t), the share of signal left in the encoder's input, asks for the exact pose only where the image can
    be seen (the lesson of ``refinement_distill_mult``)."""
    cand_dirs = F.normalize(candidates[..., :3, 3], dim=-1)
    chord2 = (cand_dirs - directions[:, None].to(cand_dirs)).pow(2).sum(-1)
    nearest = chord2.detach().argmin(dim=1)
    best = chord2[torch.arange(chord2.shape[0], device=chord2.device), nearest]
    angle = torch.rad2deg(2 * torch.asin((best.detach().sqrt() / 2).clamp(max=1.0)))
    return (alpha_bar.to(best) * best).mean(), nearest, angle

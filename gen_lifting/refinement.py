"""Pose refinement after discovery (beyond the thesis; off by default), with nerfstudio's CameraOptimizer (SO3xR3).

The thesis poses every photo with the encoder alone. Once poses have formed, two optional refinements start from the
encoder's poses and correct them against the radiance field, the way nerfacto corrects dataset poses:

Training (``--pipeline.model.pose-refinement-start-step N``, 0 = off):
  at step N the encoder poses every training photo once (top-scoring candidate at the evaluation noise level, the
  test-time rule; ``GenLiftingPipeline.predict_all_c2w``). That snapshot is a buffer of the model (saved in the
  checkpoint, restored by ``--load-dir`` / ns-eval / ns-render), and each photo's camera from then on is the snapshot
  composed with a per-image correction of nerfstudio's ``CameraOptimizer`` (its own param group ``camera_opt``,
  identity at start). Every step renders the batch's photos from these refined cameras on their clean loss pixels:
  this loss (``refined_rgb_loss``, plus the optimizer's own L2 regulariser) trains the field and the corrections.
  The encoder keeps training as before (noisy x_t, K candidates, min-over-K photometric loss + CE), so posing and
  generating from noise still work, but its render no longer trains the field (the field's parameters are frozen
  for that render, ``frozen_parameters``): the field is not pulled back to the encoder's coarser poses.
  ``--pipeline.model.refinement-field-from-encoder True`` lets the encoder's render train the field too.
  The refined poses are what nerfstudio's tools read for the training photos (viewer frusta, ``ns-render dataset``)
  and what ``evaluate_poses`` scores as ``refined_*``; the encoder's own ``rot_err_*`` keep their meaning.

``--pipeline.model.pose-refinement-reselect-ratio r`` (0 = off): a training photo whose refined camera renders its
clean score pixels with more than 1 / r times the error of the encoder's best candidate of the current step jumps to
that candidate (``PoseRefinement.move_to``); the snapshot is no longer a one-time decision.

Held-out views (``--pipeline.test-time-refine-steps S``, 0 = off), as iNeRF does: starting from the encoder's pose of
a held-out photo, S Adam steps on an SO3xR3 correction (a fresh CameraOptimizer) minimise the photometric error of
a random pixel subset of that photo rendered by the frozen field. Ground truth never enters: the refined poses are
scored (``test_refined_*``) under the alignment fitted on the training views, like the encoder's (``test_*``).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Iterator, Literal

import torch
from jaxtyping import Float, Int
from nerfstudio.cameras.camera_optimizers import CameraOptimizer, CameraOptimizerConfig
from nerfstudio.utils import poses as pose_utils
from torch import Tensor, nn


CorrectionPivot = Literal["origin", "camera"]
"""Where a correction turns a camera: about the world origin (ours, the default) or about the camera's own centre
(nerfstudio's ``CameraOptimizer.apply_to_camera``)."""


def apply_correction(
    c2w: Float[Tensor, "num 3 4"],
    correction: Float[Tensor, "num 3 4"],
    translation: bool = True,
    about: CorrectionPivot = "origin",
) -> Float[Tensor, "num 3 4"]:
    """``correction o c2w`` (nerfstudio's ``pose_utils.multiply``): the correction is a rigid motion of the camera in
    world coordinates, its rotation about the world origin, i.e. the object's centre in a 360 scene.

    Not the convention of ``CameraOptimizer.apply_to_camera`` (rotation about the camera's own centre): the encoder's
    cameras look at the origin, so its errors are mostly an orbit about the object, which is one rotation here but
    a rotation and a matching translation there, a narrow valley that Adam crosses slowly (measured on the toy of
    tests/test_lifting_refinement.py: 6 deg of orbit error were still 5.9 / 5.2 deg after 60 steps that way).

    ``translation=False`` drops the correction's translation (``--pipeline.model.pose-refinement-translation``):
    the camera only turns. ``about="camera"`` (``--pipeline.model.pose-refinement-about camera``) is
    ``CameraOptimizer.apply_to_camera``'s convention (written out here because that method reads a ``Cameras``'
    metadata and returns one matrix per call): the correction's rotation turns the camera's axes about its own
    centre, its translation shifts the centre; the natural motion of a forward-facing rig's small offsets."""
    correction = _checked(correction, translation, about)
    if about == "camera":
        return torch.cat([correction[..., :3] @ c2w[..., :3], c2w[..., 3:] + correction[..., 3:]], dim=-1)
    return pose_utils.multiply(correction, c2w)


def undo_correction(
    c2w: Float[Tensor, "num 3 4"],
    correction: Float[Tensor, "num 3 4"],
    translation: bool = True,
    about: CorrectionPivot = "origin",
) -> Float[Tensor, "num 3 4"]:
    """The camera that ``apply_correction`` (same arguments) moves to ``c2w``: its inverse."""
    correction = _checked(correction, translation, about)
    if about == "camera":  # turn back first, then undo the shift
        turn_back = correction[..., :3].transpose(-1, -2)
        return torch.cat([turn_back @ c2w[..., :3], c2w[..., 3:] - correction[..., 3:]], dim=-1)
    return pose_utils.multiply(pose_utils.inverse(correction), c2w)


def _checked(correction: Float[Tensor, "num 3 4"], translation: bool, about: str) -> Float[Tensor, "num 3 4"]:
    """The correction as both rules use it (translation zeroed when it is off); a one-line error for a bad pivot."""
    if about not in ("origin", "camera"):
        raise ValueError(f"a correction turns about 'origin' or 'camera', got {about!r}")
    if translation:
        return correction
    return torch.cat([correction[..., :3], torch.zeros_like(correction[..., 3:])], dim=-1)


@contextlib.contextmanager
def frozen_parameters(params: Iterable[nn.Parameter]) -> Iterator[None]:
    """Renders inside build no gradient for these parameters (gradients still reach the rays, i.e. the poses)."""
    params = [p for p in params if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


class PoseRefinement(nn.Module):
    """Per-training-image pose: the encoder's snapshot composed with a CameraOptimizer correction."""

    def __init__(
        self,
        num_images: int,
        camera_optimizer: CameraOptimizerConfig,
        device="cpu",
        translation: bool = True,
        about: CorrectionPivot = "origin",
    ) -> None:
        super().__init__()
        self.translation, self.about = translation, about  # how a correction moves a camera (apply_correction)
        if camera_optimizer.mode == "off":
            raise ValueError("pose refinement needs a camera optimizer mode ('SO3xR3' or 'SE3'), got 'off'")
        self.camera_optimizer: CameraOptimizer = camera_optimizer.setup(num_cameras=num_images, device=device)
        self.register_buffer("snapshot_c2w", torch.zeros(num_images, 3, 4))
        self.register_buffer("started", torch.zeros((), dtype=torch.bool))

    @property
    def is_started(self) -> bool:
        return bool(self.started)

    @torch.no_grad()
    def start(self, c2w: Float[Tensor, "num_images 3 4"]) -> None:
        """Take the snapshot (the corrections stay as they are: identity unless trained)."""
        if c2w.shape != self.snapshot_c2w.shape:
            raise ValueError(f"pose snapshot of shape {tuple(c2w.shape)}, expected {tuple(self.snapshot_c2w.shape)}")
        self.snapshot_c2w.copy_(c2w.to(self.snapshot_c2w))
        self.started.fill_(True)

    @torch.no_grad()
    def move_to(self, indices: Int[Tensor, "num"], c2w: Float[Tensor, "num 3 4"]) -> None:
        """Make the refined camera of these images ``c2w`` (their corrections, and the optimiser's state for them, are
        kept: the snapshot becomes the correction undone from c2w)."""
        indices = indices.to(self.snapshot_c2w.device)
        self.snapshot_c2w[indices] = undo_correction(c2w.to(self.snapshot_c2w), self.camera_optimizer(indices).detach(),
                                                     self.translation, self.about)

    def c2w(self, indices: Int[Tensor, "batch"] | None = None) -> Float[Tensor, "batch 3 4"]:
        """Refined camera-to-world of the given training images (all when ``indices`` is None)."""
        if indices is None:
            indices = torch.arange(self.snapshot_c2w.shape[0], device=self.snapshot_c2w.device)
        indices = indices.to(self.snapshot_c2w.device)
        return apply_correction(self.snapshot_c2w[indices], self.camera_optimizer(indices), self.translation, self.about)


def refine_poses(
    render_pixels: Callable[[Tensor, Tensor], Tensor],
    start_c2w: Float[Tensor, "num 3 4"],
    images: Float[Tensor, "num height width 3"],
    steps: int,
    pixels_per_view: int,
    lr: float,
    seed: int = 0,
    chunk: int = 32,
    translation: bool = True,
    about: CorrectionPivot = "origin",
) -> Float[Tensor, "num 3 4"]:
    """iNeRF-style test-time refinement: ``steps`` Adam steps (lr decaying from ``lr`` to ``lr / 10``) of an SO3xR3
    correction per view against a frozen
    renderer ``render_pixels(c2w [B, 3, 4], pixels [B, P, 2] (row, col)) -> rgb [B, P, 3]``.

    Each view's loss is its own mean squared error (summed over the chunk, so a view's steps do not depend on what
    it is batched with); random pixels per step from a generator seeded by ``seed`` and the chunk's first view.
    Only the corrections get gradients (``torch.autograd.grad``): nothing accumulates in the field's ``.grad``.
    ``translation`` / ``about``: how a correction moves a camera (``apply_correction``).
    """
    if steps <= 0:
        return start_c2w
    n, h, w, _ = images.shape
    out = []
    for first in range(0, n, chunk):
        c2w0 = start_c2w[first:first + chunk].detach()
        target_images = images[first:first + chunk].to(c2w0.device)
        b = c2w0.shape[0]
        opt_module = CameraOptimizerConfig(mode="SO3xR3").setup(num_cameras=b, device=c2w0.device)
        optimizer = torch.optim.Adam([opt_module.pose_adjustment], lr=lr)
        # lr decays exponentially to lr / 10 over the steps (as nerfacto's camera_opt schedule): large first steps,
        # a still finish
        schedule = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.1 ** (1.0 / steps))
        gen = torch.Generator().manual_seed(int(seed) * 100_003 + first)
        rows = torch.arange(b, device=c2w0.device)[:, None]
        all_views = torch.arange(b, device=c2w0.device)
        for _ in range(steps):
            flat = torch.randint(0, h * w, (b, pixels_per_view), generator=gen).to(c2w0.device)
            pixels = torch.stack([flat // w, flat % w], dim=-1)
            target = target_images[rows, pixels[..., 0], pixels[..., 1]]
            with torch.enable_grad():
                c2w = apply_correction(c2w0, opt_module(all_views), translation, about)
                rgb = render_pixels(c2w, pixels)
                loss = (rgb - target).pow(2).mean(dim=(1, 2)).sum()
                (grad,) = torch.autograd.grad(loss, [opt_module.pose_adjustment])
            opt_module.pose_adjustment.grad = grad
            optimizer.step()
            schedule.step()
        with torch.no_grad():
            out.append(apply_correction(c2w0, opt_module(all_views), translation, about))
    return torch.cat(out)

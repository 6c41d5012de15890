"""The training objective, in one place: the paper's denoising loss plus our optional mask terms.

Paper (thesis ch. 2): ``||eps - eps_hat||^2`` and nothing else. Ours, each off (0) unless a preset or flag turns
it on, each aimed at one failure measured on this repo (README, "factorized-seg findings"):

- ``balance_loss_mult``: batch-level usage balance, ``1 - H(mean_k m_k) / log K`` (0 when every region covers the
  same share of the batch's pixels). Rules out collapse to one region; indifferent to *how* pixels are split.
- ``confidence_loss_mult``: mean per-pixel mask entropy / log K. Rules out the other collapse, uniform soft masks
  (which satisfy the balance term and are exactly a plain U-Net). With the balance term it is the mutual
  information between pixels and regions, as in IIC (Ji et al., ICCV 2019).
- ``equivariance_loss_mult``: the masks of a second view of each image (random flip, integer shift,
  crop-and-resize of the same clean image, noised independently at the same t) must equal the first view's
  masks moved by the same transform, on the pixels both views see. A split by pixel lattice, border or image
  centre cannot satisfy it; a split by content can. Only the encoder, middle block and mask generator run on
  the second view.
- ``mutual_information_loss_mult``: on the same two views, 1 - I(z_a; z_b) / log K, where z_a, z_b are the region
  of a pixel in view a and of the same scene point in view b and their joint distribution is the mean outer
  product of the two soft masks (IIC, Ji et al., ICCV 2019). One term that is low only for masks that are
  confident, balanced over the batch and equivariant: both collapses (one region; uniform soft masks) give
  I = 0.

``SegObjective`` is an ``nn.Module`` so that DistributedDataParallel wraps the whole objective (both views) in
one forward call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

from diffusion_utils.schedule import DiffusionSchedule
from factorized_seg.model import FactorizedUNet


@dataclass(frozen=True)
class EquivarianceConfig:
    """The random transform between the two views of the equivariance term (ours)."""

    flip: bool = True
    """Random horizontal flips."""
    vflip: bool = False
    """Random vertical flips (with horizontal flips and crops, rules out a top / bottom split)."""
    max_shift: int = 3
    """Integer shifts by up to this many pixels in x and y (odd shifts move the stride-2 lattice's phase)."""
    min_scale: float = 1.0
    """Crop-and-resize: the second view shows a crop of side ``scale`` x the image, scale ~ U[min_scale, 1]
    (1.0 = no zoom). A centred blob that does not move with the content violates it."""
    max_t: Optional[int] = None
    """Apply the term only to samples with t below this (masks of nearly pure noise carry no content);
    None = every t."""
    same_noise: bool = False
    """Noise the second view with the first view's noise moved by the same transform (exact for flips and integer
    shifts; needs min_scale = 1) instead of fresh noise. With fresh noise, masks that depend on the noise at all
    are penalised, which at large t leaves only uniform masks."""
    stop_gradient: bool = False
    """Treat the first view's masks as a fixed target (no gradient through them), as in self-distillation; the
    symmetric loss can lower itself by shrinking both views' logits towards uniform masks."""


@dataclass(frozen=True)
class MaskLossConfig:
    """Weights of the mask terms added to the denoising loss (all 0 = the paper's objective)."""

    balance_loss_mult: float = 0.0
    """Batch usage balance, 1 - H(mean usage) / log K (ours)."""
    confidence_loss_mult: float = 0.0
    """Mean per-pixel mask entropy / log K (ours)."""
    equivariance_loss_mult: float = 0.0
    """Mask equivariance between two augmented views of each image (ours)."""
    mutual_information_loss_mult: float = 0.0
    """1 - I(z_a; z_b) / log K between the regions of corresponding pixels of the two views (IIC; ours)."""
    equivariance: EquivarianceConfig = field(default_factory=EquivarianceConfig)
    """Transform of the equivariance term."""

    @property
    def enabled(self) -> bool:
        return any(getattr(self, name) > 0 for name in self.WEIGHTS)

    @property
    def uses_two_views(self) -> bool:
        return self.equivariance_loss_mult > 0 or self.mutual_information_loss_mult > 0

    WEIGHTS = ("balance_loss_mult", "confidence_loss_mult", "equivariance_loss_mult", "mutual_information_loss_mult")

    def validate(self) -> None:
        for name in self.WEIGHTS:
            if getattr(self, name) < 0:
                raise ValueError(f"--mask-losses.{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        eq = self.equivariance
        if eq.max_shift < 0:
            raise ValueError(f"--mask-losses.equivariance.max-shift must be >= 0, got {eq.max_shift}")
        if not 0.0 < eq.min_scale <= 1.0:
            raise ValueError(f"--mask-losses.equivariance.min-scale must lie in (0, 1], got {eq.min_scale}")
        if eq.same_noise and eq.min_scale < 1.0:
            raise ValueError("--mask-losses.equivariance.same-noise needs --mask-losses.equivariance.min-scale 1.0 "
                             "(a resized crop would interpolate the noise and lower its variance)")


def usage_balance(masks: Float[Tensor, "batch k height width"]) -> Float[Tensor, ""]:
    """1 - H(u) / log K for the batch's region usage u_k = mean m_k; 0 at uniform usage, 1 at one region."""
    k = masks.shape[1]
    if k < 2:
        return masks.new_zeros(())
    usage = masks.float().mean(dim=(0, 2, 3))
    entropy = -(usage * usage.clamp_min(1e-12).log()).sum()
    return 1.0 - entropy / math.log(k)


def pixel_entropy(masks: Float[Tensor, "batch k height width"]) -> Float[Tensor, ""]:
    """Mean over pixels of H(m(pixel)) / log K; 0 for one-hot masks, 1 for uniform ones."""
    k = masks.shape[1]
    if k < 2:
        return masks.new_zeros(())
    m = masks.float()
    return -(m * m.clamp_min(1e-12).log()).sum(dim=1).mean() / math.log(k)


def random_view_grid(
    batch: int, height: int, width: int, cfg: EquivarianceConfig, generator: torch.Generator
) -> Float[Tensor, "batch height width 2"]:
    """Sampling grid of the second view: view_b(p) = view_a(grid(p)), in ``grid_sample`` coordinates
    (align_corners=False). A flip or an integer shift maps pixel centres exactly onto pixel centres."""
    r = torch.rand(batch, 6, generator=generator)
    scale = cfg.min_scale + (1.0 - cfg.min_scale) * r[:, 0]
    flip = torch.where((r[:, 1] < 0.5) & cfg.flip, -1.0, 1.0)
    vflip = torch.where((r[:, 4] < 0.5) & cfg.vflip, -1.0, 1.0)
    room = 1.0 - scale  # crop offsets that keep the crop inside the image
    off_x = (2 * r[:, 2] - 1) * room
    off_y = (2 * r[:, 3] - 1) * room
    shifts = torch.randint(-cfg.max_shift, cfg.max_shift + 1, (batch, 2), generator=generator).float()
    theta = torch.zeros(batch, 2, 3)
    theta[:, 0, 0] = flip * scale
    theta[:, 1, 1] = vflip * scale
    theta[:, 0, 2] = off_x + 2.0 * shifts[:, 0] / width
    theta[:, 1, 2] = off_y + 2.0 * shifts[:, 1] / height
    return F.affine_grid(theta, [batch, 1, height, width], align_corners=False)


def warp(x: Float[Tensor, "batch c height width"], grid: Float[Tensor, "batch height width 2"],
         padding_mode: str = "reflection", mode: str = "bilinear") -> Float[Tensor, "batch c height width"]:
    """``x`` seen through ``grid`` (bilinear, or ``mode``)."""
    return F.grid_sample(x, grid.to(x), mode=mode, padding_mode=padding_mode, align_corners=False)


def _moved_and_overlap(
    masks_a: Tensor, grid: Tensor, weight: Optional[Tensor]
) -> Tuple[Float[Tensor, "batch k height width"], Float[Tensor, "batch height width"]]:
    """View a's masks moved onto view b, and the weight of each pixel of view b (1 inside view a, else 0)."""
    moved = warp(masks_a.float(), grid, padding_mode="zeros")
    inside = (grid.abs() <= 1.0).all(dim=-1).to(moved)  # (batch, h, w)
    if weight is not None:
        inside = inside * weight.to(moved)[:, None, None]
    return moved, inside


def equivariance_error(
    masks_a: Float[Tensor, "batch k height width"], masks_b: Float[Tensor, "batch k height width"],
    grid: Float[Tensor, "batch height width 2"], weight: Optional[Float[Tensor, "batch"]] = None,
) -> Float[Tensor, ""]:
    """Mean squared difference between view b's masks and view a's masks moved onto view b, over the pixels of
    view b that lie inside view a (and the samples with non-zero ``weight``)."""
    moved, inside = _moved_and_overlap(masks_a, grid, weight)
    err = (moved - masks_b.float()).pow(2).sum(dim=1)
    return (err * inside).sum() / inside.sum().clamp_min(1.0)


def mutual_information_gap(
    masks_a: Float[Tensor, "batch k height width"], masks_b: Float[Tensor, "batch k height width"],
    grid: Float[Tensor, "batch height width 2"], weight: Optional[Float[Tensor, "batch"]] = None,
) -> Float[Tensor, ""]:
    """1 - I(z_a; z_b) / log K over the overlapping pixels (IIC's objective, symmetrised joint); 0 for
    confident, balanced, equivariant masks, 1 for one region or uniform soft masks."""
    k = masks_a.shape[1]
    if k < 2:
        return masks_a.new_zeros(())
    moved, inside = _moved_and_overlap(masks_a, grid, weight)
    joint = torch.einsum("bihw,bjhw,bhw->ij", moved, masks_b.float(), inside) / inside.sum().clamp_min(1.0)
    joint = ((joint + joint.T) / 2).clamp_min(1e-8)
    joint = joint / joint.sum()
    marginal = joint.sum(dim=1)
    mi = (joint * (joint.log() - marginal[:, None].log() - marginal[None, :].log())).sum()
    return 1.0 - mi / math.log(k)


class SegObjective(nn.Module):
    """Denoising loss + mask terms for one batch. ``forward(x0, t, noise, labels, generator) -> (loss, logs)``."""

    def __init__(self, model: FactorizedUNet, schedule: DiffusionSchedule, config: MaskLossConfig) -> None:
        super().__init__()
        config.validate()
        self.model = model
        self.schedule = schedule
        self.config = config

    def forward(
        self, x0: Float[Tensor, "batch channels height width"], t: Int[Tensor, "batch"],
        noise: Float[Tensor, "batch channels height width"], labels: Optional[Int[Tensor, "batch"]] = None,
        generator: Optional[torch.Generator] = None,
    ) -> Tuple[Tensor, Dict[str, Tensor]]:
        cfg = self.config
        out = self.model(self.schedule.add_noise(x0, t, noise), t, labels)
        denoise = F.mse_loss(out.eps.float(), noise.float())
        logs: Dict[str, Tensor] = {"loss/denoise": denoise.detach()}
        loss = denoise
        masks = out.masks
        if masks is None or masks.shape[1] < 2:
            return loss, logs
        balance = usage_balance(masks)
        entropy = pixel_entropy(masks)
        logs.update({"masks/usage_imbalance": balance.detach(), "masks/pixel_entropy": entropy.detach()})
        if cfg.balance_loss_mult > 0:
            loss = loss + cfg.balance_loss_mult * balance
        if cfg.confidence_loss_mult > 0:
            loss = loss + cfg.confidence_loss_mult * entropy
        if cfg.uses_two_views:
            masks_b, grid, weight = self.second_view(x0, t, masks, labels, generator, noise)
            target = masks.detach() if cfg.equivariance.stop_gradient else masks
            eq = equivariance_error(target, masks_b, grid, weight)
            mi = mutual_information_gap(target, masks_b, grid, weight)
            logs.update({"loss/equivariance": eq.detach(), "loss/mutual_information_gap": mi.detach()})
            loss = loss + cfg.equivariance_loss_mult * eq + cfg.mutual_information_loss_mult * mi
        usage = masks.detach().float().mean(dim=(0, 2, 3))
        for k, u in enumerate(usage):
            logs[f"masks/usage_{k}"] = u
        return loss, logs

    def second_view(
        self, x0: Tensor, t: Tensor, masks_a: Tensor, labels: Optional[Tensor], generator: Optional[torch.Generator],
        noise_a: Tensor,
    ) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        """Masks of a transformed copy of x0 (same t; fresh noise, or ``noise_a`` moved by the same transform with
        ``same_noise``), the grid that maps view b to view a and the per-sample weight (``max_t``)."""
        cfg = self.config.equivariance
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        batch, _, h, w = x0.shape
        grid = random_view_grid(batch, h, w, cfg, gen).to(x0.device)
        x0_b = warp(x0, grid)
        if cfg.same_noise:
            # nearest: pixel centres map onto pixel centres, so every value is one of noise_a's (variance kept)
            noise_b = warp(noise_a, grid, mode="nearest")
        else:
            noise_b = torch.randn(x0_b.shape, generator=gen).to(x0_b)
        h_mid, skips, temb = self.model.encode(self.schedule.add_noise(x0_b, t, noise_b), t, labels)
        masks_b = self.model.masks(h_mid, skips, temb)
        if masks_b.shape[1] != masks_a.shape[1]:  # hierarchical: compare the level-1 masks of both views
            raise ValueError("the equivariance term needs a scheme whose output masks are the level-1 masks")
        weight = (t < cfg.max_t).float() if cfg.max_t is not None else None
        return masks_b, grid, weight

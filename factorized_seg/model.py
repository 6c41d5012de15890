"""The factorized denoiser (thesis ch. 2): shared encoder + middle, a mask generator, and a decoder shared across
the K regions, plus the ablation schemes of Table 2.6 and the plain U-Net baseline, all from one config.

Schemes (``FactorizedUNetConfig.scheme``):
- ``factorized``: eps_k = Decoder(h_mid, skips * m_k); eps_hat = sum_k eps_k * m_k. ONE decoder, run as a single
  batched pass over the K regions (batch * k rows).
- ``concat``: the resized masks are concatenated to every skip (then a 1x1 conv back to the skip's width) and
  ONE decoder predicts eps_hat directly.
- ``mask_mid``: like ``factorized`` but h_mid is masked and the skips are not.
- ``unshared``: like ``factorized`` with K separate decoders (K times the decoder parameters).
- ``plain``: encoder + middle + decoder, no masks: the ordinary DDPM U-Net of the same width.
- ``hierarchical``: the appendix's 2-level variant. Level-1 masks m^0 (K regions) split the skips; each branch i
  runs a level-2 mask generator (shared weights, K2 regions, batched over i) giving m^1_i; the shared decoder runs
  on skips * m^0_i (eps^0_i) and on skips * m^0_i * m^1_ij (eps^1_ij); output
  sum_i m^0_i (eps^0_i + sum_j m^1_ij eps^1_ij) / 2. Masks returned are the K * K2 leaf masks m^0_i m^1_ij.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Literal, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

from diffusion_utils.unet_blocks import TimestepEmbedder, UNetDecoder, UNetEncoder, UNetMiddle, UNetTrunkConfig

Scheme = Literal["factorized", "concat", "mask_mid", "unshared", "plain", "hierarchical"]
SCHEMES: Tuple[str, ...] = ("factorized", "concat", "mask_mid", "unshared", "plain", "hierarchical")


@dataclass(frozen=True)
class FactorizedUNetConfig:
    """Architecture of the factorized denoiser (and of its ablations / plain baseline)."""

    num_regions: int = 2
    """K, the number of mask channels (regions). K = 1 makes the factorized model a plain U-Net."""
    scheme: Scheme = "factorized"
    """Decoder scheme: factorized (paper), concat, mask_mid, unshared (Table 2.6 ablations), plain (baseline
    DDPM U-Net, no masks) or hierarchical (appendix, 2 levels)."""
    num_subregions: int = 2
    """K2, masks per level-1 region in the hierarchical scheme (ignored by the other schemes)."""
    image_channels: int = 3
    """Channels of the images."""
    base_channels: int = 32
    """C, the width of the first level."""
    channel_mults: Tuple[int, ...] = (1, 2, 2)
    """Width of each level as a multiple of C (a 2x downsampling between levels)."""
    num_res_blocks: int = 1
    """ResBlocks per level."""
    attention_levels: Tuple[int, ...] = ()
    """Indices of the levels with self-attention."""
    mid_attention: bool = True
    """Self-attention in the middle block."""
    norm_groups: int = 8
    """GroupNorm groups (must divide every level's width)."""
    dropout: float = 0.0
    """Dropout inside the ResBlocks."""
    padding_mode: Literal["zeros", "reflect", "replicate"] = "reflect"
    """Padding of the 3x3 convolutions. Zero padding marks the image border, which the mask generator can use as
    a positional shortcut (a frame mask); reflect hides it."""
    antialias: bool = False
    """Blur before every downsampling and after every upsampling (blur-pool): the features carry less of the
    stride-2 lattice's phase, which full-resolution masks otherwise split (stripes)."""
    num_classes: int = 0
    """Number of class labels for class-conditional training (0 = unconditional)."""
    mask_pool: int = 1
    """Mask logits are average-pooled by this factor and upsampled bilinearly before the softmax (1 = full
    resolution, as in the paper). Small models on CPU budgets otherwise split the pixel lattice (masks of
    alternating columns, a positional shortcut); smooth masks cannot."""
    mask_mode: Literal["soft", "hard"] = "soft"
    """How the decoder passes use the masks. soft: the softmax probabilities (paper). hard (ours): a one-hot
    argmax in the forward pass with the softmax's gradient in the backward pass (straight-through), so a
    region's decoder pass really cannot see the other regions. Segmentation always reads the softmax."""
    mask_logit_norm: Literal["none", "center", "standardize"] = "none"
    """Ours: normalise each image's mask logits over its pixels before the softmax. center: subtract each region's
    mean logit, so no region can take every pixel (collapse to one region is ruled out by construction, not
    penalised by a loss whose gradient vanishes once the softmax saturates). standardize: also divide by the
    logits' standard deviation and multiply by ``mask_logit_gain``, so the masks can neither collapse nor fade to
    uniform: the mask generator chooses where the regions are, not how confident they are."""
    mask_logit_gain: float = 3.0
    """Spread of the standardised mask logits (``mask_logit_norm=standardize``): larger = closer to one-hot."""
    mask_resize: Literal["area", "nearest"] = "area"
    """How masks are resized to the coarser skips. area (paper-like): block averages, which turn a period-2 split
    into 1/K one level down. nearest (ours): one pixel per block, so a split must hold at every scale."""

    def validate(self) -> None:
        """Raise ValueError on an impossible architecture (called by ``setup``; tyro would wrap an error raised
        while parsing into a multi-line box, the CLI wants one line)."""
        if self.num_regions < 1:
            raise ValueError(f"num_regions (K) must be >= 1, got {self.num_regions}")
        if self.scheme not in SCHEMES:
            raise ValueError(f"scheme must be one of {', '.join(SCHEMES)}, got {self.scheme!r}")
        if self.scheme == "hierarchical" and self.num_subregions < 1:
            raise ValueError(f"num_subregions must be >= 1, got {self.num_subregions}")
        if self.mask_pool < 1:
            raise ValueError(f"mask_pool must be >= 1, got {self.mask_pool}")
        if self.mask_logit_norm not in ("none", "center", "standardize"):
            raise ValueError(f"mask_logit_norm must be none, center or standardize, got {self.mask_logit_norm!r}")
        if not self.mask_logit_gain > 0:
            raise ValueError(f"mask_logit_gain must be > 0, got {self.mask_logit_gain}")
        if self.mask_mode not in ("soft", "hard"):
            raise ValueError(f"mask_mode must be soft or hard, got {self.mask_mode!r}")
        if self.mask_resize not in ("area", "nearest"):
            raise ValueError(f"mask_resize must be area or nearest, got {self.mask_resize!r}")
        bad = [c for c in self.channel_mults if (c * self.base_channels) % self.norm_groups]
        if bad:
            raise ValueError(f"norm_groups={self.norm_groups} must divide every level width (base_channels * mult)")

    @property
    def trunk(self) -> UNetTrunkConfig:
        return UNetTrunkConfig(
            in_channels=self.image_channels, base_channels=self.base_channels, channel_mults=self.channel_mults,
            num_res_blocks=self.num_res_blocks, attention_levels=self.attention_levels,
            mid_attention=self.mid_attention, norm_groups=self.norm_groups, dropout=self.dropout,
            padding_mode=self.padding_mode, antialias=self.antialias,
        )

    @property
    def num_masks(self) -> int:
        """Mask channels the model outputs (K, K * K2 for the hierarchical scheme, 0 for plain)."""
        if self.scheme == "plain":
            return 0
        if self.scheme == "hierarchical":
            return self.num_regions * self.num_subregions
        return self.num_regions

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mults) - 1)

    def setup(self) -> "FactorizedUNet":
        self.validate()
        return FactorizedUNet(self)


@dataclass
class DenoiserOutput:
    """What one forward pass gives: eps_hat and (for every scheme but plain) the softmax masks."""

    eps: Float[Tensor, "batch channels height width"]
    masks: Optional[Float[Tensor, "batch k height width"]]


def resize_masks(
    masks: Float[Tensor, "batch k height width"], size: Sequence[int], mode: str = "area"
) -> Float[Tensor, "batch k h w"]:
    """Masks at a skip's resolution (``area`` or ``nearest``); both keep sum_k m_k = 1 at every pixel."""
    if tuple(masks.shape[-2:]) == tuple(size):
        return masks
    return F.interpolate(masks, size=tuple(size), mode=mode)


def mask_skips(
    skips: Sequence[Float[Tensor, "batch c h w"]], masks: Float[Tensor, "batch k height width"], mode: str = "area"
) -> Tuple[Tensor, ...]:
    """Every skip multiplied by every resized mask, flattened to (batch * k) rows in (batch, k) order.

    One resize per distinct skip resolution (several skips share one), not one per skip."""
    k = masks.shape[1]
    resized: dict = {}
    out = []
    for s in skips:
        size = tuple(s.shape[-2:])
        if size not in resized:
            resized[size] = resize_masks(masks, size, mode).unsqueeze(2)
        out.append((s.unsqueeze(1) * resized[size]).flatten(0, 1))
    assert all(o.shape[0] == skips[0].shape[0] * k for o in out)
    return tuple(out)


def straight_through_one_hot(probs: Float[Tensor, "batch k height width"]) -> Float[Tensor, "batch k height width"]:
    """One-hot argmax in the forward pass, the gradient of ``probs`` in the backward pass."""
    hard = F.one_hot(probs.argmax(dim=1), probs.shape[1]).permute(0, 3, 1, 2).to(probs)
    return hard + probs - probs.detach()


class LogitNorm(nn.Module):
    """Per image: logits minus each channel's mean over the pixels (and, with ``scale``, divided by their standard
    deviation over channels and pixels, times ``gain``). Per image rather than per batch: the logits' statistics
    change with t, so batch running statistics (BatchNorm) would shift the argmax at the read-out t."""

    def __init__(self, scale: bool, gain: float) -> None:
        super().__init__()
        self.scale, self.gain = scale, gain

    def forward(self, logits: Float[Tensor, "batch k height width"]) -> Float[Tensor, "batch k height width"]:
        centred = logits - logits.mean(dim=(2, 3), keepdim=True)
        if not self.scale:
            return centred
        std = centred.pow(2).mean(dim=(1, 2, 3), keepdim=True).add(1e-10).sqrt()
        return centred * (self.gain / std)


class FactorizedUNet(nn.Module):
    """eps-prediction network. ``forward(x_t, t, labels) -> DenoiserOutput``."""

    def __init__(self, config: FactorizedUNetConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        trunk = config.trunk
        self.time_embed = TimestepEmbedder(trunk.base_channels, trunk.temb_channels, config.num_classes)
        self.encoder = UNetEncoder(trunk)
        self.middle = UNetMiddle(trunk, self.encoder.out_channels)
        skip_c = self.encoder.skip_channels
        mid_c = self.encoder.out_channels
        out_c = config.image_channels
        k = config.num_regions
        if config.scheme != "plain":
            self.mask_generator = UNetDecoder(trunk, skip_c, mid_c, k)
            self.mask_logit_norm = (LogitNorm(config.mask_logit_norm == "standardize", config.mask_logit_gain)
                                    if config.mask_logit_norm != "none" else None)
        if config.scheme == "hierarchical":
            self.submask_generator = UNetDecoder(trunk, skip_c, mid_c, config.num_subregions)
        if config.scheme == "concat":
            # [skip, masks] -> 1x1 conv back to the skip's width (GroupNorm in the decoder needs widths divisible
            # by norm_groups, and C + K rarely is); the decoder itself is the ordinary one.
            self.mask_fusers = nn.ModuleList(nn.Conv2d(c + k, c, 1) for c in skip_c)
            self.decoder = UNetDecoder(trunk, skip_c, mid_c, out_c)
        elif config.scheme == "unshared":
            self.decoders = nn.ModuleList(UNetDecoder(trunk, skip_c, mid_c, out_c) for _ in range(k))
        else:
            self.decoder = UNetDecoder(trunk, skip_c, mid_c, out_c)

    # ------------------------------------------------------------------ parts
    def decoder_parameters(self) -> List[nn.Parameter]:
        """Parameters of the eps decoder(s) only (not the mask generator)."""
        if self.config.scheme == "unshared":
            return list(self.decoders.parameters())
        return list(self.decoder.parameters())

    def encode(
        self, x_t: Float[Tensor, "batch channels height width"], t: Int[Tensor, "batch"],
        labels: Optional[Int[Tensor, "batch"]] = None,
    ) -> Tuple[Tensor, Tuple[Tensor, ...], Tensor]:
        """Stage 1-2: time (+ class) embedding, shared encoder and middle block -> (h_mid, skips, temb)."""
        f = self.config.downsample_factor
        if x_t.shape[-1] % f or x_t.shape[-2] % f:
            raise ValueError(f"image size {tuple(x_t.shape[-2:])} must be divisible by {f} (2^(levels-1))")
        temb = self.time_embed(t, labels)
        h, skips = self.encoder(x_t, temb)
        return self.middle(h, temb), skips, temb

    def masks(
        self, h_mid: Tensor, skips: Sequence[Tensor], temb: Tensor
    ) -> Float[Tensor, "batch k height width"]:
        """Stage 3: the mask generator's softmax over the K regions."""
        logits = self.mask_generator(h_mid, skips, temb)
        if self.mask_logit_norm is not None:
            logits = self.mask_logit_norm(logits)
        return self._softmax_masks(logits)

    def _softmax_masks(self, logits: Float[Tensor, "batch k height width"]) -> Float[Tensor, "batch k height width"]:
        p = self.config.mask_pool
        if p > 1:
            size = logits.shape[-2:]
            logits = F.interpolate(F.avg_pool2d(logits, p, ceil_mode=True), size=size, mode="bilinear",
                                   align_corners=False)
        return torch.softmax(logits, dim=1)

    # ------------------------------------------------------------------ forward
    def forward(
        self, x_t: Float[Tensor, "batch channels height width"], t: Int[Tensor, "batch"],
        labels: Optional[Int[Tensor, "batch"]] = None,
    ) -> DenoiserOutput:
        h_mid, skips, temb = self.encode(x_t, t, labels)
        scheme = self.config.scheme
        if scheme == "plain":
            return DenoiserOutput(self.decoder(h_mid, skips, temb), None)
        masks = self.masks(h_mid, skips, temb)
        used = self.used_masks(masks)
        if scheme == "concat":
            cat = tuple(fuse(torch.cat([s, self._resize(used, s.shape[-2:])], dim=1))
                        for fuse, s in zip(self.mask_fusers, skips))
            return DenoiserOutput(self.decoder(h_mid, cat, temb), masks)
        if scheme == "hierarchical":
            return self._hierarchical(h_mid, skips, temb, masks)
        eps_k = self._region_eps(h_mid, skips, temb, used)
        return DenoiserOutput((eps_k * used.unsqueeze(2)).sum(dim=1), masks)

    def used_masks(self, probs: Float[Tensor, "batch k height width"]) -> Float[Tensor, "batch k height width"]:
        """The masks the decoder passes see: the softmax itself, or its straight-through one-hot (``hard``)."""
        return straight_through_one_hot(probs) if self.config.mask_mode == "hard" else probs

    def _resize(self, masks: Tensor, size: Sequence[int]) -> Tensor:
        return resize_masks(masks, size, self.config.mask_resize)

    def _region_eps(
        self, h_mid: Tensor, skips: Sequence[Tensor], temb: Tensor, masks: Float[Tensor, "batch k height width"]
    ) -> Float[Tensor, "batch k channels height width"]:
        """eps_k for every region: one batched decoder pass over (batch * k) rows (K passes if unshared)."""
        batch, k = masks.shape[:2]
        scheme = self.config.scheme
        if scheme == "unshared":
            # Different weights per region cannot share one batched call; K calls on the masked skips.
            outs = [dec(h_mid, tuple(s * self._resize(masks[:, i:i + 1], s.shape[-2:]) for s in skips), temb)
                    for i, dec in enumerate(self.decoders)]
            return torch.stack(outs, dim=1)
        temb_k = temb.repeat_interleave(k, dim=0)
        if scheme == "mask_mid":
            m = self._resize(masks, h_mid.shape[-2:])
            h_k = (h_mid.unsqueeze(1) * m.unsqueeze(2)).flatten(0, 1)
            skips_k = tuple(s.repeat_interleave(k, dim=0) for s in skips)
        else:  # factorized: h_mid is NOT masked, every skip is
            h_k = h_mid.repeat_interleave(k, dim=0)
            skips_k = mask_skips(skips, masks, self.config.mask_resize)
        eps = self.decoder(h_k, skips_k, temb_k)
        return eps.unflatten(0, (batch, k))

    def _hierarchical(
        self, h_mid: Tensor, skips: Sequence[Tensor], temb: Tensor, m0: Float[Tensor, "batch k height width"]
    ) -> DenoiserOutput:
        batch, k = m0.shape[:2]
        k2 = self.config.num_subregions
        # Level 2: each branch i sees skips * m0_i; one shared sub-mask generator, batched over (batch * k).
        mode = self.config.mask_resize
        u0 = self.used_masks(m0)
        skips_i = mask_skips(skips, u0, mode)
        h_i = h_mid.repeat_interleave(k, dim=0)
        temb_i = temb.repeat_interleave(k, dim=0)
        m1 = self._softmax_masks(self.submask_generator(h_i, skips_i, temb_i))  # (batch*k, k2, h, w)
        u1 = self.used_masks(m1)
        eps0 = self.decoder(h_i, skips_i, temb_i)  # (batch*k, c, h, w)
        skips_ij = mask_skips(skips_i, u1, mode)  # (batch*k*k2) rows
        eps1 = self.decoder(h_i.repeat_interleave(k2, dim=0), skips_ij, temb_i.repeat_interleave(k2, dim=0))
        eps1 = eps1.unflatten(0, (batch * k, k2))
        branch = eps0 + (eps1 * u1.unsqueeze(2)).sum(dim=1)
        eps = (branch.unflatten(0, (batch, k)) * u0.unsqueeze(2)).sum(dim=1) / 2.0
        leaves = (m0.unsqueeze(2) * m1.unflatten(0, (batch, k))).flatten(1, 2)
        return DenoiserOutput(eps, leaves)

    # ------------------------------------------------------------------ features (plain-kmeans baseline)
    @torch.no_grad()
    def decoder_features(
        self, x_t: Float[Tensor, "batch channels height width"], t: Int[Tensor, "batch"],
        labels: Optional[Int[Tensor, "batch"]] = None,
    ) -> Float[Tensor, "batch feat height width"]:
        """Output of every decoder level, upsampled to the image size and concatenated (plain scheme only)."""
        if self.config.scheme != "plain":
            raise ValueError("decoder_features is defined for the plain scheme")
        feats: List[Tensor] = []
        # Hook the last block of every level (ModuleList has no forward, so hook its blocks).
        handles = [blocks[-1].register_forward_hook(lambda _m, _i, out: feats.append(out))
                   for blocks in self.decoder.levels]
        try:
            self.forward(x_t, t, labels)
        finally:
            for h in handles:
                h.remove()
        size = x_t.shape[-2:]
        return torch.cat([F.interpolate(f, size=size, mode="bilinear", align_corners=False) for f in feats], dim=1)

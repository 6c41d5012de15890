"""U-Net building blocks shared by the pose encoder (gen_lifting) and the factorized U-Net (factorized_seg).

The blocks themselves are diffusers' (``ResnetBlock2D``, ``Downsample2D``, ``Upsample2D``, ``Attention``,
``UNetMidBlock2D``, ``Timesteps`` / ``TimestepEmbedding``). What is ours is the *wiring*: diffusers'
``UNet2DModel`` hides its skip list inside ``forward``, while the factorized U-Net must run one encoder and
then several up-paths (a mask generator and K decoder passes) over the *same* skip tuple, each seeing it
multiplied by a different mask. So the encoder returns ``(h, skips)`` and the up-path takes the skip tuple
and indexes it from the end, never popping a shared list.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2D
from jaxtyping import Float, Int
from torch import Tensor, nn


@dataclass
class UNetTrunkConfig:
    """Shape of a DDPM U-Net trunk (the encoder, and the up-paths that mirror it)."""

    in_channels: int = 3
    """Channels of the input image."""
    base_channels: int = 32
    """C, the width of the first level."""
    channel_mults: Tuple[int, ...] = (1, 2, 2)
    """Width of each level as a multiple of C; one level per entry, a 2x downsampling between levels."""
    num_res_blocks: int = 2
    """ResBlocks per level."""
    attention_levels: Tuple[int, ...] = ()
    """Indices of the levels that get a self-attention layer after each ResBlock."""
    mid_attention: bool = True
    """Self-attention in the middle block."""
    norm_groups: int = 8
    """GroupNorm groups (must divide every level's width)."""
    dropout: float = 0.0
    """Dropout inside the ResBlocks."""
    padding_mode: str = "zeros"
    """Padding of every 3x3 convolution: zeros (diffusers' default), reflect or replicate. Zero padding tells
    the network where the image border is, which a mask generator can use as a positional shortcut."""
    downsample_last: bool = False
    """Also downsample after the last level (an encoder-only trunk such as the pose encoder)."""
    antialias: bool = False
    """Blur (3x3 binomial) before every 2x downsampling and after every 2x upsampling, so that features carry
    less of the stride-2 lattice's phase (Zhang, "Making convolutional networks shift-invariant again", 2019)."""

    @property
    def level_channels(self) -> List[int]:
        return [self.base_channels * m for m in self.channel_mults]

    @property
    def temb_channels(self) -> int:
        return 4 * self.base_channels


class Blur(nn.Module):
    """Depthwise 3x3 binomial low-pass filter ([1, 2, 1] x [1, 2, 1] / 16), size-preserving.

    Hand-written: five lines; kornia's ``filter2d`` does the same but is not otherwise a dependency."""

    def __init__(self) -> None:
        super().__init__()
        k = torch.tensor([1.0, 2.0, 1.0])
        self.register_buffer("kernel", (k[:, None] * k[None, :] / 16.0)[None, None], persistent=False)

    def forward(self, x: Float[Tensor, "batch c h w"]) -> Float[Tensor, "batch c h w"]:
        padded = nn.functional.pad(x, (1, 1, 1, 1), mode="reflect" if min(x.shape[-2:]) > 1 else "replicate")
        return nn.functional.conv2d(padded, self.kernel.expand(x.shape[1], 1, 3, 3), groups=x.shape[1])


def set_padding_mode(module: nn.Module, mode: str) -> None:
    """Switch every padded ``nn.Conv2d`` inside ``module`` to ``mode`` (diffusers builds them with zeros)."""
    if mode not in ("zeros", "reflect", "replicate", "circular"):
        raise ValueError(f"padding_mode must be zeros, reflect, replicate or circular, got {mode!r}")
    for m in module.modules():
        if isinstance(m, nn.Conv2d) and any(p > 0 for p in m.padding if isinstance(p, int)):
            m.padding_mode = mode


class TimestepEmbedder(nn.Module):
    """Sinusoidal embedding of t followed by an MLP (diffusers' Timesteps + TimestepEmbedding)."""

    def __init__(self, base_channels: int, temb_channels: int, num_classes: int = 0) -> None:
        super().__init__()
        self.proj = Timesteps(base_channels, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.mlp = TimestepEmbedding(base_channels, temb_channels)
        # Class-conditional variant: a label embedding added to the time embedding (index num_classes = "none").
        self.class_embedding = nn.Embedding(num_classes + 1, temb_channels) if num_classes > 0 else None

    def forward(
        self, t: Int[Tensor, "batch"], labels: Optional[Int[Tensor, "batch"]] = None
    ) -> Float[Tensor, "batch temb"]:
        emb = self.mlp(self.proj(t).to(self.mlp.linear_1.weight.dtype))
        if self.class_embedding is not None:
            if labels is None:
                labels = torch.full_like(t, self.class_embedding.num_embeddings - 1)
            emb = emb + self.class_embedding(labels)
        return emb


class ResAttnBlock(nn.Module):
    """A diffusers ResnetBlock2D, optionally followed by self-attention."""

    def __init__(self, cin: int, cout: int, temb: int, groups: int, dropout: float, attention: bool) -> None:
        super().__init__()
        self.res = ResnetBlock2D(in_channels=cin, out_channels=cout, temb_channels=temb, groups=groups,
                                 dropout=dropout, eps=1e-6)
        self.attn = (
            Attention(cout, heads=1, dim_head=cout, norm_num_groups=groups, residual_connection=True, bias=True,
                      upcast_softmax=True, eps=1e-6, _from_deprecated_attn_block=True)
            if attention else None
        )

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        x = self.res(x, temb)
        return self.attn(x) if self.attn is not None else x


class UNetEncoder(nn.Module):
    """Down path of a DDPM U-Net. ``forward`` returns the bottom feature and the tuple of every skip feature."""

    def __init__(self, config: UNetTrunkConfig) -> None:
        super().__init__()
        self.config = config
        chans = config.level_channels
        temb = config.temb_channels
        self.conv_in = nn.Conv2d(config.in_channels, chans[0], 3, padding=1)
        self.skip_channels: List[int] = [chans[0]]
        self.levels = nn.ModuleList()
        self.downs = nn.ModuleList()
        cur = chans[0]
        for i, c in enumerate(chans):
            blocks = nn.ModuleList()
            for _ in range(config.num_res_blocks):
                blocks.append(ResAttnBlock(cur, c, temb, config.norm_groups, config.dropout,
                                           i in config.attention_levels))
                cur = c
                self.skip_channels.append(c)
            self.levels.append(blocks)
            if i < len(chans) - 1 or config.downsample_last:
                down = Downsample2D(c, use_conv=True, out_channels=c, padding=1)
                self.downs.append(nn.Sequential(Blur(), down) if config.antialias else down)
                self.skip_channels.append(c)
            else:
                self.downs.append(nn.Identity())
        self.out_channels = cur
        set_padding_mode(self, config.padding_mode)

    def forward(
        self, x: Float[Tensor, "batch cin height width"], temb: Float[Tensor, "batch temb"]
    ) -> Tuple[Tensor, Tuple[Tensor, ...]]:
        h = self.conv_in(x)
        skips = [h]
        for blocks, down in zip(self.levels, self.downs):
            for block in blocks:
                h = block(h, temb)
                skips.append(h)
            if not isinstance(down, nn.Identity):
                h = down(h)
                skips.append(h)
        return h, tuple(skips)


class UNetMiddle(nn.Module):
    """Middle block: ResBlock, (attention), ResBlock: diffusers' UNetMidBlock2D."""

    def __init__(self, config: UNetTrunkConfig, channels: int) -> None:
        super().__init__()
        self.block = UNetMidBlock2D(in_channels=channels, temb_channels=config.temb_channels,
                                    resnet_groups=config.norm_groups, resnet_eps=1e-6, dropout=config.dropout,
                                    add_attention=config.mid_attention, attention_head_dim=channels)
        set_padding_mode(self, config.padding_mode)

    def forward(self, h: Tensor, temb: Tensor) -> Tensor:
        return self.block(h, temb)


class UNetDecoder(nn.Module):
    """Up path mirroring ``UNetEncoder``: consumes the skip tuple from its end (the tuple is never mutated).

    Used as the ordinary U-Net decoder (``out_channels=3``), the factorized decoder and the mask generator
    (``out_channels=K``).
    """

    def __init__(self, config: UNetTrunkConfig, skip_channels: Sequence[int], in_channels: int,
                 out_channels: int) -> None:
        super().__init__()
        if config.downsample_last:
            raise ValueError("UNetDecoder mirrors an encoder built with downsample_last=False")
        self.config = config
        chans = config.level_channels
        temb = config.temb_channels
        remaining = list(skip_channels)
        self.levels = nn.ModuleList()
        self.ups = nn.ModuleList()
        cur = in_channels
        for i in reversed(range(len(chans))):
            blocks = nn.ModuleList()
            for _ in range(config.num_res_blocks + 1):
                skip_c = remaining.pop()  # construction-time bookkeeping on our own copy
                blocks.append(ResAttnBlock(cur + skip_c, chans[i], temb, config.norm_groups, config.dropout,
                                           i in config.attention_levels))
                cur = chans[i]
            self.levels.append(blocks)
            if i == 0:
                self.ups.append(nn.Identity())
            else:
                up = Upsample2D(cur, use_conv=True)
                self.ups.append(nn.Sequential(up, Blur()) if config.antialias else up)
        if remaining:
            raise ValueError(f"skip channels left unconsumed: {remaining}")
        self.num_skips = len(skip_channels)
        self.norm_out = nn.GroupNorm(config.norm_groups, cur, eps=1e-6)
        self.conv_out = nn.Conv2d(cur, out_channels, 3, padding=1)
        set_padding_mode(self, config.padding_mode)

    def forward(
        self, h: Tensor, skips: Sequence[Tensor], temb: Float[Tensor, "batch temb"]
    ) -> Float[Tensor, "batch cout height width"]:
        if len(skips) != self.num_skips:
            raise ValueError(f"expected {self.num_skips} skip features, got {len(skips)}")
        idx = len(skips)
        for blocks, up in zip(self.levels, self.ups):
            for block in blocks:
                idx -= 1
                h = block(torch.cat([h, skips[idx]], dim=1), temb)
            if not isinstance(up, nn.Identity):
                h = up(h)
        return self.conv_out(nn.functional.silu(self.norm_out(h)))

"""Pose encoder: reads a noisy image x_t and its timestep, predicts K candidate cameras and K scores.

Shaped like nerfstudio's CameraOptimizer: a config with ``_target``, a module that contributes its own param
group (``pose_encoder``) to the model, built with ``config.setup(...)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Literal, Tuple, Type

import torch
from jaxtyping import Float, Int
from nerfstudio.configs.base_config import InstantiateConfig
from torch import Tensor, nn

from diffusion_utils.unet_blocks import TimestepEmbedder, UNetEncoder, UNetTrunkConfig
from gen_lifting.cameras import (
    CandidateLayout,
    candidate_positions,
    look_at_origin,
    octant_signs,
    rotvec_translation_to_c2w,
)


def paper_trunk() -> UNetTrunkConfig:
    """Thesis trunk: 5 downsamplings, 2 ResBlocks each, channels [C, C, 2C, 2C, 4C], C = 64."""
    return UNetTrunkConfig(base_channels=64, channel_mults=(1, 1, 2, 2, 4), num_res_blocks=2,
                           mid_attention=False, norm_groups=32, downsample_last=True)


def cpu_trunk() -> UNetTrunkConfig:
    """CPU preset trunk for 64x64 inputs: 4 downsamplings, 1 ResBlock each, C = 16."""
    return UNetTrunkConfig(base_channels=16, channel_mults=(1, 2, 2, 4), num_res_blocks=1,
                           mid_attention=False, norm_groups=8, downsample_last=True)


@dataclass
class PoseEncoderConfig(InstantiateConfig):
    """Configuration of the pose encoder."""

    _target: Type = field(default_factory=lambda: PoseEncoder)
    mode: Literal["candidates", "single"] = "candidates"
    """candidates: K look-at-origin cameras on a sphere (360 scenes); single: one free camera per image from
    axis-angle + translation (forward-facing scenes)."""
    num_candidates: int = 12
    """K, the number of candidate cameras (candidates mode)."""
    layout: CandidateLayout = "upper"
    """upper: candidates over the 4 upper quadrants (z > 0); sphere: one group per octant (full-sphere scenes)."""
    radius: float = 4.0
    """Fixed distance of every candidate camera from the origin (blender scenes: about 4.03)."""
    trunk: UNetTrunkConfig = field(default_factory=cpu_trunk)
    """U-Net encoder trunk that reads the noisy image."""
    spread_init: bool = True
    """Initialise the candidates of one octant at different elevations (otherwise they start identical)."""
    input_size: int = 0
    """Ours (0 = off: the encoder reads x_t at the image's size): area-resize x_t so that its longer side is this many
    pixels before the encoder reads it (e.g. 64 for 128x128 views: the encoder sees what it sees at 64 px while the
    field renders and is scored at the full size). Applied inside the encoder, after noising, so training, posing
    new photos and sampling all see the same input."""
    pool_grid: int = 1
    """Ours (1 = the global mean of the trunk's last feature map, as before): average the last feature map to a
    pool_grid x pool_grid grid and flatten it before the linear heads, so that the heads see *where* in the image a
    feature is (a global mean keeps only what is there; a camera's pose is mostly where things are). Any input size
    gives the same head size (adaptive pooling); the CPU trunk's last map at 64 px is 4 x 4."""


class PoseEncoder(nn.Module):
    """x_t, t -> candidate camera-to-world matrices [batch, cand, 3, 4] and scores [batch, cand]."""

    config: PoseEncoderConfig

    def __init__(self, config: PoseEncoderConfig, **kwargs) -> None:
        super().__init__()
        self.config = config
        trunk = config.trunk
        self.time_embed = TimestepEmbedder(trunk.base_channels, trunk.temb_channels)
        self.encoder = UNetEncoder(trunk)
        if config.pool_grid < 1:
            raise ValueError(f"pose encoder pool_grid must be >= 1, got {config.pool_grid}")
        self.norm = nn.GroupNorm(trunk.norm_groups, self.encoder.out_channels)
        feat = self.encoder.out_channels * config.pool_grid ** 2
        if config.mode == "candidates":
            self.register_buffer("signs", octant_signs(config.layout, config.num_candidates), persistent=False)
            # the world-up of the candidates' zero-roll look-at: the thesis' fixed z, or (ours) the refined cameras'
            # own up (GenLiftingModelConfig.candidate_up_from_refined); saved, so a loaded run poses as it trained
            self.register_buffer("world_up", torch.tensor([0.0, 0.0, 1.0]))
            k = config.num_candidates
            self.direction_head = nn.Linear(feat, 3 * k)
            self.score_head = nn.Linear(feat, k)
            self._init_candidate_heads()
        elif config.mode == "single":
            self.direction_head = nn.Linear(feat, 6)
            self.score_head = None
            nn.init.zeros_(self.direction_head.weight)
            nn.init.zeros_(self.direction_head.bias)
        else:
            raise ValueError(f"pose encoder mode must be 'candidates' or 'single', got {config.mode!r}")

    @property
    def num_candidates(self) -> int:
        return self.config.num_candidates if self.config.mode == "candidates" else 1

    def _init_candidate_heads(self) -> None:
        """Small weights so that at start every candidate sits near its bias position; biases spread the
        candidates of one octant over elevations (sigmoid(v_z) low..high)."""
        nn.init.normal_(self.direction_head.weight, std=1e-3)
        nn.init.zeros_(self.score_head.weight)
        nn.init.zeros_(self.score_head.bias)
        bias = torch.zeros(self.config.num_candidates, 3)
        if self.config.spread_init:
            per_group = self.config.num_candidates // len(torch.unique(self.signs, dim=0))
            for i in range(self.config.num_candidates):
                j = i % per_group
                bias[i, 2] = torch.linspace(-1.0, 1.0, per_group)[j] if per_group > 1 else 0.0
        with torch.no_grad():
            self.direction_head.bias.copy_(bias.reshape(-1))

    def features(self, x_t: Float[Tensor, "batch 3 height width"], t: Int[Tensor, "batch"]) -> Tensor:
        size = self.config.input_size
        height, width = x_t.shape[-2:]
        if size > 0 and max(height, width) != size:
            scale = size / max(height, width)
            x_t = nn.functional.interpolate(x_t, mode="area",
                                            size=(max(1, round(height * scale)), max(1, round(width * scale))))
        temb = self.time_embed(t)
        h, _ = self.encoder(x_t, temb)
        h = nn.functional.silu(self.norm(h))
        if self.config.pool_grid == 1:
            return h.mean(dim=(2, 3))
        return nn.functional.adaptive_avg_pool2d(h, self.config.pool_grid).flatten(1)

    def forward(
        self, x_t: Float[Tensor, "batch 3 height width"], t: Int[Tensor, "batch"]
    ) -> Tuple[Float[Tensor, "batch cand 3 4"], Float[Tensor, "batch cand"]]:
        feat = self.features(x_t, t)
        if self.config.mode == "single":
            raw = self.direction_head(feat)
            c2w = rotvec_translation_to_c2w(raw[:, :3], raw[:, 3:])
            return c2w.unsqueeze(1), torch.zeros(feat.shape[0], 1, device=feat.device)
        raw = self.direction_head(feat).reshape(feat.shape[0], self.config.num_candidates, 3)
        positions = candidate_positions(raw, self.signs, self.config.radius)
        return look_at_origin(positions, up=self.world_up), self.score_head(feat)

    def get_param_groups(self, param_groups: Dict[str, List[nn.Parameter]]) -> None:
        """Adds this module's parameters to the ``pose_encoder`` group (like CameraOptimizer)."""
        param_groups["pose_encoder"] = list(self.parameters())

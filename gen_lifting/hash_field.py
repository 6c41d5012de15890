"""The GPU preset's field: nerfstudio's NerfactoField (multi-resolution hash grid + small MLPs).

Nothing is re-implemented here: the config only builds nerfstudio's field with the settings a pose-free,
single-scene run needs (no per-image appearance embedding: an image's index says nothing about a camera
the encoder predicts, and new photos have no index). tinycudann is used when it is installed and CUDA is
present, nerfstudio's pure-torch hash grid otherwise, so the same config runs (slowly) on a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Type

import torch
from jaxtyping import Float
from nerfstudio.configs.base_config import InstantiateConfig
from nerfstudio.fields.nerfacto_field import NerfactoField
from torch import Tensor


def tcnn_available() -> bool:
    """True when tinycudann imports and a CUDA device exists (its kernels are CUDA-only)."""
    if not torch.cuda.is_available():
        return False
    try:
        import tinycudann  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class HashFieldConfig(InstantiateConfig):
    """nerfstudio's NerfactoField (hash grid + MLP); the field of the GPU preset."""

    _target: Type = field(default_factory=lambda: NerfactoField)
    num_levels: int = 16
    """Hash-grid levels."""
    base_res: int = 16
    """Resolution of the coarsest level."""
    max_res: int = 1024
    """Resolution of the finest level (nerfacto: 2048 for full-size scenes; 1024 suits 128x128 views)."""
    log2_hashmap_size: int = 19
    """log2 of the entries per hash table."""
    hidden_dim: int = 64
    """Width of the density MLP."""
    hidden_dim_color: int = 64
    """Width of the colour MLP."""
    average_init_density: float = 0.01
    """Scale of the initial density (nerfacto's default for the final field)."""
    implementation: Literal["auto", "tcnn", "torch"] = "auto"
    """'auto': tinycudann when installed and CUDA is present, else nerfstudio's pure-torch hash grid."""

    def resolved_implementation(self) -> Literal["tcnn", "torch"]:
        if self.implementation == "auto":
            return "tcnn" if tcnn_available() else "torch"
        if self.implementation == "tcnn" and not tcnn_available():
            raise SystemExit("implementation='tcnn' needs tinycudann and a CUDA GPU: install tinycudann "
                             "(see README) or pass --pipeline.model.field.implementation torch")
        return self.implementation

    def setup(self, *, aabb: Float[Tensor, "2 3"], **kwargs) -> NerfactoField:
        return NerfactoField(
            aabb=aabb, num_images=1, num_levels=self.num_levels, base_res=self.base_res, max_res=self.max_res,
            log2_hashmap_size=self.log2_hashmap_size, hidden_dim=self.hidden_dim,
            hidden_dim_color=self.hidden_dim_color, appearance_embedding_dim=0,
            average_init_density=self.average_init_density, implementation=self.resolved_implementation(),
        )

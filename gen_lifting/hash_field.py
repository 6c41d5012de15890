"""The GPU preset's field: nerfstudio's NerfactoField (multi-resolution hash grid + small MLPs).

Nothing is re-implemented here: the config only builds nerfstudio's field with the settings a pose-free,
single-scene run needs (no per-image appearance embedding: an image's index says nothing about a camera
the encoder predicts, and new photos have no index). tinycudann is used when it is installed and CUDA is
present, nerfstudio's pure-torch hash grid otherwise, so the same config runs (slowly) on a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Set, Tuple, Type

import torch
from jaxtyping import Float
from nerfstudio.configs.base_config import InstantiateConfig
from nerfstudio.field_components.encodings import HashEncoding
from nerfstudio.fields.nerfacto_field import NerfactoField
from nerfstudio.utils.rich_utils import CONSOLE
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


class IndexSelectHashEncoding(HashEncoding):
    """nerfstudio's pure-torch HashEncoding with the table read by ``index_select`` instead of ``table[idx]``.

    Same values and gradients (tested); the only change is the backward: ``table[idx]`` backpropagates through
    a sort-based deterministic ``index_put_`` that took 88% of a GPU step of the GPU preset
    (benchmarks/results/lifting_gpu_profile.txt), ``index_select``'s backward is an ``index_add_``.
    Used only when tinycudann is absent."""

    def _corner(self, corner: Tensor) -> Tensor:
        idx = self.hash_fn(corner)  # [..., levels]
        return self.hash_table.index_select(0, idx.reshape(-1)).view(*idx.shape, -1)

    def pytorch_fwd(self, in_tensor: Float[Tensor, "*bs 3"]) -> Float[Tensor, "*bs out"]:
        scaled = in_tensor[..., None, :] * self.scalings.view(-1, 1).to(in_tensor.device)  # [..., L, 3]
        c = torch.ceil(scaled).type(torch.int32)
        f = torch.floor(scaled).type(torch.int32)
        o = scaled - f
        x, y, z = (slice(0, 1), slice(1, 2), slice(2, 3))

        def corner(cx: Tensor, cy: Tensor, cz: Tensor) -> Tensor:
            return self._corner(torch.cat([cx[..., x], cy[..., y], cz[..., z]], dim=-1))

        # the corner order and blend of nerfstudio's pytorch_fwd (f_0 .. f_7), so results match it
        f0, f1, f2, f3 = corner(c, c, c), corner(c, f, c), corner(f, f, c), corner(f, c, c)
        f4, f5, f6, f7 = corner(c, c, f), corner(c, f, f), corner(f, f, f), corner(f, c, f)
        f03 = f0 * o[..., x] + f3 * (1 - o[..., x])
        f12 = f1 * o[..., x] + f2 * (1 - o[..., x])
        f56 = f5 * o[..., x] + f6 * (1 - o[..., x])
        f47 = f4 * o[..., x] + f7 * (1 - o[..., x])
        f0312 = f03 * o[..., y] + f12 * (1 - o[..., y])
        f4756 = f47 * o[..., y] + f56 * (1 - o[..., y])
        out = f0312 * o[..., z] + f4756 * (1 - o[..., z])
        return torch.flatten(out, start_dim=-2, end_dim=-1)


def resolve_implementation(implementation: Literal["auto", "tcnn", "torch"], flag: str) -> Literal["tcnn", "torch"]:
    """'auto' -> tinycudann when usable, else pure torch; an explicit 'tcnn' without it is a one-line error that
    names ``flag``, the option that asked for it."""
    if implementation == "auto":
        return "tcnn" if tcnn_available() else "torch"
    if implementation == "tcnn" and not tcnn_available():
        raise SystemExit(f"implementation='tcnn' needs tinycudann and a CUDA GPU: install tinycudann "
                         f"(see README) or pass {flag} torch")
    return implementation


def use_index_select_lookup(module: torch.nn.Module) -> None:
    """Switch every pure-torch HashEncoding inside ``module`` to the ``index_select`` lookup (same state and
    values; only ``pytorch_fwd`` differs). tinycudann encodings are left alone."""
    for sub in module.modules():
        if type(sub) is HashEncoding and sub.tcnn_encoding is None:
            sub.__class__ = IndexSelectHashEncoding


def hash_implementation(module: torch.nn.Module) -> str:
    """Which hash-grid lookup ``module``'s encodings use: 'tcnn', 'torch-index-select' (ours), 'torch' (nerfstudio's
    ``table[idx]``), a '+'-joined mix, or 'none' without hash grids."""
    kinds = sorted({"tcnn" if sub.tcnn_encoding is not None else
                    "torch-index-select" if isinstance(sub, IndexSelectHashEncoding) else "torch"
                    for sub in module.modules() if isinstance(sub, HashEncoding)})
    return "+".join(kinds) or "none"


_REPORTED: Set[Tuple[str, str]] = set()
"""(what, implementation) pairs already reported in this process."""


def report_implementation(what: str, module: torch.nn.Module) -> str:
    """Log which hash-grid implementation ``what`` uses, once per process (and return it)."""
    impl = hash_implementation(module)
    if (what, impl) not in _REPORTED:
        _REPORTED.add((what, impl))
        why = "" if impl.startswith("tcnn") else (" (tinycudann not importable or no CUDA device)"
                                                  if not tcnn_available() else " (asked for)")
        CONSOLE.log(f"gen-lifting: hash grids of the {what}: {impl}{why}")
    return impl


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
    fast_torch_lookup: bool = True
    """Without tinycudann: read the hash table with ``index_select`` (same values, cheaper backward)."""

    def resolved_implementation(self) -> Literal["tcnn", "torch"]:
        return resolve_implementation(self.implementation, "--pipeline.model.field.implementation")

    def setup(self, *, aabb: Float[Tensor, "2 3"], **kwargs) -> NerfactoField:
        field = NerfactoField(
            aabb=aabb, num_images=1, num_levels=self.num_levels, base_res=self.base_res, max_res=self.max_res,
            log2_hashmap_size=self.log2_hashmap_size, hidden_dim=self.hidden_dim,
            hidden_dim_color=self.hidden_dim_color, appearance_embedding_dim=0,
            average_init_density=self.average_init_density, implementation=self.resolved_implementation(),
        )
        if self.fast_torch_lookup:
            use_index_select_lookup(field)
        report_implementation("radiance field", field)
        return field

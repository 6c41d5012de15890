"""Occupancy-grid sampling for gen-lifting on CUDA: nerfacc's ``OccGridEstimator`` and volume rendering.

The Instant-NGP recipe as nerfstudio's ``instant-ngp`` model wires it: nerfstudio's ``VolumetricSampler`` marches
each ray through nerfacc's occupancy grid (empty cells and, while training, samples behind opaque ones are
skipped), the radiance field is evaluated on the surviving samples only, and nerfacc's
``render_weight_from_density`` turns the packed samples into weights that nerfstudio's renderers accumulate with
nerfacc. Nothing is re-implemented; this module wires the parts and keeps the grid honest.

CUDA only: nerfacc 0.5.2's ray marching (``OccGridEstimator.sampling``) and packed rendering run CUDA kernels
(measured on this CPU: ``sampling`` fails inside its extension loader, ``render_weight_from_density`` with
``ray_indices`` raises "Only support cuda inputs"). Building the sampler for a CPU run is a one-line error that
names the samplers that do run there (uniform, proposal).

Candidate scoring and the grid: gen-lifting renders every one of the K candidate cameras without gradients
before the winner's render. The grid must not learn from those renders (they look at the scene from poses that
mostly lose) nor have its update schedule advanced by them. So no render ever writes the grid: it is updated
only by a training callback, once per training step, from the radiance field's density directly (nerfacc's
``update_every_n_steps`` with ``occ_eval_fn = density * step size``), exactly as nerfstudio's instant-ngp does.
Its occupancy values and binary mask are buffers, so a checkpoint carries the grid a run was trained with.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Type, Union

import nerfacc
import torch
from jaxtyping import Float
from nerfstudio.cameras.rays import RayBundle
from nerfstudio.configs.base_config import InstantiateConfig
from nerfstudio.engine.callbacks import TrainingCallback, TrainingCallbackLocation
from nerfstudio.field_components.field_heads import FieldHeadNames
from nerfstudio.fields.base_field import Field
from nerfstudio.model_components.ray_samplers import VolumetricSampler
from nerfstudio.model_components.renderers import AccumulationRenderer, DepthRenderer, RGBRenderer
from torch import Tensor, nn

SAMPLER_FLAG = "--pipeline.model.sampler"


def cuda_unavailable_reason(device: Optional[Union[str, torch.device]]) -> Optional[str]:
    """Why the occupancy sampler cannot run for a model built on ``device`` (None: only CUDA's presence is
    checked), or None when it can."""
    if not torch.cuda.is_available():
        return "no CUDA device here"
    if device is not None and torch.device(device).type != "cuda":
        return f"this run's device is {torch.device(device).type}"
    return None


def nerfacc_extension_problem() -> Optional[str]:
    """None when nerfacc's CUDA extension loads, else why not. nerfacc 0.5.2 from PyPI compiles it on first use
    (minutes; needs nvcc); 0.5.2's sources compile neither against CUDA 13's CUB (``cub::Equality`` is gone) nor as
    C++20 (its ``lerp`` clashes with ``std::lerp``) without a pre-included header (benchmarks/gpu_check.py)."""
    try:
        from nerfacc.cuda._backend import _C
    except Exception as err:  # the compiler's own output is already on the console
        first = (str(err).strip().splitlines() or [""])[0][:120]
        return (f"nerfacc's CUDA extension did not build ({type(err).__name__}: {first}; nerfacc 0.5.2 under CUDA 13 "
                "or torch's C++20 builds needs the compatibility header of benchmarks/gpu_check.py, NERFACC_CUB_SHIM)")
    if _C is None:
        return "nerfacc's CUDA extension is not built and no CUDA toolkit (nvcc) was found to build it"
    return None


def require_cuda(device: Optional[Union[str, torch.device]]) -> None:
    """The one-line error of ``--pipeline.model.sampler occupancy`` off CUDA, or without nerfacc's CUDA kernels."""
    alternatives = f"pass {SAMPLER_FLAG} proposal or {SAMPLER_FLAG} uniform, which run on CPU and GPU"
    why = cuda_unavailable_reason(device)
    if why is not None:
        raise SystemExit(f"{SAMPLER_FLAG} occupancy needs a CUDA GPU (nerfacc {nerfacc.__version__}'s occupancy-grid "
                         f"sampling runs CUDA kernels only) and {why}: {alternatives}")
    why = nerfacc_extension_problem()
    if why is not None:
        raise SystemExit(f"{SAMPLER_FLAG} occupancy: {why}; install a nerfacc build for this torch and CUDA, or "
                         f"{alternatives}")


@dataclass
class OccupancySamplingConfig(InstantiateConfig):
    """nerfacc's occupancy grid + volume rendering (Instant-NGP's sampling); CUDA only."""

    _target: Type = field(default_factory=lambda: OccupancySampling)
    grid_resolution: int = 128
    """Cells per side of the occupancy grid (nerfstudio's instant-ngp default)."""
    grid_levels: int = 1
    """Grid levels; 1 covers the scene box (more levels only help unbounded, contracted scenes)."""
    render_step_size: Optional[float] = None
    """Marching step along a ray in world units; None: the scene box's diagonal / 1000 (nerfstudio's rule)."""
    alpha_thre: float = 0.01
    """While training, samples whose opacity is below this are skipped (needs one extra density query)."""
    cone_angle: float = 0.0
    """0: constant step (bounded scenes); > 0 grows the step with distance."""
    occ_thre: float = 0.01
    """Opacity over one step above which a cell counts as occupied."""
    update_every: int = 16
    """The grid is re-estimated from the field every N training steps (nerfacc's default)."""
    warmup_steps: int = 256
    """Before this step every cell is re-estimated; afterwards a random quarter plus occupied ones."""
    ema_decay: float = 0.95
    """Decay of the running occupancy estimate of each cell."""


class OccupancySampling(nn.Module):
    """nerfstudio's ``VolumetricSampler`` on a ``nerfacc.OccGridEstimator``, rendered with nerfacc."""

    def __init__(self, config: OccupancySamplingConfig, aabb: Float[Tensor, "2 3"], field: Field,
                 device: Optional[Union[str, torch.device]] = None) -> None:
        super().__init__()
        require_cuda(device)
        self.config = config
        self.render_step_size = (config.render_step_size if config.render_step_size is not None
                                 else float((aabb[1] - aabb[0]).norm()) / 1000)
        grid = nerfacc.OccGridEstimator(roi_aabb=aabb.flatten(), resolution=config.grid_resolution,
                                        levels=config.grid_levels)
        # the field is the model's, not a submodule here (its parameters and state belong to the model)
        self.sampler = VolumetricSampler(occupancy_grid=grid, density_fn=field.density_fn)
        self._field = [field]
        self.renderer_depth = DepthRenderer(method="expected")  # median depth is not defined for packed samples
        self.renderer_accumulation = AccumulationRenderer()

    @property
    def grid(self) -> nerfacc.OccGridEstimator:
        return self.sampler.occupancy_grid

    def forward(self, ray_bundle: RayBundle, renderer_rgb: RGBRenderer) -> Dict[str, Tensor]:
        """rgb, accumulation and depth of the (flat) rays; the samples are packed (a different count per ray)."""
        field = self._field[0]
        num_rays = len(ray_bundle)
        with torch.no_grad():  # sample positions carry no gradient (as in nerfstudio's instant-ngp)
            samples, ray_indices = self.sampler(ray_bundle, render_step_size=self.render_step_size,
                                                alpha_thre=self.config.alpha_thre, cone_angle=self.config.cone_angle)
        field_out = field(samples)
        weights = nerfacc.render_weight_from_density(
            t_starts=samples.frustums.starts[..., 0], t_ends=samples.frustums.ends[..., 0],
            sigmas=field_out[FieldHeadNames.DENSITY][..., 0], ray_indices=ray_indices, n_rays=num_rays)[0][..., None]
        packed = {"ray_indices": ray_indices, "num_rays": num_rays}
        return {
            "rgb": renderer_rgb(rgb=field_out[FieldHeadNames.RGB], weights=weights, **packed),
            "accumulation": self.renderer_accumulation(weights=weights, **packed),
            "depth": self.renderer_depth(weights=weights, ray_samples=samples, **packed),
            "num_samples_per_ray": torch.bincount(ray_indices, minlength=num_rays),
        }

    def update_grid(self, step: int) -> None:
        """nerfacc's scheduled grid update from the field's density (no render involved)."""
        field = self._field[0]
        self.grid.update_every_n_steps(
            step=step, occ_eval_fn=lambda x: field.density_fn(x) * self.render_step_size,
            occ_thre=self.config.occ_thre, ema_decay=self.config.ema_decay, warmup_steps=self.config.warmup_steps,
            n=self.config.update_every)

    def training_callbacks(self) -> List[TrainingCallback]:
        """The grid update, once per training step before the step's renders."""
        return [TrainingCallback([TrainingCallbackLocation.BEFORE_TRAIN_ITERATION], self.update_grid)]

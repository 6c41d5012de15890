"""Importance sampling for the hash field: nerfstudio's proposal-network sampler, as nerfacto uses it.

Why not nerfacc's ``PropNetEstimator`` / ``OccGridEstimator``: their sampling runs CUDA kernels only (nerfacc
0.5.2; measured on this CPU), so a preset built on them could not run or be tested on a CPU. nerfstudio's
``ProposalNetworkSampler`` is the same estimator (small hash-grid density fields, PDF resampling, the
interlevel loss of mip-NeRF 360) in pure torch, with tinycudann grids when they are installed: one config runs
on both. Nothing here is re-implemented; this module only wires nerfstudio's parts together and keeps candidate
scoring from consuming the sampler's update schedule. (nerfacc's occupancy grid is the CUDA-only alternative:
gen_lifting/occupancy.py, ``sampler='occupancy'``.)
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Literal, Tuple, Type

import numpy as np
import torch
from jaxtyping import Float
from nerfstudio.cameras.rays import RayBundle, RaySamples
from nerfstudio.configs.base_config import InstantiateConfig
from nerfstudio.engine.callbacks import TrainingCallback, TrainingCallbackLocation
from nerfstudio.fields.density_fields import HashMLPDensityField
from nerfstudio.model_components.losses import interlevel_loss
from nerfstudio.model_components.ray_samplers import ProposalNetworkSampler, UniformSampler
from torch import Tensor, nn

from gen_lifting.hash_field import report_implementation, resolve_implementation, use_index_select_lookup


@dataclass
class ProposalSamplingConfig(InstantiateConfig):
    """nerfacto's proposal sampling (two small density fields, then the radiance field)."""

    _target: Type = field(default_factory=lambda: ProposalSampling)
    num_proposal_samples_per_ray: Tuple[int, ...] = (128, 64)
    """Samples per ray of each proposal level (nerfacto: 256, 96 for unbounded scenes)."""
    num_nerf_samples_per_ray: int = 48
    """Samples per ray at which the radiance field is evaluated."""
    proposal_net_args_list: List[Dict] = field(default_factory=lambda: [
        {"hidden_dim": 16, "log2_hashmap_size": 17, "num_levels": 5, "max_res": 64, "use_linear": False},
        {"hidden_dim": 16, "log2_hashmap_size": 17, "num_levels": 5, "max_res": 128, "use_linear": False},
    ])
    """Arguments of each level's HashMLPDensityField (nerfacto's, at half its resolutions: 128x128 views)."""
    interlevel_loss_mult: float = 1.0
    """Weight of the proposal (interlevel) loss on the winner's render."""
    update_every: int = 5
    """Proposal fields get gradients every N steps once warmed up (nerfacto's schedule)."""
    update_warmup: int = 5000
    """Steps over which the update interval grows from 1 to ``update_every``."""
    anneal_slope: float = 10.0
    """Slope of the proposal-weight annealing (mip-NeRF 360 eq. 18)."""
    anneal_max_num_iters: int = 1000
    """Steps until annealing reaches 1."""
    single_jitter: bool = True
    """One jitter per ray instead of per sample."""
    average_init_density: float = 1.0
    """Initial density scale of the proposal fields (nerfacto's default)."""
    implementation: Literal["auto", "tcnn", "torch"] = "auto"
    """Hash grids of the proposal fields: tinycudann when installed and CUDA is present, else pure torch."""


class ProposalSampling(nn.Module):
    """Proposal density fields + nerfstudio's ``ProposalNetworkSampler``."""

    def __init__(self, config: ProposalSamplingConfig, aabb: Float[Tensor, "2 3"]) -> None:
        super().__init__()
        self.config = config
        impl = resolve_implementation(config.implementation, "--pipeline.model.proposal.implementation")
        n_levels = len(config.num_proposal_samples_per_ray)
        if n_levels < 1:
            raise ValueError("num_proposal_samples_per_ray needs at least one level")
        args = config.proposal_net_args_list
        self.networks = nn.ModuleList([
            HashMLPDensityField(aabb, **args[min(i, len(args) - 1)],
                                average_init_density=config.average_init_density, implementation=impl)
            for i in range(n_levels)
        ])
        if impl == "torch":
            use_index_select_lookup(self.networks)
        report_implementation("proposal fields", self.networks)
        self.density_fns: List[Callable] = [net.density_fn for net in self.networks]

        def update_schedule(step: int) -> float:
            return float(np.clip(np.interp(step, [0, config.update_warmup], [0, config.update_every]),
                                 1, config.update_every))

        self.sampler = ProposalNetworkSampler(
            num_proposal_samples_per_ray=config.num_proposal_samples_per_ray,
            num_nerf_samples_per_ray=config.num_nerf_samples_per_ray,
            num_proposal_network_iterations=n_levels,
            single_jitter=config.single_jitter,
            update_sched=update_schedule,
            initial_sampler=UniformSampler(single_jitter=config.single_jitter),  # bounded scenes: no contraction
        )

    def forward(self, ray_bundle: RayBundle) -> Tuple[RaySamples, List[Tensor], List[RaySamples]]:
        """Samples for the radiance field, plus the proposal levels' weights and samples (for the loss)."""
        return self.sampler(ray_bundle, density_fns=self.density_fns)

    @contextmanager
    def schedule_untouched(self) -> Iterator[None]:
        """Renders inside do not count as the step's proposal update (candidate scoring runs without gradients
        before the winner's render; without this it would use up the update and the proposal fields would only
        ever be queried under ``no_grad``)."""
        saved = self.sampler._steps_since_update
        try:
            yield
        finally:
            self.sampler._steps_since_update = saved

    def loss(self, weights_list: List[Tensor], ray_samples_list: List[RaySamples]) -> Tensor:
        """Weighted interlevel loss (the proposal weights must bound the radiance field's)."""
        return self.config.interlevel_loss_mult * interlevel_loss(weights_list, ray_samples_list)

    def training_callbacks(self) -> List[TrainingCallback]:
        """nerfacto's annealing of the proposal weights and the sampler's step counter."""
        cfg = self.config

        def set_anneal(step: int) -> None:
            frac = float(np.clip(step / max(1, cfg.anneal_max_num_iters), 0, 1))
            b = cfg.anneal_slope
            self.sampler.set_anneal(b * frac / ((b - 1) * frac + 1))

        return [
            TrainingCallback([TrainingCallbackLocation.BEFORE_TRAIN_ITERATION], set_anneal),
            TrainingCallback([TrainingCallbackLocation.AFTER_TRAIN_ITERATION], self.sampler.step_cb),
        ]

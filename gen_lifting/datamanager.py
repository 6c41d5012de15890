"""DataManager that turns each training image into a diffusion training sample.

Every ``next_train`` returns a batch of whole images: the clean image x_0 (kept for the photometric loss),
its noisy copy x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps for the pose encoder, t, and random pixel
coordinates for candidate scoring and for the loss. Ground-truth camera poses never enter a training batch:
only the (shared) intrinsics of the training cameras are read; poses feed evaluation alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Dict, Optional, Tuple, Type

import torch
import tyro
from jaxtyping import Float, Int
from nerfstudio.data.datamanagers.base_datamanager import VanillaDataManager, VanillaDataManagerConfig
from nerfstudio.data.pixel_samplers import PixelSamplerConfig
from nerfstudio.utils.rich_utils import CONSOLE
from torch import Tensor

from diffusion_utils.schedule import DiffusionScheduleConfig, to_model_range
from gen_lifting.data_checks import SceneDataError, validate_scene
from gen_lifting.datasets import DataNotFoundError, resolve_data


@dataclass
class GenLiftingDataManagerConfig(VanillaDataManagerConfig):
    """Diffusion-noised whole-image batches for gen-lifting."""

    _target: Type = field(default_factory=lambda: GenLiftingDataManager)
    # Inherited ray-batch flags that this datamanager does not read (it samples whole images, for training and for
    # the eval loss): hidden from the CLI so that no flag silently does nothing.
    train_num_rays_per_batch: tyro.conf.Suppress[int] = 1024
    train_num_images_to_sample_from: tyro.conf.Suppress[int] = -1
    train_num_times_to_repeat_images: tyro.conf.Suppress[int] = -1
    eval_num_rays_per_batch: tyro.conf.Suppress[int] = 1024
    eval_num_images_to_sample_from: tyro.conf.Suppress[int] = -1
    eval_num_times_to_repeat_images: tyro.conf.Suppress[int] = -1
    patch_size: tyro.conf.Suppress[int] = 1
    pixel_sampler: tyro.conf.Suppress[PixelSamplerConfig] = field(default_factory=PixelSamplerConfig)
    images_per_batch: int = 8
    """Training images per step (each one is noised, posed by the encoder and rendered)."""
    loss_pixels_per_image: int = 256
    """Pixels per image rendered from the winning candidate with gradients (the photometric loss)."""
    score_pixels_per_image: int = 64
    """Pixels per image rendered from every candidate, without gradients, to pick the winner."""
    diffusion: DiffusionScheduleConfig = field(default_factory=lambda: DiffusionScheduleConfig(num_timesteps=100))
    """Forward noising process (paper: T = 100, linear betas 1e-4..0.02)."""
    use_diffusion_noise: bool = True
    """Noise the encoder's input. False gives the clean-image autoencoder ablation (gen-lifting-ae)."""
    noise_warmup_steps: int = 0
    """Curriculum over t: the largest t drawn grows linearly from 1 to T over these steps (0 = paper:
    t ~ U{0..T-1} from the start)."""
    eval_timestep: int = 2
    """Noise level t at which unseen images are posed (ignored without diffusion noise)."""
    seed: int = 0
    """Seed of the batch sampler (images, t, noise, pixels)."""


class GenLiftingDataManager(VanillaDataManager):
    """Caches the training images once and samples noised whole-image batches from them."""

    config: GenLiftingDataManagerConfig

    def __init__(self, config: GenLiftingDataManagerConfig, *args, **kwargs) -> None:
        # ``--data lego`` names a bundled scene; the config object itself is left as the user wrote it.
        data = config.data if config.data is not None else config.dataparser.data
        try:
            path = resolve_data(data)
            validate_scene(path)
        except (DataNotFoundError, SceneDataError) as err:
            raise SystemExit(f"error: {err}") from None
        config = replace(config, data=path, dataparser=replace(config.dataparser, data=path))
        self.schedule = config.diffusion.setup()
        super().__init__(config, *args, **kwargs)

    def setup_train(self) -> None:
        """Load every training image into one [num_images, height, width, 3] tensor (no pose is read)."""
        assert self.train_dataset is not None
        CONSOLE.print("Caching training images...")
        images = [self.train_dataset.get_image_float32(i)[..., :3] for i in range(len(self.train_dataset))]
        shapes = {tuple(im.shape) for im in images}
        if len(shapes) != 1:
            raise ValueError(f"gen-lifting needs training images of one size, found {sorted(shapes)}; resize them")
        self.train_images: Float[Tensor, "num_images height width 3"] = torch.stack(images).to(self.device)
        self.generator = torch.Generator().manual_seed(self.config.seed)

    def get_train_rays_per_batch(self) -> int:
        """Rays rendered with gradients per step (the winner's loss pixels); used for nerfstudio's rays/s."""
        return self.config.images_per_batch * self.config.loss_pixels_per_image

    @property
    def intrinsics(self) -> Float[Tensor, "6"]:
        """(fx, fy, cx, cy, width, height) of the first training camera: intrinsics only, never the pose."""
        cams = self.train_dataset.cameras
        return torch.tensor([cams.fx[0, 0], cams.fy[0, 0], cams.cx[0, 0], cams.cy[0, 0],
                             cams.width[0, 0], cams.height[0, 0]], dtype=torch.float32)

    def encoder_input(
        self, images: Float[Tensor, "batch height width 3"], t: Int[Tensor, "batch"],
        generator: Optional[torch.Generator] = None,
    ) -> Tuple[Float[Tensor, "batch 3 height width"], Int[Tensor, "batch"]]:
        """x_t in [-1, 1], channels first, and the t actually used (0 without diffusion noise)."""
        x0 = to_model_range(images.permute(0, 3, 1, 2))
        if not self.config.use_diffusion_noise:
            return x0, torch.zeros_like(t)
        noise = torch.randn(x0.shape, generator=generator).to(x0)
        return self.schedule.add_noise(x0, t, noise), t

    def _random_pixels(self, batch: int, count: int, height: int, width: int) -> Int[Tensor, "batch count 2"]:
        flat = torch.randint(0, height * width, (batch, count), generator=self.generator)
        return torch.stack([flat // width, flat % width], dim=-1).to(self.device)

    def t_max(self, step: int) -> int:
        """Largest timestep (exclusive) drawn at ``step`` under the noise curriculum."""
        total, warm = self.schedule.num_timesteps, self.config.noise_warmup_steps
        return total if warm <= 0 else max(1, min(total, int(total * step / warm) + 1))

    def sample_batch(self, images: Float[Tensor, "num_images height width 3"], batch: int,
                     t: Optional[Int[Tensor, "batch"]] = None, step: Optional[int] = None) -> Dict[str, Tensor]:
        """One training-style batch drawn from ``images`` (t from the curriculum at ``step`` unless given)."""
        n, h, w, _ = images.shape
        idx = torch.randint(0, n, (batch,), generator=self.generator).to(self.device)
        if t is None:
            t_max = self.t_max(step) if step is not None else None
            t = self.schedule.sample_timesteps(batch, generator=self.generator, t_max=t_max)
        t = t.to(self.device)
        clean = images[idx]
        x_t, t_used = self.encoder_input(clean, t, self.generator)
        return {
            "image_idx": idx,
            "image": clean,
            "x_t": x_t,
            "t": t_used,
            "loss_pixels": self._random_pixels(batch, self.config.loss_pixels_per_image, h, w),
            "score_pixels": self._random_pixels(batch, self.config.score_pixels_per_image, h, w),
        }

    def next_train(self, step: int) -> Tuple[None, Dict[str, Tensor]]:  # type: ignore[override]
        self.train_count += 1
        return None, self.sample_batch(self.train_images, self.config.images_per_batch, step=step)

    def eval_images(self) -> Float[Tensor, "num_images height width 3"]:
        """Held-out images (cached on first use)."""
        if not hasattr(self, "_eval_images"):
            ims = [self.eval_dataset.get_image_float32(i)[..., :3] for i in range(len(self.eval_dataset))]
            self._eval_images = torch.stack(ims).to(self.device)
        return self._eval_images

    def next_eval_batch(self, step: int) -> Dict[str, Tensor]:
        """A training-style batch of held-out images at the evaluation noise level."""
        self.eval_count += 1
        b = self.config.images_per_batch
        t = torch.full((b,), self.config.eval_timestep, dtype=torch.long)
        return self.sample_batch(self.eval_images(), b, t=t)

"""DataManager that turns each training image into a diffusion training sample.

Every ``next_train`` returns a batch of whole images: the clean image x_0 (kept for the photometric loss),
its noisy copy x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps for the pose encoder, t, and random pixel
coordinates for candidate scoring and for the loss. Ground-truth camera poses never enter a training batch:
only the (shared) intrinsics of the training cameras are read; poses feed evaluation alone (and the true-pose
upper bound ``gen-lifting-oracle``, which sets ``use_dataset_poses``).

The datasets' cameras are what nerfstudio's tools read (viewer frusta, ``ns-render``). Their dataset poses are
copied aside for evaluation (``dataset_camera_to_worlds``) and every camera is tagged with its view
(``VIEW_KEY``), so that the pipeline can put the model's predicted poses in their place and the model can render a
dataset camera from the pose it predicts for that photo (see ``GenLiftingPipeline.show_predicted_poses``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Dict, Literal, Optional, Tuple, Type

import numpy as np
import torch
import torch.distributed as dist
import tyro
from jaxtyping import Float, Int
from nerfstudio.data.datamanagers.base_datamanager import VanillaDataManager, VanillaDataManagerConfig
from nerfstudio.data.datasets.base_dataset import InputDataset
from nerfstudio.data.pixel_samplers import PixelSamplerConfig
from nerfstudio.utils.rich_utils import CONSOLE
from torch import Tensor

from diffusion_utils.schedule import DiffusionScheduleConfig, to_model_range
from gen_lifting.data_checks import SceneDataError, validate_scene
from gen_lifting.datasets import DataNotFoundError, resolve_data

VIEW_KEY = "gen_lifting_view"
"""Cameras metadata key: per camera (split code, image index), split codes in ``SPLIT_CODES``."""
SPLIT_CODES: Dict[str, int] = {"train": 0, "val": 1, "test": 2}


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
    diffusion: DiffusionScheduleConfig = field(
        default_factory=lambda: DiffusionScheduleConfig(num_timesteps=100, scale_betas_to_num_timesteps=True))
    """Forward noising process. Paper: T = 100 steps from the image to noise. The linear betas 1e-4..0.02 are scaled
    by 1000 / T, so t = T - 1 is nearly pure noise (alpha_bar = 2e-5); setting ``scale-betas-to-num-timesteps`` to
    False gives the unscaled schedule, whose noisiest input still has alpha_bar = 0.36."""
    use_diffusion_noise: bool = True
    """Noise the encoder's input. False gives the clean-image autoencoder ablation (gen-lifting-ae)."""
    noise_warmup_steps: int = 0
    """Curriculum over t: the largest t drawn grows linearly from 1 to T over these steps (0 = paper:
    t ~ U{0..T-1} from the start)."""
    noise_start_steps: int = 0
    """Ours, not the paper's: the curriculum starts after this many steps; before them every image is posed at t = 0
    (the least noise of the schedule), so poses form as in the clean-image ablation and diffusion noise enters once
    they have (0 = the curriculum starts at step 0)."""
    timestep_power: float = 1.0
    """Ours, not the paper's (1 = paper: t uniform below the curriculum's cap): t = floor(t_max * u ** p), u ~ U[0, 1),
    so p > 1 draws small t (little noise) more often: p = 2 puts 32% of the draws in the lowest tenth of t."""
    eval_timestep: int = 0
    """Noise level t at which unseen images are posed (ignored without diffusion noise; t = 0 of the scaled schedule
    adds noise of std 0.03 in [-1, 1])."""
    seed: int = 0
    """Seed of the batch sampler (images, t, noise, pixels); each process of a multi-GPU run draws its own stream."""
    use_dataset_poses: bool = False
    """Train on the dataset's camera poses instead of predicting them: the true-pose upper bound (gen-lifting-oracle),
    with the same field, sampler and trainer. Off for gen-lifting, whose training never reads a pose."""


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
        self._dataset_c2w: Dict[str, Tensor] = {}  # filled while the parent builds the datasets
        super().__init__(config, *args, **kwargs)

    # ----------------------------------------------------------------------------------- datasets and cameras
    def create_train_dataset(self) -> InputDataset:
        return self._prepare_cameras(super().create_train_dataset(), "train")

    def create_eval_dataset(self) -> InputDataset:
        return self._prepare_cameras(super().create_eval_dataset(), self.test_split)

    def _prepare_cameras(self, dataset: InputDataset, split: str) -> InputDataset:
        """Keep the dataset poses aside for evaluation and tag each camera with its view; float32 intrinsics.

        float32: nerfstudio's blender parser gives float64 focal lengths next to float32 poses, and its spiral camera
        path (``ns-render spiral``) then fails in ``viewmatrix`` with mixed dtypes.
        """
        cams = dataset.cameras
        for name in ("fx", "fy", "cx", "cy"):
            setattr(cams, name, getattr(cams, name).float())
        self._dataset_c2w["train" if split == "train" else "eval"] = cams.camera_to_worlds.clone()
        if not self.config.use_dataset_poses:  # the oracle's cameras are its true poses: nothing to replace
            views = torch.stack([torch.full((len(cams),), SPLIT_CODES[split]), torch.arange(len(cams))], dim=-1)
            cams.metadata = {**(cams.metadata or {}), VIEW_KEY: views}
        return dataset

    def dataset_camera_to_worlds(self, split: Literal["train", "eval"]) -> Float[Tensor, "num_images 3 4"]:
        """The poses the dataset files give (ground truth): for evaluation and ``use_dataset_poses`` only."""
        return self._dataset_c2w[split].to(self.device)

    # ----------------------------------------------------------------------------------- images
    def setup_train(self) -> None:
        """Cache the training images and start this process's batch stream (no pose is read)."""
        CONSOLE.print("Caching training images...")
        assert self.train_images.shape[0] == len(self.train_dataset)
        self.generator = self._generator(stream=0, index=self._rank())

    @cached_property
    def train_images(self) -> Float[Tensor, "num_images height width 3"]:
        """Every training image in one tensor (loaded on first use: ``ns-render`` builds datamanagers without setup)."""
        assert self.train_dataset is not None
        images = [self.train_dataset.get_image_float32(i)[..., :3] for i in range(len(self.train_dataset))]
        shapes = {tuple(im.shape) for im in images}
        if len(shapes) != 1:
            raise ValueError(f"gen-lifting needs training images of one size, found {sorted(shapes)}; resize them")
        return torch.stack(images).to(self.device)

    def _rank(self) -> int:
        """Global rank of this process (``local_rank`` alone repeats on every machine of a multi-machine run)."""
        return dist.get_rank() if dist.is_available() and dist.is_initialized() else self.local_rank

    def _generator(self, stream: int, index: int) -> torch.Generator:
        """An independent random stream per (seed, stream, index): training per rank, evaluation per step."""
        seed = np.random.SeedSequence([self.config.seed, stream, index]).generate_state(1, dtype=np.uint64)[0]
        return torch.Generator().manual_seed(int(seed))

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
        generator: Optional[torch.Generator] = None, noise: Optional[Float[Tensor, "batch 3 height width"]] = None,
    ) -> Tuple[Float[Tensor, "batch 3 height width"], Int[Tensor, "batch"]]:
        """x_t in [-1, 1], channels first, and the t actually used (0 without diffusion noise); the noise is drawn
        with ``generator`` unless given."""
        x0 = to_model_range(images.permute(0, 3, 1, 2))
        if not self.config.use_diffusion_noise:
            return x0, torch.zeros_like(t)
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator)
        return self.schedule.add_noise(x0, t, noise.to(x0)), t

    def _random_pixels(
        self, batch: int, count: int, height: int, width: int, generator: torch.Generator
    ) -> Int[Tensor, "batch count 2"]:
        flat = torch.randint(0, height * width, (batch, count), generator=generator)
        return torch.stack([flat // width, flat % width], dim=-1).to(self.device)

    def t_max(self, step: int) -> int:
        """Largest timestep (exclusive) drawn at ``step`` under the noise curriculum."""
        total, warm = self.schedule.num_timesteps, self.config.noise_warmup_steps
        step = step - self.config.noise_start_steps
        if step < 0:
            return 1
        return total if warm <= 0 else max(1, min(total, int(total * step / warm) + 1))

    def sample_timesteps(self, batch: int, generator: torch.Generator, t_max: Optional[int]) -> Int[Tensor, "batch"]:
        """t below the curriculum's cap: uniform (paper), or skewed toward small t by ``timestep_power``."""
        return self.schedule.sample_timesteps(batch, generator=generator, t_max=t_max,
                                              power=self.config.timestep_power)

    def sample_batch(self, images: Float[Tensor, "num_images height width 3"], batch: int, generator: torch.Generator,
                     t: Optional[Int[Tensor, "batch"]] = None, step: Optional[int] = None) -> Dict[str, Tensor]:
        """One training-style batch drawn from ``images`` with ``generator`` (t from the curriculum at ``step``
        unless given)."""
        n, h, w, _ = images.shape
        idx = torch.randint(0, n, (batch,), generator=generator).to(self.device)
        if t is None:
            t_max = self.t_max(step) if step is not None else None
            t = self.sample_timesteps(batch, generator, t_max)
        t = t.to(self.device)
        clean = images[idx]
        x_t, t_used = self.encoder_input(clean, t, generator)
        return {
            "image_idx": idx,
            "image": clean,
            "x_t": x_t,
            "t": t_used,
            "alpha_bar": self.schedule.alphas_cumprod[t_used.cpu()].to(self.device),  # signal share of x_t
            "loss_pixels": self._random_pixels(batch, self.config.loss_pixels_per_image, h, w, generator),
            "score_pixels": self._random_pixels(batch, self.config.score_pixels_per_image, h, w, generator),
        }

    def next_train(self, step: int) -> Tuple[None, Dict[str, Tensor]]:  # type: ignore[override]
        self.train_count += 1
        batch = self.sample_batch(self.train_images, self.config.images_per_batch, self.generator, step=step)
        if self.config.use_dataset_poses:
            batch["camera_to_worlds"] = self.dataset_camera_to_worlds("train")[batch["image_idx"]]
        return None, batch

    @cached_property
    def eval_images(self) -> Float[Tensor, "num_images height width 3"]:
        """Held-out images (loaded on first use)."""
        ims = [self.eval_dataset.get_image_float32(i)[..., :3] for i in range(len(self.eval_dataset))]
        return torch.stack(ims).to(self.device)

    def next_eval_batch(self, step: int) -> Dict[str, Tensor]:
        """A training-style batch of held-out images at the evaluation noise level, from a stream of its own (seeded
        by ``step``): evaluating never shifts the training batches."""
        self.eval_count += 1
        b = self.config.images_per_batch
        t = torch.full((b,), self.config.eval_timestep, dtype=torch.long)
        batch = self.sample_batch(self.eval_images, b, self._generator(stream=1, index=step), t=t)
        if self.config.use_dataset_poses:
            batch["camera_to_worlds"] = self.dataset_camera_to_worlds("eval")[batch["image_idx"]]
        return batch

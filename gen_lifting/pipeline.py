"""Pipeline that lets the model see the image it must pose.

nerfstudio's VanillaPipeline trains and evaluates by handing the model rays built from the dataset's cameras.
gen-lifting must never use those poses: training hands the model a batch of noisy images, and evaluation
poses every held-out image with the encoder, then renders the NeRF from the predicted camera.
Under DDP (``--machine.num-devices > 1``) ``self._model`` is the DistributedDataParallel wrapper: training
calls it (so gradients are all-reduced); everything else reaches the model through ``self.model``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from time import time
from typing import Dict, Optional, Tuple, Type

import torch
import torchvision.utils as vutils
from jaxtyping import Float, Int
from nerfstudio.cameras.cameras import Cameras
from nerfstudio.pipelines.base_pipeline import VanillaPipeline, VanillaPipelineConfig
from nerfstudio.utils import profiler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import Tensor

from gen_lifting.datamanager import GenLiftingDataManagerConfig
from gen_lifting.model import GenLiftingModelConfig


@dataclass
class GenLiftingPipelineConfig(VanillaPipelineConfig):
    """gen-lifting pipeline."""

    _target: Type = field(default_factory=lambda: GenLiftingPipeline)
    datamanager: GenLiftingDataManagerConfig = field(default_factory=GenLiftingDataManagerConfig)
    """Noisy whole-image batches."""
    model: GenLiftingModelConfig = field(default_factory=GenLiftingModelConfig)
    """Pose encoder + field."""
    eval_pose_seed: int = 1234
    """Seed of the small noise added to held-out images before posing them (reproducible eval)."""


class GenLiftingPipeline(VanillaPipeline):
    config: GenLiftingPipelineConfig

    def __init__(self, config: GenLiftingPipelineConfig, *args, **kwargs) -> None:
        super().__init__(config, *args, **kwargs)
        self.model.intrinsics.copy_(self.datamanager.intrinsics.to(self.model.intrinsics))

    # ----------------------------------------------------------------------------------- training
    @profiler.time_function
    def get_train_loss_dict(self, step: int):
        _, batch = self.datamanager.next_train(step)
        outputs = self._model(batch)  # the DDP wrapper when world_size > 1
        metrics = self.model.get_metrics_dict(outputs, batch)
        loss = self.model.get_loss_dict(outputs, batch, metrics)
        return outputs, loss, metrics

    @profiler.time_function
    def get_eval_loss_dict(self, step: int):
        self.eval()
        batch = self.datamanager.next_eval_batch(step)
        outputs = self.model(batch)
        metrics = self.model.get_metrics_dict(outputs, batch)
        loss = self.model.get_loss_dict(outputs, batch, metrics)
        self.train()
        return outputs, loss, metrics

    # ----------------------------------------------------------------------------------- posing
    def encoder_input(
        self, images: Float[Tensor, "batch height width 3"]
    ) -> Tuple[Float[Tensor, "batch 3 height width"], Int[Tensor, "batch"]]:
        """Images (in [0, 1]) noised to the evaluation level with the seeded evaluation noise."""
        dm = self.datamanager
        t = torch.full((images.shape[0],), dm.config.eval_timestep, dtype=torch.long, device=self.device)
        gen = torch.Generator().manual_seed(self.config.eval_pose_seed)
        return dm.encoder_input(images.to(self.device), t, gen)

    @torch.no_grad()
    def encode(
        self, images: Float[Tensor, "batch height width 3"]
    ) -> Tuple[Float[Tensor, "batch cand 3 4"], Float[Tensor, "batch cand"]]:
        """All candidate cameras and scores of images at the evaluation noise level."""
        return self.model.pose_encoder(*self.encoder_input(images))

    def predict(
        self, images: Float[Tensor, "batch height width 3"]
    ) -> Tuple[Float[Tensor, "batch 3 4"], Int[Tensor, "batch"]]:
        """The top-scoring camera of each image (the test-time rule) and its candidate index."""
        return self.model.predict_c2w(*self.encoder_input(images))

    def predict_c2w(self, images: Float[Tensor, "batch height width 3"]) -> Float[Tensor, "batch 3 4"]:
        return self.predict(images)[0]

    def predict_cameras(self, images: Float[Tensor, "batch height width 3"]) -> Cameras:
        return self.model.cameras_from_c2w(self.predict_c2w(images)).to(self.device)

    @profiler.time_function
    def get_eval_image_metrics_and_images(self, step: int):
        self.eval()
        _, batch = self.datamanager.next_eval_image(step)
        camera = self.predict_cameras(batch["image"][None, ..., :3])
        outputs = self.model.get_outputs_for_camera(camera)
        metrics, images = self.model.get_image_metrics_and_images(outputs, batch)
        metrics["num_rays"] = int(camera.height * camera.width)
        self.train()
        return metrics, images

    @torch.no_grad()
    def evaluate_poses(self) -> Dict[str, float]:
        """Pose error of the training images after aligning predicted to true camera centres (eval only)."""
        from gen_lifting.alignment import pose_errors

        pred = torch.cat([self.predict_c2w(chunk) for chunk in self.datamanager.train_images.split(32)])
        gt = self.datamanager.train_dataset.cameras.camera_to_worlds.to(pred)
        # 360 scenes: rotation about the object; forward-facing: fit on orientations (coplanar centres)
        mode = "rotation" if self.model.pose_encoder.config.mode == "candidates" else "orientation"
        return {k: float(v) for k, v in pose_errors(pred, gt, mode=mode).items()}

    @profiler.time_function
    def get_average_eval_image_metrics(
        self, step: Optional[int] = None, output_path: Optional[Path] = None, get_std: bool = False
    ) -> Dict[str, float]:
        """PSNR / SSIM / LPIPS of every held-out image rendered from its *predicted* pose, plus pose errors."""
        self.eval()
        loader = self.datamanager.fixed_indices_eval_dataloader
        per_image = []
        if output_path is not None:
            output_path.mkdir(parents=True, exist_ok=True)
        with Progress(TextColumn("[progress.description]{task.description}"), BarColumn(), TimeElapsedColumn(),
                      MofNCompleteColumn(), transient=True) as progress:
            task = progress.add_task("[green]Posing and rendering held-out images...", total=len(loader))
            for idx, (_, batch) in enumerate(loader):
                start = time()
                camera = self.predict_cameras(batch["image"][None, ..., :3])
                outputs = self.model.get_outputs_for_camera(camera)
                metrics, images = self.model.get_image_metrics_and_images(outputs, batch)
                metrics["fps"] = 1.0 / max(time() - start, 1e-9)
                if output_path is not None:
                    for key, image in images.items():
                        vutils.save_image(image.permute(2, 0, 1).cpu(), output_path / f"eval_{key}_{idx:04d}.png")
                per_image.append(metrics)
                progress.advance(task)
        result: Dict[str, float] = {}
        for key in per_image[0]:
            values = torch.tensor([m[key] for m in per_image])
            result[key] = float(values.mean())
            if get_std:
                result[f"{key}_std"] = float(values.std())
        result.update(self.evaluate_poses())
        self.train()
        return result

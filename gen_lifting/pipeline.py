"""Pipeline that lets the model see the image it must pose.

nerfstudio's VanillaPipeline trains and evaluates by handing the model rays built from the dataset's cameras.
gen-lifting must never use those poses: training hands the model a batch of noisy images, and evaluation
poses every held-out image with the encoder, then renders the NeRF from the predicted camera.
What nerfstudio's tools read as "the dataset's cameras" (viewer frusta, ``ns-render spiral / interpolate``) is put
at the model's predicted poses when the pipeline is built, when a checkpoint is loaded and when the viewer's frusta
are redrawn (``show_predicted_poses``); the dataset poses stay with the datamanager for evaluation only.
With ``use_dataset_poses`` (gen-lifting-oracle) the dataset poses are the cameras, for training and evaluation.
Under DDP (``--machine.num-devices > 1``) ``self._model`` is the DistributedDataParallel wrapper: training
calls it (so gradients are all-reduced); everything else reaches the model through ``self.model``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from time import time
from typing import Any, Dict, List, Optional, Tuple, Type

import torch
import torchvision.utils as vutils
from jaxtyping import Float, Int
from nerfstudio.cameras.cameras import Cameras
from nerfstudio.engine.callbacks import TrainingCallback, TrainingCallbackAttributes, TrainingCallbackLocation
from nerfstudio.pipelines.base_pipeline import VanillaPipeline, VanillaPipelineConfig
from nerfstudio.utils import profiler
from nerfstudio.utils.rich_utils import CONSOLE
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel as DDP

from gen_lifting import guards
from gen_lifting.cameras import fit_world_up
from gen_lifting.data_checks import SceneDataError, check_scene_kind
from gen_lifting.datamanager import GenLiftingDataManagerConfig
from gen_lifting.model import GenLiftingModelConfig
from gen_lifting.refinement import refine_poses
from gen_lifting.synthetic_views import SyntheticViews, jitter_for, render_synthetic_views


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
    test_time_refine_steps: int = 0
    """Beyond the thesis (gen_lifting/refinement.py): refine each held-out photo's predicted pose with this many Adam
    steps against the trained field before scoring it (``psnr_refined``, ``test_refined_*``; the encoder-pose metrics
    stay). 0 = off."""
    test_time_refine_lr: float = 1e-2
    """Initial Adam learning rate of the held-out pose corrections (radians / scene units per step; decays to a tenth
    over the steps)."""
    test_time_refine_pixels: int = 512
    """Random pixels of a held-out photo rendered per refinement step."""
    candidate_check_pixels: int = 0
    """Beyond the thesis: pose a photo with the field's check of the encoder's K candidates. Each candidate renders
    the same this many random pixels of the photo and the one with the lowest error is the pose (training's winner
    rule, min over K, applied to the clean photo; ``GenLiftingPipeline.predict_checked``). Used as the start of
    test-time refinement and by ``gen-lifting predict-pose``, scored as ``checked_*`` / ``test_checked_*``; the
    encoder's top-score metrics (``rot_err_*``, ``test_*``) and renders stay the thesis's. 0 = off (the top-scoring
    candidate)."""
    refinement_snapshot_checked: bool = False
    """Ours: the snapshot that starts training-time pose refinement (``--pipeline.model.pose-refinement-start-step``)
    takes each training photo's field-checked candidate (``candidate_check_pixels``) instead of its top-scoring one."""

    def __post_init__(self) -> None:
        guards.check_flags(self)  # tyro builds this while parsing: before ns-train writes anything
        check_refinement_flags(self)


def check_refinement_flags(config: GenLiftingPipelineConfig) -> None:
    """One-line errors for the pose refinement flags (gen_lifting/refinement.py), before anything is written."""
    model = config.model
    for flag, value in (("pipeline.model.pose-refinement-start-step", model.pose_refinement_start_step),
                        ("pipeline.test-time-refine-steps", config.test_time_refine_steps),
                        ("pipeline.candidate-check-pixels", config.candidate_check_pixels)):
        if value < 0:
            raise guards.FlagError(f"--{flag} must be >= 0 (0 = off), got {value}")
    if config.refinement_snapshot_checked and (config.candidate_check_pixels <= 0
                                               or model.pose_refinement_start_step <= 0):
        raise guards.FlagError("--pipeline.refinement-snapshot-checked needs --pipeline.candidate-check-pixels > 0 "
                               "and --pipeline.model.pose-refinement-start-step > 0 (the snapshot it changes)")
    if config.test_time_refine_pixels < 1:
        raise guards.FlagError(f"--pipeline.test-time-refine-pixels must be >= 1, got {config.test_time_refine_pixels}")
    if model.pose_refinement_start_step > 0 and model.camera_optimizer.mode == "off":
        raise guards.FlagError("--pipeline.model.pose-refinement-start-step needs a camera optimizer: set "
                               "--pipeline.model.camera-optimizer.mode SO3xR3")
    ratio = model.pose_refinement_reselect_ratio
    if not 0 <= ratio < 1:
        raise guards.FlagError(f"--pipeline.model.pose-refinement-reselect-ratio must be in [0, 1) (0 = off), "
                               f"got {ratio}")
    if model.synthetic_pose_views < 0 or model.synthetic_pose_refresh_steps < 1:
        raise guards.FlagError("--pipeline.model.synthetic-pose-views must be >= 0 (0 = off) and "
                               "--pipeline.model.synthetic-pose-refresh-steps >= 1, got "
                               f"{model.synthetic_pose_views} and {model.synthetic_pose_refresh_steps}")
    if not (0 <= model.synthetic_pose_jitter_deg <= 180 and model.synthetic_pose_mult >= 0
            and model.synthetic_pose_jitter_spacing_mult >= 0):
        raise guards.FlagError("--pipeline.model.synthetic-pose-jitter-deg must be in [0, 180] and "
                               "--pipeline.model.synthetic-pose-mult and -jitter-spacing-mult >= 0, got "
                               f"{model.synthetic_pose_jitter_deg}, {model.synthetic_pose_mult} and "
                               f"{model.synthetic_pose_jitter_spacing_mult}")
    if model.synthetic_pose_views > 0 and (model.pose_refinement_start_step == 0
                                           or model.pose_encoder.mode != "candidates"):
        raise guards.FlagError("--pipeline.model.synthetic-pose-views renders views near the refined cameras of a 360 "
                               "scene: set --pipeline.model.pose-refinement-start-step N too, with the candidates "
                               "pose encoder (not the forward-facing 'single' one)")
    if model.candidate_up_from_refined and (model.pose_refinement_start_step == 0
                                            or model.pose_encoder.mode != "candidates"):
        raise guards.FlagError("--pipeline.model.candidate-up-from-refined takes the candidates' up from the refined "
                               "cameras of a 360 scene: set --pipeline.model.pose-refinement-start-step N too, with "
                               "the candidates pose encoder (not the forward-facing 'single' one)")
    if ratio > 0 and model.pose_refinement_start_step == 0:
        raise guards.FlagError("--pipeline.model.pose-refinement-reselect-ratio acts during pose refinement: set "
                               "--pipeline.model.pose-refinement-start-step N too")
    refining = model.pose_refinement_start_step > 0 or config.test_time_refine_steps > 0
    if refining and config.datamanager.use_dataset_poses:
        raise guards.FlagError("pose refinement refines predicted poses; this method trains on the dataset poses "
                               "(use_dataset_poses): leave --pipeline.model.pose-refinement-start-step and "
                               "--pipeline.test-time-refine-steps at 0")


class GenLiftingPipeline(VanillaPipeline):
    config: GenLiftingPipelineConfig

    def __init__(self, config: GenLiftingPipelineConfig, device: str, test_mode: str = "val", world_size: int = 1,
                 local_rank: int = 0, grad_scaler: Optional[Any] = None) -> None:
        # nerfstudio wraps the model as DDP(model, device_ids=[local_rank]), which DDP refuses for a CPU module; on a
        # CPU (gloo) the parent builds a single-process pipeline and the model is wrapped here without device ids.
        on_cpu = torch.device(device).type == "cpu"
        try:  # before nerfstudio's dataparser reads the files of the wrong scene kind (a 49-line traceback)
            dm = config.datamanager
            check_scene_kind(dm.data, dm.dataparser, oracle=dm.use_dataset_poses)
        except SceneDataError as err:
            raise SystemExit(f"error: {err}") from None
        super().__init__(config, device, test_mode, 1 if on_cpu else world_size, local_rank, grad_scaler)
        if on_cpu and world_size > 1:
            self.world_size = self.datamanager.world_size = world_size
            self._model = DDP(self._model, find_unused_parameters=True)
        self.model.intrinsics.copy_(self.datamanager.intrinsics.to(self.model.intrinsics))
        self.synthetic_views: Optional[SyntheticViews] = None
        """Self-labelled renders for the encoder (``synthetic_pose_views``), re-rendered every
        ``synthetic_pose_refresh_steps`` during refinement; not saved (a resumed run renders them again)."""
        self.synthetic_rendered_at: Optional[int] = None
        self.candidate_up_fitted_at: Optional[int] = None
        self.train_candidates: Optional[Tensor] = None
        """Winning candidate of each training photo at the last ``show_predicted_poses`` (None for the oracle)."""
        self.show_predicted_poses()

    @property
    def uses_dataset_poses(self) -> bool:
        """gen-lifting-oracle: the dataset's poses are the cameras (training and evaluation)."""
        return self.datamanager.config.use_dataset_poses

    @property
    def pose_alignment_mode(self) -> str:
        """How predicted cameras are aligned to the dataset's for scoring (``alignment.fit_camera_alignment``): 360
        scenes, a rotation about the object; forward-facing, a fit on orientations (their centres are coplanar)."""
        return "rotation" if self.model.pose_encoder.config.mode == "candidates" else "orientation"

    def load_pipeline(self, loaded_state: Dict[str, Any], step: int) -> None:
        """Load a checkpoint (ns-eval, ns-render, ns-viewer, our CLI), then show the loaded model's poses."""
        from gen_lifting.compat import ffmpeg_on_path

        super().load_pipeline(loaded_state, step)
        self.show_predicted_poses()
        ffmpeg_on_path()  # ns-render needs one; only for loaded gen-lifting runs, never at import

    # ----------------------------------------------------------------------------------- training
    def get_training_callbacks(
        self, training_callback_attributes: TrainingCallbackAttributes
    ) -> List[TrainingCallback]:
        """The datamanager's and model's callbacks, then the divergence guard (gen_lifting/guards.py); turns on
        deterministic mode here (training only) when ``GEN_LIFTING_DETERMINISTIC`` asks for it."""
        if guards.deterministic_mode_requested():
            guards.apply_deterministic_mode(self.device)
        callbacks = super().get_training_callbacks(training_callback_attributes)
        if self.model.pose_refinement is not None:
            callbacks.append(TrainingCallback([TrainingCallbackLocation.BEFORE_TRAIN_ITERATION],
                                              self.maybe_start_pose_refinement))
        if self.model.config.candidate_up_from_refined:  # before the synthetic views, which are rendered about it
            callbacks.append(TrainingCallback([TrainingCallbackLocation.BEFORE_TRAIN_ITERATION],
                                              self.maybe_fit_candidate_up))
        if self.model.config.synthetic_pose_views > 0:
            callbacks.append(TrainingCallback([TrainingCallbackLocation.BEFORE_TRAIN_ITERATION],
                                              self.maybe_render_synthetic_views))
        guard = guards.nonfinite_guard(training_callback_attributes)
        return callbacks + ([guard] if guard is not None else [])

    def maybe_start_pose_refinement(self, step: int) -> bool:
        """At ``pose_refinement_start_step`` (or the first step after it, e.g. a run resumed from an older
        checkpoint) snapshot the encoder's pose of every training photo; a loaded snapshot is kept. Returns whether
        a snapshot was taken now."""
        refinement = self.model.pose_refinement
        if refinement is None or refinement.is_started or step < self.model.config.pose_refinement_start_step:
            return False
        # one posing pass: the encoder's poses are the snapshot, and the cameras nerfstudio's tools read already show
        # them (the corrections start at identity)
        if self.config.refinement_snapshot_checked:  # the field-checked candidates; the tools then show them
            refinement.start(self.predict_checked(self.datamanager.train_images)[0])
            self.show_predicted_poses()
        else:
            refinement.start(self.show_predicted_poses()["train"])
        return True

    def refresh_due(self, last_step: Optional[int], step: int) -> bool:
        """Whether a refinement-time refresh last done at ``last_step`` (None: never, e.g. a resumed run) is due:
        every ``synthetic_pose_refresh_steps`` steps."""
        return last_step is None or step - last_step >= self.model.config.synthetic_pose_refresh_steps

    def maybe_fit_candidate_up(self, step: int) -> bool:
        """During refinement, every ``synthetic_pose_refresh_steps`` steps (and at a resumed run's first step), set
        the candidates' world-up to the refined cameras' (``candidate_up_from_refined``). Returns whether it did."""
        if not self.model.config.candidate_up_from_refined or not self.model.refining or not self.refresh_due(
                self.candidate_up_fitted_at, step):
            return False
        assert self.model.pose_refinement is not None
        with torch.no_grad():
            self.model.pose_encoder.world_up.copy_(fit_world_up(self.model.pose_refinement.c2w().detach()))
        self.candidate_up_fitted_at = step
        return True

    def maybe_render_synthetic_views(self, step: int) -> bool:
        """During refinement, (re-)render the encoder's self-labelled views when they are missing or
        ``synthetic_pose_refresh_steps`` old (gen_lifting/synthetic_views.py). Returns whether it rendered now."""
        cfg = self.model.config
        if cfg.synthetic_pose_views <= 0 or not self.model.refining or not self.refresh_due(
                self.synthetic_rendered_at, step):
            return False
        assert self.model.pose_refinement is not None
        generator = self.datamanager._generator(stream=3, index=step)
        c2w = self.model.pose_refinement.c2w().detach()
        jitter = jitter_for(c2w.shape[0], self.model.pose_encoder.config.layout == "upper",
                            cfg.synthetic_pose_jitter_deg, cfg.synthetic_pose_jitter_spacing_mult)
        if self.synthetic_views is None:
            CONSOLE.log(f"gen-lifting: synthetic views for the encoder: {cfg.synthetic_pose_views} renders every "
                        f"{cfg.synthetic_pose_refresh_steps} steps, jittered up to {jitter:.1f} deg")
        self.synthetic_views = render_synthetic_views(self.model, c2w, cfg.synthetic_pose_views, jitter, generator)
        self.synthetic_rendered_at = step
        return True

    def add_synthetic_views(self, batch: Dict[str, Tensor], step: int) -> None:
        """Noised synthetic views and their labels for this step, drawn like the photos (t from the curriculum) from a
        random stream of their own, so the photos' batches are the same with and without them. (Every process of a
        multi-GPU run renders and draws the same views; only its photos differ.)"""
        views, dm = self.synthetic_views, self.datamanager
        assert views is not None
        sub = dm.sample_batch(views.images, dm.config.images_per_batch, dm._generator(stream=2, index=step), step=step)
        batch.update(synthetic_x_t=sub["x_t"], synthetic_t=sub["t"], synthetic_alpha_bar=sub["alpha_bar"],
                     synthetic_direction=views.directions[sub["image_idx"]])

    @profiler.time_function
    def get_train_loss_dict(self, step: int):
        _, batch = self.datamanager.next_train(step)
        if self.synthetic_views is not None:  # only rendered once refinement has started, which never stops
            self.add_synthetic_views(batch, step)
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
        b, h, w, _ = images.shape
        t = torch.full((b,), dm.config.eval_timestep, dtype=torch.long, device=self.device)
        # one fixed noise image for every photo: a photo's predicted pose does not depend on what it is batched with
        noise = torch.randn((1, 3, h, w), generator=torch.Generator().manual_seed(self.config.eval_pose_seed))
        return dm.encoder_input(images.to(self.device), t, noise=noise.expand(b, -1, -1, -1))

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

    def predict_all(
        self, images: Float[Tensor, "num_images height width 3"]
    ) -> Tuple[Float[Tensor, "num_images 3 4"], Int[Tensor, "num_images"]]:
        """``predict`` in chunks of 32 images (the noise of each chunk is the seeded evaluation noise)."""
        out = [self.predict(chunk) for chunk in images.split(32)]
        return torch.cat([c2w for c2w, _ in out]), torch.cat([index for _, index in out])

    def predict_all_c2w(self, images: Float[Tensor, "num_images height width 3"]) -> Float[Tensor, "num_images 3 4"]:
        return self.predict_all(images)[0]

    @torch.no_grad()
    def predict_checked(
        self, images: Float[Tensor, "num_images height width 3"], chunk: int = 16
    ) -> Tuple[Float[Tensor, "num_images 3 4"], Int[Tensor, "num_images"]]:
        """The encoder's candidate whose render best matches each photo on ``candidate_check_pixels`` random pixels,
        and its index. The pixels are the same for every photo (drawn from ``eval_pose_seed``): a photo's pose does
        not depend on what it is batched with."""
        was_training = self.training
        self.eval()
        out_c2w, out_index = [], []
        try:
            for part in images.split(chunk):
                c2w, _ = self.encode(part)
                index = self.check_candidates(c2w, part)
                out_c2w.append(c2w[torch.arange(c2w.shape[0], device=c2w.device), index])
                out_index.append(index)
        finally:
            if was_training:
                self.train()
        return torch.cat(out_c2w), torch.cat(out_index)

    @torch.no_grad()
    def check_candidates(
        self, candidates: Float[Tensor, "batch cand 3 4"], images: Float[Tensor, "batch height width 3"]
    ) -> Int[Tensor, "batch"]:
        """``predict_checked``'s choice among given candidate cameras of the photos (call in eval mode)."""
        count = self.config.candidate_check_pixels
        if count <= 0:
            raise ValueError("the field's check of the candidates needs --pipeline.candidate-check-pixels > 0")
        h, w = images.shape[1:3]
        flat = torch.randperm(h * w, generator=torch.Generator().manual_seed(self.config.eval_pose_seed))[:count]
        pixels = torch.stack([flat // w, flat % w], dim=-1).to(self.device)
        images = images.to(self.device)
        return self.model.candidate_errors(candidates, images, pixels.expand(images.shape[0], -1, -1)).argmin(dim=1)

    def predict_cameras(self, images: Float[Tensor, "batch height width 3"]) -> Cameras:
        return self.model.cameras_from_c2w(self.predict_c2w(images)).to(self.device)

    @torch.no_grad()
    def show_predicted_poses(self) -> Dict[str, Tensor]:
        """Pose every photo of the datasets with the current model and put those poses where nerfstudio's tools look.

        The datasets' cameras (viewer frusta, ``ns-render interpolate / spiral``) move to the predicted poses, and the
        model keeps them by split so that it renders a dataset camera from its photo's pose (``ns-render dataset``).
        The dataset poses stay in ``datamanager.dataset_camera_to_worlds`` for evaluation. With training-time pose
        refinement started, the training photos' cameras are their refined poses instead. Returns the encoder's poses
        by split, and keeps each training photo's winning candidate index in ``train_candidates`` (the viewer's
        frustum colours).
        No-op for gen-lifting-oracle, whose cameras are the dataset poses.
        """
        if self.uses_dataset_poses:
            return {}
        dm = self.datamanager
        was_training = self.training
        self.eval()
        train_c2w, self.train_candidates = self.predict_all(dm.train_images)
        poses = {"train": train_c2w, dm.test_split: self.predict_all_c2w(dm.eval_images)}
        if was_training:
            self.train()
        shown = dict(poses)
        if self.model.refining:  # the training photos' cameras are the refined ones (gen_lifting/refinement.py)
            assert self.model.pose_refinement is not None
            shown["train"] = self.model.pose_refinement.c2w().detach()
        self.model.view_poses = shown
        # nerfstudio's eval dataloaders copy the eval cameras (ns-render spiral starts from one of theirs)
        loaders = ("eval_dataloader", "fixed_indices_eval_dataloader")
        eval_cameras = [dm.eval_dataset.cameras] + [getattr(dm, name).cameras for name in loaders if hasattr(dm, name)]
        for cams, split in [(dm.train_dataset.cameras, "train")] + [(cams, dm.test_split) for cams in eval_cameras]:
            cams.camera_to_worlds.copy_(shown[split].to(cams.camera_to_worlds))
        return poses

    # ----------------------------------------------------------------------------------- evaluation
    def eval_camera(self, camera: Cameras, batch: Dict[str, Tensor]) -> Cameras:
        """The camera a held-out photo is rendered from: posed by the encoder (the oracle: the dataset's pose)."""
        if self.uses_dataset_poses:
            return camera.to(self.device)
        return self.predict_cameras(batch["image"][None, ..., :3])

    @profiler.time_function
    def get_eval_image_metrics_and_images(self, step: int):
        self.eval()
        camera, batch = self.datamanager.next_eval_image(step)
        camera = self.eval_camera(camera, batch)
        outputs = self.model.get_outputs_for_camera(camera)
        metrics, images = self.model.get_image_metrics_and_images(outputs, batch)
        metrics["num_rays"] = int(camera.height * camera.width)
        self.train()
        return metrics, images

    @torch.no_grad()
    def refine_held_out_poses(self) -> Float[Tensor, "num_images 3 4"]:
        """Every held-out photo's encoder pose refined against the frozen field (``test_time_refine_steps``, iNeRF-like;
        gen_lifting/refinement.py). Only the photos and the field are used, never a dataset pose."""
        dm = self.datamanager
        was_training = self.training
        self.eval()
        start = (self.predict_checked(dm.eval_images)[0] if self.config.candidate_check_pixels > 0
                 else self.predict_all_c2w(dm.eval_images))
        refined = refine_poses(self.model.render_pixels, start, dm.eval_images, self.config.test_time_refine_steps,
                               self.config.test_time_refine_pixels, self.config.test_time_refine_lr,
                               seed=self.config.eval_pose_seed,
                               translation=self.model.config.pose_refinement_translation,
                               about=self.model.config.pose_refinement_about)
        if was_training:
            self.train()
        return refined

    @torch.no_grad()
    def evaluate_poses(self, refined_held_out: Optional[Tensor] = None) -> Dict[str, float]:
        """Pose errors after aligning predicted to true cameras (evaluation only; {} for the oracle).

        Training views: the alignment is fitted on them (keys as in ``alignment.pose_errors``). Held-out views
        (``test_*`` keys): the training views' alignment is applied to their predicted poses, nothing is refitted.
        These keys score the encoder's poses. With pose refinement (gen_lifting/refinement.py): ``refined_*``, the
        training photos' refined cameras (alignment fitted on them); ``test_refined_*``, ``refined_held_out`` (the
        held-out photos' test-time refined poses, from ``refine_held_out_poses``) under the alignment fitted on the
        cameras the field was trained with (refined ones once training-time refinement has started).
        With ``candidate_check_pixels``: ``checked_*``, the training photos' field-checked candidates
        (``predict_checked``; alignment fitted on them), and ``test_checked_*``, the held-out photos' under it.
        ``robust_*``: every key above again under the inlier refit of its alignment (``fit_camera_alignment_inliers``,
        views within 15 deg, fitted on the same training views), with ``robust_inlier_share`` /
        ``robust_refined_inlier_share`` the share of training views it kept.
        """
        from gen_lifting.alignment import Alignment, fit_camera_alignment, fit_camera_alignment_inliers, pose_errors

        if self.uses_dataset_poses:
            return {}
        poses = self.show_predicted_poses()
        dm = self.datamanager
        pred, gt = poses["train"].double(), dm.dataset_camera_to_worlds("train").double()
        gt_held_out = dm.dataset_camera_to_worlds("eval")
        refined = None
        if self.model.refining:
            assert self.model.pose_refinement is not None
            refined = self.model.pose_refinement.c2w().detach().double()
        checked = None
        if self.config.candidate_check_pixels > 0:
            checked = {"train": self.predict_checked(dm.train_images)[0].double(),
                       "test": self.predict_checked(dm.eval_images)[0].double()}
        mode = self.pose_alignment_mode
        errors: Dict[str, float] = {}

        def add(prefix: str, scores: Dict[str, float]) -> None:
            errors.update({prefix + key: value for key, value in scores.items()})

        def fit(cameras: Tensor, tag: str, name: str) -> Alignment:
            if not tag:
                return fit_camera_alignment(cameras, gt, mode)
            alignment, inliers = fit_camera_alignment_inliers(cameras, gt, mode)
            errors[f"{tag}{name}inlier_share"] = inliers.double().mean().item()
            return alignment

        # unprefixed: the least-squares alignment; robust_*: the same keys under its inlier refit (views within 15 deg,
        # alignment.fit_camera_alignment_inliers), so that a few flipped views do not tilt every other view's score
        for tag in ("", "robust_"):
            alignment = fit(pred, tag, "")  # fitted once: scores these views, then the held-out ones
            add(tag, pose_errors(pred, gt, alignment=alignment))
            add(f"{tag}test_", pose_errors(poses[dm.test_split], gt_held_out, alignment=alignment))
            field_alignment = alignment  # the frame of the cameras the field is trained with
            if checked is not None:
                checked_alignment = fit(checked["train"], tag, "checked_")
                add(f"{tag}checked_", pose_errors(checked["train"], gt, alignment=checked_alignment))
                add(f"{tag}test_checked_", pose_errors(checked["test"], gt_held_out, alignment=checked_alignment))
            if refined is not None:
                field_alignment = fit(refined, tag, "refined_")
                add(f"{tag}refined_", pose_errors(refined, gt, alignment=field_alignment))
            if refined_held_out is not None:
                add(f"{tag}test_refined_", pose_errors(refined_held_out, gt_held_out, alignment=field_alignment))
        return {key: float(value) for key, value in errors.items()}

    @profiler.time_function
    def get_average_eval_image_metrics(
        self, step: Optional[int] = None, output_path: Optional[Path] = None, get_std: bool = False
    ) -> Dict[str, float]:
        """PSNR / SSIM / LPIPS of every held-out image rendered from its *predicted* pose, plus pose errors.

        With ``test_time_refine_steps`` also from its test-time refined pose (``psnr_refined``, ``ssim_refined``,
        ``lpips_refined``; renders ``eval_refined_*.png``) and the refined poses' errors (``test_refined_*``)."""
        self.eval()
        loader = self.datamanager.fixed_indices_eval_dataloader
        refined_held_out = None
        if self.config.test_time_refine_steps > 0 and not self.uses_dataset_poses:
            refined_held_out = self.refine_held_out_poses()
        per_image = []
        if output_path is not None:
            output_path.mkdir(parents=True, exist_ok=True)
        with Progress(TextColumn("[progress.description]{task.description}"), BarColumn(), TimeElapsedColumn(),
                      MofNCompleteColumn(), transient=True) as progress:
            task = progress.add_task("[green]Posing and rendering held-out images...", total=len(loader))
            for idx, (camera, batch) in enumerate(loader):
                start = time()
                outputs = self.model.get_outputs_for_camera(self.eval_camera(camera, batch))
                metrics, images = self.model.get_image_metrics_and_images(outputs, batch)
                metrics["fps"] = 1.0 / max(time() - start, 1e-9)
                if refined_held_out is not None:
                    view = int(batch["image_idx"])
                    refined_camera = self.model.cameras_from_c2w(refined_held_out[view:view + 1]).to(self.device)
                    refined_metrics, refined_images = self.model.get_image_metrics_and_images(
                        self.model.get_outputs_for_camera(refined_camera), batch)
                    metrics.update({f"{key}_refined": value for key, value in refined_metrics.items()})
                    images.update({f"refined_{key}": image for key, image in refined_images.items()})
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
        result.update(self.evaluate_poses(refined_held_out))
        self.train()
        return result

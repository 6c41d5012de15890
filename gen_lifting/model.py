"""gen-lifting model: a pose encoder and a NeRF trained together inside a DDPM (thesis ch. 3).

Training (``forward`` on a batch dict from GenLiftingDataManager):
  1. the pose encoder reads x_t, t and proposes K cameras with scores;
  2. every candidate is rendered on a few random pixels (no gradients) and the one with the lowest
     photometric error wins;
  3. the winner alone is rendered on the full ray batch with gradients: loss = ||render - x_0||^2
     + lambda * CE(scores, argmin).
A batch that carries ``camera_to_worlds`` (gen-lifting-oracle) is rendered from those poses instead.
Anything else (viewer, ns-render, ns-eval) goes through nerfstudio's usual ``get_outputs(ray_bundle)``; a dataset
camera (tagged by the datamanager) is rendered from the pose the model predicts for its photo.
Beyond the thesis and off by default: pose refinement after discovery (``pose_refinement_start_step``,
gen_lifting/refinement.py), where the field learns from the encoder's poses corrected by nerfstudio's CameraOptimizer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Dict, List, Literal, Optional, Tuple, Type, Union

import torch
import torch.nn.functional as F
import tyro
from jaxtyping import Bool, Float, Int
from nerfstudio.cameras.camera_optimizers import CameraOptimizerConfig
from nerfstudio.cameras.cameras import Cameras, CameraType
from nerfstudio.cameras.rays import RayBundle
from nerfstudio.engine.callbacks import TrainingCallback, TrainingCallbackAttributes, TrainingCallbackLocation
from nerfstudio.field_components.field_heads import FieldHeadNames
from nerfstudio.model_components.ray_samplers import UniformSampler
from nerfstudio.model_components.renderers import AccumulationRenderer, DepthRenderer, RGBRenderer
from nerfstudio.models.base_model import Model, ModelConfig
from nerfstudio.utils import colormaps
from torch import Tensor
from torch.nn import Parameter
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure
from typing_extensions import Annotated

from gen_lifting.datamanager import SPLIT_CODES, VIEW_KEY
from gen_lifting.grid_field import GridFieldConfig
from gen_lifting.hash_field import HashFieldConfig
from gen_lifting.occupancy import OccupancySampling, OccupancySamplingConfig
from gen_lifting.pose_encoder import PoseEncoderConfig
from gen_lifting.proposal import ProposalSampling, ProposalSamplingConfig
from gen_lifting.refinement import CorrectionPivot, PoseRefinement, frozen_parameters
from gen_lifting.synthetic_views import nearest_candidate_loss


FieldConfig = Union[
    Annotated[GridFieldConfig, tyro.conf.subcommand("grid")],
    Annotated[HashFieldConfig, tyro.conf.subcommand("hash")],
]
"""The pluggable fields: both build a nerfstudio ``Field`` from the scene's aabb."""


@dataclass
class GenLiftingModelConfig(ModelConfig):
    """Pose encoder + radiance field, trained only to denoise."""

    _target: Type = field(default_factory=lambda: GenLiftingModel)
    pose_encoder: PoseEncoderConfig = field(default_factory=PoseEncoderConfig)
    """Encoder that predicts candidate cameras and their scores from the noisy image."""
    sampler: Literal["uniform", "proposal", "occupancy"] = "uniform"
    """'uniform': ``num_samples`` stratified samples per ray (CPU presets). 'proposal': nerfstudio's proposal-network
    importance sampling, as in nerfacto (``--pipeline.model.proposal.*``; pure torch or tinycudann). 'occupancy':
    nerfacc's occupancy grid and volume rendering, as in instant-ngp (``--pipeline.model.occupancy.*``; CUDA only)."""
    num_samples: int = 48
    """Samples per ray of the uniform sampler (stratified during training)."""
    # (before ``field``: that attribute shadows dataclasses.field in the class body)
    proposal: ProposalSamplingConfig = field(default_factory=ProposalSamplingConfig)
    """Proposal sampling, used when ``sampler='proposal'``."""
    occupancy: OccupancySamplingConfig = field(default_factory=OccupancySamplingConfig)
    """Occupancy-grid sampling, used when ``sampler='occupancy'``."""
    pose_refinement_start_step: int = 0
    """Beyond the thesis (gen_lifting/refinement.py): from this step on, each training photo's camera is the encoder's
    pose of it (snapshot at this step) times a learned CameraOptimizer correction, and the field learns from those
    cameras (0 = off, the thesis method)."""
    pose_refinement_reselect_ratio: float = 0.0
    """Beyond the thesis, during pose refinement (0 = off): a training photo's refined camera jumps to the encoder's
    best candidate of the current step when that candidate renders the photo's score pixels with less than this
    fraction of the refined camera's error (e.g. 0.5). The refined camera becomes one more candidate of the method's
    min over K, so a photo whose snapshot was grossly wrong is not stuck with it while the encoder improves."""
    pose_refinement_translation: bool = True
    """Pose refinement (training and test-time): with False each correction is a rotation about the world origin
    only, its translation held at zero, so a camera keeps its distance to the scene centre and, like the 360
    candidates (gen_lifting/cameras.py), keeps looking at the origin; it can still orbit and roll. For 360 scenes;
    forward-facing cameras need the translation."""
    pose_refinement_about: CorrectionPivot = "origin"
    """Pose refinement (training and test-time): where a correction turns a camera. 'origin' (ours): about the world
    origin, one rotation for the orbit errors of 360 candidates; 'camera' (``CameraOptimizer.apply_to_camera``'s
    rule): the camera's axes turn about its own centre and the translation shifts that centre."""
    camera_optimizer: CameraOptimizerConfig = field(default_factory=lambda: CameraOptimizerConfig(mode="SO3xR3"))
    """nerfstudio's per-image pose correction used by the pose refinement (only built when it is on; its optimiser
    is the ``camera_opt`` group of ``--optimizers``)."""
    refinement_field_from_encoder: bool = False
    """During pose refinement, let the encoder's min-over-K render train the field too (default: only the refined
    cameras train the field; the encoder's render trains the encoder alone)."""
    refinement_distill_mult: float = 0.0
    """Ours (0 = off): during pose refinement, also pull the encoder's winning candidate of each training photo
    toward that photo's refined camera (mean squared difference of the 3x4 camera-to-world matrices, the refined
    camera held fixed), weighted by alpha_bar(t), the share of signal left in the encoder's input: the encoder is
    asked for the exact pose where it can see the photo, not where x_t is mostly noise. Aim: the encoder alone
    poses new photos about as well as the refinement did. The refined cameras are the model's own (no dataset pose
    is read)."""
    synthetic_pose_views: int = 0
    """Ours (0 = off; needs pose refinement): during refinement the encoder also learns from this many renders of the
    field at directions of refined training cameras jittered by up to ``synthetic_pose_jitter_deg``, each labelled
    with its own camera (no dataset pose; gen_lifting/synthetic_views.py): views between the photos, so that the
    encoder alone poses new photos better. Each step noises ``images_per_batch`` of them like the photos."""
    synthetic_pose_refresh_steps: int = 250
    """Re-render the synthetic views every this many steps (the field sharpens during refinement)."""
    synthetic_pose_jitter_deg: float = 15.0
    """Largest angle (on the sphere about the origin) between a synthetic view and the refined camera it is drawn
    near (lego's 100 training cameras lie ~6 deg from their nearest neighbour; held-out views fall between them)."""
    synthetic_pose_jitter_spacing_mult: float = 0.0
    """Ours (0 = off: the jitter is ``synthetic_pose_jitter_deg``): the jitter becomes this many times the spacing of
    the training photos spread evenly over the candidates' layout, sqrt(2 pi / N) rad on the upper hemisphere, where
    that is larger, so that sparse photo sets get views across their wider gaps (100 photos: 14.4 deg, under the
    15-deg floor; 25: 28.7)."""
    candidate_up_from_refined: bool = False
    """Ours (off: the thesis' fixed world-up z): during pose refinement, every ``synthetic_pose_refresh_steps`` steps
    the candidates' (and synthetic views') zero-roll look-at takes the world-up of the refined cameras
    (``cameras.fit_world_up``). The refined cameras of lego runs look at the origin but about an up tilted 2-5 deg from
    z (the field sits tilted), so a look-at camera about z at a refined camera's exact direction is 2-4 deg from the
    truth: a floor under the encoder's error (docs/lifting.md, R43)."""
    synthetic_pose_mult: float = 1.0
    """Weight of the synthetic views' pose loss (alpha_bar-weighted squared chord between the nearest candidate's
    direction and the label; their score loss is weighted by ``ce_loss_mult`` like the photos')."""
    field: tyro.conf.AvoidSubcommands[FieldConfig] = field(default_factory=GridFieldConfig)
    """Radiance field: a dense voxel grid (CPU presets) or nerfstudio's NerfactoField (gen-lifting-gpu; tinycudann
    when installed). The method picks the kind; its flags are ``--pipeline.model.field.*``."""
    background_color: Literal["white", "black"] = "white"
    """Colour behind the scene (blender scenes are composited on white)."""
    ce_loss_mult: float = 0.1
    """lambda, weight of CE(scores, argmin) (paper: 0.1)."""
    tv_loss_mult: float = 0.0
    """Weight of the total-variation prior on the field's grids."""
    tv_decay_start_step: int = 0
    """Ours (0 = off: the TV weight stays ``tv_loss_mult``). From this step on the TV weight falls linearly to 0 over
    ``tv_decay_steps``: the prior that helps poses form early also blurs the field, and a blurred field gives the
    pose refinement a flat photometric error to descend (the issue's "decay the TV prior once poses settle")."""
    tv_decay_steps: int = 1000
    """Steps over which the TV weight falls to 0 once ``tv_decay_start_step`` is reached."""
    random_route_prob: float = 0.0
    """Early exploration: chance that an image's gradient goes to a random candidate instead of the argmin
    (linearly decayed to 0 over ``random_route_steps``; the CE target stays the argmin)."""
    random_route_steps: int = 0
    """Steps over which ``random_route_prob`` decays to 0."""
    random_route_moves_camera: bool = True
    """Ours: whether a randomly routed image's render also moves the camera it was routed to. False (the CPU presets):
    that render trains the field only (its camera is detached) and the cameras learn from their best-of-K renders
    alone. With True, candidates explored by photos of every azimuth collapsed to near-constant cameras high toward
    the top view, and discovery failed on 3 of 9 lego seeds (docs/lifting.md)."""
    field_max_t: int = 0
    """Ours, not the thesis' (0 = off, the thesis: every image trains the field). Only images noised to t below this
    train the radiance field; the noisier ones train the pose encoder alone (their render still passes gradients to
    the cameras). At large t the encoder cannot see the pose, so its best-of-K camera can be far off, and a field
    fitted to those renders blurs. Training photos only; the oracle and pose refinement are unaffected."""
    score_chunk_rays: int = 8192
    """Candidate scoring renders at most this many rays at once (bounds memory: K x images x score pixels rays
    with a hash-grid field can need tens of GB in one pass)."""
    viewer_frustum_every: int = 100
    """Redraw the predicted training cameras in the viewer every N steps (0 = never)."""


def gather_pixels(
    images: Float[Tensor, "batch height width 3"], pixels: Int[Tensor, "batch count 2"]
) -> Float[Tensor, "batch count 3"]:
    """images[b, y, x] for every (y, x) in pixels[b]."""
    b = torch.arange(images.shape[0], device=images.device)[:, None]
    return images[b, pixels[..., 0], pixels[..., 1]]


class GenLiftingModel(Model):
    config: GenLiftingModelConfig

    def populate_modules(self) -> None:
        super().populate_modules()
        self.pose_encoder = self.config.pose_encoder.setup()
        self.field = self.config.field.setup(aabb=self.scene_box.aabb)
        self.sampler: Optional[UniformSampler] = None  # exactly one of the three is built
        self.proposal: Optional[ProposalSampling] = None
        self.occupancy: Optional[OccupancySampling] = None
        if self.config.sampler == "proposal":
            self.proposal = self.config.proposal.setup(aabb=self.scene_box.aabb)
        elif self.config.sampler == "occupancy":  # CUDA only: a one-line error for a CPU run
            self.occupancy = self.config.occupancy.setup(aabb=self.scene_box.aabb, field=self.field,
                                                         device=self.kwargs.get("device"))
        else:
            self.sampler = UniformSampler(num_samples=self.config.num_samples)
        self.renderer_rgb = RGBRenderer(background_color=self.config.background_color)
        self.renderer_accumulation = AccumulationRenderer()
        self.renderer_depth = DepthRenderer()
        # fx, fy, cx, cy, width, height of the (shared) training intrinsics; set by the pipeline, saved with
        # the checkpoint so a loaded model can pose new photos without the dataset.
        self.register_buffer("intrinsics", torch.zeros(6))
        self.psnr = PeakSignalNoiseRatio(data_range=1.0)
        self.ssim = StructuralSimilarityIndexMeasure(data_range=1.0)
        from gen_lifting.lpips_offline import make_lpips  # AlexNet LPIPS that also works offline

        self.lpips = make_lpips()
        self.step = 0
        # Predicted poses of the dataset's photos by split name, set by the pipeline (``show_predicted_poses``):
        # derived from the weights and the images, so never saved.
        self.view_poses: Dict[str, Tensor] = {}
        # Optional pose refinement (snapshot buffer + CameraOptimizer); absent when off, so that the state dict, the
        # param groups and the loss of the thesis method are untouched.
        self.pose_refinement: Optional[PoseRefinement] = None
        if self.config.pose_refinement_start_step > 0:
            self.pose_refinement = PoseRefinement(self.num_train_data, self.config.camera_optimizer,
                                                  translation=self.config.pose_refinement_translation,
                                                  about=self.config.pose_refinement_about)

    def get_training_callbacks(
        self, training_callback_attributes: TrainingCallbackAttributes
    ) -> List[TrainingCallback]:
        def set_step(step: int) -> None:
            self.step = step
            if hasattr(self.field, "set_step"):
                self.field.set_step(step)

        callbacks = [TrainingCallback([TrainingCallbackLocation.BEFORE_TRAIN_ITERATION], set_step)]
        if self.proposal is not None:
            callbacks += self.proposal.training_callbacks()
        if self.occupancy is not None:  # the grid learns from the field once per step, never from a render
            callbacks += self.occupancy.training_callbacks()
        trainer, pipeline = training_callback_attributes.trainer, training_callback_attributes.pipeline
        if self.config.viewer_frustum_every > 0 and trainer is not None and pipeline is not None:
            from gen_lifting.viewer_frustums import update_viewer_frustums

            def draw(step: int) -> None:
                if trainer.viewer_state is not None:
                    update_viewer_frustums(pipeline, trainer.viewer_state)

            callbacks.append(TrainingCallback([TrainingCallbackLocation.AFTER_TRAIN_ITERATION], draw,
                                              update_every_num_iters=self.config.viewer_frustum_every))
        return callbacks

    def route_prob(self) -> float:
        cfg = self.config
        if cfg.random_route_prob <= 0 or cfg.random_route_steps <= 0:
            return 0.0
        return cfg.random_route_prob * max(0.0, 1.0 - self.step / cfg.random_route_steps)

    def tv_weight(self) -> float:
        """``tv_loss_mult``, decayed linearly to 0 from ``tv_decay_start_step`` over ``tv_decay_steps`` when set."""
        cfg = self.config
        if cfg.tv_decay_start_step <= 0 or self.step < cfg.tv_decay_start_step:
            return cfg.tv_loss_mult
        return cfg.tv_loss_mult * max(0.0, 1.0 - (self.step - cfg.tv_decay_start_step) / max(cfg.tv_decay_steps, 1))

    # ----------------------------------------------------------------------------------- parameters
    def get_param_groups(self) -> Dict[str, List[Parameter]]:
        # the proposal fields share the radiance field's optimizer (nerfacto gives both the same Adam settings)
        proposal = list(self.proposal.parameters()) if self.proposal is not None else []
        groups = {"fields": list(self.field.parameters()) + proposal}
        self.pose_encoder.get_param_groups(groups)
        if self.pose_refinement is not None:
            self.pose_refinement.camera_optimizer.get_param_groups(groups)  # "camera_opt", as in nerfacto
        return groups

    @property
    def refining(self) -> bool:
        """Training-time pose refinement is on and its snapshot has been taken."""
        return self.pose_refinement is not None and self.pose_refinement.is_started

    # ----------------------------------------------------------------------------------- rendering
    def get_outputs(self, ray_bundle: RayBundle) -> Dict[str, Tensor]:
        if self.occupancy is not None:  # packed samples, rendered with nerfacc
            return self.occupancy(ray_bundle, self.renderer_rgb)
        if self.proposal is not None:
            samples, weights_list, samples_list = self.proposal(ray_bundle)
        else:
            assert self.sampler is not None
            samples = self.sampler(ray_bundle)
        field_out = self.field(samples)
        weights = samples.get_weights(field_out[FieldHeadNames.DENSITY])
        outputs = {
            "rgb": self.renderer_rgb(rgb=field_out[FieldHeadNames.RGB], weights=weights),
            "accumulation": self.renderer_accumulation(weights=weights),
            "depth": self.renderer_depth(weights=weights, ray_samples=samples),
        }
        if self.proposal is not None and self.training and torch.is_grad_enabled():
            outputs["weights_list"] = weights_list + [weights]
            outputs["ray_samples_list"] = samples_list + [samples]
        return outputs

    def cameras_from_c2w(self, c2w: Float[Tensor, "num 3 4"]) -> Cameras:
        """nerfstudio Cameras with the learned poses and the training intrinsics."""
        fx, fy, cx, cy, w, h = self.intrinsics.tolist()
        if w <= 0:
            raise RuntimeError("model intrinsics are unset: build the model through GenLiftingPipeline")
        n = c2w.shape[0]
        ones = torch.ones(n, 1, device=c2w.device)
        return Cameras(camera_to_worlds=c2w, fx=fx * ones, fy=fy * ones, cx=cx * ones, cy=cy * ones,
                       width=int(w), height=int(h), camera_type=CameraType.PERSPECTIVE)

    def render_pixel_outputs(self, c2w: Float[Tensor, "num 3 4"], pixels: Int[Tensor, "num count 2"]) -> Dict:
        """``get_outputs`` for the given pixels (row, col) of each camera, rays flattened camera-major."""
        n, count = pixels.shape[:2]
        cams = self.cameras_from_c2w(c2w)
        idx = torch.arange(n, device=c2w.device).repeat_interleave(count)[:, None]
        coords = pixels.reshape(-1, 2).float() + 0.5  # nerfstudio samples pixel centres
        rays = cams.generate_rays(camera_indices=idx, coords=coords)
        return super().forward(rays)

    def render_pixels(
        self, c2w: Float[Tensor, "num 3 4"], pixels: Int[Tensor, "num count 2"]
    ) -> Float[Tensor, "num count 3"]:
        """Render the given pixels (row, col) of each camera; differentiable w.r.t. c2w and the field."""
        return self.render_pixel_outputs(c2w, pixels)["rgb"].reshape(*pixels.shape[:2], 3)

    # ----------------------------------------------------------------------------------- training
    def forward(self, ray_bundle: Union[RayBundle, Cameras, Dict[str, Tensor]]) -> Dict[str, Tensor]:
        """A batch dict (training through the pipeline, also under DDP) or nerfstudio's rays / cameras."""
        if isinstance(ray_bundle, dict):
            return self.get_train_outputs(ray_bundle)
        return super().forward(ray_bundle)

    def get_outputs_for_camera(self, camera: Cameras, obb_box=None) -> Dict[str, Tensor]:
        """nerfstudio's render of a camera; a dataset camera stands for its photo and is rendered from the pose the
        model predicts for that photo (``ns-render dataset``), never from the dataset's pose."""
        views = (camera.metadata or {}).get(VIEW_KEY)
        if views is not None:
            camera = self.camera_at_predicted_pose(camera, views)
        return super().get_outputs_for_camera(camera, obb_box=obb_box)

    def camera_at_predicted_pose(self, camera: Cameras, views: Int[Tensor, "num 2"]) -> Cameras:
        """``camera`` (its intrinsics, untagged) at the predicted pose of each view (split code, image index)."""
        names = {code: name for name, code in SPLIT_CODES.items()}
        poses = []
        for code, index in views.reshape(-1, 2).tolist():
            split = names[code]
            if split not in self.view_poses:
                raise ValueError(
                    f"this gen-lifting run has no predicted poses for its {split!r} photos (it has: "
                    f"{', '.join(self.view_poses) or 'none'}); render the split the run was loaded for, or use "
                    "`ns-eval --render-output-path DIR`, which renders every held-out photo from its predicted pose")
            poses.append(self.view_poses[split][index])
        c2w = torch.stack(poses).to(camera.camera_to_worlds).reshape(camera.camera_to_worlds.shape)
        return dataclasses.replace(camera, camera_to_worlds=c2w, metadata=None)

    def get_train_outputs(self, batch: Dict[str, Tensor]) -> Dict[str, Tensor]:
        if "camera_to_worlds" in batch:  # gen-lifting-oracle: the dataset's poses, one camera per image
            c2w = batch["camera_to_worlds"][:, None]
            scores = torch.zeros(c2w.shape[:2], device=c2w.device)
        else:
            c2w, scores = self.pose_encoder(batch["x_t"], batch["t"])
        bsz, k = scores.shape
        explore = None  # photos routed to a random candidate this step (early exploration)
        if k > 1:
            cand_err = self.candidate_errors(c2w, batch["image"], batch["score_pixels"])
            winner = cand_err.argmin(dim=1)
            routed = winner
            p = self.route_prob() if self.training else 0.0
            if p > 0:
                explore = torch.rand(bsz, device=c2w.device) < p
                routed = torch.where(explore, torch.randint(0, k, (bsz,), device=c2w.device), winner)
        else:
            cand_err = torch.zeros(bsz, 1, device=c2w.device)
            winner = routed = torch.zeros(bsz, dtype=torch.long, device=c2w.device)
        best = c2w[torch.arange(bsz, device=c2w.device), routed]
        if explore is not None and not self.config.random_route_moves_camera:
            best = torch.where(explore[:, None, None], best.detach(), best)
        # pose refinement (training batches only, never the oracle's): the refined cameras train the field; the
        # encoder's render trains the encoder alone unless ``refinement_field_from_encoder``
        refine = self.refining and self.training and "camera_to_worlds" not in batch
        freeze = refine and not self.config.refinement_field_from_encoder
        gate = (self.config.field_max_t > 0 and self.training and not refine and "camera_to_worlds" not in batch)
        if gate:
            render = self.render_gated(best, batch["loss_pixels"], batch["t"] < self.config.field_max_t)
        else:
            with (frozen_parameters(self.field_parameters()) if freeze else contextlib.nullcontext()), \
                    (self.scoring_pass() if refine else contextlib.nullcontext()):
                render = self.render_pixel_outputs(best, batch["loss_pixels"])
        target = gather_pixels(batch["image"], batch["loss_pixels"])
        outputs = {"rgb": render["rgb"].reshape(target.shape), "target": target, "scores": scores, "winner": winner,
                   "routed": routed, "cand_err": cand_err, "c2w": c2w}
        if refine:
            assert self.pose_refinement is not None
            if k > 1 and self.config.pose_refinement_reselect_ratio > 0:
                outputs["reselected"] = self.reselect_refined_cameras(batch, c2w.detach(), cand_err)
            refined_c2w = self.pose_refinement.c2w(batch["image_idx"])
            render = self.render_pixel_outputs(refined_c2w, batch["loss_pixels"])
            outputs["refined_rgb"] = render["rgb"].reshape(target.shape)
            if self.config.refinement_distill_mult > 0:
                outputs["distill_pred"] = best
                outputs["distill_target"] = refined_c2w.detach()
        if "synthetic_x_t" in batch and self.training:  # self-labelled renders (gen_lifting/synthetic_views.py)
            outputs["synthetic_c2w"], outputs["synthetic_scores"] = self.pose_encoder(batch["synthetic_x_t"],
                                                                                     batch["synthetic_t"])
        for key in ("weights_list", "ray_samples_list"):  # proposal sampling: its loss on the field's training render
            if key in render:
                outputs[key] = render[key]
        return outputs

    def render_gated(
        self, c2w: Float[Tensor, "batch 3 4"], pixels: Int[Tensor, "batch count 2"], learn: Bool[Tensor, "batch"]
    ) -> Dict[str, Tensor]:
        """``field_max_t``: the rows where ``learn`` holds are rendered with gradients into the field, the others
        with the field frozen (gradients reach their cameras only). ``rgb`` comes back in the batch's row order;
        a proposal sampler's lists come from the field-training render."""
        if bool(learn.all()) or not bool(learn.any()):
            with (contextlib.nullcontext() if bool(learn.all()) else frozen_parameters(self.field_parameters())):
                return self.render_pixel_outputs(c2w, pixels)
        count = pixels.shape[1]
        trained = self.render_pixel_outputs(c2w[learn], pixels[learn])
        with frozen_parameters(self.field_parameters()), self.scoring_pass():
            frozen = self.render_pixel_outputs(c2w[~learn], pixels[~learn])
        rgb = torch.empty(c2w.shape[0], count, 3, dtype=trained["rgb"].dtype, device=c2w.device)
        rgb = rgb.index_put((learn.nonzero()[:, 0],), trained["rgb"].reshape(-1, count, 3))
        rgb = rgb.index_put(((~learn).nonzero()[:, 0],), frozen["rgb"].reshape(-1, count, 3))
        out = {"rgb": rgb.reshape(-1, 3)}
        out.update({key: trained[key] for key in ("weights_list", "ray_samples_list") if key in trained})
        return out

    @torch.no_grad()
    def candidate_errors(
        self, c2w: Float[Tensor, "batch cand 3 4"], images: Float[Tensor, "batch height width 3"],
        pixels: Int[Tensor, "batch count 2"],
    ) -> Float[Tensor, "batch cand"]:
        """Mean squared error of every candidate camera's render of ``pixels`` against its photo (the winner rule of
        training: min over K), without gradients, in chunks of ``score_chunk_rays`` rays."""
        bsz, k = c2w.shape[:2]
        with self.scoring_pass():
            pix = pixels.repeat_interleave(k, dim=0)
            cams = c2w.detach().reshape(bsz * k, 3, 4)
            rows = max(1, self.config.score_chunk_rays // pix.shape[1])
            rgb = torch.cat([self.render_pixels(cams[i:i + rows], pix[i:i + rows]) for i in range(0, bsz * k, rows)])
        target = gather_pixels(images, pixels)
        return (rgb.reshape(bsz, k, -1, 3) - target[:, None]).pow(2).mean(dim=(-1, -2))

    @torch.no_grad()
    def reselect_refined_cameras(
        self, batch: Dict[str, Tensor], c2w: Float[Tensor, "batch cand 3 4"], cand_err: Float[Tensor, "batch cand"]
    ) -> Tensor:
        """``pose_refinement_reselect_ratio``: the refined camera of each batch photo is scored on the same clean
        score pixels as the K candidates; where the best candidate's error is below ratio x the refined one's, the
        photo's camera becomes that candidate. Returns how many photos jumped."""
        assert self.pose_refinement is not None
        idx = batch["image_idx"]
        with self.scoring_pass():
            rgb = self.render_pixels(self.pose_refinement.c2w(idx), batch["score_pixels"])
        target = gather_pixels(batch["image"], batch["score_pixels"])
        refined_err = (rgb - target).pow(2).mean(dim=(-1, -2))
        best_err, best = cand_err.min(dim=1)
        jump = best_err < self.config.pose_refinement_reselect_ratio * refined_err
        if jump.any():
            rows = torch.arange(c2w.shape[0], device=c2w.device)[jump]
            self.pose_refinement.move_to(idx[jump], c2w[rows, best[jump]])
        return jump.sum()

    def field_parameters(self) -> List[Parameter]:
        """The radiance field's parameters (and the proposal fields', which share its optimiser)."""
        return self.get_param_groups()["fields"]

    def scoring_pass(self):
        """Context for the no-gradient candidate renders: they must not use up the proposal sampler's update. (The
        occupancy grid needs none: no render writes it, see gen_lifting/occupancy.py.)"""
        return self.proposal.schedule_untouched() if self.proposal is not None else contextlib.nullcontext()

    def get_metrics_dict(self, outputs: Dict[str, Tensor], batch: Dict[str, Tensor]) -> Dict[str, Tensor]:
        metrics: Dict[str, Tensor] = {}
        if "winner" not in outputs:
            return metrics
        mse = (outputs["rgb"] - outputs["target"]).pow(2).mean()
        metrics["chosen_loss"] = mse.detach()
        # An oracle, not a test metric: the candidate is chosen by comparing every render with the clean image itself
        # (best of K), which no test photo allows. Held-out PSNR is ns-eval's ``psnr`` (render at the top-score pose).
        metrics["oracle_best_of_k_psnr"] = -10.0 * torch.log10(mse.detach().clamp_min(1e-10))
        if "refined_rgb" in outputs and self.pose_refinement is not None:
            refined_mse = (outputs["refined_rgb"] - outputs["target"]).pow(2).mean().detach()
            metrics["refined_pose_train_psnr"] = -10.0 * torch.log10(refined_mse.clamp_min(1e-10))
            self.pose_refinement.camera_optimizer.get_metrics_dict(metrics)
            if "reselected" in outputs:
                metrics["refined_reselected"] = outputs["reselected"].float()
        if "synthetic_c2w" in outputs:  # how far the encoder's nearest candidate is from a synthetic view's camera
            _, _, angle = nearest_candidate_loss(outputs["synthetic_c2w"].detach(), batch["synthetic_direction"],
                                                 batch["synthetic_alpha_bar"])
            metrics["synthetic_nearest_deg"] = angle.median()
        k = outputs["scores"].shape[1]
        if k > 1:
            metrics["score_argmax_is_argmin"] = (outputs["scores"].argmax(1) == outputs["winner"]).float().mean()
            usage = torch.bincount(outputs["winner"], minlength=k).float() / outputs["winner"].numel()
            metrics["candidate_usage_entropy"] = -(usage * usage.clamp_min(1e-12).log()).sum() / math.log(k)
            for i in range(k):
                metrics[f"candidate_usage/{i:02d}"] = usage[i]
        return metrics

    def get_loss_dict(self, outputs, batch, metrics_dict=None) -> Dict[str, Tensor]:
        if "winner" not in outputs:
            return {}
        loss = {"rgb_loss": F.mse_loss(outputs["rgb"], outputs["target"])}
        if "refined_rgb" in outputs and self.pose_refinement is not None:
            loss["refined_rgb_loss"] = F.mse_loss(outputs["refined_rgb"], outputs["target"])
            self.pose_refinement.camera_optimizer.get_loss_dict(loss)  # its L2 regulariser, as in nerfacto
        if "distill_pred" in outputs:
            per_image = (outputs["distill_pred"] - outputs["distill_target"]).pow(2).mean(dim=(1, 2))
            loss["pose_distill_loss"] = self.config.refinement_distill_mult * (batch["alpha_bar"] * per_image).mean()
        if "synthetic_c2w" in outputs:
            pose, nearest, _ = nearest_candidate_loss(outputs["synthetic_c2w"], batch["synthetic_direction"],
                                                      batch["synthetic_alpha_bar"])
            loss["synthetic_pose_loss"] = self.config.synthetic_pose_mult * pose
            if self.config.ce_loss_mult > 0:
                loss["synthetic_score_ce_loss"] = self.config.ce_loss_mult * F.cross_entropy(
                    outputs["synthetic_scores"], nearest)
        if outputs["scores"].shape[1] > 1 and self.config.ce_loss_mult > 0:
            loss["score_ce_loss"] = self.config.ce_loss_mult * F.cross_entropy(outputs["scores"], outputs["winner"])
        if self.proposal is not None and "weights_list" in outputs:
            loss["interlevel_loss"] = self.proposal.loss(outputs["weights_list"], outputs["ray_samples_list"])
        tv_weight = self.tv_weight()
        if tv_weight > 0 and hasattr(self.field, "total_variation"):
            loss["tv_loss"] = tv_weight * self.field.total_variation()
        return loss

    # ----------------------------------------------------------------------------------- inference
    @torch.no_grad()
    def predict_c2w(
        self, x_t: Float[Tensor, "batch 3 height width"], t: Int[Tensor, "batch"]
    ) -> Tuple[Float[Tensor, "batch 3 4"], Int[Tensor, "batch"]]:
        """The top-scoring candidate camera of each image (test-time rule) and its index."""
        c2w, scores = self.pose_encoder(x_t, t)
        top = scores.argmax(dim=1)
        return c2w[torch.arange(c2w.shape[0], device=c2w.device), top], top

    def get_image_metrics_and_images(
        self, outputs: Dict[str, Tensor], batch: Dict[str, Tensor]
    ) -> Tuple[Dict[str, float], Dict[str, Tensor]]:
        gt = batch["image"][..., :3].to(outputs["rgb"].device)
        rgb = outputs["rgb"]
        gt_chw, rgb_chw = gt.permute(2, 0, 1)[None], rgb.clamp(0, 1).permute(2, 0, 1)[None]
        metrics = {
            "psnr": float(self.psnr(rgb_chw, gt_chw)),
            "ssim": float(self.ssim(rgb_chw, gt_chw)),
            "lpips": float(self.lpips(rgb_chw, gt_chw)),
        }
        assert self.config.collider_params is not None
        depth = colormaps.apply_depth_colormap(outputs["depth"], accumulation=outputs["accumulation"],
                                               near_plane=self.config.collider_params["near_plane"],
                                               far_plane=self.config.collider_params["far_plane"])
        images = {"img": torch.cat([gt, rgb], dim=1), "accumulation": colormaps.apply_colormap(outputs["accumulation"]),
                  "depth": depth}
        return metrics, images

"""gen-lifting quality benchmark: every method gets the same wall-clock training budget on one scene.

    python benchmarks/lifting.py --budget-s 600 --scenes lego --methods gen-lifting gen-lifting-ae \
        gen-lifting-oracle nerfacto-gt-poses nerfacto-camopt-no-poses

Methods (every one is a registered nerfstudio method, trained by nerfstudio's Trainer with its callbacks)
  gen-lifting / gen-lifting-ae / gen-lifting-single : this package (poses never seen in training).
  gen-lifting-gpu          : the paper-scale GPU preset (hash-grid field); give it 128x128 views.
  gen-lifting-oracle / gen-lifting-single-oracle : the same field, sampler and trainer on the true poses (upper
                             bound; ``ns-train gen-lifting-oracle`` is the same code path).
  nerfacto-gt-poses        : nerfstudio's nerfacto with the true poses (upper bound, CPU-sized).
  nerfacto-camopt-no-poses : nerfacto + its CameraOptimizer (SO3xR3), every training camera starting at one
                             point of the sphere (the "refine-only" peer: poses that carry no information).
  colmap                   : the peer a user with unposed photos runs first: pycolmap (``pip install -e .[bench]``)
                             on the training images (RGBA composited on white, resized with Lanczos to each
                             ``--colmap-px`` long side from the scene's stored images), SIFT, exhaustive matching,
                             incremental mapping with the scene's intrinsics held fixed, CPU, ``--threads`` threads.
                             Rows ``colmap-<px>px``; the largest model is scored. Not a nerfstudio method: COLMAP
                             is the tool users run instead; no field, so PSNR / SSIM / LPIPS are null.
Test metrics: PSNR / SSIM / LPIPS (AlexNet) on held-out views; gen-lifting renders each from the pose it
predicts for that view, the others from the true test pose. Pose errors: training cameras after aligning
predicted to true cameras (rotation about the origin for 360 scenes, orientation + similarity for LLFF); held-out
(``test_*``): every held-out view's predicted pose under the alignment fitted on the training views.
colmap: training views only (no held-out poses); a similarity alignment of the registered views to the true cameras
(on centres for 360 scenes, on orientations for LLFF, as gen-lifting's forward-facing evaluation), and
``within_15deg`` is a share of ALL training views: an unregistered view counts as a miss. Ground truth is read only
for that evaluation (COLMAP gets images, focal length and principal point).
Optional pose refinement (``--set pipeline.model.pose_refinement_start_step=N pipeline.test_time_refine_steps=S``,
gen_lifting/refinement.py): the keys above stay the encoder's; ``refined_*`` (training views' refined cameras),
``test_refined_*`` and ``psnr_refined`` / ``ssim_refined`` / ``lpips_refined`` (held-out views after test-time
refinement) are added, and the table gets a "refined poses" line under the row.
Prints a table and writes JSON with machine, command and git commit.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np
import torch
from jaxtyping import Bool, Float
from torch import Tensor

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's gen_lifting, not whichever one the environment installed
REFINED_KEYS = ("psnr_refined", "ssim_refined", "lpips_refined", "refined_rot_err_median_deg", "refined_rot_err_mean_deg",
                "refined_within_15deg", "test_refined_rot_err_median_deg", "test_refined_rot_err_mean_deg",
                "test_refined_within_15deg")
"""Metrics of gen-lifting's optional pose refinement: training-time (``refined_*``, training views) and test-time
(``*_refined`` image metrics and ``test_refined_*``, held-out views); the unprefixed keys stay the encoder's."""
CENTRE_KEYS = ("center_angle_err_median_deg", "center_dist_median", "refined_center_angle_err_median_deg",
               "refined_center_dist_median")
"""Training cameras' centre errors (angle seen from the scene centre, distance in the dataset's units), encoder and
refined: they tell an orientation error at the right place from a camera in the wrong place."""


ROBUST_KEYS = tuple(f"robust_{key}" for key in (
    "inlier_share", "rot_err_median_deg", "within_15deg", "test_rot_err_median_deg", "test_within_15deg",
    "refined_inlier_share", "refined_rot_err_median_deg", "refined_within_15deg", "test_refined_rot_err_median_deg",
    "test_refined_within_15deg"))
"""The same pose errors under the inlier refit of the alignment (``GenLiftingPipeline.evaluate_poses``, views within
15 deg of the least-squares fit, fitted on training views only): a few flipped views no longer tilt every view's
score. The unprefixed keys keep the least-squares alignment."""


CHECKED_KEYS = ("checked_rot_err_median_deg", "checked_rot_err_mean_deg", "checked_within_15deg",
                "test_checked_rot_err_median_deg", "test_checked_rot_err_mean_deg", "test_checked_within_15deg",
                "robust_checked_rot_err_median_deg", "robust_test_checked_rot_err_median_deg")
"""With ``--pipeline.candidate-check-pixels``: the pose errors of the encoder's candidates chosen by the field's check
(``GenLiftingPipeline.predict_checked``) instead of the top score; training views (alignment fitted on them) and
held-out views under that alignment."""


def tagged_key(key: str, tag: str) -> str:
    """A pose metric's name for other poses of the same views, as ``evaluate_poses`` writes it:
    rot_err_median_deg -> TAG_rot_err_median_deg, test_within_15deg -> test_TAG_within_15deg."""
    return f"test_{tag}_{key[len('test_'):]}" if key.startswith("test_") else f"{tag}_{key}"


def refined_key(key: str) -> str:
    """The REFINED_KEYS name of a metric read from the refined poses (psnr -> psnr_refined, rot_err_median_deg ->
    refined_rot_err_median_deg, test_within_15deg -> test_refined_within_15deg)."""
    if key in ("psnr", "ssim", "lpips"):
        return f"{key}_refined"
    return tagged_key(key, "refined")


GEN_METHODS = ("gen-lifting", "gen-lifting-refine", "gen-lifting-ae", "gen-lifting-single", "gen-lifting-gpu",
               "gen-lifting-oracle", "gen-lifting-single-oracle")


def machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.node()} {platform.machine()} {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, {gpu}"


def git_commit() -> str:
    if os.environ.get("BENCH_COMMIT"):  # a copy of the tree without .git (e.g. a remote GPU machine)
        return os.environ["BENCH_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except OSError:
        return "unknown"


def write_result(out: Path, commit: str, **fields: Any) -> None:
    """Result JSON: machine, ``commit`` (read when the run started), the command line, then ``fields``; written
    atomically (a temp file, then ``os.replace``)."""
    payload = {"machine": machine(), "commit": commit,
               "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]), **fields}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, out)
    print(f"wrote {out}")


def set_path(obj: Any, dotted: str, value: Any) -> None:
    """``--set pipeline.model.field.resolution=32`` style overrides (JSON values)."""
    *parents, last = dotted.split(".")
    for name in parents:
        obj = obj[name] if isinstance(obj, dict) else getattr(obj, name)
    if isinstance(obj, dict):
        obj[last] = value
    else:
        setattr(obj, last, value)


def no_pose_copy(scene: Path, out: Path) -> Path:
    """Blender scene whose training cameras all sit at the first camera's pose (images untouched)."""
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val", "test"):
        meta = json.loads((scene / f"transforms_{split}.json").read_text())
        if split == "train":
            first = meta["frames"][0]["transform_matrix"]
            for frame in meta["frames"]:
                frame["transform_matrix"] = first
        for frame in meta["frames"]:
            frame["file_path"] = str((scene / frame["file_path"]).resolve())
        (out / f"transforms_{split}.json").write_text(json.dumps(meta))
    return out


def is_llff(scene: str) -> bool:
    from gen_lifting.datasets import resolve_data

    return (resolve_data(scene) / "poses_bounds.npy").is_file()


def runs_on(method: str, scene: str) -> bool:
    """gen-lifting-single(-oracle) is for forward-facing (LLFF) scenes, the rest of gen-lifting and nerfacto for 360;
    colmap for both."""
    return method == "colmap" or method.startswith("gen-lifting-single") == is_llff(scene)


def build_config(method: str, scene: str, args: argparse.Namespace, tmp: Path):
    from gen_lifting.datasets import resolve_data

    data = resolve_data(scene)
    if method in GEN_METHODS:
        import method_configs.gen_lifting as specs

        config = copy.deepcopy(getattr(specs, method.replace("-", "_")).config)
    elif method.startswith("nerfacto"):
        from nerfstudio.cameras.camera_optimizers import CameraOptimizerConfig
        from nerfstudio.configs.method_configs import method_configs
        from nerfstudio.data.datamanagers.base_datamanager import VanillaDataManagerConfig
        from nerfstudio.data.dataparsers.blender_dataparser import BlenderDataParserConfig

        config = copy.deepcopy(method_configs["nerfacto"])
        model = config.pipeline.model
        model.camera_optimizer = CameraOptimizerConfig(mode="SO3xR3" if "camopt" in method else "off")
        model.background_color = "white"
        model.disable_scene_contraction = True
        model.num_nerf_samples_per_ray = 24
        model.num_proposal_samples_per_ray = (64, 32)
        model.near_plane, model.far_plane = 2.0, 6.0
        model.eval_num_rays_per_chunk = 4096
        config.pipeline.datamanager = VanillaDataManagerConfig(dataparser=BlenderDataParserConfig(),
                                                               train_num_rays_per_batch=1024)
        config.mixed_precision = False
        if "camopt" in method:
            data = no_pose_copy(data, tmp / "no_pose_scene")
    else:
        raise SystemExit(f"error: unknown method {method!r}")
    config.pipeline.datamanager.data = data
    if hasattr(config.pipeline.datamanager, "dataparser"):
        config.pipeline.datamanager.dataparser.data = data
    config.machine.device_type = args.device
    config.output_dir = tmp / "outputs"
    config.vis = "tensorboard"
    config.max_num_iterations = 10**9
    if hasattr(config.pipeline.datamanager, "seed"):
        config.pipeline.datamanager.seed = args.seed
    for item in args.set:
        key, _, raw = item.partition("=")
        set_path(config, key, json.loads(raw))
    config.set_timestamp()
    return config


def train(method: str, config, budget_s: float, log_every_s: float, max_steps: int = 0):
    """Train for ``budget_s`` seconds of wall clock (setup excluded), or until ``max_steps`` steps if that comes
    first (0 = no step limit); returns the trainer and step count.

    The loop is nerfstudio's ``Trainer.train`` body for every method (callbacks before and after each
    ``train_iteration``), stopped by the clock instead of an iteration count, without checkpoints or evaluation.
    """
    from nerfstudio.engine.callbacks import TrainingCallbackLocation

    from gen_lifting.diagnostics import camera_spread
    from gen_lifting.lpips_offline import nerfstudio_models_offline

    trainer = config.setup(local_rank=0, world_size=1)
    with nerfstudio_models_offline():  # nerfacto builds torchmetrics' LPIPS, which loads AlexNet through torch.hub
        trainer.setup(test_mode="test")
    pipe = trainer.pipeline
    start, step, next_log = time.time(), 0, 0.0
    while time.time() - start < budget_s and (max_steps <= 0 or step < max_steps):
        for cb in trainer.callbacks:
            cb.run_callback_at_location(step, location=TrainingCallbackLocation.BEFORE_TRAIN_ITERATION)
        loss, _, metrics = trainer.train_iteration(step)
        for cb in trainer.callbacks:
            cb.run_callback_at_location(step, location=TrainingCallbackLocation.AFTER_TRAIN_ITERATION)
        step += 1
        elapsed = time.time() - start
        if log_every_s > 0 and elapsed >= next_log:
            next_log += log_every_s
            line = f"  [{method}] {elapsed:6.0f}s step {step:6d} loss {loss.item():.4f}"
            pe = pipe.evaluate_poses() if method in GEN_METHODS else {}
            if pe:
                line += (f" rot_med {pe['rot_err_median_deg']:6.1f} within15 {pe['within_15deg']:.2f}"
                         f" test_rot_med {pe['test_rot_err_median_deg']:6.1f}"
                         f" usage_entropy {float(metrics.get('candidate_usage_entropy', 0)):.2f}")
                spread = camera_spread(pipe)  # ground-truth-free: do the cameras collapse? (gen_lifting/diagnostics)
                if spread:
                    line += (f" spread {spread['top_spread_deg']:5.1f}"
                             f" cand_moves {spread['candidate_dependence_deg']:5.1f}")
                if "refined_rot_err_median_deg" in pe:  # optional pose refinement (gen_lifting/refinement.py)
                    line += (f" refined_rot_med {pe['refined_rot_err_median_deg']:6.1f}"
                             f" refined_within15 {pe['refined_within_15deg']:.2f}")
            print(line, flush=True)
    return trainer, step, time.time() - start


@torch.no_grad()
def evaluate(method: str, trainer, eval_images: int, scene: Path) -> Dict[str, float]:
    from nerfstudio.data.utils.dataloaders import FixedIndicesEvalDataloader

    pipe = trainer.pipeline
    dm = pipe.datamanager
    n = len(dm.eval_dataset) if eval_images <= 0 else min(eval_images, len(dm.eval_dataset))
    step = max(1, len(dm.eval_dataset) // n)
    dm.fixed_indices_eval_dataloader = FixedIndicesEvalDataloader(
        input_dataset=dm.eval_dataset, image_indices=tuple(range(0, step * n, step)), device=dm.device)
    raw = pipe.get_average_eval_image_metrics()
    keep = ("psnr", "ssim", "lpips", "rot_err_median_deg", "rot_err_mean_deg", "within_15deg",
            *CENTRE_KEYS, "test_rot_err_median_deg", "test_rot_err_mean_deg", "test_within_15deg",
            # optional pose refinement (gen_lifting/refinement.py): present only when it is on
            *REFINED_KEYS, *ROBUST_KEYS, *CHECKED_KEYS)
    result = {k: float(raw[k]) for k in keep if k in raw}
    if method == "nerfacto-camopt-no-poses":
        result.update(camera_optimizer_pose_errors(pipe, scene))
    return result


def true_train_c2w(scene: Path) -> torch.Tensor:
    from nerfstudio.data.dataparsers.blender_dataparser import BlenderDataParserConfig

    outputs = BlenderDataParserConfig(data=scene).setup().get_dataparser_outputs("train")
    return outputs.cameras.camera_to_worlds


def camera_optimizer_pose_errors(pipe, original_scene: Path) -> Dict[str, float]:
    """Pose errors of nerfacto's optimised training cameras (start pose + learned correction) vs truth."""
    from gen_lifting.alignment import pose_errors

    cams = pipe.datamanager.train_dataset.cameras
    idx = torch.arange(len(cams), device=pipe.device)
    start = cams.camera_to_worlds.to(pipe.device)
    adj = pipe.model.camera_optimizer(idx)  # [N, 3, 4] correction
    rot = start[:, :, :3] @ adj[:, :, :3]
    trans = start[:, :, 3:] + adj[:, :, 3:]
    pred = torch.cat([rot, trans], dim=-1)
    gt = true_train_c2w(original_scene).to(pred)
    errors = pose_errors(pred, gt, mode="rotation")
    return {k: errors[k] for k in ("rot_err_median_deg", "rot_err_mean_deg", "within_15deg")}


BENCH_EXTRA = "pycolmap is not installed: the colmap baseline needs the bench extra: pip install -e '.[bench]'"


def import_pycolmap():
    """pycolmap, or a one-line SystemExit naming the missing extra."""
    try:
        import pycolmap
    except ImportError:
        raise SystemExit(f"error: {BENCH_EXTRA}") from None
    return pycolmap


def scene_train_views(scene: str):
    """The training split as the methods see it: (image files, nerfstudio Cameras with the true poses), from the
    scene's own dataparser at its stored resolution (no downscaling)."""
    from gen_lifting.datasets import resolve_data

    data = resolve_data(scene)
    if is_llff(scene):
        from gen_lifting.llff_dataparser import LLFFDataParserConfig

        parser = LLFFDataParserConfig(data=data, downscale_factor=1)
    else:
        from nerfstudio.data.dataparsers.blender_dataparser import BlenderDataParserConfig

        parser = BlenderDataParserConfig(data=data)
    outputs = parser.setup().get_dataparser_outputs("train")
    return [Path(f) for f in outputs.image_filenames], outputs.cameras


def write_colmap_images(files: List[Path], px: int, out: Path) -> float:
    """The images COLMAP reads: RGB (alpha composited on white, the background the NeRF methods train with),
    long side ``px`` (Lanczos; 0 = as stored). Returns the resize factor. Refuses to upsample."""
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    factor = 1.0
    for i, path in enumerate(files):
        img = Image.open(path)
        if img.mode in ("RGBA", "LA", "P"):
            rgba = img.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            img = Image.alpha_composite(white, rgba)
        img = img.convert("RGB")
        long_side = max(img.size)
        if px and px != long_side:
            if px > long_side:
                raise SystemExit(f"error: --colmap-px {px} is larger than the stored images ({img.size[0]}x{img.size[1]},"
                                 f" {path}); pass a larger copy of the scene (e.g. ../shared/data/nerf_synthetic/lego)")
            factor = px / long_side
            img = img.resize((round(img.size[0] * factor), round(img.size[1] * factor)), Image.LANCZOS)
        img.save(out / f"{i:04d}.png")
    return factor


def colmap_c2w(cam_from_world: np.ndarray) -> torch.Tensor:
    """COLMAP's world-to-camera [3, 4] (OpenCV axes: y down, z forward) as a camera-to-world in nerfstudio's
    OpenGL axes (y up, z backward)."""
    rot, trans = cam_from_world[:, :3], cam_from_world[:, 3]
    c2w = np.concatenate([rot.T, (-rot.T @ trans)[:, None]], axis=1)
    c2w[:, 1:3] *= -1  # flip the camera's y and z axes
    return torch.from_numpy(c2w)


def registered_pose_metrics(
    pred_c2w: Float[Tensor, "num_reg 3 4"], registered: Bool[Tensor, "num_views"],
    gt_c2w: Float[Tensor, "num_views 3 4"], mode: str, threshold_deg: float = 15.0,
) -> Dict[str, Any]:
    """Pose errors of a method that poses only some views: the registered views (rows of ``pred_c2w``, in view
    order) are aligned to their true cameras (``alignment.pose_errors``, ``mode``) and scored; ``within_15deg`` is
    the share of ALL views within ``threshold_deg`` (an unregistered view is a miss), ``within_15deg_registered``
    the share of the registered ones. Fewer than 3 registered views cannot be aligned: errors are None.
    ``robust_*``: the same under the inlier refit of the alignment (as gen-lifting's ROBUST_KEYS)."""
    from gen_lifting.alignment import fit_camera_alignment_inliers, pose_errors

    num_views, num_reg = int(registered.numel()), int(registered.sum())
    if pred_c2w.shape[0] != num_reg or gt_c2w.shape[0] != num_views:
        raise ValueError(f"{pred_c2w.shape[0]} predicted poses for {num_reg} registered of {num_views} views "
                         f"({gt_c2w.shape[0]} true poses)")
    key = f"within_{threshold_deg:g}deg"
    result: Dict[str, Any] = {"registered": num_reg, "num_views": num_views, "registered_share": num_reg / num_views,
                              "rot_err_median_deg": None, "rot_err_mean_deg": None, key: 0.0,
                              key + "_registered": None, "center_dist_median": None}
    if num_reg < 3:
        return result
    errors = pose_errors(pred_c2w, gt_c2w[registered], mode=mode, threshold_deg=threshold_deg)
    result.update({k: errors[k] for k in ("rot_err_median_deg", "rot_err_mean_deg", "center_dist_median")})
    result[key + "_registered"] = errors[key]
    result[key] = errors[key] * num_reg / num_views
    # the inlier refit gen-lifting's robust_* keys use (ROBUST_KEYS), for a like-for-like comparison
    alignment, inliers = fit_camera_alignment_inliers(pred_c2w, gt_c2w[registered], mode, inlier_deg=threshold_deg)
    robust = pose_errors(pred_c2w, gt_c2w[registered], threshold_deg=threshold_deg, alignment=alignment)
    result.update({"robust_rot_err_median_deg": robust["rot_err_median_deg"], f"robust_{key}": robust[key] * num_reg
                   / num_views, "robust_inlier_share": inliers.double().mean().item()})
    return result


def run_colmap(scene: str, px: int, args: argparse.Namespace, tmp: Path) -> Dict[str, Any]:
    """COLMAP on the scene's training images at long side ``px`` (see the module docstring); metrics row."""
    pycolmap = import_pycolmap()
    files, cameras = scene_train_views(scene)
    images = tmp / "images"
    factor = write_colmap_images(files, px, images)
    # known intrinsics (the scene's, scaled with the images); one shared pinhole camera, never refined
    f = float(cameras.fx[0]) * factor
    cx, cy = float(cameras.cx[0]) * factor, float(cameras.cy[0]) * factor
    reader = pycolmap.ImageReaderOptions(camera_model="SIMPLE_PINHOLE", camera_params=f"{f},{cx},{cy}")
    extraction = pycolmap.FeatureExtractionOptions(num_threads=args.threads, use_gpu=False)
    matching = pycolmap.FeatureMatchingOptions(num_threads=args.threads, use_gpu=False)
    mapping = pycolmap.IncrementalPipelineOptions(
        num_threads=args.threads, random_seed=args.seed, ba_refine_focal_length=False,
        ba_refine_principal_point=False, ba_refine_extra_params=False)
    mapping.mapper.abs_pose_refine_focal_length = False
    mapping.mapper.abs_pose_refine_extra_params = False
    mapping.mapper.num_threads = args.threads
    mapping.mapper.random_seed = args.seed
    mapping.triangulation.random_seed = args.seed
    pycolmap.set_random_seed(args.seed)
    database, sparse = tmp / "database.db", tmp / "sparse"
    sparse.mkdir()
    start = time.time()
    pycolmap.extract_features(database, images, camera_mode=pycolmap.CameraMode.SINGLE, reader_options=reader,
                              extraction_options=extraction, device=pycolmap.Device.cpu)
    extract_s = time.time() - start
    pycolmap.match_exhaustive(database, matching_options=matching, device=pycolmap.Device.cpu)
    match_s = time.time() - start - extract_s
    models = pycolmap.incremental_mapping(database, images, sparse, options=mapping)
    wall_s = time.time() - start

    num_views = len(files)
    registered = torch.zeros(num_views, dtype=torch.bool)
    poses: Dict[int, torch.Tensor] = {}
    if models:  # a user keeps the largest model
        best = max(models.values(), key=lambda rec: rec.num_reg_images())
        for image in best.images.values():
            if image.has_pose:
                index = int(Path(image.name).stem)
                poses[index] = colmap_c2w(np.asarray(image.cam_from_world().matrix()))
                registered[index] = True
    pred = torch.stack([poses[i] for i in sorted(poses)]) if poses else torch.zeros(0, 3, 4, dtype=torch.float64)
    mode = "orientation" if is_llff(scene) else "similarity"
    metrics = registered_pose_metrics(pred, registered, cameras.camera_to_worlds.double(), mode)
    width, height = image_size(images / "0000.png")
    metrics.update(psnr=None, ssim=None, lpips=None, steps=None, train_s=wall_s, extract_s=extract_s,
                   match_s=match_s, map_s=wall_s - extract_s - match_s, num_models=len(models),
                   image_width=width, image_height=height, focal_px=f, alignment=mode,
                   pycolmap_version=pycolmap.__version__, threads=args.threads)
    return metrics


def image_size(path: Path) -> Tuple[int, int]:
    from PIL import Image

    with Image.open(path) as img:
        return img.size


def print_table(results: Dict[str, Dict[str, Dict[str, Any]]]) -> None:
    """One line per scene and method (PSNR / SSIM / LPIPS, training and held-out pose error), a "refined poses"
    line under a row with pose refinement, and the registration count under a colmap row."""
    header = (f"{'scene':6s} {'method':26s} {'PSNR':>6s} {'SSIM':>6s} {'LPIPS':>6s} {'rot med':>8s} {'<=15deg':>8s}"
              f" {'test rot':>8s} {'<=15deg':>8s} {'steps':>7s}")
    print(header)
    columns = ("psnr", "ssim", "lpips", "rot_err_median_deg", "within_15deg", "test_rot_err_median_deg",
               "test_within_15deg")

    def cells(m: Dict[str, Any], key_of=lambda key: key) -> str:
        v = [float("nan") if m.get(key_of(k)) is None else m[key_of(k)] for k in columns]  # colmap: no field
        return (f"{v[0]:6.2f} {v[1]:6.3f} {v[2]:6.3f} {v[3]:8.1f} {v[4]:8.2f} {v[5]:8.1f} {v[6]:8.2f}")

    for scene, rows in results.items():
        for method, m in rows.items():
            steps = float("nan") if m.get("steps") is None else m["steps"]
            print(f"{scene:6s} {method:26s} {cells(m)} {steps:7.0f}")
            if "registered" in m:
                print(f"{'':6s} {'':26s} registered {m['registered']}/{m['num_views']}, {m['train_s']:.1f} s")
            if any(key in m for key in REFINED_KEYS):  # the same columns from the refined poses
                print(f"{'':6s} {'  refined poses':26s} {cells(m, refined_key)}")
            for label, key_of in (("  field-checked candidates", lambda k: tagged_key(k, "checked")),
                                  ("  robust alignment", lambda k: f"robust_{k}"),
                                  ("  refined, robust", lambda k: f"robust_{refined_key(k)}")):
                if m.get(key_of("rot_err_median_deg")) is not None:  # pose columns only (no image metrics)
                    print(f"{'':6s} {label:26s} {cells({k: m.get(key_of(k)) for k in columns[3:]})}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-s", type=float, default=600.0, help="training wall-clock seconds per method")
    parser.add_argument("--scenes", nargs="+", default=["lego"], help="bundled scene names or paths")
    parser.add_argument("--methods", nargs="+", default=["gen-lifting", "gen-lifting-ae", "gen-lifting-oracle"])
    parser.add_argument("--eval-images", type=int, default=50, help="held-out views evaluated (0 = all)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--max-steps", type=int, default=0,
                        help="also stop after this many steps (0 = wall clock only); a step budget compares levers "
                             "fairly on a machine whose load changes")
    parser.add_argument("--seed", type=int, default=0, help="torch seed and the datamanager's batch seed")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--log-every-s", type=float, default=60.0, help="progress line interval (0 = off)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=JSON",
                        help="config overrides for every method, e.g. pipeline.model.field.resolution=32")
    parser.add_argument("--colmap-px", type=int, nargs="+", default=[0],
                        help="colmap: long sides of the images COLMAP reads, one run each (0 = as stored)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "lifting.json")
    parser.add_argument("--keep-run", type=Path, default=None, metavar="DIR",
                        help="keep each gen-lifting run under DIR (config.yml and a checkpoint of the last step, as "
                             "ns-train writes them) for ns-viewer / ns-eval / gen-lifting pose-vs-noise; default: a "
                             "temporary folder, deleted")
    args = parser.parse_args()
    if "colmap" in args.methods:
        import_pycolmap()  # fail before any training if the extra is missing
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    commit = git_commit()  # the code this run executes (taken now, not when the JSON is written)
    results: Dict[str, Dict[str, Dict[str, float]]] = {}
    for scene in args.scenes:
        results[scene] = {}
        for method in args.methods:
            if not runs_on(method, scene):
                continue
            if method == "colmap":
                for px in args.colmap_px:
                    with tempfile.TemporaryDirectory() as tmp:
                        print(f"== {scene} / colmap at {px or 'stored'} px", flush=True)
                        metrics = run_colmap(scene, px, args, Path(tmp))
                    results[scene][f"colmap-{max(metrics['image_width'], metrics['image_height'])}px"] = metrics
                    print(f"   {json.dumps(metrics)}", flush=True)
                continue
            with tempfile.TemporaryDirectory() as tmp:
                config = build_config(method, scene, args, Path(tmp))
                keep = args.keep_run is not None and method in GEN_METHODS
                if keep:
                    config.output_dir = args.keep_run
                    config.save_config()
                print(f"== {scene} / {method}: training {args.budget_s:.0f}s", flush=True)
                trainer, steps, train_s = train(method, config, args.budget_s, args.log_every_s, args.max_steps)
                if keep:
                    trainer.save_checkpoint(steps - 1)  # the step index of the last update, as nerfstudio counts
                    print(f"   kept the run: {config.get_base_dir() / 'config.yml'}", flush=True)
                from gen_lifting.datasets import resolve_data

                metrics = evaluate(method, trainer, args.eval_images, resolve_data(scene))
                metrics.update(train_s=train_s, steps=steps)
                results[scene][method] = metrics
                print(f"   {json.dumps({k: round(v, 4) for k, v in metrics.items()})}", flush=True)
    print_table(results)
    write_result(args.out, commit, budget_s=args.budget_s, max_steps=args.max_steps, seed=args.seed, scenes=results)


if __name__ == "__main__":
    main()

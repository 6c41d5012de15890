"""``gen-lifting``: commands around a trained run (training itself is ``ns-train gen-lifting``).

    gen-lifting demo --output-dir outputs/demo              # train the CPU preset on bundled lego, write renders
    gen-lifting predict-pose --load-config RUN/config.yml --image photo.png --output-dir out/
    gen-lifting sample --load-config RUN/config.yml --output-dir out/ --seed 0
    gen-lifting orbit --load-config RUN/config.yml --output-dir out/
    gen-lifting view --load-config RUN/config.yml            # nerfstudio's viewer on 127.0.0.1 (ns-viewer: 0.0.0.0)
    gen-lifting pose-vs-noise --load-config RUN/config.yml --output-dir out/   # pose error against noise level t
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import tyro
from typing_extensions import Annotated


def _write_json(data: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


@dataclass
class PredictPose:
    """Predict the camera of a new photo (small noise, one encoder pass) and re-render it from there."""

    load_config: Path
    """config.yml of a trained gen-lifting run (ns-train writes it in the run folder)."""
    image: Path
    """The photo to pose (PNG/JPEG; resized to the training resolution; RGBA composited on white)."""
    output_dir: Path = Path("outputs/predict_pose")
    """Where pose.json and render.png (photo | render side by side) are written."""
    check_pixels: Optional[int] = None
    """Which of the encoder's K candidates is the pose: 0, the top-scoring one (the thesis's rule); N > 0, the one
    whose render best matches the photo on N random pixels (the field's check); unset, the run's own
    --pipeline.candidate-check-pixels."""

    def main(self) -> None:
        import torch

        from gen_lifting.inference import InferenceError, image_size, load_pipeline, predict_pose, read_photo, save_png

        if self.check_pixels is not None and self.check_pixels < 0:
            raise InferenceError(f"--check-pixels must be >= 0 (0 = the top-scoring candidate), "
                                 f"got {self.check_pixels}")
        pipeline = load_pipeline(self.load_config)
        if self.check_pixels is not None:
            pipeline.config.candidate_check_pixels = self.check_pixels
        width, height = image_size(pipeline)
        photo = read_photo(self.image, width, height)
        result = predict_pose(pipeline, photo)
        _write_json({"image": str(self.image), "camera_to_world": result["c2w"].tolist(),
                     "candidate": result["candidate"], "rule": result["rule"],
                     "candidate_probabilities": result["probabilities"].tolist(),
                     "noise_timestep": result["t"], "width": width, "height": height,
                     "intrinsics_fx_fy_cx_cy": pipeline.model.intrinsics[:4].tolist()},
                    self.output_dir / "pose.json")
        save_png(torch.cat([photo, result["render"]], dim=1), self.output_dir / "render.png")
        print(f"wrote {self.output_dir / 'pose.json'} and {self.output_dir / 'render.png'}")


@dataclass
class Sample:
    """Sample a camera and a novel view from pure noise by reverse diffusion through encoder + NeRF."""

    load_config: Path
    """config.yml of a trained gen-lifting run."""
    output_dir: Path = Path("outputs/sample")
    """Where view.png, camera.json and strip.png (x0 estimates from t = T to 0) are written."""
    seed: int = 0
    """Seed of the initial noise and of every reverse step."""
    num_samples: int = 1
    """How many independent samples (seeds seed, seed+1, ...)."""

    def main(self) -> None:
        from gen_lifting.inference import load_pipeline, sample_from_noise, save_png

        pipeline = load_pipeline(self.load_config)
        for i in range(self.num_samples):
            out = sample_from_noise(pipeline, seed=self.seed + i)
            folder = self.output_dir / f"sample_{self.seed + i:03d}"
            save_png(out["view"], folder / "view.png")
            save_png(out["strip"], folder / "strip.png")
            _write_json({"camera_to_world": out["c2w"].tolist(), "seed": self.seed + i,
                         "trajectory_camera_to_world": out["trajectory_c2w"].tolist()}, folder / "camera.json")
            print(f"wrote {folder}")


@dataclass
class Orbit:
    """Render frames on a circle around the object at the learned radius (no dataset needed)."""

    load_config: Path
    """config.yml of a trained gen-lifting run."""
    output_dir: Path = Path("outputs/orbit")
    """Where frame_XXX.png and orbit.png (a contact sheet) are written."""
    frames: int = 24
    """Number of frames around the circle."""
    elevation_deg: float = 30.0
    """Elevation of the circle above the horizon (the learned frame's z is up)."""

    def main(self) -> None:
        import torch

        from gen_lifting.inference import load_pipeline, orbit_c2w, render_c2w, save_png

        pipeline = load_pipeline(self.load_config)
        radius = pipeline.model.pose_encoder.config.radius
        frames = render_c2w(pipeline, orbit_c2w(radius, self.elevation_deg, self.frames)).cpu()
        for i, frame in enumerate(frames):
            save_png(frame, self.output_dir / f"frame_{i:03d}.png")
        cols = 8
        rows = [torch.cat(list(frames[i : i + cols]), dim=1) for i in range(0, len(frames) - cols + 1, cols)]
        if rows:
            save_png(torch.cat(rows, dim=0), self.output_dir / "orbit.png")
        print(f"wrote {len(frames)} frames to {self.output_dir}")


@dataclass
class PoseVsNoise:
    """Diagnose pose discovery: the encoder's pose error on the run's training and held-out photos at several noise
    levels t, for its top-scoring camera and for the best of its K candidates (gen_lifting/diagnostics.py). Reads the
    dataset's true poses to score only. Writes pose_vs_noise.json and pose_vs_noise.png."""

    load_config: Path
    """config.yml of a trained gen-lifting run (not an oracle: it needs the pose encoder)."""
    output_dir: Path = Path("outputs/pose_vs_noise")
    """Where pose_vs_noise.json (one row per t) and pose_vs_noise.png are written."""
    timesteps: tuple[int, ...] = (0, 10, 20, 30, 50, 70, 99)
    """Noise levels to pose at (0 .. T-1 of the run's schedule; T = 100 in the presets, t = 99 is nearly pure noise).
    A run trained on clean images (gen-lifting-ae) ignores t."""

    def main(self) -> None:
        from gen_lifting.diagnostics import plot_pose_errors_by_noise, pose_errors_by_noise
        from gen_lifting.inference import InferenceError, load_pipeline

        pipeline = load_pipeline(self.load_config, test_mode="test")
        try:
            rows = pose_errors_by_noise(pipeline, self.timesteps)
        except ValueError as err:
            raise InferenceError(str(err)) from None
        _write_json({"config": str(self.load_config), "rows": rows}, self.output_dir / "pose_vs_noise.json")
        tmp = self.output_dir / ".pose_vs_noise.tmp.png"
        run = self.load_config.resolve().parent  # ns-train's OUTPUT/EXPERIMENT/METHOD/TIMESTAMP/config.yml
        plot_pose_errors_by_noise(rows, tmp, title=f"{run.parent.parent.name} / {run.parent.name}: pose error vs t")
        os.replace(tmp, self.output_dir / "pose_vs_noise.png")
        print(f"{'t':>4} {'alpha_bar':>9}  {'train top / best-of-K (deg)':>28}  {'held-out top / best-of-K (deg)':>31}")
        for r in rows:
            print(f"{r['t']:>4} {r['alpha_bar']:>9.4f}  {r['train_rot_err_median_deg']:>13.1f} / "
                  f"{r['train_best_of_k_rot_err_median_deg']:<12.1f}  {r['test_rot_err_median_deg']:>15.1f} / "
                  f"{r['test_best_of_k_rot_err_median_deg']:<13.1f}")
        print(f"wrote {self.output_dir / 'pose_vs_noise.json'} and {self.output_dir / 'pose_vs_noise.png'}")


@dataclass
class View:
    """Open a trained run in nerfstudio's viewer, listening on this machine only (127.0.0.1).

    ``ns-viewer --load-config`` binds every network interface (0.0.0.0) by nerfstudio's default; this starts the same
    viewer (nerfstudio's RunViewer, unchanged) on --host. From another machine: ssh -L 7007:127.0.0.1:7007 host.
    """

    load_config: Path
    """config.yml of a trained gen-lifting run."""
    host: str = "127.0.0.1"
    """Address the viewer binds: 127.0.0.1 serves this machine only; 0.0.0.0 serves every network interface."""
    port: Optional[int] = None
    """Port of the viewer (None: 7007, or the next free one)."""

    def main(self) -> None:
        from gen_lifting.inference import InferenceError

        if self.port is not None and not 1 <= self.port <= 65535:
            raise InferenceError(f"--port must be in 1..65535 (or omitted for 7007), got {self.port}")
        if not self.load_config.is_file():
            raise InferenceError(f"{self.load_config} does not exist; pass the config.yml that ns-train wrote in "
                                 "its run folder")
        from nerfstudio.scripts.viewer.run_viewer import RunViewer, ViewerConfigWithoutNumRays

        import method_configs.gen_lifting  # noqa: F401  (as load_pipeline: the plugin's configs for config.yml)

        viewer = ViewerConfigWithoutNumRays(websocket_host=self.host, websocket_port=self.port)
        try:
            RunViewer(load_config=self.load_config, viewer=viewer).main()  # serves until interrupted
        except KeyboardInterrupt:
            pass


def write_camera_plots(pipeline, metrics: dict, output_dir: Path) -> list[Path]:
    """``cameras.png``: the encoder's poses of the training photos against the true ones (rotation-aligned; true poses
    are read for this picture only). A run whose pose refinement has started also gets ``cameras_refined.png``, its
    refined training cameras, which are what the field was trained from at the end."""
    import torch

    from gen_lifting.inference import plot_cameras

    if pipeline.model.pose_encoder.config.mode != "candidates":
        return []
    gt = pipeline.datamanager.dataset_camera_to_worlds("train").cpu()
    pred = pipeline.predict_all_c2w(pipeline.datamanager.train_images).cpu()
    written = [output_dir / "cameras.png"]
    plot_cameras(pred, gt, written[0], f"encoder poses: median rotation error "
                                        f"{metrics.get('rot_err_median_deg', float('nan')):.1f} deg")
    refinement = pipeline.model.pose_refinement
    if refinement is not None and refinement.is_started:
        written.append(output_dir / "cameras_refined.png")
        with torch.no_grad():
            refined = refinement.c2w().cpu()
        plot_cameras(refined, gt, written[1], f"refined poses: median rotation error "
                                              f"{metrics.get('refined_rot_err_median_deg', float('nan')):.1f} deg")
    return written


DEMO_METHODS = ("gen-lifting", "gen-lifting-refine", "gen-lifting-ae")
"""Registered methods the demo can train (CPU presets whose pose encoder scores candidates)."""


@dataclass
class Demo:
    """Train the CPU preset of gen-lifting on the bundled 64x64 lego, then write test renders and an orbit."""

    output_dir: Path = Path("outputs/demo")
    """Run folder root (nerfstudio layout) and renders."""
    max_num_iterations: int = 3000
    """Training steps (about 8 minutes on 2 CPU cores)."""
    data: str = "lego"
    """Bundled scene name or path to a Blender-format scene."""
    method: str = "gen-lifting"
    """gen-lifting (the thesis), gen-lifting-refine (ours: + pose refinement from step 2000 that can jump back to the
    encoder's best candidate, the encoder also trained on the field's renders at jittered refined cameras, and 100
    iNeRF-like steps per held-out photo from the candidate the field's check picks; needs
    --max-num-iterations above 2000 to refine training poses) or gen-lifting-ae."""

    def main(self) -> None:
        import copy

        import torch
        from nerfstudio.scripts.train import main as ns_train

        import method_configs.gen_lifting as specs
        from gen_lifting.inference import load_pipeline, orbit_c2w, render_c2w, save_png

        if self.method not in DEMO_METHODS:
            raise SystemExit(f"error: --method must be one of {', '.join(DEMO_METHODS)}, got {self.method!r}")
        # the registered MethodSpecification of that name (method_configs/gen_lifting.py: gen-lifting -> gen_lifting)
        config = copy.deepcopy(getattr(specs, self.method.replace("-", "_")).config)
        config.pipeline.datamanager.data = Path(self.data)
        config.max_num_iterations = self.max_num_iterations
        config.output_dir = self.output_dir
        config.vis = "tensorboard"
        config.set_timestamp()
        ns_train(config)
        config_path = config.get_base_dir() / "config.yml"
        pipeline = load_pipeline(config_path, test_mode="test")
        metrics = pipeline.get_average_eval_image_metrics(output_path=self.output_dir / "test_renders")
        _write_json({"config": str(config_path), "metrics": metrics}, self.output_dir / "metrics.json")
        frames = render_c2w(pipeline, orbit_c2w(pipeline.model.pose_encoder.config.radius, 30.0, 8)).cpu()
        save_png(torch.cat(list(frames), dim=1), self.output_dir / "orbit.png")
        write_camera_plots(pipeline, metrics, self.output_dir)
        print(json.dumps({k: round(v, 3) for k, v in metrics.items()}, indent=1))
        print(f"config: {config_path}\nrenders: {self.output_dir}/test_renders, {self.output_dir}/orbit.png")


Commands = Union[
    Annotated[Demo, tyro.conf.subcommand("demo")],
    Annotated[PredictPose, tyro.conf.subcommand("predict-pose")],
    Annotated[Sample, tyro.conf.subcommand("sample")],
    Annotated[Orbit, tyro.conf.subcommand("orbit")],
    Annotated[View, tyro.conf.subcommand("view")],
    Annotated[PoseVsNoise, tyro.conf.subcommand("pose-vs-noise")],
]


def entrypoint(argv: Optional[list] = None) -> None:
    from gen_lifting.inference import InferenceError

    command = tyro.cli(Commands, args=argv, description=__doc__)
    try:
        command.main()
    except InferenceError as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    entrypoint()

"""Uses of a trained gen-lifting run beyond ns-render: pose a new photo, sample a view from pure noise, orbit.

All functions take a loaded ``GenLiftingPipeline`` (``load_pipeline(config.yml)``) and return tensors; the CLI
(``gen_lifting/scripts/cli.py``) writes them to disk.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
from jaxtyping import Float
from PIL import Image
from torch import Tensor

from diffusion_utils.schedule import to_image_range
from gen_lifting.cameras import look_at_origin
from gen_lifting.data_checks import high_bit_depth_message, is_high_bit_depth_grayscale


class InferenceError(ValueError):
    """Bad input to an inference command; the message is one line naming the problem and the fix."""


def load_pipeline(config_path: Path, test_mode: str = "inference"):
    """Load a trained run (its config.yml and latest checkpoint) on CPU or CUDA."""
    if not Path(config_path).is_file():
        raise InferenceError(f"{config_path} does not exist; pass the config.yml that ns-train wrote in its run folder")
    from nerfstudio.utils.eval_utils import eval_setup

    import method_configs.gen_lifting  # noqa: F401  (registers the compat fixes for checkpoint loading)

    def to_available_device(config):
        config.machine.device_type = "cuda" if torch.cuda.is_available() else "cpu"
        return config

    _, pipeline, ckpt, step = eval_setup(Path(config_path), test_mode=test_mode,
                                         update_config_callback=to_available_device)
    if not hasattr(pipeline.model, "pose_encoder"):
        raise InferenceError(f"{config_path} is not a gen-lifting run (no pose encoder in its model)")
    return pipeline


def read_photo(path: Path, width: int, height: int) -> Float[Tensor, "height width 3"]:
    """An image file as [H, W, 3] in [0, 1] at the training resolution (RGBA composited on white); 16-bit
    grayscale is refused with the conversion that keeps its range (gen_lifting/data_checks.py)."""
    try:
        image = Image.open(path)
        image.load()
    except (OSError, ValueError) as err:
        raise InferenceError(f"cannot read image {path} ({err}); pass a PNG or JPEG file") from None
    if is_high_bit_depth_grayscale(image.mode):  # convert("RGB") would clip it to white, as for training scenes
        raise InferenceError(high_bit_depth_message(path, image.mode))
    if image.mode in ("RGBA", "LA"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    image = image.convert("RGB").resize((width, height), Image.LANCZOS)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)


def image_size(pipeline) -> tuple[int, int]:
    fx, fy, cx, cy, w, h = pipeline.model.intrinsics.tolist()
    return int(w), int(h)


@torch.no_grad()
def render_c2w(pipeline, c2w: Float[Tensor, "num 3 4"]) -> Float[Tensor, "num height width 3"]:
    cams = pipeline.model.cameras_from_c2w(c2w.to(pipeline.device)).to(pipeline.device)
    return torch.stack([pipeline.model.get_outputs_for_camera(cams[i : i + 1])["rgb"] for i in range(len(cams))])


@torch.no_grad()
def predict_pose(pipeline, photo: Float[Tensor, "height width 3"]) -> Dict[str, object]:
    """Pose one photo (small noise, one encoder pass), render it back from the predicted camera: the top-scoring
    candidate, or with the run's ``--pipeline.candidate-check-pixels`` the one the field's check picks."""
    c2w_all, scores = pipeline.encode(photo[None])
    top = int(scores[0].argmax())
    if pipeline.config.candidate_check_pixels > 0:
        top = int(pipeline.check_candidates(c2w_all, photo[None])[0])
    render = render_c2w(pipeline, c2w_all[0, top : top + 1])[0]
    return {
        "c2w": c2w_all[0, top].cpu(),
        "candidate": top,
        "rule": "field check" if pipeline.config.candidate_check_pixels > 0 else "top score",
        "probabilities": torch.softmax(scores[0], dim=0).cpu(),
        "candidates_c2w": c2w_all[0].cpu(),
        "render": render.cpu(),
        "t": int(pipeline.datamanager.config.eval_timestep) if pipeline.datamanager.config.use_diffusion_noise else 0,
    }


@torch.no_grad()
def sample_from_noise(
    pipeline, seed: int = 0, strip_every: Optional[int] = None
) -> Dict[str, object]:
    """Reverse diffusion through encoder + NeRF: at every step the encoder poses x_t, the NeRF renders x0_hat
    from the top-scoring camera, and x_{t-1} is drawn from q(x_{t-1} | x_t, x0_hat)."""
    dm = pipeline.datamanager
    schedule = dm.schedule
    width, height = image_size(pipeline)
    gen = torch.Generator().manual_seed(seed)
    x_t = torch.randn((1, 3, height, width), generator=gen).to(pipeline.device)
    total = schedule.num_timesteps
    strip_every = strip_every or max(1, total // 10)
    strip: List[Tensor] = []
    cameras: List[Tensor] = []
    c2w = None
    for step in reversed(range(total)):
        t = torch.full((1,), step, dtype=torch.long, device=pipeline.device)
        c2w, _ = pipeline.model.predict_c2w(x_t, t)
        x0_hat = render_c2w(pipeline, c2w)[0].permute(2, 0, 1)[None] * 2.0 - 1.0
        x_t, _ = schedule.step(x0_hat, t, x_t, prediction="sample", generator=gen)
        if step % strip_every == 0 or step == total - 1:
            strip.append(to_image_range(x0_hat[0]).permute(1, 2, 0).clamp(0, 1).cpu())
            cameras.append(c2w[0].cpu())
    assert c2w is not None
    view = render_c2w(pipeline, c2w)[0].cpu()
    return {"view": view, "c2w": c2w[0].cpu(), "strip": torch.cat(strip, dim=1), "trajectory_c2w": torch.stack(cameras)}


def orbit_c2w(radius: float, elevation_deg: float = 30.0, frames: int = 36) -> Float[Tensor, "frames 3 4"]:
    """Cameras on a horizontal circle at ``radius`` looking at the origin (z up)."""
    az = torch.linspace(0, 2 * math.pi, frames + 1)[:-1]
    el = math.radians(elevation_deg)
    pos = torch.stack([radius * math.cos(el) * torch.cos(az), radius * math.cos(el) * torch.sin(az),
                       torch.full_like(az, radius * math.sin(el))], dim=-1)
    return look_at_origin(pos)


def save_png(image: Float[Tensor, "height width 3"], path: Path) -> None:
    """Atomic PNG write (temp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray((image.clamp(0, 1).numpy() * 255).round().astype(np.uint8)).save(tmp, format="PNG")
    tmp.replace(path)


def plot_cameras(pred_c2w: Float[Tensor, "num 3 4"], gt_c2w: Float[Tensor, "num 3 4"], path: Path,
                 title: str = "") -> None:
    """Top and side views of true vs predicted (rotation-aligned) camera centres, lines joining each pair."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gen_lifting.alignment import align_cameras

    aligned = align_cameras(pred_c2w.double(), gt_c2w.double(), mode="rotation")[:, :, 3].numpy()
    gt = gt_c2w[:, :3, 3].double().numpy()
    fig, axes = plt.subplots(1, 2, figsize=(8, 4))
    for ax, (i, j, name) in zip(axes, [(0, 1, "top view (x, y)"), (0, 2, "side view (x, z)")]):
        for a, b in zip(aligned, gt):
            ax.plot([a[i], b[i]], [a[j], b[j]], color="0.7", linewidth=0.5)
        ax.scatter(gt[:, i], gt[:, j], s=10, c="tab:green", label="true")
        ax.scatter(aligned[:, i], aligned[:, j], s=10, c="tab:red", label="predicted (aligned)")
        ax.set_title(name)
        ax.set_aspect("equal")
    axes[0].legend(loc="lower left", fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    tmp.replace(path)

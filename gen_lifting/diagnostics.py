"""Where pose discovery breaks: the encoder's pose error as a function of the noise level (issue 10's "which images the
noisy encoder cannot pose, at which t").

For each noise level t, every training and held-out photo is noised to t with the seeded evaluation noise (the rule
``GenLiftingPipeline.encoder_input`` applies at t = ``eval_timestep``) and posed by the encoder. Two errors per photo,
both after the alignment fitted on the training photos' top-scoring poses at that t (held-out photos are never
fitted on, as in ``evaluate_poses``):

- *top*: the top-scoring candidate, the camera the method uses;
- *best of K*: the candidate nearest to the true camera, an oracle choice that tells a bad candidate set (the true
  pose is among none of them) from bad scores (it is there but ranked low, e.g. a symmetric confusion).

Ground truth is read only to score; nothing here trains or changes the model (``eval_timestep`` is restored).
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import roma
import torch
from jaxtyping import Float
from torch import Tensor

from gen_lifting.alignment import apply_alignment, direction_angle_deg, fit_camera_alignment


def encode_all(
    pipeline, images: Float[Tensor, "num height width 3"]
) -> Tuple[Float[Tensor, "num cand 3 4"], Float[Tensor, "num cand"]]:
    """Every candidate camera (float64) and score of the images at the evaluation noise, in chunks of 32."""
    out = [pipeline.encode(chunk) for chunk in images.split(32)]
    return torch.cat([c for c, _ in out]).double(), torch.cat([s for _, s in out])


def candidate_rotation_errors(
    candidates: Float[Tensor, "num cand 3 4"], gt: Float[Tensor, "num 3 4"], alignment
) -> Float[Tensor, "num cand"]:
    """Rotation error (deg) of every candidate after ``alignment``."""
    n, k = candidates.shape[:2]
    aligned = apply_alignment(candidates.reshape(n * k, 3, 4), alignment).reshape(n, k, 3, 4)
    rotations = gt[:, None, :3, :3].expand(n, k, 3, 3)
    return torch.rad2deg(roma.rotmat_geodesic_distance(aligned[..., :3], rotations))


@torch.no_grad()
def pose_errors_by_noise(pipeline, timesteps: Sequence[int], threshold_deg: float = 15.0) -> List[Dict[str, float]]:
    """One row per t: medians (``torch.quantile`` 0.5, as ``alignment.pose_errors``) of the top-scoring and best-of-K
    rotation errors (deg), the share within ``threshold_deg``, and how often the top-scoring candidate is the best one,
    for training (``train_*``) and held-out (``test_*``) photos; plus alpha_bar(t), the signal share of the encoder's
    input."""
    if pipeline.uses_dataset_poses:
        raise ValueError("this run trains on the dataset's poses (an oracle): it has no pose encoder to diagnose")
    dm = pipeline.datamanager
    num_timesteps = dm.schedule.num_timesteps
    bad = [t for t in timesteps if not 0 <= int(t) < num_timesteps]
    if bad:
        raise ValueError(f"timesteps must be in [0, {num_timesteps - 1}] (the run's schedule), got {bad}")
    mode = pipeline.pose_alignment_mode
    gt = {"train": dm.dataset_camera_to_worlds("train").double()[:, :3, :4],
          "test": dm.dataset_camera_to_worlds("eval").double()[:, :3, :4]}
    images = {"train": dm.train_images, "test": dm.eval_images}
    was_training, saved_t = pipeline.training, dm.config.eval_timestep
    pipeline.eval()
    rows = []
    try:
        for t in timesteps:
            dm.config.eval_timestep = int(t)
            encoded = {split: encode_all(pipeline, images[split]) for split in images}
            top = {split: c[torch.arange(len(c)), s.argmax(dim=1)] for split, (c, s) in encoded.items()}
            alignment = fit_camera_alignment(top["train"], gt["train"], mode)
            row: Dict[str, float] = {"t": int(t), "alpha_bar": float(dm.schedule.alphas_cumprod[int(t)])}
            for split, (candidates, scores) in encoded.items():
                errors = candidate_rotation_errors(candidates, gt[split], alignment)
                top_err = errors.gather(1, scores.argmax(dim=1, keepdim=True)).squeeze(1)
                best_err = errors.min(dim=1).values
                row.update({
                    f"{split}_rot_err_median_deg": top_err.quantile(0.5).item(),
                    f"{split}_within_{threshold_deg:g}deg": (top_err <= threshold_deg).double().mean().item(),
                    f"{split}_best_of_k_rot_err_median_deg": best_err.quantile(0.5).item(),
                    f"{split}_best_of_k_within_{threshold_deg:g}deg":
                        (best_err <= threshold_deg).double().mean().item(),
                    f"{split}_top_is_best": (top_err <= best_err + 1e-9).double().mean().item(),
                })
            rows.append(row)
    finally:
        dm.config.eval_timestep = saved_t
        if was_training:
            pipeline.train()
    return rows


def plot_pose_errors_by_noise(rows: List[Dict[str, float]], path, title: str = "") -> None:
    """Median rotation error against t: top-scoring vs best-of-K candidate, training and held-out photos."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    ts = [r["t"] for r in rows]
    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=120)
    for split, colour in (("train", "tab:blue"), ("test", "tab:orange")):
        label = "training" if split == "train" else "held-out"
        ax.plot(ts, [r[f"{split}_rot_err_median_deg"] for r in rows], "-o", color=colour, label=f"{label}: top score")
        ax.plot(ts, [r[f"{split}_best_of_k_rot_err_median_deg"] for r in rows], "--", color=colour,
                label=f"{label}: best of K")
    ax.axhline(15.0, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("noise level t of the encoder's input")
    ax.set_ylabel("median rotation error (deg)")
    ax.set_title(title or "pose error vs noise level")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def mean_pairwise_angle_deg(centres: Float[Tensor, "num 3"]) -> float:
    """Mean angle (deg), seen from the origin, between two of these camera centres."""
    i, j = torch.triu_indices(len(centres), len(centres), offset=1)
    return direction_angle_deg(centres[i], centres[j]).mean().item()


@torch.no_grad()
def camera_spread(pipeline) -> Dict[str, float]:
    """Ground-truth-free statistics of the encoder's cameras of the training photos (360 candidates; {} otherwise):

    - ``top_spread_deg``: mean angle, seen from the origin, between the top-scoring cameras of two training photos.
      A capture that circles the object spreads its cameras (lego's true cameras: 68 deg); a collapsed run puts
      them in a few clumps (lego runs that never posed: 41-46 deg);
    - ``candidate_dependence_deg``: the median over candidates of how far a candidate's camera moves with the photo
      (median angle to its mean position over the training photos). Candidates that barely move (a few deg) ignore
      the photo: the encoder outputs near-constant cameras, and the score alone picks one of K fixed views.

    Photos are encoded at the evaluation noise level (``pipeline.encode``); nothing is trained or changed.
    """
    if pipeline.uses_dataset_poses or pipeline.model.pose_encoder.config.mode != "candidates":
        return {}
    was_training = pipeline.training
    pipeline.eval()
    try:
        candidates, scores = encode_all(pipeline, pipeline.datamanager.train_images)
    finally:
        if was_training:
            pipeline.train()
    centres = candidates[..., :3, 3]  # [n, k, 3]
    top = centres[torch.arange(len(centres)), scores.argmax(dim=1)]
    moves = direction_angle_deg(centres, centres.mean(dim=0, keepdim=True).expand_as(centres)).median(dim=0).values
    return {"top_spread_deg": mean_pairwise_angle_deg(top), "candidate_dependence_deg": moves.median().item()}

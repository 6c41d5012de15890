"""How far a trained gen-lifting run's look-at candidates can get: the field's frame against the candidates' up, and
the encoder on photos against the field's own renders (docs/lifting.md, "The encoder's own accuracy").

    python benchmarks/lifting_frame.py --load-config RUN/config.yml [RUN2/config.yml ...] --out frame.json

For a run with pose refinement, from its refined training cameras (no ground truth): where their optical axes meet
(``target_offset``, distance from the origin the candidates look at) and the up about which they have the least roll
(``cameras.fit_world_up``; ``tilt_deg`` from z). Scored against the dataset's cameras (alignment fitted on each set
itself, as ``evaluate_poses`` does): the refined cameras, look-at-origin cameras at the refined cameras' directions
about z (the thesis' candidates' floor), about the fitted up, and about the up the run's candidates used
(``pose_encoder.world_up``). Then the encoder's top-score and best-of-K medians on the held-out photos and on the
field's renders at the true held-out cameras (mapped into the field's frame by the refined cameras' alignment), both
under the alignment of its training-photo poses. Ground truth is read only to score. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def frame_statistics(pipe) -> Dict[str, float]:
    """The module docstring's numbers for one loaded run."""
    from gen_lifting.alignment import fit_camera_alignment, pose_errors
    from gen_lifting.cameras import fit_world_up, look_at_origin
    from gen_lifting.diagnostics import candidate_rotation_errors, encode_all
    from gen_lifting.inference import render_c2w

    if pipe.model.pose_refinement is None or not pipe.model.pose_refinement.is_started:
        raise SystemExit("this run has no started pose refinement: train with gen-lifting-refine (or "
                         "--pipeline.model.pose-refinement-start-step N) past its start step")
    dm, mode = pipe.datamanager, pipe.pose_alignment_mode
    gt = {"train": dm.dataset_camera_to_worlds("train").double()[:, :3, :4],
          "test": dm.dataset_camera_to_worlds("eval").double()[:, :3, :4]}
    refined = pipe.model.pose_refinement.c2w().detach().double().cpu()
    centres, forward = refined[:, :, 3], -refined[:, :, 2]
    project = torch.eye(3, dtype=refined.dtype) - forward[:, :, None] * forward[:, None, :]
    target = torch.linalg.solve(project.sum(0), (project @ centres[:, :, None]).sum(0)).squeeze(-1)
    up = fit_world_up(refined)
    run_up = pipe.model.pose_encoder.world_up.double().cpu()

    def tilt(vector: torch.Tensor) -> float:
        return torch.rad2deg(torch.acos(vector[2].clamp(-1, 1))).item()

    def median_error(cams: torch.Tensor) -> float:
        alignment = fit_camera_alignment(cams, gt["train"], mode)
        return pose_errors(cams, gt["train"], alignment=alignment)["rot_err_median_deg"]

    out = {"target_offset": target.norm().item(), "tilt_deg": tilt(up), "run_up_tilt_deg": tilt(run_up)}

    out["refined_rot_err_median_deg"] = median_error(refined)
    for name, world_up in (("z", torch.tensor([0.0, 0.0, 1.0], dtype=refined.dtype)), ("fitted_up", up),
                           ("run_up", run_up)):
        out[f"lookat_{name}_rot_err_median_deg"] = median_error(look_at_origin(centres, up=world_up))

    # the encoder on held-out photos and on the field's renders at the true held-out cameras
    rotation, translation, scale = fit_camera_alignment(refined, gt["train"], mode)  # field frame -> truth
    test_in_field = torch.cat([rotation.T @ gt["test"][:, :, :3],
                               (((gt["test"][:, :, 3] - translation) @ rotation) / scale)[:, :, None]], dim=2)
    renders = render_c2w(pipe, test_in_field.float()).clamp(0, 1)

    train_c, train_s = (x.cpu() for x in encode_all(pipe, dm.train_images))
    top_train = train_c[torch.arange(len(train_c)), train_s.argmax(1)]
    alignment = fit_camera_alignment(top_train, gt["train"], mode)
    for name, images in (("photo", dm.eval_images), ("render", renders)):
        cands, scores = (x.cpu() for x in encode_all(pipe, images))
        errors = candidate_rotation_errors(cands, gt["test"], alignment)
        # medians as alignment.pose_errors takes them (torch.quantile 0.5: the mean of the middle two of an even count)
        top = errors.gather(1, scores.argmax(1, keepdim=True)).squeeze(1)
        out[f"test_{name}_top_rot_err_median_deg"] = top.quantile(0.5).item()
        out[f"test_{name}_best_of_k_rot_err_median_deg"] = errors.min(1).values.quantile(0.5).item()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load-config", type=Path, nargs="+", required=True,
                        help="config.yml of one or more trained gen-lifting runs with pose refinement")
    parser.add_argument("--out", type=Path, default=Path("lifting_frame.json"), help="JSON written here")
    args = parser.parse_args()
    from benchmarks.lifting import git_commit, write_result
    from gen_lifting.inference import load_pipeline

    commit = git_commit()
    runs = {}
    for config in args.load_config:
        pipe = load_pipeline(config, test_mode="test")
        pipe.eval()
        with torch.no_grad():
            runs[str(config)] = frame_statistics(pipe)
    keys = list(next(iter(runs.values())))
    for key in keys:
        print(f"{key:44s}" + "".join(f"{stats[key]:9.3f}" for stats in runs.values()))
    write_result(args.out, commit, runs=runs)


if __name__ == "__main__":
    main()

"""Cost of one gen-lifting-gpu training step: uniform sampling (128 per ray) vs proposal sampling (128 + 64 on the
proposal fields, 48 on the radiance field).

    python benchmarks/sampling_cost.py --threads 1 --repeats 10

Both variants are the gen-lifting-gpu model (hash-grid field, paper encoder, K = 12 candidates) on the same
batches of the bundled 64x64 lego, timed alternately in one run: forward (candidate scoring + the winner's render)
+ backward, mean of ``--repeats`` steps after a warm-up step. The batch is smaller than the preset's (``--images``,
``--loss-pixels``, ``--score-pixels``) so that a CPU finishes; on a GPU machine pass the preset's sizes.
Prints a table and writes JSON with machine, command and commit.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lifting import git_commit, write_result  # noqa: E402  (same result format as the lifting benchmark)


def build_pipeline(sampler: str, args: argparse.Namespace):
    import method_configs.gen_lifting as specs
    from gen_lifting.datasets import resolve_data

    config = copy.deepcopy(specs.gen_lifting_gpu.config)
    dm = config.pipeline.datamanager
    dm.data = dm.dataparser.data = resolve_data(args.scene)
    dm.images_per_batch, dm.loss_pixels_per_image, dm.score_pixels_per_image = (
        args.images, args.loss_pixels, args.score_pixels)
    config.pipeline.model.sampler = sampler
    config.pipeline.model.num_samples = 128  # the uniform sampler's count before proposal sampling replaced it
    torch.manual_seed(0)
    pipe = config.pipeline.setup(device=args.device, test_mode="val")
    pipe.train()
    from nerfstudio.engine.callbacks import TrainingCallbackAttributes

    callbacks = pipe.model.get_training_callbacks(
        TrainingCallbackAttributes(optimizers=None, grad_scaler=None, pipeline=pipe, trainer=None))
    return pipe, callbacks


def time_step(pipe, callbacks, step: int) -> float:
    """One step's forward + backward, with the model's training callbacks around it (the proposal sampler's update
    schedule and annealing advance as in ns-train)."""
    from nerfstudio.engine.callbacks import TrainingCallbackLocation

    sync = torch.cuda.synchronize if pipe.device.type == "cuda" else (lambda: None)
    for cb in callbacks:
        cb.run_callback_at_location(step, TrainingCallbackLocation.BEFORE_TRAIN_ITERATION)
    sync()
    start = time.perf_counter()
    _, loss_dict, _ = pipe.get_train_loss_dict(step)
    sum(loss_dict.values()).backward()
    sync()
    elapsed = time.perf_counter() - start
    pipe.model.zero_grad(set_to_none=True)
    for cb in callbacks:
        cb.run_callback_at_location(step, TrainingCallbackLocation.AFTER_TRAIN_ITERATION)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scene", default="lego", help="bundled scene name or path (360 scene)")
    parser.add_argument("--images", type=int, default=2, help="images per step")
    parser.add_argument("--loss-pixels", type=int, default=256, help="winner pixels per image (with gradients)")
    parser.add_argument("--score-pixels", type=int, default=64, help="pixels per image per candidate (scoring)")
    parser.add_argument("--repeats", type=int, default=10,
                        help="timed steps per variant (a multiple of 5: the proposal fields update every 5th step)")
    parser.add_argument("--start-step", type=int, default=10_000,
                        help="step number of the first timed step (past nerfacto's 5000-step update warm-up)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "sampling_cost.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    commit = git_commit()
    pipes = {"uniform 128": build_pipeline("uniform", args), "proposal 128+64 -> 48": build_pipeline("proposal", args)}
    times = {name: [] for name in pipes}
    for pipe, callbacks in pipes.values():  # warm-up
        time_step(pipe, callbacks, args.start_step - 1)
    for i in range(args.repeats):
        for name, (pipe, callbacks) in pipes.items():
            times[name].append(time_step(pipe, callbacks, args.start_step + i))
    # mean, not median: one step in five also trains the proposal fields, and that cost belongs in the figure
    mean = {name: statistics.fmean(v) for name, v in times.items()}
    base = mean["uniform 128"]
    print(f"{'sampling':24s} {'step s':>8s} {'speed-up':>9s}")
    for name, m in mean.items():
        print(f"{name:24s} {m:8.3f} {base / m:8.2f}x")
    write_result(args.out, commit, device=args.device, images=args.images, loss_pixels=args.loss_pixels,
                 score_pixels=args.score_pixels, repeats=args.repeats, start_step=args.start_step,
                 mean_step_s=mean, speedup_vs_uniform=base / mean["proposal 128+64 -> 48"], step_times_s=times)


if __name__ == "__main__":
    main()

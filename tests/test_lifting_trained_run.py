"""What a user sees after training: the loaded run equals the trained one, and nerfstudio's tools show the model's
poses (ns-eval, ns-render dataset / interpolate / spiral, the viewer's training cameras)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from test_lifting_method import make_tiny_lego, tiny_config

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """8 steps of ns-train's trainer with coarse-to-fine on (4^3 -> 16^3 over 20 steps: 6^3 at the last step)."""
    root = tmp_path_factory.mktemp("trained")
    config = tiny_config(make_tiny_lego(root / "lego"))
    field = config.pipeline.model.field
    field.coarse_to_fine_steps, field.coarse_resolution = 20, 4
    config.max_num_iterations, config.steps_per_save = 8, 1000  # one checkpoint: the final one
    config.vis, config.output_dir = "tensorboard", root / "outputs"
    config.set_timestamp()
    config.save_config()  # as ns-train does before training
    trainer = config.setup(local_rank=0, world_size=1)
    trainer.setup()
    trainer.train()
    return trainer.pipeline, trainer.base_dir / "config.yml"


def _load(config_path: Path, test_mode: str = "val"):
    from nerfstudio.utils.eval_utils import eval_setup

    return eval_setup(config_path, test_mode=test_mode)[1]


def test_loaded_run_renders_and_evaluates_like_the_trained_one(trained):
    """Before the fix the coarse-to-fine resolution was not in the checkpoint: a loaded run rendered at 4^3 (the
    README demo: PSNR 15.57 loaded vs 17.24 in memory)."""
    pipeline, config_path = trained
    pipeline.eval()  # as eval_setup leaves a loaded one (no stratified sample jitter)
    assert int(pipeline.model.field.effective_resolution) == 6
    loaded = _load(config_path)
    assert int(loaded.model.field.effective_resolution) == 6
    c2w = pipeline.predict_all_c2w(pipeline.datamanager.train_images[:2])
    torch.testing.assert_close(loaded.predict_all_c2w(loaded.datamanager.train_images[:2]), c2w)
    render = pipeline.model.get_outputs_for_camera(pipeline.model.cameras_from_c2w(c2w[:1]))["rgb"]
    torch.testing.assert_close(loaded.model.get_outputs_for_camera(loaded.model.cameras_from_c2w(c2w[:1]))["rgb"],
                               render)
    in_memory, from_disk = pipeline.get_average_eval_image_metrics(), loaded.get_average_eval_image_metrics()
    for key in ("psnr", "ssim", "lpips", "rot_err_median_deg", "test_rot_err_median_deg", "test_within_15deg"):
        assert from_disk[key] == pytest.approx(in_memory[key], abs=1e-6), key


def test_ns_render_dataset_renders_each_photo_from_its_predicted_pose(trained, tmp_path):
    """``ns-render dataset`` builds its own datamanager from the config and renders its cameras: each training (and
    test) photo comes out rendered from the pose the model predicts for it, not from the dataset's pose."""
    from nerfstudio.scripts.render import DatasetRender

    _, config_path = trained
    out = tmp_path / "renders"
    DatasetRender(load_config=config_path, output_path=out, split="train+test", image_format="png",
                  rendered_output_names=["rgb"]).main()
    loaded = _load(config_path, "inference")  # as ns-render loads it
    dm = loaded.datamanager
    for split, images, gt in (("train", dm.train_images, dm.dataset_camera_to_worlds("train")),
                              ("test", dm.eval_images, dm.dataset_camera_to_worlds("eval"))):
        files = sorted((out / split / "rgb").rglob("*.png"))
        assert len(files) == len(images)
        predicted = loaded.predict_all_c2w(images)
        for i, file in enumerate(files):
            written = torch.from_numpy(np.asarray(Image.open(file), dtype=np.float32) / 255.0)
            expected = loaded.model.get_outputs_for_camera(loaded.model.cameras_from_c2w(predicted[i : i + 1]))["rgb"]
            at_dataset_pose = loaded.model.get_outputs_for_camera(loaded.model.cameras_from_c2w(gt[i : i + 1]))["rgb"]
            assert (written - expected).abs().max() <= 1 / 255 + 1e-6, (split, i)  # 8-bit PNG rounding only
            assert (written - at_dataset_pose).abs().max() > 0.05, (split, i)


def test_ns_render_dataset_of_a_split_the_run_has_not_posed_says_what_to_do(trained, tmp_path):
    from nerfstudio.scripts.render import DatasetRender

    _, config_path = trained
    with pytest.raises(ValueError, match="ns-eval --render-output-path"):
        DatasetRender(load_config=config_path, output_path=tmp_path, split="val", image_format="png").main()


def test_tools_read_the_predicted_poses_after_loading(trained):
    """The cameras ns-viewer (training frusta), ns-render interpolate and ns-render spiral read are the loaded
    model's predicted poses; the dataset's stay available for evaluation only."""
    _, config_path = trained
    loaded = _load(config_path, "test")  # as ns-render interpolate / spiral and ns-viewer load it
    dm = loaded.datamanager
    train_pred, test_pred = loaded.predict_all_c2w(dm.train_images), loaded.predict_all_c2w(dm.eval_images)
    torch.testing.assert_close(dm.train_dataset.cameras.camera_to_worlds, train_pred)
    torch.testing.assert_close(dm.eval_dataset.cameras.camera_to_worlds, test_pred)
    spiral_start, _ = dm.eval_dataloader.get_camera(image_idx=0)  # ns-render spiral
    torch.testing.assert_close(spiral_start.camera_to_worlds[0], test_pred[0])
    assert not torch.allclose(dm.dataset_camera_to_worlds("train"), train_pred, atol=1e-2)


def test_pose_vs_noise_from_the_loaded_run(trained, tmp_path):
    """``gen-lifting pose-vs-noise`` on the saved run: at t = eval_timestep its top-scoring errors are evaluate_poses'
    numbers; the best of K is never worse than the top-scoring candidate; the run's eval_timestep is left as it was."""
    import json

    from gen_lifting.diagnostics import pose_errors_by_noise
    from gen_lifting.scripts.cli import entrypoint

    pipeline, config_path = trained
    entrypoint(["pose-vs-noise", "--load-config", str(config_path), "--output-dir", str(tmp_path),
                "--timesteps", "0", "5", "9"])
    rows = json.loads((tmp_path / "pose_vs_noise.json").read_text())["rows"]
    assert [r["t"] for r in rows] == [0, 5, 9] and (tmp_path / "pose_vs_noise.png").stat().st_size > 0
    for r in rows:
        for split in ("train", "test"):
            assert r[f"{split}_best_of_k_rot_err_median_deg"] <= r[f"{split}_rot_err_median_deg"] + 1e-9
            assert 0.0 <= r[f"{split}_top_is_best"] <= 1.0
    assert rows[0]["alpha_bar"] > rows[1]["alpha_bar"] > rows[2]["alpha_bar"]
    loaded = _load(config_path, test_mode="test")
    eval_t = loaded.datamanager.config.eval_timestep
    expected = loaded.evaluate_poses()
    row = pose_errors_by_noise(loaded, [eval_t])[0]
    assert loaded.datamanager.config.eval_timestep == eval_t
    assert row["train_rot_err_median_deg"] == pytest.approx(expected["rot_err_median_deg"], abs=1e-6)
    assert row["test_rot_err_median_deg"] == pytest.approx(expected["test_rot_err_median_deg"], abs=1e-6)
    with pytest.raises(ValueError, match="timesteps must be in"):
        pose_errors_by_noise(loaded, [10_000])


def test_field_check_picks_the_candidate_whose_render_is_the_photo(trained, monkeypatch):
    """``--pipeline.candidate-check-pixels``: photos that are the field's renders from one of their candidates are
    posed at that candidate (not the top-scoring one), whatever they are batched with."""
    pipeline, _ = trained
    photos = pipeline.datamanager.train_images[:3]
    candidates, scores = pipeline.encode(photos)
    pick = (scores.argmax(dim=1) + torch.tensor([1, 5, 7])) % candidates.shape[1]  # never the top-scoring one
    chosen = candidates[torch.arange(3), pick]
    renders = torch.stack([pipeline.model.get_outputs_for_camera(pipeline.model.cameras_from_c2w(c[None]))["rgb"]
                           for c in chosen]).clamp(0, 1)
    monkeypatch.setattr(pipeline, "encode", lambda images: (candidates[: len(images)], scores[: len(images)]))
    monkeypatch.setattr(pipeline.config, "candidate_check_pixels", 256)
    c2w, index = pipeline.predict_checked(renders, chunk=3)
    assert index.tolist() == pick.tolist()
    torch.testing.assert_close(c2w, chosen)
    monkeypatch.setattr(pipeline, "encode", lambda images: (candidates[1:2], scores[1:2]))
    assert pipeline.predict_checked(renders[1:2], chunk=1)[1].tolist() == pick[1:2].tolist()
    monkeypatch.setattr(pipeline.config, "candidate_check_pixels", 0)
    with pytest.raises(ValueError, match="candidate-check-pixels"):
        pipeline.predict_checked(renders)


def test_field_check_metrics_and_predict_pose_from_the_loaded_run(trained, tmp_path):
    """With the check on, evaluate_poses adds checked_* / test_checked_* and keeps the top-score keys; the loaded run
    gives the in-memory numbers; ``gen-lifting predict-pose --check-pixels`` poses with the check, 0 with the top."""
    import json

    from gen_lifting.inference import read_photo
    from gen_lifting.scripts.cli import entrypoint

    pipeline, config_path = trained
    before = pipeline.evaluate_poses()
    pipeline.config.candidate_check_pixels = 64
    try:
        checked = pipeline.evaluate_poses()
    finally:
        pipeline.config.candidate_check_pixels = 0
    assert "checked_rot_err_median_deg" not in before
    for key in ("rot_err_median_deg", "test_rot_err_median_deg"):
        assert checked[key] == before[key]
    for key in ("checked_rot_err_median_deg", "test_checked_rot_err_median_deg", "test_checked_within_15deg",
                "robust_test_checked_rot_err_median_deg", "robust_checked_inlier_share"):
        assert np.isfinite(checked[key]), key
    loaded = _load(config_path)  # the split the trained pipeline holds out
    loaded.config.candidate_check_pixels = 64
    from_disk = loaded.evaluate_poses()
    for key in ("checked_rot_err_median_deg", "test_checked_rot_err_median_deg"):
        assert from_disk[key] == pytest.approx(checked[key], abs=1e-6), key
    # test-time refinement starts from the checked candidates (0 steps: its start is what it returns)
    assert loaded.config.test_time_refine_steps == 0
    start = loaded.predict_checked(loaded.datamanager.eval_images)[0]
    torch.testing.assert_close(loaded.refine_held_out_poses(), start)

    photo_path = next(Path(loaded.datamanager.config.data).joinpath("test").glob("*.png"))
    width, height = (int(v) for v in loaded.model.intrinsics[4:].tolist())
    photo = read_photo(photo_path, width, height)
    expected = int(loaded.predict_checked(photo[None])[1][0])
    for flag, rule, candidate in (("64", "field check", expected),
                                  ("0", "top score", int(loaded.encode(photo[None])[1][0].argmax()))):
        entrypoint(["predict-pose", "--load-config", str(config_path), "--image", str(photo_path),
                    "--output-dir", str(tmp_path / flag), "--check-pixels", flag])
        pose = json.loads((tmp_path / flag / "pose.json").read_text())
        assert (pose["rule"], pose["candidate"]) == (rule, candidate)

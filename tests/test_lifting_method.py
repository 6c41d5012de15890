"""gen-lifting as a nerfstudio method: GT-pose invariance, routing, CE target, eval, oracle, DDP unwrapping, smoke,
and the golden pose-discovery test."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from diffusion_utils.unet_blocks import UNetTrunkConfig
from gen_lifting.datasets import BUNDLED_DIR
from gen_lifting.hash_field import HashFieldConfig
from gen_lifting.proposal import ProposalSamplingConfig

pytestmark = pytest.mark.filterwarnings("ignore")


def make_tiny_lego(root: Path, n_train: int = 6, n_eval: int = 2, poses: str = "true",
                   pose_splits: tuple = ("train",)) -> Path:
    """A few frames of the bundled 64x64 lego; ``poses``: true | shuffled | random (for ``pose_splits``)."""
    src = BUNDLED_DIR / "lego"
    root.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(7)
    for split, n in (("train", n_train), ("val", n_eval), ("test", n_eval)):
        meta = json.loads((src / f"transforms_{split}.json").read_text())
        meta["frames"] = meta["frames"][:n]
        (root / split).mkdir(exist_ok=True)
        for frame in meta["frames"]:
            shutil.copy(src / (frame["file_path"][2:] + ".png"), root / (frame["file_path"][2:] + ".png"))
        if split in pose_splits and poses == "shuffled":
            mats = [f["transform_matrix"] for f in meta["frames"]]
            for f, m in zip(meta["frames"], mats[1:] + mats[:1]):
                f["transform_matrix"] = m
        elif split in pose_splits and poses == "random":
            for f in meta["frames"]:
                f["transform_matrix"] = (torch.randn(4, 4, generator=gen)).tolist()
        (root / f"transforms_{split}.json").write_text(json.dumps(meta))
    return root


def tiny_config(data: Path, method: str = "gen_lifting"):
    import method_configs.gen_lifting as specs

    config = copy.deepcopy(getattr(specs, method).config)
    config.pipeline.datamanager.data = data
    dm = config.pipeline.datamanager
    dm.images_per_batch, dm.loss_pixels_per_image, dm.score_pixels_per_image = 3, 32, 16
    model = config.pipeline.model
    model.num_samples = 16
    if isinstance(model.field, HashFieldConfig):  # the GPU preset's nerfacto field, shrunk
        model.field = HashFieldConfig(num_levels=4, max_res=64, log2_hashmap_size=12, hidden_dim=16,
                                      hidden_dim_color=16, implementation="torch")
    else:
        model.field.resolution = 16
        model.field.coarse_to_fine_steps = 0  # the CPU preset's schedules are step-based; unit tests use none
    if model.sampler == "proposal":  # the GPU preset's proposal sampling, shrunk
        model.proposal = ProposalSamplingConfig(
            num_proposal_samples_per_ray=(16, 8), num_nerf_samples_per_ray=8, implementation="torch",
            proposal_net_args_list=[{"hidden_dim": 8, "log2_hashmap_size": 10, "num_levels": 3, "max_res": 32}])
    model.random_route_prob = 0.0
    model.tv_loss_mult = 0.0
    dm.noise_warmup_steps = 0
    model.pose_encoder.trunk = UNetTrunkConfig(base_channels=8, channel_mults=(1, 2), num_res_blocks=1, norm_groups=4,
                                               mid_attention=False, downsample_last=True)
    config.machine.device_type = "cpu"
    return config


def setup_pipeline(data: Path, method: str = "gen_lifting", seed: int = 0):
    config = tiny_config(data, method)
    torch.manual_seed(seed)
    return config.pipeline.setup(device="cpu", test_mode="val")


@pytest.fixture(scope="module")
def tiny_lego(tmp_path_factory) -> Path:
    return make_tiny_lego(tmp_path_factory.mktemp("lego_true"))


@pytest.fixture(scope="module")
def pipeline(tiny_lego):
    return setup_pipeline(tiny_lego)


def _two_step_losses(pipe) -> list:
    opt = torch.optim.Adam(pipe.model.parameters(), lr=1e-2)
    losses = []
    for step in range(2):
        torch.manual_seed(100 + step)
        _, loss_dict, _ = pipe.get_train_loss_dict(step)
        loss = sum(loss_dict.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.detach().clone())
    return losses


@pytest.mark.parametrize("poses", ["shuffled", "random"])
def test_training_is_bit_identical_without_true_poses(tmp_path, tiny_lego, poses):
    reference = _two_step_losses(setup_pipeline(tiny_lego))
    other = _two_step_losses(setup_pipeline(make_tiny_lego(tmp_path / poses, poses=poses)))
    assert all(torch.equal(a, b) for a, b in zip(reference, other))


def test_llff_training_is_bit_identical_with_random_poses_and_bounds(tmp_path):
    """LLFF: poses and depth bounds random (intrinsics kept). Before the fix the scene box came from the true
    frustums of every view and the scale from the bounds, so these runs differed."""
    from test_llff_dataparser import randomised_fern

    reference = _two_step_losses(setup_pipeline(BUNDLED_DIR / "fern", "gen_lifting_single"))
    other = _two_step_losses(setup_pipeline(randomised_fern(tmp_path), "gen_lifting_single"))
    assert all(torch.equal(a, b) for a, b in zip(reference, other))


def test_evaluation_renders_from_the_predicted_poses(tmp_path, tiny_lego):
    """Held-out metrics change with the encoder and not with the dataset's poses (train and test poses random)."""
    reference = setup_pipeline(tiny_lego).get_average_eval_image_metrics()
    data = make_tiny_lego(tmp_path / "random", poses="random", pose_splits=("train", "val", "test"))
    other = setup_pipeline(data).get_average_eval_image_metrics()
    for key in ("psnr", "ssim", "lpips"):
        assert other[key] == reference[key], key
    moved = setup_pipeline(tiny_lego)
    with torch.no_grad():
        moved.model.pose_encoder.direction_head.bias.add_(0.5)  # every candidate camera moves
    assert moved.get_average_eval_image_metrics()["psnr"] != reference["psnr"]


def test_pose_errors_for_training_and_held_out_views(pipeline):
    """Held-out views are scored with the alignment fitted on the training views (``test_*`` keys), under the
    least-squares fit and (``robust_*``) its inlier refit."""
    from gen_lifting.alignment import fit_camera_alignment, fit_camera_alignment_inliers, pose_errors

    errors = pipeline.evaluate_poses()
    dm = pipeline.datamanager
    pred_train, pred_test = pipeline.predict_all_c2w(dm.train_images), pipeline.predict_all_c2w(dm.eval_images)
    gt_train, gt_test = dm.dataset_camera_to_worlds("train"), dm.dataset_camera_to_worlds("eval")
    alignment = fit_camera_alignment(pred_train.double(), gt_train.double(), "rotation")
    held_out = pose_errors(pred_test, gt_test, alignment=alignment)
    assert errors["test_rot_err_median_deg"] == pytest.approx(held_out["rot_err_median_deg"])
    assert errors["test_within_15deg"] == held_out["within_15deg"]
    refitted = pose_errors(pred_test, gt_test, mode="rotation")  # what fitting on the judged views would give
    assert errors["test_rot_err_mean_deg"] != pytest.approx(refitted["rot_err_mean_deg"])
    train = pose_errors(pred_train, gt_train, "rotation")
    assert errors["rot_err_median_deg"] == pytest.approx(train["rot_err_median_deg"])
    # robust_*: the same under the inlier refit, fitted on the training views only
    robust, inliers = fit_camera_alignment_inliers(pred_train.double(), gt_train.double(), "rotation")
    assert errors["robust_inlier_share"] == pytest.approx(inliers.double().mean().item())
    held_out = pose_errors(pred_test, gt_test, alignment=robust)
    assert errors["robust_test_rot_err_median_deg"] == pytest.approx(held_out["rot_err_median_deg"])
    assert errors["robust_rot_err_median_deg"] == pytest.approx(
        pose_errors(pred_train, gt_train, alignment=robust)["rot_err_median_deg"])


def test_eval_batches_do_not_shift_the_training_batches(tiny_lego):
    a, b = setup_pipeline(tiny_lego), setup_pipeline(tiny_lego)
    a.get_eval_loss_dict(0)
    batch_a, batch_b = a.datamanager.next_train(0)[1], b.datamanager.next_train(0)[1]
    for key in ("image_idx", "t", "x_t", "loss_pixels", "score_pixels"):
        assert torch.equal(batch_a[key], batch_b[key]), key


def test_oracle_trains_and_evaluates_on_the_dataset_poses(tiny_lego, pipeline):
    """gen-lifting-oracle: the same model and trainer; batches carry the dataset poses, held-out views are rendered
    from theirs (the upper bound); gen-lifting's batches carry none."""
    assert "camera_to_worlds" not in pipeline.datamanager.next_train(0)[1]
    oracle = setup_pipeline(tiny_lego, "gen_lifting_oracle")
    dm = oracle.datamanager
    _, batch = dm.next_train(0)
    assert torch.equal(batch["camera_to_worlds"], dm.dataset_camera_to_worlds("train")[batch["image_idx"]])
    outputs = oracle.model(batch)
    assert torch.equal(outputs["c2w"][:, 0], batch["camera_to_worlds"]) and "score_ce_loss" not in \
        oracle.model.get_loss_dict(outputs, batch)
    metrics = oracle.get_average_eval_image_metrics()
    assert "rot_err_median_deg" not in metrics
    assert torch.equal(dm.eval_dataset.cameras.camera_to_worlds, dm.dataset_camera_to_worlds("eval"))
    oracle.eval()
    psnrs = []
    for camera, image in dm.fixed_indices_eval_dataloader:
        outputs = oracle.model.get_outputs_for_camera(camera)
        psnrs.append(oracle.model.get_image_metrics_and_images(outputs, image)[0]["psnr"])
    assert metrics["psnr"] == pytest.approx(sum(psnrs) / len(psnrs))
    predicted = oracle.model.get_outputs_for_camera(oracle.predict_cameras(image["image"][None, ..., :3]))["rgb"]
    assert not torch.allclose(predicted, oracle.model.get_outputs_for_camera(camera)["rgb"])  # the two differ here


def test_gradient_reaches_only_the_chosen_candidate(pipeline):
    pipe = pipeline
    _, batch = pipe.datamanager.next_train(0)
    outputs = pipe.model(batch)
    outputs["c2w"].retain_grad()
    loss = sum(pipe.model.get_loss_dict(outputs, batch).values())
    loss.backward()
    grad = outputs["c2w"].grad.abs().sum(dim=(-1, -2))  # [batch, cand]
    chosen = F.one_hot(outputs["routed"], grad.shape[1]).bool()
    assert (grad[~chosen] == 0).all()
    assert (grad[chosen] > 0).all()
    pipe.model.zero_grad()
    # the chosen render's PSNR is the best of K against the clean image itself: logged as the oracle it is
    assert set(pipe.model.get_metrics_dict(outputs, batch)) >= {"oracle_best_of_k_psnr", "chosen_loss"}
    assert "psnr" not in pipe.model.get_metrics_dict(outputs, batch)


def test_ce_target_is_argmin_of_candidate_error(pipeline):
    pipe = pipeline
    _, batch = pipe.datamanager.next_train(1)
    with torch.no_grad():
        outputs = pipe.model(batch)
        loss = pipe.model.get_loss_dict(outputs, batch)
    assert torch.equal(outputs["winner"], outputs["cand_err"].argmin(dim=1))
    assert torch.equal(outputs["routed"], outputs["winner"])  # no exploration configured
    expected = 0.1 * F.cross_entropy(outputs["scores"], outputs["cand_err"].argmin(dim=1))
    assert torch.allclose(loss["score_ce_loss"], expected)


def test_random_routing_sends_gradient_to_the_routed_candidate(tiny_lego):
    pipe = setup_pipeline(tiny_lego)
    pipe.model.config.random_route_prob, pipe.model.config.random_route_steps = 1.0, 10
    pipe.model.config.random_route_moves_camera = True  # the CPU presets set False (next test)
    pipe.model.step = 0
    torch.manual_seed(5)
    _, batch = pipe.datamanager.next_train(0)
    outputs = pipe.model(batch)
    outputs["c2w"].retain_grad()
    sum(pipe.model.get_loss_dict(outputs, batch).values()).backward()
    grad = outputs["c2w"].grad.abs().sum(dim=(-1, -2))
    assert torch.equal(grad.argmax(dim=1), outputs["routed"])
    assert torch.equal(outputs["winner"], outputs["cand_err"].argmin(dim=1))  # CE target stays the argmin
    pipe.model.step = 10
    assert pipe.model.route_prob() == 0.0


def test_random_routes_can_train_the_field_only(tiny_lego):
    """random_route_moves_camera=False: an explored photo's render moves no camera (the CE loss on the scores
    still trains the encoder); the field still learns from it."""
    pipe = setup_pipeline(tiny_lego)
    cfg = pipe.model.config
    cfg.random_route_prob, cfg.random_route_steps, cfg.random_route_moves_camera = 1.0, 10, False
    pipe.model.step = 0  # route_prob 1: every photo is explored
    _, batch = pipe.datamanager.next_train(0)
    outputs = pipe.model(batch)
    outputs["c2w"].retain_grad()
    loss = pipe.model.get_loss_dict(outputs, batch)
    loss["rgb_loss"].backward()
    assert outputs["c2w"].grad is None or not outputs["c2w"].grad.any()
    assert any(p.grad is not None and p.grad.any() for p in pipe.model.field_parameters())
    cfg.random_route_moves_camera = True  # as before: the explored render moves its camera
    pipe.model.zero_grad()
    outputs = pipe.model(batch)
    outputs["c2w"].retain_grad()
    pipe.model.get_loss_dict(outputs, batch)["rgb_loss"].backward()
    assert outputs["c2w"].grad.abs().sum(dim=(-1, -2)).gt(0).any()


def test_camera_spread_tells_constant_cameras_from_photo_dependent_ones(tiny_lego):
    """diagnostics.camera_spread (ground-truth free): an encoder whose cameras ignore the photo scores 0 on both
    statistics; once its cameras depend on the photo, both are positive."""
    from gen_lifting.diagnostics import camera_spread

    pipe = setup_pipeline(tiny_lego)
    head = pipe.model.pose_encoder.direction_head
    with torch.no_grad():
        head.weight.zero_()  # every photo gets the same K cameras (the biases), and the scores are all zero
    flat = camera_spread(pipe)
    assert flat["top_spread_deg"] == pytest.approx(0.0, abs=1e-3)
    assert flat["candidate_dependence_deg"] == pytest.approx(0.0, abs=1e-3)
    with torch.no_grad():
        head.weight.normal_(std=3.0)
    moving = camera_spread(pipe)
    assert moving["top_spread_deg"] > 1.0 and moving["candidate_dependence_deg"] > 1.0
    assert pipe.training  # restored


def test_tv_prior_decays_to_zero_after_its_start_step(tiny_lego):
    pipe = setup_pipeline(tiny_lego)
    cfg = pipe.model.config
    cfg.tv_loss_mult, cfg.tv_decay_start_step, cfg.tv_decay_steps = 0.1, 10, 4
    weights = []
    for step in (0, 9, 10, 12, 14, 20):
        pipe.model.step = step
        weights.append(pipe.model.tv_weight())
    assert weights == pytest.approx([0.1, 0.1, 0.1, 0.05, 0.0, 0.0])
    torch.manual_seed(5)
    _, batch = pipe.datamanager.next_train(0)
    outputs = pipe.model(batch)
    pipe.model.step = 12
    tv_half = pipe.model.get_loss_dict(outputs, batch)["tv_loss"]
    assert torch.allclose(tv_half, 0.05 * pipe.model.field.total_variation())
    pipe.model.step = 14
    assert "tv_loss" not in pipe.model.get_loss_dict(outputs, batch)  # fully decayed: no term at all
    from gen_lifting.guards import FlagError

    cfg.tv_decay_steps = 0
    with pytest.raises(FlagError, match="tv-decay"):
        pipe.config.__post_init__()


def test_eval_uses_predicted_poses_and_reports_metrics(pipeline):
    metrics = pipeline.get_average_eval_image_metrics()
    for key in ("psnr", "ssim", "lpips", "rot_err_median_deg", "within_15deg"):
        assert key in metrics and metrics[key] == metrics[key]  # present and not NaN
    metrics_one, images = pipeline.get_eval_image_metrics_and_images(0)
    assert images["img"].shape == (64, 128, 3)


def test_ddp_wrapped_model_is_unwrapped(tmp_path, pipeline):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        inner = pipeline._model
        pipeline._model = DDP(inner, find_unused_parameters=True)
        assert pipeline.model is inner
        _, loss_dict, _ = pipeline.get_train_loss_dict(0)
        sum(loss_dict.values()).backward()
        assert inner.pose_encoder.direction_head.weight.grad is not None
    finally:
        pipeline._model = inner
        dist.destroy_process_group()
        inner.zero_grad()


def test_unknown_data_name_is_a_one_line_error():
    config = tiny_config(Path("no-such-scene"))
    with pytest.raises(SystemExit) as err:
        config.pipeline.setup(device="cpu", test_mode="val")
    message = str(err.value)
    assert "\n" not in message and "lego" in message and "fern" in message


@pytest.mark.parametrize("method", ["gen_lifting", "gen_lifting_refine", "gen_lifting_ae", "gen_lifting_single",
                                    "gen_lifting_gpu", "gen_lifting_oracle", "gen_lifting_single_oracle"])
def test_ns_train_two_iterations(tmp_path, tiny_lego, method):
    from nerfstudio.scripts.train import main

    data = tiny_lego if "single" not in method else BUNDLED_DIR / "fern"
    config = tiny_config(data, method)
    config.max_num_iterations = 2
    config.vis = "tensorboard"
    config.output_dir = tmp_path / "outputs"
    config.steps_per_save = 1
    main(config)
    ckpts = list((tmp_path / "outputs").rglob("step-*.ckpt"))
    assert ckpts, "no checkpoint written"
    if method != "gen_lifting":
        return
    # the commands that use a trained run, on the checkpoint just written
    from gen_lifting.scripts.cli import entrypoint

    cfg = str(next((tmp_path / "outputs").rglob("config.yml")))
    photo = str(next((tiny_lego / "test").glob("*.png")))
    out = tmp_path / "uses"
    entrypoint(["predict-pose", "--load-config", cfg, "--image", photo, "--output-dir", str(out / "pose")])
    pose = json.loads((out / "pose" / "pose.json").read_text())
    assert len(pose["camera_to_world"]) == 3 and 0 <= pose["candidate"] < 12
    entrypoint(["sample", "--load-config", cfg, "--output-dir", str(out / "sample")])
    assert (out / "sample" / "sample_000" / "view.png").is_file()
    entrypoint(["orbit", "--load-config", cfg, "--output-dir", str(out / "orbit"), "--frames", "8"])
    assert (out / "orbit" / "orbit.png").is_file()
    # ns-render's spiral camera path on the same run (video through the bundled ffmpeg)
    from nerfstudio.scripts.render import SpiralRender

    SpiralRender(load_config=Path(cfg), output_path=out / "spiral.mp4", seconds=0.5, frame_rate=8).main()
    assert (out / "spiral.mp4").stat().st_size > 0


def golden_config(root: Path, seed: int = 0, steps: int = 1000):
    """The CPU preset on lego's 100 training views with the cost per step cut (32^3 grid, 24 samples, 128 loss and
    32 score pixels) and its schedules (coarse-to-fine, random routing, noise curriculum) shortened to 800 steps."""
    import method_configs.gen_lifting as specs

    config = copy.deepcopy(specs.gen_lifting.config)
    config.pipeline.datamanager.data = make_tiny_lego(root / "lego100", n_train=100, n_eval=10)
    dm, model = config.pipeline.datamanager, config.pipeline.model
    dm.loss_pixels_per_image, dm.score_pixels_per_image, dm.noise_warmup_steps, dm.seed = 128, 32, 800, seed
    model.num_samples, model.field.resolution = 24, 32
    model.field.coarse_to_fine_steps = model.random_route_steps = 800
    config.machine.device_type, config.machine.seed = "cpu", seed
    config.max_num_iterations, config.steps_per_save, config.steps_per_eval_batch = steps, 10**9, 10**9
    config.steps_per_eval_image, config.vis, config.output_dir = 10**9, "tensorboard", root / "outputs"
    return config


def pose_discovery_run(root: Path, seed: int = 0, steps: int = 1000):
    """(pose errors before training, after ``steps`` steps of nerfstudio's Trainer), on one torch thread: the
    numbers below were measured that way, and CPU kernels may sum in another order with more threads (run alone on
    2 threads, seed 0 ended at 50.4 deg instead of 35.8, while the whole suite ran it after a test that had left
    torch at one thread)."""
    config = golden_config(root, seed, steps)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(seed)
        trainer = config.setup(local_rank=0, world_size=1)
        trainer.setup()
        before = trainer.pipeline.evaluate_poses()
        trainer.train()
        return before, trainer.pipeline.evaluate_poses()
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_golden_poses_are_learned(tmp_path):
    """End-to-end golden test: 1000 steps of the (cut-down) CPU preset on lego's 100 views must pose the views far
    better than the untrained encoder. A frozen encoder keeps its step-0 poses, so "before" is also what a run whose
    poses are not learned ends with (the old golden test, a PSNR gain, passed with the encoder frozen).
    Measured, median aligned rotation error in degrees, before -> after (seeds 0 / 1 / 2, one thread, ~110 s each on
    a 2-core AMD EPYC, with the presets' field-only random routes): training views 88.9 -> 34.2, 85.4 -> 22.1,
    85.9 -> 42.7; held-out views 77.2 -> 34.4, 81.9 -> 27.1, 83.6 -> 43.0 (when explored renders also moved their
    cameras, on an earlier machine: 35.8 / 38.0 / 41.4 and 57.4 / 41.6 / 41.9). Margins of the asserts at the worst
    seed: 7.3 deg (train < 50), 13.2 deg (drop > 30), 30.6 deg (held-out drop > 10). Not yet discovery (the full
    preset needs ~2000 steps); learning, not a frozen map."""
    before, after = pose_discovery_run(tmp_path)
    print(f"golden: training views {before['rot_err_median_deg']:.1f} -> {after['rot_err_median_deg']:.1f} deg, "
          f"held-out {before['test_rot_err_median_deg']:.1f} -> {after['test_rot_err_median_deg']:.1f} deg")
    assert after["rot_err_median_deg"] < 50.0
    assert after["rot_err_median_deg"] < before["rot_err_median_deg"] - 30.0
    assert after["test_rot_err_median_deg"] < before["test_rot_err_median_deg"] - 10.0


def test_viewer_frustums_follow_predicted_poses(pipeline):
    from gen_lifting.viewer_frustums import update_viewer_frustums

    class Handle:
        position = wxyz = None

    class Scene:
        def __init__(self):
            self.calls = []

        def add_camera_frustum(self, name, **kwargs):
            self.calls.append((name, kwargs))

    class Server:
        scene = Scene()

    class ViewerState:
        viser_server = Server()
        camera_handles = {0: Handle()}

    state = ViewerState()
    calls = []
    predict = pipeline.predict
    pipeline.predict = lambda images: calls.append(len(images)) or predict(images)  # count encoder passes
    try:
        drawn = update_viewer_frustums(pipeline, state)
    finally:
        del pipeline.predict
    n = len(pipeline.datamanager.train_images)
    assert drawn == n and len(state.viser_server.scene.calls) == n
    # one encoder pass per photo per redraw (training and held-out photos), not a second one for the colours
    assert sum(calls) == n + len(pipeline.datamanager.eval_images)
    from gen_lifting.viewer_frustums import candidate_colour

    winners = pipeline.predict(pipeline.datamanager.train_images[:3])[1].tolist()
    k = pipeline.model.pose_encoder.num_candidates
    assert [kw["color"] for _, kw in state.viser_server.scene.calls[:3]] == [candidate_colour(c, k) for c in winners]
    pred = pipeline.predict_c2w(pipeline.datamanager.train_images[:1])[0]
    assert torch.allclose(torch.tensor(state.camera_handles[0].position, dtype=torch.float32), pred[:, 3] * 10, atol=1e-3)
    assert update_viewer_frustums(pipeline, object()) == 0  # no viewer: nothing drawn


def test_demo_command_writes_renders_and_camera_plot(tmp_path, tiny_lego):
    from gen_lifting.scripts.cli import entrypoint

    out = tmp_path / "demo"
    entrypoint(["demo", "--output-dir", str(out), "--max-num-iterations", "2", "--data", str(tiny_lego)])
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert {"psnr", "ssim", "lpips", "rot_err_median_deg"} <= set(metrics)
    assert (out / "orbit.png").is_file() and (out / "cameras.png").is_file()
    assert list((out / "test_renders").glob("eval_img_*.png"))


def test_demo_with_the_refine_preset_reports_refined_metrics(tmp_path, tiny_lego, capsys):
    """``gen-lifting demo --method gen-lifting-refine``: held-out poses refined at test time (``psnr_refined``) from
    the field-checked candidates (``test_checked_*``);
    an unknown method is a one-line error."""
    from gen_lifting.scripts.cli import entrypoint

    out = tmp_path / "demo"
    entrypoint(["demo", "--output-dir", str(out), "--max-num-iterations", "2", "--data", str(tiny_lego),
                "--method", "gen-lifting-refine"])
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    expected = {"psnr", "psnr_refined", "test_refined_rot_err_median_deg", "test_checked_rot_err_median_deg"}
    assert expected <= set(metrics)
    with pytest.raises(SystemExit, match="gen-lifting-refine"):
        entrypoint(["demo", "--output-dir", str(tmp_path / "x"), "--method", "gen-lifting-nope"])
    assert not (tmp_path / "x").exists()


def test_noise_curriculum_caps_t(tiny_lego):
    pipe = setup_pipeline(tiny_lego)
    dm = pipe.datamanager
    assert dm.t_max(0) == 100  # paper default: no curriculum
    dm.config.noise_warmup_steps = 50
    assert dm.t_max(0) == 1 and dm.t_max(25) == 51 and dm.t_max(50) == 100 and dm.t_max(500) == 100
    dm.config.noise_start_steps = 200  # t = 0 only until step 200, then the same ramp
    assert dm.t_max(0) == 1 and dm.t_max(199) == 1 and dm.t_max(225) == 51 and dm.t_max(250) == 100
    dm.config.noise_start_steps = 0
    dm.config.timestep_power = 2.0  # skewed toward small t, still inside [0, t_max)
    t = dm.sample_timesteps(20000, torch.Generator().manual_seed(0), 100)
    assert t.min() >= 0 and t.max() <= 99
    assert abs((t < 10).float().mean().item() - 0.1 ** 0.5) < 0.02  # P(u^2 < 0.1) = sqrt(0.1)
    assert (dm.sample_timesteps(50, torch.Generator().manual_seed(0), 1) == 0).all()
    dm.config.timestep_power = 1.0
    _, batch = dm.next_train(0)
    assert (batch["t"] == 0).all()
    dm.config.noise_warmup_steps = 0


def test_gpu_preset_field_is_nerfstudios_nerfacto_field_without_tcnn(tiny_lego):
    """The GPU preset's field is nerfstudio's NerfactoField; without tinycudann/CUDA 'auto' picks pure torch, and
    the winner's render still sends gradients into both the hash grid and the camera."""
    from nerfstudio.fields.nerfacto_field import NerfactoField

    import method_configs.gen_lifting as specs

    assert isinstance(specs.gen_lifting_gpu.config.pipeline.model.field, HashFieldConfig)
    if not torch.cuda.is_available():
        assert HashFieldConfig().resolved_implementation() == "torch"
    pipe = setup_pipeline(tiny_lego, "gen_lifting_gpu")
    assert isinstance(pipe.model.field, NerfactoField)
    _, batch = pipe.datamanager.next_train(0)
    outputs = pipe.model(batch)
    outputs["c2w"].retain_grad()
    sum(pipe.model.get_loss_dict(outputs, batch).values()).backward()
    assert outputs["c2w"].grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in pipe.model.field.mlp_base.parameters())


def test_gpu_preset_proposal_sampling_trains_its_density_fields(tiny_lego):
    """The GPU preset samples with nerfstudio's proposal networks: the winner's render carries the interlevel loss,
    and a step that is due to update the proposal fields gives them gradients even though the candidate scoring
    (no gradients) renders through the same sampler first."""
    import method_configs.gen_lifting as specs

    assert specs.gen_lifting_gpu.config.pipeline.model.sampler == "proposal"
    pipe = setup_pipeline(tiny_lego, "gen_lifting_gpu")
    model = pipe.model
    assert all(any(p is q for q in model.get_param_groups()["fields"]) for p in model.proposal.parameters())
    for net in model.proposal.networks:  # proposal densities far below the field's: the interlevel loss is active
        net.average_init_density = 1e-4
    sampler = model.proposal.sampler
    sampler._step, sampler._steps_since_update = 100, 100  # past the warm-up steps, an update is due
    _, batch = pipe.datamanager.next_train(0)
    outputs = model(batch)
    losses = model.get_loss_dict(outputs, batch)
    assert losses["interlevel_loss"] > 1e-3
    sum(losses.values()).backward()
    for net in model.proposal.networks:
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
    assert sampler._steps_since_update == 0  # the winner's render used the update, the scoring did not
    model.zero_grad()
    # a step that is not due: the proposal fields are queried without gradients and the counter keeps running
    sampler._steps_since_update = 1
    outputs = model(batch)
    sum(model.get_loss_dict(outputs, batch).values()).backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.proposal.parameters())
    assert sampler._steps_since_update == 1
    model.zero_grad()


def test_candidate_scoring_in_chunks_matches_one_pass(pipeline):
    pipe = pipeline
    _, batch = pipe.datamanager.next_train(0)
    pipe.eval()  # deterministic sample positions
    try:
        whole = pipe.model(batch)["cand_err"]
        pipe.model.config.score_chunk_rays = 20  # 1 camera (16 score pixels) per chunk
        chunked = pipe.model(batch)["cand_err"]
    finally:
        pipe.model.config.score_chunk_rays = 8192
        pipe.train()
    torch.testing.assert_close(chunked, whole)


def test_index_select_hash_lookup_matches_nerfstudio_values_and_gradients():
    from nerfstudio.field_components.encodings import HashEncoding

    from gen_lifting.hash_field import IndexSelectHashEncoding

    torch.manual_seed(0)
    ref = HashEncoding(num_levels=4, min_res=4, max_res=64, log2_hashmap_size=8, implementation="torch")
    fast = copy.deepcopy(ref)
    fast.__class__ = IndexSelectHashEncoding
    x = torch.rand(500, 3)
    out_ref, out_fast = ref(x), fast(x)
    torch.testing.assert_close(out_fast, out_ref)
    out_ref.pow(2).sum().backward()
    out_fast.pow(2).sum().backward()
    torch.testing.assert_close(fast.hash_table.grad, ref.hash_table.grad)
    assert HashFieldConfig(num_levels=2, log2_hashmap_size=8, implementation="torch").setup(
        aabb=torch.tensor([[-1.0] * 3, [1.0] * 3])).mlp_base.model[0].__class__ is IndexSelectHashEncoding


def test_demo_methods_name_their_registered_specs():
    """Each ``gen-lifting demo --method`` name reads the MethodSpecification registered under that name."""
    import method_configs.gen_lifting as specs
    from gen_lifting.scripts.cli import DEMO_METHODS

    for name in DEMO_METHODS:
        assert getattr(specs, name.replace("-", "_")).config.method_name == name


def test_cpu_presets_pose_larger_views_through_a_64px_copy():
    """gen-lifting's CPU presets read views larger than 64 px through a 64-px copy (pose_encoder.input_size), which
    at 64 px (the bundled lego, every measured CPU result) is the identity; the GPU and forward-facing presets read
    their views at full size."""
    import method_configs.gen_lifting as specs

    for spec in (specs.gen_lifting, specs.gen_lifting_refine, specs.gen_lifting_ae, specs.gen_lifting_oracle):
        assert spec.config.pipeline.model.pose_encoder.input_size == 64
    for spec in (specs.gen_lifting_gpu, specs.gen_lifting_single):
        assert spec.config.pipeline.model.pose_encoder.input_size == 0

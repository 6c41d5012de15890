"""Optional pose refinement after discovery (gen_lifting/refinement.py): off by default and then inert, identity at
start, saved and loaded with the run, iNeRF-like held-out refinement that must reduce a known pose error, and an
ns-train-flag run whose loaded checkpoint evaluates to the in-memory numbers."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import roma
import torch
from nerfstudio.cameras.camera_optimizers import CameraOptimizerConfig

from gen_lifting.refinement import PoseRefinement, apply_correction, refine_poses
from test_lifting_method import make_tiny_lego, setup_pipeline, tiny_config

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def tiny_lego(tmp_path_factory) -> Path:
    return make_tiny_lego(tmp_path_factory.mktemp("refine") / "lego", n_train=4, n_eval=2)


def refining_pipeline(data: Path, start: int = 1, test_steps: int = 0, seed: int = 0):
    config = tiny_config(data)
    config.pipeline.model.pose_refinement_start_step = start
    config.pipeline.test_time_refine_steps = test_steps
    torch.manual_seed(seed)
    return config.pipeline.setup(device="cpu", test_mode="val")


def losses(pipe, steps=(0, 1)):
    out = []
    opt = torch.optim.Adam(pipe.model.parameters(), lr=1e-2)
    for step in steps:
        torch.manual_seed(100 + step)
        _, loss_dict, _ = pipe.get_train_loss_dict(step)
        opt.zero_grad()
        sum(loss_dict.values()).backward()
        opt.step()
        out.append({k: v.detach().clone() for k, v in loss_dict.items()})
    return out


def test_off_by_default_changes_nothing(tiny_lego):
    """Default: no refinement module, the thesis' param groups and loss terms; a refinement that has not started
    yet (start step never reached) gives bit-identical losses."""
    default = setup_pipeline(tiny_lego)
    assert default.model.config.pose_refinement_start_step == 0 and default.config.test_time_refine_steps == 0
    assert default.model.pose_refinement is None
    assert set(default.model.get_param_groups()) == {"fields", "pose_encoder"}
    assert not any("pose_refinement" in key or "camera_opt" in key for key in default.model.state_dict())
    reference = losses(default)
    assert set(reference[0]) == {"rgb_loss", "score_ce_loss"}
    waiting = refining_pipeline(tiny_lego, start=10**9)
    for a, b in zip(reference, losses(waiting)):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    metrics = default.get_average_eval_image_metrics()
    assert not any("refined" in key for key in metrics)


def test_correction_starts_at_identity_and_orbits_about_the_origin(tiny_lego):
    """At the start step the refined poses are the snapshot, which is the encoder's top-scoring pose of each
    training photo, and nerfstudio's tools see them; a rotation correction orbits a camera about the origin."""
    pipe = refining_pipeline(tiny_lego, start=1)
    refinement = pipe.model.pose_refinement
    assert set(pipe.model.get_param_groups()) == {"fields", "pose_encoder", "camera_opt"}
    assert not pipe.maybe_start_pose_refinement(0) and not refinement.is_started
    assert pipe.maybe_start_pose_refinement(1) and refinement.is_started
    assert not pipe.maybe_start_pose_refinement(2)  # once only
    encoder = pipe.predict_all_c2w(pipe.datamanager.train_images)
    assert torch.equal(refinement.snapshot_c2w, encoder)
    assert torch.equal(refinement.c2w(), encoder)  # identity correction
    # a rotation-only correction orbits the camera about the origin (centre and axes turn together)
    with torch.no_grad():
        refinement.camera_optimizer.pose_adjustment[2] = torch.tensor([0.0, 0.0, 0.0, 0.1, -0.2, 0.05])
    turn = roma.rotvec_to_rotmat(torch.tensor([0.1, -0.2, 0.05]))
    moved = refinement.c2w(torch.tensor([2]))[0]
    assert torch.allclose(moved[:, 3], turn @ encoder[2, :, 3], atol=1e-5)
    assert torch.allclose(moved[:, :3], turn @ encoder[2, :, :3], atol=1e-5)
    assert torch.equal(refinement.c2w(torch.tensor([1])), encoder[1:2])  # the others stay
    pipe.show_predicted_poses()
    assert torch.allclose(pipe.datamanager.train_dataset.cameras.camera_to_worlds, refinement.c2w().detach())
    assert torch.allclose(pipe.model.view_poses["train"], refinement.c2w().detach())


def test_demo_plots_the_refined_cameras_once_refinement_has_started(tiny_lego, tmp_path):
    """The demo's camera pictures: the encoder's poses always, the refined ones only after the start step."""
    from gen_lifting.scripts.cli import write_camera_plots

    pipe = refining_pipeline(tiny_lego, start=1)
    assert [p.name for p in write_camera_plots(pipe, {}, tmp_path / "a")] == ["cameras.png"]
    pipe.maybe_start_pose_refinement(1)
    written = write_camera_plots(pipe, {"refined_rot_err_median_deg": 1.0}, tmp_path / "b")
    assert [p.name for p in written] == ["cameras.png", "cameras_refined.png"] and all(p.is_file() for p in written)


def test_refined_loss_trains_field_and_corrections_not_the_encoder_render(tiny_lego):
    """After the start the field gets gradient only from the refined cameras; the encoder still learns."""
    pipe = refining_pipeline(tiny_lego, start=1)
    pipe.maybe_start_pose_refinement(1)
    pipe.train()
    torch.manual_seed(0)
    _, loss, metrics = pipe.get_train_loss_dict(1)
    assert {"rgb_loss", "refined_rgb_loss", "camera_opt_regularizer", "score_ce_loss"} <= set(loss)
    assert "refined_pose_train_psnr" in metrics
    field = pipe.model.field
    grads = [torch.autograd.grad(loss[key], [field.density_grid, pipe.model.pose_refinement.camera_optimizer
                                             .pose_adjustment], allow_unused=True, retain_graph=True)
             for key in ("rgb_loss", "refined_rgb_loss")]
    assert grads[0][0] is None and grads[0][1] is None  # encoder render: no field gradient
    assert grads[1][0].abs().sum() > 0 and grads[1][1].abs().sum() > 0
    encoder_grad = torch.autograd.grad(loss["rgb_loss"], [pipe.model.pose_encoder.direction_head.weight])[0]
    assert encoder_grad.abs().sum() > 0
    assert all(p.requires_grad for p in field.parameters())  # the freeze is undone


def test_field_max_t_trains_the_field_from_low_noise_images_only(tiny_lego):
    """Ours: ``field_max_t`` keeps images noised to t >= it out of the field's gradient; their renders still train
    the encoder, and the batch's rows stay in order (a row's loss pixels keep their own colours)."""
    config = tiny_config(tiny_lego)
    config.pipeline.model.field_max_t = 10
    torch.manual_seed(0)
    pipe = config.pipeline.setup(device="cpu", test_mode="val")
    pipe.train()
    _, batch = pipe.datamanager.next_train(0)
    batch["t"] = torch.tensor([3, 50, 80])  # row 0 trains the field, rows 1 and 2 only the encoder
    out = pipe.model(batch)
    rgb = out["rgb"].reshape(3, -1, 3)
    field, head = pipe.model.field.density_grid, pipe.model.pose_encoder.direction_head.weight
    low = torch.autograd.grad(rgb[0].sum(), [field, head], retain_graph=True)
    high = torch.autograd.grad(rgb[1:].sum(), [field, head], retain_graph=True)
    assert low[0].abs().sum() > 0 and low[1].abs().sum() > 0
    assert high[0].abs().sum() == 0 and high[1].abs().sum() > 0
    assert all(p.requires_grad for p in pipe.model.field.parameters())  # the freeze is undone
    pipe.eval()  # deterministic samples: the same rows rendered without the gate give the same colours
    with torch.no_grad():
        ref = pipe.model.render_pixels(out["c2w"][torch.arange(3), out["routed"]], batch["loss_pixels"])
        gated = pipe.model.render_gated(out["c2w"][torch.arange(3), out["routed"]], batch["loss_pixels"],
                                        torch.tensor([True, False, True]))["rgb"].reshape(3, -1, 3)
    assert torch.allclose(gated, ref, atol=1e-6)
    batch["t"] = torch.tensor([20, 50, 80])  # no row below the gate: no field gradient at all
    pipe.train()
    rgb = pipe.model(batch)["rgb"]
    assert torch.autograd.grad(rgb.sum(), [field], allow_unused=True)[0] is None
    from gen_lifting.guards import FlagError

    config.pipeline.model.field_max_t = 1000
    with pytest.raises(FlagError, match="field-max-t"):
        config.pipeline.__post_init__()


def test_distillation_pulls_the_encoder_toward_the_refined_cameras_only(tiny_lego):
    """Ours: ``refinement_distill_mult`` adds a loss on the encoder's winning camera against the refined one (held
    fixed): it trains the encoder, never the corrections or the field; it needs refinement."""
    from gen_lifting.guards import FlagError

    config = tiny_config(tiny_lego)
    config.pipeline.model.pose_refinement_start_step = 1
    config.pipeline.model.refinement_distill_mult = 1.0
    torch.manual_seed(0)
    pipe = config.pipeline.setup(device="cpu", test_mode="val")
    pipe.maybe_start_pose_refinement(1)
    pipe.train()
    torch.manual_seed(0)
    _, loss, _ = pipe.get_train_loss_dict(1)
    distill = loss["pose_distill_loss"]
    assert distill > 0
    refinement = pipe.model.pose_refinement
    enc, corr, grid = torch.autograd.grad(
        distill, [pipe.model.pose_encoder.direction_head.weight, refinement.camera_optimizer.pose_adjustment,
                  pipe.model.field.density_grid], allow_unused=True)
    assert enc.abs().sum() > 0 and corr is None and grid is None
    _, batch = pipe.datamanager.next_train(1)  # weighted by alpha_bar(t): nothing asked of pure noise
    outputs = pipe.model(batch)
    assert pipe.model.get_loss_dict(outputs, batch)["pose_distill_loss"] > 0
    batch["alpha_bar"] = torch.zeros_like(batch["alpha_bar"])
    assert pipe.model.get_loss_dict(outputs, batch)["pose_distill_loss"] == 0
    config.pipeline.model.pose_refinement_start_step = 0
    with pytest.raises(FlagError, match="refinement-distill-mult needs pose refinement"):
        config.pipeline.__post_init__()


def toy_field_pipeline(data: Path):
    """A fixed, hand-made field (an off-centre coloured box): the photometric error has a clear minimum at the
    true pose."""
    config = tiny_config(data)
    config.pipeline.model.num_samples = 48
    config.pipeline.model.field.resolution = 32
    torch.manual_seed(0)
    pipe = config.pipeline.setup(device="cpu", test_mode="val")
    field = pipe.model.field
    r = 32
    axis = torch.linspace(-1.5, 1.5, r)  # the blender scene box
    z, y, x = torch.meshgrid(axis, axis, axis, indexing="ij")  # grid_sample order: (D, H, W) = (z, y, x)
    inside = (x.abs() < 0.8) & ((y - 0.2).abs() < 0.6) & ((z + 0.1).abs() < 0.7)
    with torch.no_grad():
        field.density_grid.copy_(torch.where(inside, 4.0, -8.0)[None, None])
        field.color_grid.copy_(torch.stack([3 * x, 3 * y, 3 * z * torch.sign(x)])[None])
    pipe.eval()
    return pipe


def toy_pose_problem(pipe):
    """Two held-out views of the toy field: their true c2w, the field's renders from them (the target photos) and
    start poses turned by 6 degrees about the origin (two different axes)."""
    true = pipe.datamanager.dataset_camera_to_worlds("eval")[:2]
    with torch.no_grad():
        target = torch.stack([pipe.model.get_outputs_for_camera(pipe.model.cameras_from_c2w(true[i:i + 1]))["rgb"]
                              for i in range(2)])
    axes = torch.nn.functional.normalize(torch.tensor([[0.3, -0.8, 0.5], [-0.6, 0.2, 0.7]]), dim=1)
    return true, target, roma.rotvec_to_rotmat(axes * math.radians(6.0)) @ true


def test_test_time_refinement_reduces_a_known_pose_error(tiny_lego):
    """Toy: the field is fixed, the target photo is its render from a true pose, and the start pose is that pose
    turned by 6 degrees about the origin. 100 steps must bring the rotation error to under half of that
    (measured: 1.8 and 0.06 deg)."""
    pipe = toy_field_pipeline(tiny_lego)
    true, target, start = toy_pose_problem(pipe)

    def error(c2w):
        return torch.rad2deg(roma.rotmat_geodesic_distance(c2w[:, :, :3], true[:, :, :3]))

    refined = refine_poses(pipe.model.render_pixels, start, target, steps=100, pixels_per_view=512, lr=5e-3)
    before, after = error(start), error(refined)
    assert torch.allclose(before, torch.full((2,), 6.0), atol=1e-3)
    assert (after < 3.0).all() and after.mean() < 1.5, (before, after)
    assert not any(p.grad is not None for p in pipe.model.field.parameters())  # the field is untouched
    # zero steps: the start pose itself
    assert torch.equal(refine_poses(pipe.model.render_pixels, start, target, 0, 512, 5e-3), start)


def test_rotation_only_corrections_keep_each_camera_on_its_sphere(tiny_lego):
    """``--pipeline.model.pose-refinement-translation False``: a correction's translation is dropped (training
    refinement, re-selection and test-time refinement alike), so a camera turns about the origin and keeps its
    distance to it; the toy's 6 deg orbit error still falls below half."""
    config = tiny_config(tiny_lego)
    config.pipeline.model.pose_refinement_start_step = 1
    config.pipeline.model.pose_refinement_translation = False
    pipe = config.pipeline.setup(device="cpu", test_mode="val")
    refinement = pipe.model.pose_refinement
    assert pipe.maybe_start_pose_refinement(1)
    encoder = refinement.snapshot_c2w.clone()
    with torch.no_grad():
        refinement.camera_optimizer.pose_adjustment[2] = torch.tensor([0.5, -0.3, 0.2, 0.1, -0.2, 0.05])
    turn = roma.rotvec_to_rotmat(torch.tensor([0.1, -0.2, 0.05]))
    moved = refinement.c2w(torch.tensor([2]))[0]
    assert torch.allclose(moved, turn @ encoder[2], atol=1e-5)  # the translation (0.5, -0.3, 0.2) is ignored
    # re-selection: moving to a camera makes it the refined camera under the same rotation-only correction
    target = pipe.datamanager.dataset_camera_to_worlds("train")[:1].float()
    refinement.move_to(torch.tensor([2]), target)
    assert torch.allclose(refinement.c2w(torch.tensor([2])), target, atol=1e-5)
    # test-time: the toy of test_test_time_refinement_reduces_a_known_pose_error, rotations only
    toy = toy_field_pipeline(tiny_lego)
    true, images, start = toy_pose_problem(toy)
    refined = refine_poses(toy.model.render_pixels, start, images, steps=100, pixels_per_view=512, lr=5e-3,
                           translation=False)
    after = torch.rad2deg(roma.rotmat_geodesic_distance(refined[:, :, :3], true[:, :, :3]))
    assert (after < 3.0).all(), after
    assert torch.allclose(refined[:, :, 3].norm(dim=1), true[:, :, 3].norm(dim=1), atol=1e-4)  # still on the sphere


def test_corrections_about_the_camera_follow_nerfstudios_convention(tiny_lego):
    """``--pipeline.model.pose-refinement-about camera``: the refined camera is what nerfstudio's
    ``CameraOptimizer.apply_to_camera`` makes of the snapshot (turned about its own centre, shifted); re-selection
    inverts it."""
    config = tiny_config(tiny_lego)
    config.pipeline.model.pose_refinement_start_step = 1
    config.pipeline.model.pose_refinement_about = "camera"
    pipe = config.pipeline.setup(device="cpu", test_mode="val")
    refinement = pipe.model.pose_refinement
    assert pipe.maybe_start_pose_refinement(1)
    snapshot = refinement.snapshot_c2w.clone()
    with torch.no_grad():
        refinement.camera_optimizer.pose_adjustment[1] = torch.tensor([0.2, -0.1, 0.3, 0.05, 0.1, -0.2])
    cameras = pipe.model.cameras_from_c2w(snapshot[1:2])
    cameras.metadata = {"cam_idx": 1}
    expected = refinement.camera_optimizer.apply_to_camera(cameras)  # nerfstudio's own rule
    moved = refinement.c2w(torch.tensor([1]))
    assert torch.allclose(moved, expected, atol=1e-6)
    assert torch.allclose(moved[0, :, 3], snapshot[1, :, 3] + torch.tensor([0.2, -0.1, 0.3]), atol=1e-6)
    target = pipe.datamanager.dataset_camera_to_worlds("train")[:1].float()
    refinement.move_to(torch.tensor([1]), target)
    assert torch.allclose(refinement.c2w(torch.tensor([1])), target, atol=1e-5)
    with pytest.raises(ValueError, match="'origin' or 'camera'"):
        apply_correction(snapshot[:1], snapshot[:1], about="centre")


def test_snapshot_and_corrections_survive_save_and_load(tiny_lego):
    pipe = refining_pipeline(tiny_lego, start=1)
    pipe.maybe_start_pose_refinement(1)
    with torch.no_grad():
        pipe.model.pose_refinement.camera_optimizer.pose_adjustment.normal_(std=0.05)
    state = {f"_model.{k}": v for k, v in pipe.model.state_dict().items()}
    other = refining_pipeline(tiny_lego, start=1, seed=5)
    assert not other.model.pose_refinement.is_started
    other.load_pipeline(state, step=7)
    assert other.model.pose_refinement.is_started
    assert torch.equal(other.model.pose_refinement.snapshot_c2w, pipe.model.pose_refinement.snapshot_c2w)
    assert torch.equal(other.model.pose_refinement.c2w(), pipe.model.pose_refinement.c2w())
    assert torch.equal(other.model.view_poses["train"], pipe.model.pose_refinement.c2w().detach())
    assert not other.maybe_start_pose_refinement(8)  # a resumed run keeps its snapshot


def test_refinement_flags_are_checked():
    from gen_lifting.guards import FlagError

    config = tiny_config(Path("unused"))
    with pytest.raises(FlagError, match="test-time-refine-steps"):
        type(config.pipeline)(test_time_refine_steps=-1)
    with pytest.raises(FlagError, match="candidate-check-pixels must be >= 0"):
        type(config.pipeline)(candidate_check_pixels=-1)
    oracle = tiny_config(Path("unused"), "gen_lifting_oracle").pipeline
    with pytest.raises(FlagError, match="dataset poses"):
        type(oracle)(datamanager=oracle.datamanager, test_time_refine_steps=5)
    with pytest.raises(FlagError, match="camera-optimizer"):
        model = tiny_config(Path("unused")).pipeline.model
        model.pose_refinement_start_step, model.camera_optimizer = 3, CameraOptimizerConfig(mode="off")
        type(config.pipeline)(model=model)
    with pytest.raises(ValueError):
        PoseRefinement(3, CameraOptimizerConfig(mode="off"))
    assert apply_correction(torch.eye(4)[None, :3], torch.eye(4)[None, :3]).equal(torch.eye(4)[None, :3])


def test_ns_train_flags_then_loaded_run_evaluates_as_in_memory(tmp_path, tiny_lego):
    """Both options set with ns-train's flags, and the encoder's synthetic views; 3 steps of nerfstudio's Trainer
    (refinement from step 1); the checkpoint loaded the way ns-eval / the gen-lifting commands load it gives the
    in-memory numbers (encoder and refined poses alike), and the synthetic views, training-only, are not in it."""
    import tyro

    from gen_lifting.inference import load_pipeline

    base = tiny_config(tiny_lego)
    config = tyro.cli(type(base), default=base, args=[
        "--pipeline.model.pose-refinement-start-step", "1", "--pipeline.test-time-refine-steps", "3",
        "--optimizers.camera-opt.optimizer.lr", "1e-2", "--pipeline.model.synthetic-pose-views", "2"])
    assert config.pipeline.model.pose_refinement_start_step == 1 and config.pipeline.test_time_refine_steps == 3
    assert config.pipeline.model.synthetic_pose_views == 2
    config.max_num_iterations, config.vis, config.output_dir = 3, "tensorboard", tmp_path / "outputs"
    config.steps_per_eval_image = config.steps_per_eval_batch = 10**9
    config.set_timestamp()
    config.save_config()
    torch.manual_seed(0)
    trainer = config.setup(local_rank=0, world_size=1)
    trainer.setup()
    trainer.train()  # saves the last step's checkpoint, as ns-train does
    pipe = trainer.pipeline
    assert pipe.model.pose_refinement.is_started
    assert pipe.model.pose_refinement.camera_optimizer.pose_adjustment.abs().sum() > 0  # corrections trained
    assert pipe.synthetic_views is not None and pipe.synthetic_views.images.shape[0] == 2  # rendered and trained on
    in_memory = pipe.get_average_eval_image_metrics()
    for key in ("psnr", "psnr_refined", "rot_err_median_deg", "refined_rot_err_median_deg",
                "refined_within_15deg", "test_rot_err_median_deg", "test_refined_rot_err_median_deg",
                "robust_refined_rot_err_median_deg", "robust_test_refined_rot_err_median_deg"):
        assert key in in_memory, key
    loaded = load_pipeline(config.get_base_dir() / "config.yml", test_mode="val")
    assert loaded.config.test_time_refine_steps == 3
    assert loaded.synthetic_views is None  # training-only: a resumed run renders them again
    ckpt = next(config.get_checkpoint_dir().glob("step-*.ckpt"))
    assert not any("synthetic" in key for key in torch.load(ckpt, map_location="cpu", weights_only=True)["pipeline"])
    metrics = loaded.get_average_eval_image_metrics()
    assert metrics.keys() == in_memory.keys()
    for key, value in in_memory.items():
        if key != "fps":
            assert metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-5), key


def test_ns_train_two_iterations_with_refinement(tmp_path, tiny_lego):
    """ns-train's main with both options on (and the synthetic views, rendered and trained on at step 1): the
    checkpoint carries the started snapshot and the corrections."""
    import tyro
    from nerfstudio.scripts.train import main

    base = tiny_config(tiny_lego)
    config = tyro.cli(type(base), default=base, args=["--pipeline.model.pose-refinement-start-step", "1",
                                                      "--pipeline.test-time-refine-steps", "2",
                                                      "--pipeline.model.synthetic-pose-views", "2"])
    config.max_num_iterations, config.vis, config.output_dir = 2, "tensorboard", tmp_path / "outputs"
    main(config)
    ckpt = next((tmp_path / "outputs").rglob("step-*.ckpt"))
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert bool(state["pipeline"]["_model.pose_refinement.started"])
    assert state["pipeline"]["_model.pose_refinement.snapshot_c2w"].abs().sum() > 0
    assert "camera_opt" in state["optimizers"]


def test_viewer_thumbnails_follow_the_refined_poses(tiny_lego):
    """During training the viewer's thumbnail frusta sit at the poses every other tool shows: the refined ones once
    refinement has started."""
    from gen_lifting.viewer_frustums import update_viewer_frustums

    class Handle:
        position = wxyz = None

    class Scene:
        def add_camera_frustum(self, name, **kwargs):
            pass

    class Server:
        scene = Scene()

    class ViewerState:
        viser_server = Server()
        camera_handles = {2: Handle()}

    pipe = refining_pipeline(tiny_lego, start=1)
    assert pipe.maybe_start_pose_refinement(1)
    with torch.no_grad():
        pipe.model.pose_refinement.camera_optimizer.pose_adjustment[2] = torch.tensor([0.0, 0.0, 0.0, 0.1, -0.2, 0.05])
    state = ViewerState()
    update_viewer_frustums(pipe, state)
    refined = pipe.model.pose_refinement.c2w(torch.tensor([2]))[0].detach()
    encoder = pipe.predict_all_c2w(pipe.datamanager.train_images)[2]
    shown = torch.tensor(state.camera_handles[2].position, dtype=torch.float32)
    assert torch.allclose(shown, refined[:, 3] * 10, atol=1e-3)
    assert not torch.allclose(shown, encoder[:, 3] * 10, atol=1e-2)


def test_reselect_moves_only_photos_whose_candidate_is_clearly_better(tiny_lego):
    """``pose_refinement_reselect_ratio``: a photo jumps to its best candidate when that candidate's error is below
    ratio x its refined camera's error (same score pixels); the others keep their refined camera, the corrections
    are kept, and the jumped photo's refined camera is exactly the candidate."""
    pipe = refining_pipeline(tiny_lego, start=1)
    model = pipe.model
    model.config.pose_refinement_reselect_ratio = 0.5
    pipe.maybe_start_pose_refinement(1)
    with torch.no_grad():
        model.pose_refinement.camera_optimizer.pose_adjustment.normal_(std=0.05)
    correction = model.pose_refinement.camera_optimizer.pose_adjustment.detach().clone()
    before = model.pose_refinement.c2w().detach().clone()
    _, batch = pipe.datamanager.next_train(0)
    idx = batch["image_idx"]
    assert len(set(idx.tolist())) == len(idx) >= 2  # distinct photos, so each row's outcome is its own
    candidates = torch.stack([model.pose_refinement.c2w(idx).detach()] * 3, dim=1).clone()
    candidates[:, 1, :, 3] += 0.3  # candidate 1: the refined camera moved 0.3 along the world axes
    cand_err = torch.full((len(idx), 3), 1e3)
    cand_err[0, 1] = 0.0  # photo 0: candidate 1 renders perfectly -> jumps; the others: candidates far worse
    jumped = model.reselect_refined_cameras(batch, candidates, cand_err)
    assert int(jumped) == 1
    after = model.pose_refinement.c2w().detach()
    assert torch.allclose(after[idx[0]], candidates[0, 1], atol=1e-5)
    others = [i for i in range(before.shape[0]) if i != int(idx[0])]
    assert torch.equal(after[others], before[others])
    assert torch.equal(model.pose_refinement.camera_optimizer.pose_adjustment, correction)
    # a training step with the ratio set logs how many photos jumped, and never trips on its own cameras
    _, _, metrics = pipe.get_train_loss_dict(2)
    assert "refined_reselected" in metrics


def test_reselect_flag_is_checked():
    from gen_lifting.guards import FlagError

    config = tiny_config(Path("unused"))
    for ratio, start, match in ((0.5, 0, "start-step"), (1.0, 5, r"\[0, 1\)"), (-0.1, 5, r"\[0, 1\)")):
        model = tiny_config(Path("unused")).pipeline.model
        model.pose_refinement_reselect_ratio, model.pose_refinement_start_step = ratio, start
        with pytest.raises(FlagError, match=match):
            type(config.pipeline)(model=model)


def test_refine_preset_is_the_gen_lifting_preset_plus_refinement():
    """``ns-train gen-lifting-refine``: the thesis preset with the two refinement settings, the TV prior's decay
    from the refinement's start, the encoder's synthetic views during refinement, re-selection and the field's check
    of the candidates at test time, nothing else changed."""
    import copy
    import dataclasses

    import method_configs.gen_lifting as specs

    base, refine = specs.gen_lifting.config, copy.deepcopy(specs.gen_lifting_refine.config)
    assert refine.pipeline.model.pose_refinement_start_step == 2000 and refine.pipeline.test_time_refine_steps == 100
    assert refine.max_num_iterations == base.max_num_iterations == 4000  # refinement gets the second half
    assert refine.pipeline.model.tv_decay_start_step == 2000 and refine.pipeline.model.tv_decay_steps == 1000
    refine.pipeline.model.pose_refinement_start_step, refine.pipeline.test_time_refine_steps = 0, 0
    refine.pipeline.model.tv_decay_start_step = base.pipeline.model.tv_decay_start_step
    assert refine.pipeline.model.synthetic_pose_views == 64 and refine.pipeline.model.synthetic_pose_mult == 4.0
    refine.pipeline.model.synthetic_pose_views = base.pipeline.model.synthetic_pose_views
    refine.pipeline.model.synthetic_pose_mult = base.pipeline.model.synthetic_pose_mult
    assert refine.pipeline.model.synthetic_pose_jitter_spacing_mult == 1.0
    refine.pipeline.model.synthetic_pose_jitter_spacing_mult = base.pipeline.model.synthetic_pose_jitter_spacing_mult
    assert refine.pipeline.model.pose_refinement_reselect_ratio == 0.5
    refine.pipeline.model.pose_refinement_reselect_ratio = base.pipeline.model.pose_refinement_reselect_ratio
    assert refine.pipeline.candidate_check_pixels == 512 and not refine.pipeline.refinement_snapshot_checked
    refine.pipeline.candidate_check_pixels = base.pipeline.candidate_check_pixels
    decay = refine.optimizers["pose_encoder"]["scheduler"]
    assert (decay.lr_final, decay.warmup_steps, decay.lr_pre_warmup) == (3e-4, 3000, 3e-3)  # held, then decayed
    decay.lr_final, decay.warmup_steps = None, 0
    assert dataclasses.replace(refine, method_name=base.method_name) == base


@pytest.mark.parametrize("group, rate", [("camera_opt", 3e-3), ("pose_encoder", 3e-3)])
def test_rates_are_constant_by_default_can_decay_and_their_state_loads_weights_only(tmp_path, group, rate):
    """The preset's camera_opt and pose_encoder groups carry nerfstudio's exponential decay with ``lr_final = None``:
    exactly their rate (bit-identical to no scheduler; nerfstudio's own curve is 1 only up to rounding there);
    ``--optimizers.<group>.scheduler.lr-final`` / ``.warmup-steps`` make it decay after the warm-up, which holds the
    rate itself. The state must load with ``weights_only=True`` (nerfstudio's own class keeps numpy floats there)."""
    import copy

    import method_configs.gen_lifting as specs

    cfg = copy.deepcopy(specs.gen_lifting.config.optimizers[group])  # gen-lifting-refine decays pose_encoder's
    assert cfg["optimizer"].lr == rate
    param = torch.nn.Parameter(torch.zeros(1))

    def rates(scheduler_config, steps):
        optimizer = cfg["optimizer"].setup(params=[param])
        scheduler = scheduler_config.setup().get_scheduler(optimizer=optimizer, lr_init=cfg["optimizer"].lr)
        out = []
        for step in range(max(steps) + 1):
            if step in steps:
                out.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        torch.save({"scheduler": scheduler.state_dict(), "optimizer": optimizer.state_dict()}, tmp_path / "s.pt")
        torch.load(tmp_path / "s.pt", weights_only=True)  # raises on numpy scalars
        return out

    steps = [0, 1000, 2000, 3000, 4000]
    assert rates(cfg["scheduler"], steps) == [rate] * 5  # exactly
    cfg["scheduler"].lr_final, cfg["scheduler"].warmup_steps = rate / 10, 2000
    decayed = rates(cfg["scheduler"], steps)
    assert decayed[:2] == [rate] * 2  # the warm-up holds the rate exactly: training before it is unchanged
    assert decayed[2:] == pytest.approx([rate, math.sqrt(rate * rate / 10), rate / 10])


# ------------------------------------------------------------------------------ synthetic views (ours, off by default)
def test_jittered_directions_stay_within_the_cap_and_above_the_horizon():
    from gen_lifting.synthetic_views import jitter_directions

    base = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0, 0.05], [0.0, 0.0, 1.0], [0.3, -0.4, 0.5]]), dim=-1)
    base = base.repeat(400, 1)
    moved = jitter_directions(base, 15.0, torch.Generator().manual_seed(0), upper=True)
    assert torch.allclose(moved.norm(dim=-1), torch.ones(len(moved)), atol=1e-5)
    assert (moved[:, 2] >= 0).all()  # the first direction sits 3 deg above the horizon: many were mirrored back up
    # mirroring can only bring a direction closer to its (upper) source, so every angle stays within the cap
    angle = torch.rad2deg(torch.acos((moved * base).sum(-1).clamp(-1, 1)))
    assert angle.max() <= 15.0 + 1e-3 and angle.median() > 7.0  # area-uniform: median ~ 15 / sqrt(2) = 10.6
    assert torch.equal(jitter_directions(base, 0.0, torch.Generator().manual_seed(0), upper=True), base)


def test_jitter_follows_the_photos_spacing_only_where_it_is_wider_than_the_floor():
    from gen_lifting.synthetic_views import even_spacing_deg, jitter_for

    # N cameras spread evenly over the upper hemisphere (2 pi sr) are sqrt(2 pi / N) rad apart; the sphere: 4 pi
    assert even_spacing_deg(100, upper=True) == pytest.approx(14.36, abs=0.01)
    assert even_spacing_deg(25, upper=True) == pytest.approx(28.72, abs=0.01)
    assert even_spacing_deg(50, upper=False) == pytest.approx(even_spacing_deg(25, upper=True))
    assert jitter_for(100, True, 15.0, 1.0) == 15.0  # 100 photos: under the floor, as with the rule off
    assert jitter_for(25, True, 15.0, 1.0) == pytest.approx(28.72, abs=0.01)
    assert jitter_for(25, True, 15.0, 0.0) == 15.0 and jitter_for(2, True, 15.0, 10.0) == 180.0


def test_nearest_candidate_loss_targets_the_closest_candidate_weighted_by_signal():
    from gen_lifting.cameras import look_at_origin
    from gen_lifting.synthetic_views import nearest_candidate_loss

    label = torch.tensor([[0.0, 0.0, 1.0]])
    tilt = math.radians(10.0)
    dirs = torch.tensor([[math.sin(tilt), 0.0, math.cos(tilt)], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
    cands = look_at_origin(4.0 * dirs)[None]  # the radius does not matter: directions are compared
    loss, nearest, angle = nearest_candidate_loss(cands, label, torch.ones(1))
    assert nearest.tolist() == [0] and angle.item() == pytest.approx(10.0, abs=1e-3)
    assert loss.item() == pytest.approx(2 - 2 * math.cos(tilt), rel=1e-4)  # squared chord
    assert nearest_candidate_loss(cands, label, torch.zeros(1))[0].item() == 0.0


def synthetic_pipeline(data: Path, views: int):
    config = tiny_config(data)
    config.pipeline.model.pose_refinement_start_step = 1
    config.pipeline.model.synthetic_pose_views = views
    config.pipeline.model.synthetic_pose_refresh_steps = 2
    torch.manual_seed(0)
    return config.pipeline.setup(device="cpu", test_mode="val")


def test_synthetic_views_train_the_encoder_only_and_leave_the_refined_branch_bit_identical(tiny_lego):
    """The bank is rendered once refinement has started and re-rendered every refresh; its loss reaches the encoder
    alone, and the photos' batches, the field and the refined cameras are exactly those of a run without it."""
    runs = {}
    for views in (0, 5):
        pipe = synthetic_pipeline(tiny_lego, views)
        pipe.train()
        assert not pipe.maybe_render_synthetic_views(0)  # refinement has not started: nothing to render near
        assert pipe.maybe_start_pose_refinement(1)
        opt = torch.optim.Adam(pipe.model.parameters(), lr=1e-2)
        torch.manual_seed(5)
        for step in (1, 2, 3):
            rendered = pipe.maybe_render_synthetic_views(step)
            assert rendered == (views > 0 and step in (1, 3))  # refresh every 2 steps
            _, loss, metrics = pipe.get_train_loss_dict(step)
            if views:
                assert loss["synthetic_pose_loss"] > 0 and "synthetic_score_ce_loss" in loss
                assert 0 <= metrics["synthetic_nearest_deg"] <= 180
                grads = torch.autograd.grad(loss["synthetic_pose_loss"] + loss["synthetic_score_ce_loss"],
                                            [pipe.model.pose_encoder.direction_head.weight,
                                             pipe.model.pose_refinement.camera_optimizer.pose_adjustment,
                                             pipe.model.field.density_grid], allow_unused=True, retain_graph=True)
                assert grads[0].abs().sum() > 0 and grads[1] is None and grads[2] is None
            else:
                assert pipe.synthetic_views is None and not any("synthetic" in key for key in loss)
            opt.zero_grad()
            sum(loss.values()).backward()
            opt.step()
        if views:
            h, w = pipe.datamanager.train_images.shape[1:3]
            bank = pipe.synthetic_views
            assert bank.images.shape == (5, h, w, 3) and 0 <= bank.images.min() and bank.images.max() <= 1
        runs[views] = (pipe.model.pose_refinement.c2w().detach(), pipe.model.field.density_grid.detach().clone())
    assert torch.equal(runs[0][0], runs[5][0]) and torch.equal(runs[0][1], runs[5][1])


def test_synthetic_views_spread_wider_for_fewer_photos(tiny_lego):
    """With the spacing rule the bank's jitter follows the photo count: the tiny scene's 6 training photos spread
    over the upper hemisphere are 58.6 deg apart, so its views reach up to 58.6 deg from the refined cameras (the
    15-deg floor without the rule)."""
    from gen_lifting.synthetic_views import even_spacing_deg

    for spacing_mult in (0.0, 1.0):
        pipe = synthetic_pipeline(tiny_lego, 64)
        pipe.model.config.synthetic_pose_jitter_spacing_mult = spacing_mult
        assert pipe.maybe_start_pose_refinement(1) and pipe.maybe_render_synthetic_views(1)
        refined = torch.nn.functional.normalize(pipe.model.pose_refinement.c2w().detach()[:, :3, 3], dim=-1)
        expected = even_spacing_deg(refined.shape[0], upper=True) if spacing_mult else 15.0
        bank = pipe.synthetic_views
        assert bank.max_angle_deg == pytest.approx(expected) and (expected > 50.0) == bool(spacing_mult)
        nearest = torch.rad2deg(torch.acos((bank.directions @ refined.T).clamp(-1, 1))).min(dim=1).values
        assert nearest.max() <= expected + 0.5
        if spacing_mult:
            assert nearest.max() > 15.0 + 0.5  # views beyond the floor's reach


def test_candidate_up_follows_the_refined_cameras_and_survives_save_and_load(tiny_lego):
    """candidate_up_from_refined: once refinement runs, every refresh the candidates' look-at takes the refined
    cameras' up (here refined cameras about an up tilted 6 deg), the synthetic views are rendered about it, and a
    loaded run keeps it (its candidates equal the in-memory ones); off, the up stays z."""
    from gen_lifting.cameras import look_at_origin

    tilt = math.radians(6.0)
    up = torch.tensor([0.0, math.sin(tilt), math.cos(tilt)])
    z = torch.tensor([0.0, 0.0, 1.0])
    for on in (False, True):
        pipe = synthetic_pipeline(tiny_lego, 3)
        pipe.model.config.candidate_up_from_refined = on
        pipe.train()
        assert not pipe.maybe_fit_candidate_up(0)  # refinement has not started
        centres = pipe.show_predicted_poses()["train"][:, :3, 3]  # the encoder's, re-rolled about the tilted up
        pipe.model.pose_refinement.start(look_at_origin(centres, up=up))
        assert pipe.maybe_fit_candidate_up(1) == on and not pipe.maybe_fit_candidate_up(2)
        assert pipe.maybe_fit_candidate_up(3) == on  # refresh every 2 steps
        torch.testing.assert_close(pipe.model.pose_encoder.world_up, up if on else z, atol=1e-5, rtol=0)
        assert pipe.maybe_render_synthetic_views(3)
        pipe.eval()
        candidates, _ = pipe.encode(pipe.datamanager.train_images[:2])
        right = candidates[..., :3, 0]
        assert (right @ (up if on else z)).abs().max() < 1e-5
    state = {f"_model.{k}": v for k, v in pipe.model.state_dict().items()}
    other = synthetic_pipeline(tiny_lego, 3)
    other.model.config.candidate_up_from_refined = True
    other.load_pipeline(state, step=4)
    other.eval()
    torch.testing.assert_close(other.model.pose_encoder.world_up, up, atol=1e-5, rtol=0)
    torch.testing.assert_close(other.encode(other.datamanager.train_images[:2])[0], candidates)


def test_synthetic_view_flags_are_checked():
    from gen_lifting.guards import FlagError

    config = tiny_config(Path("unused"))
    model = config.pipeline.model
    model.synthetic_pose_views = 8
    with pytest.raises(FlagError, match="pose-refinement-start-step"):
        type(config.pipeline)(model=model)
    model.pose_refinement_start_step = 10
    type(config.pipeline)(model=model)
    model.synthetic_pose_jitter_deg = -1.0
    with pytest.raises(FlagError, match="jitter"):
        type(config.pipeline)(model=model)
    model.synthetic_pose_jitter_deg, model.synthetic_pose_jitter_spacing_mult = 15.0, -1.0
    with pytest.raises(FlagError, match="jitter-spacing-mult"):
        type(config.pipeline)(model=model)
    model.synthetic_pose_jitter_spacing_mult, model.synthetic_pose_views = 0.0, 0
    model.candidate_up_from_refined, model.pose_refinement_start_step = True, 0
    with pytest.raises(FlagError, match="candidate-up-from-refined"):
        type(config.pipeline)(model=model)
    model.pose_refinement_start_step = 10
    type(config.pipeline)(model=model)


def test_checked_snapshot_starts_refinement_at_the_field_checked_candidates(tiny_lego):
    """``--pipeline.refinement-snapshot-checked``: the snapshot is ``predict_checked``'s camera of every training photo
    (not the top-scoring one), and the tools show it; the flag needs the check and refinement."""
    from gen_lifting.guards import FlagError

    pipe = refining_pipeline(tiny_lego, start=1)
    pipe.config.candidate_check_pixels, pipe.config.refinement_snapshot_checked = 128, True
    images = pipe.datamanager.train_images
    checked, index = pipe.predict_checked(images)
    top = pipe.predict_all(images)[1]
    assert (index != top).any(), "the toy must have photos whose check differs from the top score"
    assert pipe.maybe_start_pose_refinement(1)
    assert torch.equal(pipe.model.pose_refinement.snapshot_c2w, checked)
    assert torch.equal(pipe.model.view_poses["train"], pipe.model.pose_refinement.c2w().detach())
    config = tiny_config(Path("unused"))
    with pytest.raises(FlagError, match="refinement-snapshot-checked needs"):
        type(config.pipeline)(refinement_snapshot_checked=True)


def test_frame_benchmark_measures_the_tilt_of_the_refined_cameras(tiny_lego):
    """benchmarks/lifting_frame.py on a pipeline whose refined cameras are the true ones (look-at-origin about z)
    turned 6 deg about the x axis, as if the field sat tilted in its frame: it reports that tilt, the refined
    cameras are exact after alignment, a look-at about z at their directions is off by about the tilt, and a look-at
    about the fitted up is exact."""
    import sys

    import roma

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from lifting_frame import frame_statistics

    pipe = refining_pipeline(tiny_lego, start=1)
    turn = roma.rotvec_to_rotmat(torch.tensor([math.radians(6.0), 0.0, 0.0]))
    truth = pipe.datamanager.dataset_camera_to_worlds("train")[:, :3, :4].float()
    pipe.model.pose_refinement.start(turn @ truth)
    pipe.eval()
    with torch.no_grad():
        stats = frame_statistics(pipe)
    assert stats["tilt_deg"] == pytest.approx(6.0, abs=0.01) and stats["run_up_tilt_deg"] == 0.0
    assert stats["target_offset"] < 1e-3
    assert stats["refined_rot_err_median_deg"] < 0.1 and stats["lookat_fitted_up_rot_err_median_deg"] < 0.1
    assert stats["lookat_z_rot_err_median_deg"] > 1.0
    assert stats["lookat_run_up_rot_err_median_deg"] == stats["lookat_z_rot_err_median_deg"]
    assert all(0 <= stats[f"test_{kind}_top_rot_err_median_deg"] <= 180 for kind in ("photo", "render"))

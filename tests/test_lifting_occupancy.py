"""gen-lifting's occupancy-grid sampler (nerfacc, CUDA only): selection through the real config path, the one-line
error off CUDA, the grid's update schedule, and (with CUDA) training in which only the training callback, never
the candidate scoring, changes the grid. Also: the hash-grid implementation in use is reported once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from nerfstudio.engine.callbacks import TrainingCallbackAttributes, TrainingCallbackLocation

from gen_lifting.occupancy import OccupancySamplingConfig
from test_lifting_method import make_tiny_lego, tiny_config

pytestmark = pytest.mark.filterwarnings("ignore")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="nerfacc's occupancy-grid sampling is CUDA-only")
BEFORE, AFTER = TrainingCallbackLocation.BEFORE_TRAIN_ITERATION, TrainingCallbackLocation.AFTER_TRAIN_ITERATION


@pytest.fixture(scope="module")
def tiny_lego(tmp_path_factory) -> Path:
    return make_tiny_lego(tmp_path_factory.mktemp("lego_occ"))


def occupancy_config(data: Path, device: str = "cpu", **occupancy):
    """The GPU preset (shrunk by tiny_config) with ``sampler='occupancy'`` and a small grid."""
    config = tiny_config(data, "gen_lifting_gpu")
    config.machine.device_type = device
    model = config.pipeline.model
    model.sampler = "occupancy"
    model.occupancy = OccupancySamplingConfig(**{"grid_resolution": 16, "update_every": 2, "render_step_size": 0.05,
                                                 **occupancy})
    return config


def callbacks_of(pipe):
    return pipe.model.get_training_callbacks(
        TrainingCallbackAttributes(optimizers=None, grad_scaler=None, pipeline=pipe, trainer=None))


def run_callbacks(callbacks, step: int, where) -> None:
    for cb in callbacks:
        cb.run_callback_at_location(step, where)


def grid_state(model) -> dict:
    grid = model.occupancy.grid
    return {"occs": grid.occs.clone(), "binaries": grid.binaries.clone()}


def same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------------- CPU


@pytest.mark.parametrize("sampler", ["uniform", "proposal"])
def test_sampler_flag_builds_exactly_that_sampler(tiny_lego, sampler):
    config = tiny_config(tiny_lego, "gen_lifting_gpu")
    config.pipeline.model.sampler = sampler
    model = config.pipeline.setup(device="cpu", test_mode="val").model
    built = {name for name in ("sampler", "proposal", "occupancy") if getattr(model, name) is not None}
    assert built == {"sampler" if sampler == "uniform" else sampler}


def test_sampler_flag_parses_occupancy():
    """``--pipeline.model.sampler occupancy`` and ``--pipeline.model.occupancy.*`` are real flags of the method."""
    import tyro

    import method_configs.gen_lifting as specs

    config = tyro.cli(type(specs.gen_lifting_gpu.config), default=specs.gen_lifting_gpu.config,
                      args=["--pipeline.model.sampler", "occupancy",
                            "--pipeline.model.occupancy.grid-resolution", "64"])
    assert config.pipeline.model.sampler == "occupancy"
    assert config.pipeline.model.occupancy.grid_resolution == 64


def test_occupancy_on_cpu_is_a_one_line_error(tiny_lego):
    config = occupancy_config(tiny_lego)
    with pytest.raises(SystemExit) as err:
        config.pipeline.setup(device="cpu", test_mode="val")
    message = str(err.value)
    assert "\n" not in message
    assert "CUDA" in message and "occupancy" in message
    assert "--pipeline.model.sampler proposal" in message and "--pipeline.model.sampler uniform" in message


def test_ns_train_with_occupancy_on_cpu_fails_with_one_line(tmp_path, tiny_lego):
    """What a user on a CPU sees from ns-train: the message, no traceback."""
    exe = Path(sys.executable).parent / "ns-train"
    if not exe.exists():
        pytest.skip("ns-train not installed in this environment")
    args = [str(exe), "gen-lifting-gpu", "--data", str(tiny_lego), "--pipeline.model.sampler", "occupancy",
            "--machine.device-type", "cpu", "--vis", "tensorboard", "--output-dir", str(tmp_path / "out"),
            "--max-num-iterations", "1", "--pipeline.model.field.num-levels", "4",
            "--pipeline.model.field.log2-hashmap-size", "12"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    res = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode != 0
    assert "Traceback" not in res.stderr, res.stderr[-2000:]
    last = [line for line in res.stderr.splitlines() if line.strip()][-1]
    assert "--pipeline.model.sampler occupancy needs a CUDA GPU" in last
    assert "proposal" in last and "uniform" in last
    assert not list((tmp_path / "out").rglob("*.ckpt"))


def test_grid_is_updated_from_the_field_on_its_schedule(tiny_lego, monkeypatch):
    """The grid's update is a training callback reading the field's density (no render): due steps change it, the
    others do not. Its state is in the checkpoint and it owns no parameters. (The CUDA gate is lifted for this CPU
    test: nerfacc's grid update itself is pure torch; its ray marching is not, and is not called here.)"""
    import gen_lifting.occupancy as occupancy

    monkeypatch.setattr(occupancy, "require_cuda", lambda device: None)
    torch.manual_seed(0)
    pipe = occupancy_config(tiny_lego).pipeline.setup(device="cpu", test_mode="val")
    model = pipe.model
    assert model.sampler is None and model.proposal is None and model.occupancy is not None
    assert list(model.occupancy.parameters()) == []  # the field's parameters are the model's, counted once
    state = model.state_dict()
    assert {"occupancy.sampler.occupancy_grid.occs", "occupancy.sampler.occupancy_grid.binaries"} <= set(state)
    assert not any(k.startswith("occupancy.") and "field" in k for k in state)
    callbacks = callbacks_of(pipe)
    before = grid_state(model)
    run_callbacks(callbacks, 1, BEFORE)  # update_every=2: step 1 is not due
    assert same(grid_state(model), before)
    run_callbacks(callbacks, 2, BEFORE)
    after = grid_state(model)
    assert not torch.equal(after["occs"], before["occs"]) and after["binaries"].any()
    # the estimate follows the field's density: a field dense only where x > 0 occupies exactly that half
    monkeypatch.setattr(model.field, "density_fn", lambda x, times=None: 100.0 * (x[..., :1] > 0).float())
    run_callbacks(callbacks, 3, BEFORE)
    assert torch.equal(grid_state(model)["occs"], after["occs"])
    run_callbacks(callbacks, 4, BEFORE)
    half = model.occupancy.grid.binaries[0].shape[0] // 2  # 16 cells per side over [-1.5, 1.5]: x = 0 is a border
    assert model.occupancy.grid.binaries[0, half:].all() and not model.occupancy.grid.binaries[0, :half].any()


# ------------------------------------------------------------------------------------------------- CUDA


@needs_cuda
def test_occupancy_trains_and_only_training_changes_the_grid(tiny_lego, monkeypatch):
    """A few training steps on CUDA: the K-candidate scoring renders never change the grid; the grid is updated
    exactly once per due step however many renders a step makes; the winner's render trains field and camera."""
    torch.manual_seed(0)
    pipe = occupancy_config(tiny_lego, "cuda").pipeline.setup(device="cuda", test_mode="val")
    model = pipe.model
    grid = model.occupancy.grid
    updates = []
    real_update = grid._update
    monkeypatch.setattr(grid, "_update", lambda **kw: (updates.append(kw["step"]), real_update(**kw))[1])
    callbacks = callbacks_of(pipe)
    run_callbacks(callbacks, 0, BEFORE)  # step 0 is due: the grid now marks the field's occupied cells
    assert updates == [0] and grid.binaries.any()

    # renders alone (scoring of all K candidates + the winner, and more scoring-only renders) leave it untouched
    snapshot = grid_state(model)
    _, batch = pipe.datamanager.next_train(0)
    outputs = model(batch)
    assert outputs["scores"].shape[1] > 1  # K candidates were scored
    with torch.no_grad(), model.scoring_pass():
        cams = outputs["c2w"].detach().reshape(-1, 3, 4)[:4]
        model.render_pixel_outputs(cams, batch["score_pixels"][:1].expand(4, -1, -1))
    assert same(grid_state(model), snapshot) and updates == [0]

    # training steps through the pipeline with the callbacks, as ns-train runs them
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(1, 5):
        run_callbacks(callbacks, step, BEFORE)
        _, loss_dict, _ = pipe.get_train_loss_dict(step)
        loss = sum(loss_dict.values())
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.field.parameters())
        opt.step()
        run_callbacks(callbacks, step, AFTER)
    assert updates == [0, 2, 4]  # one update per due step (update_every=2), none from the 13 renders of each step
    assert not same(grid_state(model), snapshot)

    # the winner's render sends gradients to the chosen camera, through nerfacc's packed rendering
    _, batch = pipe.datamanager.next_train(5)
    outputs = model(batch)
    outputs["c2w"].retain_grad()
    sum(model.get_loss_dict(outputs, batch).values()).backward()
    assert outputs["c2w"].grad.abs().sum() > 0
    model.zero_grad()
    pipe.eval()
    try:
        render = model.render_pixel_outputs(outputs["c2w"][:, 0].detach(), batch["loss_pixels"])
    finally:
        pipe.train()
    assert torch.isfinite(render["rgb"]).all() and render["num_samples_per_ray"].sum() > 0


@needs_cuda
def test_ns_train_with_occupancy_saves_and_reloads_the_grid(tmp_path, tiny_lego):
    """ns-train for a few iterations on CUDA; the loaded run carries the trained grid (buffers in the checkpoint)."""
    from nerfstudio.scripts.train import main
    from nerfstudio.utils.eval_utils import eval_setup

    config = occupancy_config(tiny_lego, "cuda")
    config.max_num_iterations = 4
    config.vis = "tensorboard"
    config.output_dir = tmp_path / "outputs"
    config.steps_per_save = 2
    main(config)
    ckpt = sorted((tmp_path / "outputs").rglob("step-*.ckpt"))[-1]
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)["pipeline"]
    key = next(k for k in saved if k.endswith("occupancy.sampler.occupancy_grid.binaries"))
    assert saved[key].any()
    _, pipe, _, _ = eval_setup(next((tmp_path / "outputs").rglob("config.yml")), test_mode="val")
    assert torch.equal(pipe.model.occupancy.grid.binaries.cpu(), saved[key])


# ------------------------------------------------------------------------------------------------- hash grids


def test_hash_implementation_is_reported_once_per_kind(monkeypatch, capsys):
    """The hash-grid implementation in use is logged (once per process and kind), read from the built modules."""
    import dataclasses

    import gen_lifting.hash_field as hash_field

    monkeypatch.setattr(hash_field, "_REPORTED", set())
    config = hash_field.HashFieldConfig(num_levels=2, max_res=32, log2_hashmap_size=10, hidden_dim=8,
                                        hidden_dim_color=8, implementation="torch")
    aabb = torch.tensor([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]])
    fields = [config.setup(aabb=aabb), config.setup(aabb=aabb)]
    plain = dataclasses.replace(config, fast_torch_lookup=False).setup(aabb=aabb)
    out = capsys.readouterr().out
    assert out.count("hash grids of the radiance field: torch-index-select") == 1
    assert out.count("hash grids of the radiance field: torch ") == 1  # nerfstudio's own lookup, asked for
    assert [hash_field.hash_implementation(f) for f in (*fields, plain)] == ["torch-index-select"] * 2 + ["torch"]
    assert hash_field.hash_implementation(torch.nn.Linear(2, 2)) == "none"

"""Crash-safe checkpoints of gen-lifting runs (gen_lifting/trainer.py): a save cut short leaves the previous
checkpoint intact and no truncated ``step-*.ckpt``; ``--load-dir`` skips a truncated newest checkpoint (as
nerfstudio's in-place save leaves after a kill -9) with a one-line warning. The kill -9 + ``--load-dir`` resume of a
real ``ns-train`` process is tests/test_lifting_reliability.py."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import List

import pytest
import torch
from nerfstudio.engine.trainer import Trainer

from gen_lifting.trainer import CheckpointError, GenLiftingTrainer, GenLiftingTrainerConfig
from test_lifting_method import make_tiny_lego, tiny_config

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def tiny_lego(tmp_path_factory) -> Path:
    return make_tiny_lego(tmp_path_factory.mktemp("checkpoints") / "lego", n_train=3, n_eval=1)


def make_trainer(data: Path, output_dir: Path, **overrides) -> GenLiftingTrainer:
    config = tiny_config(data)
    config.vis, config.output_dir, config.timestamp = "tensorboard", output_dir, "run"
    for key, value in overrides.items():
        setattr(config, key, value)
    trainer = config.setup(local_rank=0, world_size=1)
    trainer.setup()
    return trainer


def names(folder: Path) -> List[str]:
    return sorted(p.name for p in folder.iterdir())


def weights(state: dict) -> dict:
    return {k: v for k, v in state["pipeline"].items() if v.is_floating_point()}


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_every_gen_lifting_method_uses_the_crash_safe_trainer():
    import method_configs.gen_lifting as specs
    from nerfstudio.plugins.types import MethodSpecification

    methods = {spec.config.method_name: spec.config for spec in vars(specs).values()
               if isinstance(spec, MethodSpecification)}
    assert {"gen-lifting", "gen-lifting-refine", "gen-lifting-ae", "gen-lifting-single", "gen-lifting-gpu",
            "gen-lifting-oracle",
            "gen-lifting-single-oracle"} <= methods.keys()
    for name, config in methods.items():
        assert isinstance(config, GenLiftingTrainerConfig) and config._target is GenLiftingTrainer, name


def test_save_writes_what_nerfstudio_writes(tmp_path, tiny_lego):
    """The same keys and tensors as nerfstudio's own Trainer.save_checkpoint (our state dict is written out)."""
    trainer = make_trainer(tiny_lego, tmp_path / "outputs")
    trainer.save_checkpoint(3)
    ours = load(trainer.checkpoint_dir / "step-000000003.ckpt")
    trainer.checkpoint_dir = tmp_path / "nerfstudio"
    Trainer.save_checkpoint(trainer, 3)
    theirs = load(tmp_path / "nerfstudio" / "step-000000003.ckpt")
    assert ours.keys() == theirs.keys() and ours["step"] == 3
    for key in ("pipeline", "optimizers", "schedulers", "scalers"):
        assert repr(ours[key].keys()) == repr(theirs[key].keys()), key
    assert all(torch.equal(v, theirs["pipeline"][k]) for k, v in ours["pipeline"].items())


def test_save_cut_short_keeps_the_previous_checkpoint(tmp_path, tiny_lego, monkeypatch):
    """torch.save dies after writing half the archive (as a kill or a full disk would): step 1's checkpoint is
    intact, there is no step-2 file, nothing half-written is left, and nerfstudio_models holds only step files."""
    trainer = make_trainer(tiny_lego, tmp_path / "outputs")
    trainer.save_checkpoint(1)
    first = load(trainer.checkpoint_dir / "step-000000001.ckpt")
    real_save = torch.save
    written: List[int] = []

    def dies_mid_write(obj, file, *args, **kwargs):
        import io

        buffer = io.BytesIO()
        real_save(obj, buffer)
        data = buffer.getvalue()
        file.write(data[: len(data) // 2])
        file.flush()
        written.append(len(data) // 2)
        raise OSError(28, "No space left on device")

    with torch.no_grad():  # the weights change after step 1's save
        next(trainer.pipeline.parameters()).add_(1.0)
    monkeypatch.setattr(torch, "save", dies_mid_write)
    with pytest.raises(OSError, match="No space left"):
        trainer.save_checkpoint(2)
    monkeypatch.undo()
    assert written, "the save did not reach torch.save"
    assert names(trainer.checkpoint_dir) == ["step-000000001.ckpt"]
    assert not list(trainer.base_dir.glob(".step-*")), "a temporary was left behind"
    after = load(trainer.checkpoint_dir / "step-000000001.ckpt")
    assert after["step"] == 1
    assert all(torch.equal(v, after["pipeline"][k]) for k, v in first["pipeline"].items())

    trainer.save_checkpoint(2)  # the next complete save replaces step 1 (save_only_latest_checkpoint)
    assert names(trainer.checkpoint_dir) == ["step-000000002.ckpt"]
    assert load(trainer.checkpoint_dir / "step-000000002.ckpt")["step"] == 2


def test_a_killed_save_leaves_nothing_nerfstudio_trips_on_and_is_cleaned_on_start(tmp_path, tiny_lego):
    """A kill -9 mid-save leaves the temporary (no exception handler runs): it sits in the run folder, where
    nerfstudio's loaders (ns-eval, ns-render, gen-lifting commands) never look, and the next trainer of that run
    folder removes it."""
    from nerfstudio.utils.eval_utils import eval_load_checkpoint

    trainer = make_trainer(tiny_lego, tmp_path / "outputs")
    trainer.save_checkpoint(1)
    stale = trainer.base_dir / ".step-000000002.ckpt.tmp"
    stale.write_bytes((trainer.checkpoint_dir / "step-000000001.ckpt").read_bytes()[:1000])
    config = copy.copy(trainer.config)
    config.load_dir, config.load_step = trainer.checkpoint_dir, None
    assert eval_load_checkpoint(config, trainer.pipeline) == (trainer.checkpoint_dir / "step-000000001.ckpt", 1)

    again = make_trainer(tiny_lego, tmp_path / "outputs")
    assert again.base_dir == trainer.base_dir and not stale.exists()


def test_load_dir_skips_a_truncated_newest_checkpoint_with_one_warning(tmp_path, tiny_lego, capsys):
    """nerfstudio's in-place save killed mid-write: step 2 is truncated, step 1 complete. ``--load-dir`` warns once
    (one line naming step 2 and step 1) and resumes from step 1: its step, weights and Adam state."""
    trainer = make_trainer(tiny_lego, tmp_path / "first", save_only_latest_checkpoint=False)
    trainer.save_checkpoint(1)
    with torch.no_grad():
        next(trainer.pipeline.parameters()).add_(1.0)
    trainer.save_checkpoint(2)
    newest = trainer.checkpoint_dir / "step-000000002.ckpt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    saved = load(trainer.checkpoint_dir / "step-000000001.ckpt")

    capsys.readouterr()
    resumed = make_trainer(tiny_lego, tmp_path / "second", load_dir=trainer.checkpoint_dir)
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, err
    assert "step-000000002.ckpt" in warnings[0] and "resuming from step-000000001.ckpt" in warnings[0]
    assert resumed._start_step == 2
    state = resumed.pipeline.state_dict()
    for key, value in weights(saved).items():
        assert torch.equal(state[key], value), key
    assert {k: v.state_dict()["state"].keys() for k, v in resumed.optimizers.optimizers.items()} == {
        k: v["state"].keys() for k, v in saved["optimizers"].items()}


@pytest.mark.parametrize("damage", ["all-truncated", "explicit-step", "empty-folder"])
def test_load_errors_are_one_line(tmp_path, tiny_lego, damage):
    """Nothing readable to resume from: one line naming the folder or file and the flag, no traceback."""
    trainer = make_trainer(tiny_lego, tmp_path / "first", save_only_latest_checkpoint=False)
    trainer.save_checkpoint(1)
    trainer.save_checkpoint(2)
    overrides: dict = {"load_dir": trainer.checkpoint_dir}
    if damage == "all-truncated":
        for path in trainer.checkpoint_dir.iterdir():
            path.write_bytes(path.read_bytes()[:500])
        expect = ("no readable checkpoint", "step-000000002.ckpt", "step-000000001.ckpt")
    elif damage == "explicit-step":
        path = trainer.checkpoint_dir / "step-000000001.ckpt"
        path.write_bytes(path.read_bytes()[:500])
        overrides["load_step"] = 1
        expect = ("step-000000001.ckpt", "cannot be read", "--load-step")
    else:
        for path in trainer.checkpoint_dir.iterdir():
            path.unlink()
        expect = ("holds no step-*.ckpt checkpoint",)
    with pytest.raises(CheckpointError) as stop:
        make_trainer(tiny_lego, tmp_path / "second", **overrides)
    message = str(stop.value.code)
    assert message.startswith("error: ") and "\n" not in message
    for word in expect:
        assert word in message, (word, message)

"""gen_lifting.compat.apply(): checkpoint loading, ffmpeg on PATH, float32 spiral camera paths."""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from gen_lifting import compat


@pytest.fixture
def clean_safe_globals():
    """Start without any allow-listed globals (as a fresh process would) and restore afterwards."""
    saved = torch.serialization.get_safe_globals()
    torch.serialization.clear_safe_globals()
    yield
    torch.serialization.clear_safe_globals()
    torch.serialization.add_safe_globals(saved)


def _save_like_nerfstudio_trainer(path: Path) -> dict:
    """Same dict layout as nerfstudio.engine.trainer.Trainer.save_checkpoint, from nerfstudio's own optimizers."""
    from nerfstudio.engine.optimizers import AdamOptimizerConfig
    from nerfstudio.engine.schedulers import ExponentialDecaySchedulerConfig

    field = torch.nn.Linear(3, 2)
    optimizer = AdamOptimizerConfig(lr=1e-2).setup(list(field.parameters()))
    scheduler = ExponentialDecaySchedulerConfig(lr_final=1e-4, max_steps=10).setup().get_scheduler(optimizer, 1e-2)
    for _ in range(3):
        field(torch.ones(1, 3)).sum().backward()
        optimizer.step()
        scheduler.step()
    state = {
        "step": 3,
        "pipeline": {f"_model.field.{k}": v for k, v in field.state_dict().items()},
        "optimizers": {"fields": optimizer.state_dict()},
        "schedulers": {"fields": scheduler.state_dict()},
        "scalers": torch.amp.GradScaler("cpu", enabled=False).state_dict(),
    }
    assert isinstance(state["schedulers"]["fields"]["_last_lr"][0], np.floating)  # what breaks weights_only
    torch.save(state, path)
    return state


def _load_like_ns_eval(path: Path) -> dict:
    # nerfstudio/utils/eval_utils.py:eval_load_checkpoint (ns-eval, ns-render, ns-viewer) does exactly this.
    return torch.load(path, map_location="cpu")


def test_ns_eval_still_loads_checkpoints_with_default_torch_load():
    import nerfstudio

    source = (Path(nerfstudio.__file__).parent / "utils" / "eval_utils.py").read_text()
    assert 'torch.load(load_path, map_location="cpu")' in source


def test_trainer_checkpoint_loads_after_apply(tmp_path, cache_dir, clean_safe_globals):
    path = tmp_path / "step-000000003.ckpt"
    saved = _save_like_nerfstudio_trainer(path)
    with pytest.raises(pickle.UnpicklingError, match="numpy"):
        _load_like_ns_eval(path)  # the bug apply() fixes
    compat.apply()
    compat.apply()  # idempotent
    loaded = _load_like_ns_eval(path)
    assert loaded["step"] == 3
    assert loaded["schedulers"]["fields"]["_last_lr"] == saved["schedulers"]["fields"]["_last_lr"]
    for key, value in saved["pipeline"].items():
        assert torch.equal(loaded["pipeline"][key], value)


def test_safe_globals_do_not_allow_numpy_arrays(tmp_path, cache_dir, clean_safe_globals):
    compat.apply()
    torch.save({"array": np.zeros(3)}, tmp_path / "array.ckpt")
    with pytest.raises(pickle.UnpicklingError):
        torch.load(tmp_path / "array.ckpt")


def test_ffmpeg_reachable_after_apply(tmp_path, cache_dir, monkeypatch):
    empty = tmp_path / "empty_bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    assert shutil.which("ffmpeg") is None
    compat.apply()
    compat.apply()
    ffmpeg = shutil.which("ffmpeg")
    assert ffmpeg is not None and Path(ffmpeg).parent == cache_dir / "bin"
    assert os.environ["PATH"].split(os.pathsep).count(str(cache_dir / "bin")) == 1
    assert subprocess.run([ffmpeg, "-version"], capture_output=True, check=False).returncode == 0


def test_spiral_path_from_blender_style_float32_cameras(cache_dir, monkeypatch):
    from nerfstudio.cameras import camera_utils
    from nerfstudio.cameras.camera_paths import get_spiral_path
    from nerfstudio.cameras.cameras import Cameras

    compat.apply()
    # as nerfstudio's blender dataparser builds them: float32 c2w, numpy.float64 focal (-> float64 fx)
    c2w = torch.eye(4)[:3].expand(2, 3, 4).clone()
    c2w[:, 2, 3] = 4.0
    focal = 0.5 * 64 / np.tan(0.5 * 0.69)
    cameras = Cameras(camera_to_worlds=c2w, fx=focal, fy=focal, cx=32.0, cy=32.0)
    assert cameras.fx.dtype == torch.float64 and cameras.camera_to_worlds.dtype == torch.float32

    path = get_spiral_path(cameras[0:1], steps=8, radius=0.1)
    poses = path.camera_to_worlds
    assert poses.shape == (8, 3, 4) and poses.dtype == torch.float32
    rotations = poses[:, :, :3]
    assert torch.allclose(rotations @ rotations.transpose(1, 2), torch.eye(3).expand(8, 3, 3), atol=1e-5)

    monkeypatch.setattr(camera_utils, "viewmatrix", camera_utils.viewmatrix.__wrapped__)
    with pytest.raises(RuntimeError, match="expected scalar type"):
        get_spiral_path(cameras[0:1], steps=8, radius=0.1)  # nerfstudio's own viewmatrix: the bug

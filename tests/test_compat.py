"""The plugin changes nothing outside itself: import side effects, checkpoint loading, ffmpeg, spiral camera paths."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gen_lifting import compat

IMPORT_PROBE = r"""
import json, os, sys, torch
from pathlib import Path
from nerfstudio.cameras import camera_utils

def state():
    return {"hub": torch.hub.get_dir(), "hub_dir_attr": torch.hub._hub_dir, "path": os.environ["PATH"],
            "viewmatrix": (camera_utils.viewmatrix.__module__, hasattr(camera_utils.viewmatrix, "__wrapped__")),
            # torch registers its own classes as modules load; what we used to add was numpy's
            "numpy_safe_globals": sorted(g for g in map(repr, torch.serialization.get_safe_globals()) if "numpy" in g)}

before = state()
import method_configs.gen_lifting  # what nerfstudio imports for every ns-* command once we are installed
from nerfstudio.configs.method_configs import all_methods  # and the way nerfstudio itself loads plugins
assert "gen-lifting" in all_methods and "gen-lifting-oracle" in all_methods
after = state()

def refuse(url, *args, **kwargs):
    raise OSError("network disabled")

torch.hub.download_url_to_file = refuse  # an offline machine without AlexNet in its hub cache
import torchvision
try:
    net = torchvision.models.alexnet(weights=torchvision.models.AlexNet_Weights.DEFAULT)
    alexnet = "nan" if any(torch.isnan(p).any().item() for p in net.classifier.parameters()) else "finite"
except OSError:
    alexnet = "download refused"
print(json.dumps({"before": before, "after": after, "alexnet": alexnet}))
"""


def test_importing_the_plugin_changes_nothing_outside_it(tmp_path):
    """torch.hub's dir, nerfstudio's viewmatrix, PATH and torch's safe globals are untouched by the import, and a
    user's torchvision AlexNet is never served our NaN-classifier file (before the fix: NaN logits, silently)."""
    env = {**os.environ, "TORCH_HOME": str(tmp_path / "torch_home"), "GEN_LIFTING_CACHE_DIR": str(tmp_path / "cache"),
           "PATH": os.environ.get("PATH", "")}
    result = subprocess.run([sys.executable, "-W", "ignore", "-c", IMPORT_PROBE], capture_output=True, text=True,
                            env=env, cwd=Path(__file__).resolve().parents[1], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    probe = json.loads(result.stdout.strip().splitlines()[-1])
    assert probe["after"] == probe["before"]
    assert probe["after"]["viewmatrix"] == ["nerfstudio.cameras.camera_utils", False]
    assert probe["alexnet"] == "download refused"
    assert not (tmp_path / "cache").exists(), "importing wrote to the package cache"


@pytest.fixture
def clean_safe_globals():
    """Start without any allow-listed globals (as a fresh process would) and restore afterwards."""
    saved = torch.serialization.get_safe_globals()
    torch.serialization.clear_safe_globals()
    yield
    torch.serialization.clear_safe_globals()
    torch.serialization.add_safe_globals(saved)


def test_gen_lifting_checkpoints_load_with_torch_defaults(tmp_path, clean_safe_globals):
    """nerfstudio's ns-eval / ns-render / ns-viewer call ``torch.load(path, map_location="cpu")`` (weights_only by
    default); gen-lifting's checkpoints hold no numpy scalars (its lr schedulers keep Python floats), so they load
    with no allow-list."""
    import nerfstudio

    from test_lifting_method import make_tiny_lego, tiny_config
    from nerfstudio.scripts.train import main

    source = (Path(nerfstudio.__file__).parent / "utils" / "eval_utils.py").read_text()
    assert 'torch.load(load_path, map_location="cpu")' in source
    config = tiny_config(make_tiny_lego(tmp_path / "lego"))
    config.max_num_iterations, config.vis, config.output_dir = 2, "tensorboard", tmp_path / "outputs"
    main(config)
    torch.serialization.clear_safe_globals()
    state = torch.load(next((tmp_path / "outputs").rglob("step-*.ckpt")), map_location="cpu")
    assert state["step"] == 1 and any(key.endswith("density_grid") for key in state["pipeline"])


def test_ffmpeg_on_path_supplies_one_only_where_missing(tmp_path, cache_dir, monkeypatch):
    empty = tmp_path / "empty_bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    assert shutil.which("ffmpeg") is None
    assert compat.ffmpeg_on_path() == cache_dir / "bin"
    assert compat.ffmpeg_on_path() is None  # found now: PATH is left alone
    ffmpeg = shutil.which("ffmpeg")
    assert ffmpeg is not None and Path(ffmpeg).parent == cache_dir / "bin"
    assert os.environ["PATH"].split(os.pathsep) == [str(empty), str(cache_dir / "bin")]  # appended, never first
    assert subprocess.run([ffmpeg, "-version"], capture_output=True, check=False).returncode == 0


def test_spiral_path_from_gen_lifting_cameras(tmp_path):
    """nerfstudio's blender parser gives float64 focal lengths next to float32 poses, which breaks its spiral path
    (``viewmatrix``: "expected scalar type Float but found Double"); gen-lifting's datamanager casts its cameras'
    intrinsics to float32 instead of patching nerfstudio."""
    from nerfstudio.cameras.camera_paths import get_spiral_path
    from nerfstudio.data.dataparsers.blender_dataparser import BlenderDataParserConfig

    from test_lifting_method import make_tiny_lego, setup_pipeline

    data = make_tiny_lego(tmp_path / "lego")
    raw = BlenderDataParserConfig(data=data).setup().get_dataparser_outputs("val").cameras
    assert raw.fx.dtype == torch.float64 and raw.camera_to_worlds.dtype == torch.float32
    with pytest.raises(RuntimeError, match="expected scalar type"):
        get_spiral_path(raw[0:1], steps=8, radius=0.1)  # nerfstudio alone: the bug
    pipeline = setup_pipeline(data)
    camera, _ = pipeline.datamanager.eval_dataloader.get_camera(image_idx=0)  # what ns-render spiral starts from
    assert camera.fx.dtype == torch.float32
    poses = get_spiral_path(camera, steps=8, radius=0.1).camera_to_worlds
    assert poses.shape == (8, 3, 4) and poses.dtype == torch.float32

"""Scene validation: detected format, or one-line SceneDataError naming the problem and the fix."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gen_lifting.data_checks import SceneDataError, check_image_folder_consistency, validate_scene


def _png(path: Path, size=(8, 6), mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size).save(path)
    return path


def _blender(root: Path, n: int = 3, **image_kwargs) -> Path:
    frames = [{"file_path": f"./train/r_{i}", "transform_matrix": np.eye(4).tolist()} for i in range(n)]
    root.mkdir(parents=True, exist_ok=True)
    (root / "transforms_train.json").write_text(json.dumps({"camera_angle_x": 0.69, "frames": frames}))
    for i in range(n):
        _png(root / "train" / f"r_{i}.png", **image_kwargs)
    return root


def _llff(root: Path, n: int = 3, folder: str = "images_8") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    np.save(root / "poses_bounds.npy", np.zeros((n, 17)))
    for i in range(n):
        _png(root / folder / f"image{i:03d}.png")
    return root


def _error(path) -> str:
    with pytest.raises(SceneDataError) as err:
        validate_scene(path)
    message = str(err.value)
    assert "\n" not in message
    return message


def test_detects_blender_and_llff(tmp_path):
    assert validate_scene(_blender(tmp_path / "b")) == "blender"
    assert validate_scene(_llff(tmp_path / "l")) == "llff"


def test_bundled_names_resolve():
    assert validate_scene("lego") == "blender"
    assert validate_scene("fern") == "llff"


def test_missing_data_names_the_bundled_datasets(tmp_path):
    message = _error(tmp_path / "nope")
    assert "neither an existing path nor a bundled dataset" in message and "lego" in message


def test_folder_without_pose_file(tmp_path):
    _png(tmp_path / "scene" / "a.png")
    assert "neither transforms_train.json (Blender) nor poses_bounds.npy (LLFF)" in _error(tmp_path / "scene")


def test_data_that_is_a_file(tmp_path):
    assert "is a file" in _error(_png(tmp_path / "a.png"))


def test_mixed_sizes(tmp_path):
    root = _blender(tmp_path / "b")
    _png(root / "train" / "r_1.png", size=(16, 6))
    assert "mixed sizes" in _error(root) and "16x6" in _error(root)


def test_corrupt_and_truncated_images(tmp_path):
    root = _blender(tmp_path / "b")
    (root / "train" / "r_0.png").write_bytes(b"not an image")
    assert "r_0.png is corrupt" in _error(root)
    root = _blender(tmp_path / "c", size=(64, 64))
    Image.effect_noise((64, 64), 50).convert("RGB").save(root / "train" / "r_2.png")
    data = (root / "train" / "r_2.png").read_bytes()
    (root / "train" / "r_2.png").write_bytes(data[: len(data) // 2])
    assert "r_2.png is corrupt" in _error(root)


def test_missing_frame_image(tmp_path):
    root = _blender(tmp_path / "b")
    (root / "train" / "r_2.png").unlink()
    assert "r_2.png is missing" in _error(root)


def test_grayscale_rejected_with_conversion_hint(tmp_path):
    root = _blender(tmp_path / "b", mode="L")
    assert "grayscale (mode L)" in _error(root) and "convert('RGB')" in _error(root)


def test_rgba_allowed_for_blender_but_not_llff(tmp_path):
    assert validate_scene(_blender(tmp_path / "b", mode="RGBA")) == "blender"
    root = _llff(tmp_path / "l")
    _png(root / "images_8" / "image000.png", mode="RGBA")
    assert "alpha channel" in _error(root)


def test_llff_count_shape_and_folder_errors(tmp_path):
    root = _llff(tmp_path / "count")
    (root / "images_8" / "image002.png").unlink()
    assert "2 images but poses_bounds.npy has 3 poses" in _error(root)
    root = _llff(tmp_path / "shape")
    np.save(root / "poses_bounds.npy", np.zeros((3, 15)))
    assert "expected [num_images, 17]" in _error(root)
    root = tmp_path / "noimages"
    root.mkdir()
    np.save(root / "poses_bounds.npy", np.zeros((3, 17)))
    assert "no images/ or images_N/ folder" in _error(root)


def test_bad_transforms_json(tmp_path):
    root = _blender(tmp_path / "b")
    (root / "transforms_train.json").write_text("{")
    assert "not a Blender transforms file" in _error(root)


def test_consistency_returns_the_common_size(tmp_path):
    paths = [_png(tmp_path / f"{i}.png", size=(5, 7)) for i in range(3)]
    assert check_image_folder_consistency(paths) == (5, 7)
    with pytest.raises(SceneDataError, match="no images found"):
        check_image_folder_consistency([])

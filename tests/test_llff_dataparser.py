"""LLFF dataparser on the bundled fern: conventions, split, scaling, downscaling, registration, errors."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gen_lifting.data_checks import SceneDataError
from gen_lifting.datasets import resolve_data
from gen_lifting.llff_dataparser import LLFFDataParserConfig, average_pose, llff_to_opengl

FERN = resolve_data("fern")


@pytest.fixture(scope="module")
def fern():
    parser = LLFFDataParserConfig(data=Path("fern")).setup()
    return {split: parser.get_dataparser_outputs(split) for split in ("train", "val", "test")}


def test_split_every_8th_image_is_test(fern):
    names = sorted(p.name for p in (FERN / "images_8").iterdir())
    assert [p.name for p in fern["test"].image_filenames] == names[::8]  # 20 images -> 0, 8, 16
    assert [p.name for p in fern["val"].image_filenames] == names[::8]
    assert len(fern["train"].image_filenames) == 17
    assert not set(fern["train"].image_filenames) & set(fern["test"].image_filenames)


def test_cameras_shapes_orthonormal_and_looking_down_minus_z(fern):
    cams = fern["train"].cameras
    c2w = cams.camera_to_worlds
    assert c2w.shape == (17, 3, 4) and c2w.dtype == torch.float32
    rot = c2w[:, :, :3]
    assert torch.allclose(rot @ rot.transpose(1, 2), torch.eye(3).expand(17, 3, 3), atol=1e-5)
    assert torch.allclose(torch.linalg.det(rot), torch.ones(17), atol=1e-5)
    viewing = -rot[:, :, 2]  # OpenGL cameras look along their -z axis
    assert (viewing @ torch.tensor([0.0, 0.0, -1.0]) > 0.9).all()
    assert (cams.width == 504).all() and (cams.height == 378).all()
    assert torch.allclose(cams.cx, torch.tensor(252.0)) and torch.allclose(cams.cy, torch.tensor(189.0))


def test_llff_axes_convert_to_opengl():
    # an LLFF camera whose [down, right, back] columns are world [-y, x, z] is the identity in OpenGL
    llff = np.array([[[0.0, 1.0, 0.0, 5.0], [-1.0, 0.0, 0.0, 6.0], [0.0, 0.0, 1.0, 7.0]]])
    assert np.allclose(llff_to_opengl(llff), np.array([[[1, 0, 0, 5], [0, 1, 0, 6], [0, 0, 1, 7]]]))


def test_dataset_poses_recentred_and_scaled_so_near_bound_is_one_over_bd_factor(fern):
    c2w = torch.cat([fern["train"].cameras.camera_to_worlds, fern["test"].cameras.camera_to_worlds]).double()
    assert np.allclose(average_pose(c2w.numpy()), np.eye(4)[:3], atol=1e-5)
    raw = np.load(FERN / "poses_bounds.npy")
    assert fern["train"].dataparser_scale == pytest.approx(1 / (raw[:, 15:].min() * 0.75))


def test_scene_box_and_planes_are_the_stated_prior(fern):
    """Box = the reference camera's frustum (origin, looking down -z) between the near and far planes, widened by
    camera_spread; near/far are the flags. None of it is read from the poses or bounds."""
    meta, aabb = fern["train"].metadata, fern["train"].scene_box.aabb
    assert (meta["near_plane"], meta["far_plane"]) == (1.0, 7.0) and "bounds" not in meta
    half_w, half_h = 7.0 * 504 / 2 / fern["train"].cameras.fx[0, 0], 7.0 * 378 / 2 / fern["train"].cameras.fy[0, 0]
    expected = torch.tensor([[-half_w - 0.5, -half_h - 0.5, -7.5], [half_w + 0.5, half_h + 0.5, -0.5]])
    torch.testing.assert_close(aabb, expected)
    other = LLFFDataParserConfig(data=Path("fern"), near_plane=2.0, far_plane=4.0, camera_spread=0.0).setup()
    outputs = other.get_dataparser_outputs("train")
    assert outputs.metadata["near_plane"] == 2.0 and outputs.scene_box.aabb[:, 2].tolist() == [-4.0, -2.0]


def test_scene_box_holds_what_the_dataset_cameras_see(fern):
    """The prior suits fern: the true cameras' mid-depth points lie inside the box (the oracle trains there)."""
    cams, aabb = fern["train"].cameras, fern["train"].scene_box.aabb
    meta = fern["train"].metadata
    mid = (meta["near_plane"] + meta["far_plane"]) / 2
    points = cams.camera_to_worlds[:, :, 3] - mid * cams.camera_to_worlds[:, :, 2]
    assert ((points >= aabb[0]) & (points <= aabb[1])).all()
    assert aabb[1, 2] < 0  # forward-facing: the box lies in front of the cameras (world -z)


def randomised_fern(root: Path, seed: int = 0) -> Path:
    """A copy of fern whose poses and depth bounds (everything COLMAP estimated except the intrinsics) are random."""
    scene = Path(shutil.copytree(FERN, root / "fern_random"))
    raw = np.load(scene / "poses_bounds.npy")
    rng = np.random.default_rng(seed)
    poses = raw[:, :15].reshape(-1, 3, 5)
    poses[:, :, :4] = rng.normal(size=poses[:, :, :4].shape) * 5  # hwf column (intrinsics) kept
    raw[:, :15] = poses.reshape(-1, 15)
    raw[:, 15:] = rng.uniform(0.5, 200.0, size=raw[:, 15:].shape)
    np.save(scene / "poses_bounds.npy", raw)
    return scene


def test_nothing_training_reads_depends_on_the_dataset_poses(tmp_path, fern):
    """Scene box, near/far, intrinsics, images and metadata are the same for random poses and bounds."""
    other = LLFFDataParserConfig(data=randomised_fern(tmp_path)).setup()
    for split in ("train", "test"):
        a, b = fern[split], other.get_dataparser_outputs(split)
        torch.testing.assert_close(a.scene_box.aabb, b.scene_box.aabb)
        assert a.metadata == b.metadata
        assert [p.name for p in a.image_filenames] == [p.name for p in b.image_filenames]
        for name in ("fx", "fy", "cx", "cy", "width", "height"):
            assert torch.equal(getattr(a.cameras, name), getattr(b.cameras, name)), name
        assert not torch.allclose(a.cameras.camera_to_worlds, b.cameras.camera_to_worlds)  # only these differ


def test_on_the_fly_downscale_writes_only_to_the_cache(cache_dir):
    before = sorted(p.name for p in FERN.rglob("*"))
    outputs = LLFFDataParserConfig(data=FERN, downscale_factor=2).setup().get_dataparser_outputs("train")
    assert sorted(p.name for p in FERN.rglob("*")) == before
    cams = outputs.cameras
    assert (cams.width == 252).all() and (cams.height == 189).all()
    assert all(cache_dir in p.parents for p in outputs.image_filenames)
    from PIL import Image

    assert Image.open(outputs.image_filenames[0]).size == (252, 189)
    full = LLFFDataParserConfig(data=FERN).setup().get_dataparser_outputs("train").cameras
    assert torch.allclose(cams.fx * 2, full.fx) and torch.allclose(cams.fy * 2, full.fy)


def _copy_fern(tmp_path: Path) -> Path:
    return Path(shutil.copytree(FERN, tmp_path / "fern"))


def test_missing_poses_bounds_is_a_one_line_error(tmp_path):
    scene = _copy_fern(tmp_path)
    (scene / "poses_bounds.npy").unlink()
    with pytest.raises(SceneDataError, match="no poses_bounds.npy") as err:
        LLFFDataParserConfig(data=scene).setup().get_dataparser_outputs("train")
    assert "\n" not in str(err.value)


def test_missing_images_folder_names_the_available_ones(tmp_path):
    scene = _copy_fern(tmp_path)
    with pytest.raises(SceneDataError, match=r"images_4 not found \(have: images_8\)"):
        LLFFDataParserConfig(data=scene, images_downscale=4).setup().get_dataparser_outputs("train")


def test_image_count_must_match_poses(tmp_path):
    scene = _copy_fern(tmp_path)
    (scene / "images_8" / "image019.png").unlink()
    with pytest.raises(SceneDataError, match="19 images but poses_bounds.npy has 20 poses"):
        LLFFDataParserConfig(data=scene).setup().get_dataparser_outputs("train")


def test_registered_as_llff_data_without_importing_method_configs():
    code = (
        "import sys; from importlib.metadata import entry_points;"
        "spec = entry_points(group='nerfstudio.dataparser_configs')['llff-data'].load();"
        "from gen_lifting.llff_dataparser import LLFFDataParserConfig;"
        "assert isinstance(spec.config, LLFFDataParserConfig), spec;"
        "bad = {'nerfstudio.configs.method_configs', 'nerfstudio.configs.dataparser_configs'} & set(sys.modules);"
        "assert not bad, bad"
    )
    result = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_bundled_fern_matches_the_shared_source(shared_data):
    source = shared_data / "nerf_llff" / "fern"
    assert np.array_equal(np.load(source / "poses_bounds.npy"), np.load(FERN / "poses_bounds.npy"))
    assert sorted(p.name for p in (source / "images_8").iterdir()) == sorted(p.name for p in (FERN / "images_8").iterdir())

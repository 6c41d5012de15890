"""benchmarks/lifting.py's COLMAP baseline: the metric (unregistered views are misses), COLMAP's camera convention,
the one-line error without the bench extra, (with pycolmap installed) a 64-px lego run of the CLI, and a gen-lifting
run kept with --keep-run that loads with the pose errors the benchmark wrote."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import lifting  # noqa: E402


def _cameras(n: int, radius: float = 4.0) -> torch.Tensor:
    """OpenGL c2w [n, 3, 4] on a sphere, looking at the origin (z up)."""
    g = torch.Generator().manual_seed(0)
    azimuth = torch.rand(n, generator=g, dtype=torch.float64) * 2 * math.pi
    elevation = torch.rand(n, generator=g, dtype=torch.float64) * 1.2 + 0.1
    back = torch.stack([elevation.cos() * azimuth.cos(), elevation.cos() * azimuth.sin(), elevation.sin()], 1)
    right = torch.linalg.cross(torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64).expand_as(back), back)
    right = right / right.norm(dim=1, keepdim=True)
    up = torch.linalg.cross(back, right)
    return torch.cat([torch.stack([right, up, back], dim=2), radius * back[:, :, None]], dim=2)


def _other_frame(c2w: torch.Tensor, scale: float = 0.3) -> torch.Tensor:
    """The same cameras in an arbitrary similarity frame (as COLMAP's reconstruction is)."""
    rotation = torch.tensor([[0.0, -1.0, 0.0], [0.0, 0.0, 1.0], [-1.0, 0.0, 0.0]], dtype=c2w.dtype)
    out = c2w.clone()
    out[:, :, :3] = rotation @ c2w[:, :, :3]
    out[:, :, 3] = scale * c2w[:, :, 3] @ rotation.T + torch.tensor([1.0, 2.0, -3.0], dtype=c2w.dtype)
    return out


def _rotate_about_own_z(c2w: torch.Tensor, degrees: float) -> torch.Tensor:
    angle = math.radians(degrees)
    turn = torch.tensor([[math.cos(angle), -math.sin(angle), 0.0], [math.sin(angle), math.cos(angle), 0.0],
                         [0.0, 0.0, 1.0]], dtype=c2w.dtype)
    out = c2w.clone()
    out[:, :, :3] = c2w[:, :, :3] @ turn
    return out


def test_unregistered_views_count_as_misses():
    gt = _cameras(10)
    registered = torch.tensor([1, 1, 0, 1, 1, 0, 1, 0, 1, 0], dtype=torch.bool)  # 6 of 10
    pred = _other_frame(gt[registered])
    pred[0] = _rotate_about_own_z(pred[:1], 40.0)[0]  # one registered view badly posed
    m = lifting.registered_pose_metrics(pred, registered, gt, mode="similarity")
    assert m["registered"] == 6 and m["num_views"] == 10 and m["registered_share"] == pytest.approx(0.6)
    assert m["within_15deg_registered"] == pytest.approx(5 / 6)
    assert m["within_15deg"] == pytest.approx(5 / 10)  # the 4 unregistered views are misses
    assert m["rot_err_median_deg"] < 1.0  # the alignment is fitted through the outlier (Umeyama on centres)


def test_fewer_than_three_registered_views_have_no_error():
    gt = _cameras(5)
    registered = torch.tensor([1, 0, 0, 1, 0], dtype=torch.bool)
    m = lifting.registered_pose_metrics(_other_frame(gt[registered]), registered, gt, mode="similarity")
    assert m["registered"] == 2 and m["within_15deg"] == 0.0
    assert m["rot_err_median_deg"] is None and m["within_15deg_registered"] is None
    with pytest.raises(ValueError, match="predicted poses"):
        lifting.registered_pose_metrics(gt[:3], registered, gt, mode="similarity")


def test_colmap_world_to_camera_becomes_opengl_camera_to_world():
    c2w = _cameras(4)
    for pose in c2w:
        opencv = pose.clone()
        opencv[:, 1:3] *= -1  # camera y down, z forward
        rot, centre = opencv[:, :3], opencv[:, 3]
        cam_from_world = torch.cat([rot.T, (-rot.T @ centre)[:, None]], dim=1)
        assert torch.allclose(lifting.colmap_c2w(cam_from_world.numpy()), pose, atol=1e-9)


def test_missing_extra_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "pycolmap", None)  # import pycolmap raises ImportError
    with pytest.raises(SystemExit) as info:
        lifting.import_pycolmap()
    message = str(info.value)
    assert "\n" not in message and "bench" in message and "pip install" in message


def test_colmap_refuses_to_upsample(tmp_path):
    from gen_lifting.datasets import resolve_data

    files = sorted((resolve_data("lego") / "train").glob("*.png"))[:1]
    with pytest.raises(SystemExit, match="larger than the stored images"):
        lifting.write_colmap_images(files, 128, tmp_path)
    assert lifting.write_colmap_images(files, 32, tmp_path) == pytest.approx(0.5)


def test_colmap_cli_on_bundled_lego_64px(tmp_path):
    pytest.importorskip("pycolmap")
    out = tmp_path / "colmap.json"
    proc = subprocess.run([sys.executable, str(BENCH / "lifting.py"), "--methods", "colmap", "--scenes", "lego",
                           "--colmap-px", "64", "--threads", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "colmap-64px" in proc.stdout  # the table
    result = json.loads(out.read_text())
    assert result["commit"] and result["machine"] and result["seed"] == 0 and "--methods colmap" in result["command"]
    m = result["scenes"]["lego"]["colmap-64px"]
    assert m["num_views"] == 100 and 0 <= m["registered"] <= 100
    assert m["image_width"] == m["image_height"] == 64 and m["threads"] == 1
    assert 0.0 <= m["within_15deg"] <= m["registered"] / 100
    assert m["psnr"] is None and m["train_s"] > 0
    assert (m["rot_err_median_deg"] is None) == (m["registered"] < 3)


def test_table_prints_encoder_refined_and_colmap_rows(capsys):
    """The table's "refined poses" line reads the refined_* keys (every REFINED_KEYS name maps from a column), the
    "field-checked" line the checked_* keys, and a colmap row (no field: PSNR / SSIM / LPIPS null, no steps) prints nan
    there and its registration count."""
    assert {lifting.refined_key(k) for k in ("psnr", "ssim", "lpips", "rot_err_median_deg", "within_15deg",
                                             "test_rot_err_median_deg", "test_within_15deg", "rot_err_mean_deg",
                                             "test_rot_err_mean_deg")} == set(lifting.REFINED_KEYS)
    refined = {"psnr": 17.1, "ssim": 0.6, "lpips": 0.5, "rot_err_median_deg": 9.9, "within_15deg": 0.7,
               "test_rot_err_median_deg": 11.8, "test_within_15deg": 0.6, "steps": 4000,
               "psnr_refined": 19.96, "ssim_refined": 0.8, "lpips_refined": 0.3, "refined_rot_err_median_deg": 2.4,
               "refined_within_15deg": 0.98, "test_refined_rot_err_median_deg": 2.9, "test_refined_within_15deg": 0.95,
               "checked_rot_err_median_deg": 8.1, "checked_within_15deg": 0.8, "test_checked_rot_err_median_deg": 8.7,
               "test_checked_within_15deg": 0.75}
    colmap = {"psnr": None, "ssim": None, "lpips": None, "rot_err_median_deg": 5.1, "within_15deg": 0.26,
              "test_rot_err_median_deg": None, "test_within_15deg": None, "registered": 26, "num_views": 100,
              "train_s": 7.0}
    lifting.print_table({"lego": {"gen-lifting-refine": refined, "colmap-128px": colmap}})
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[2:] == ["17.10", "0.600", "0.500", "9.9", "0.70", "11.8", "0.60", "4000"]
    assert lines[2].split()[-7:] == ["19.96", "0.800", "0.300", "2.4", "0.98", "2.9", "0.95"]
    assert lines[3].split()[-4:] == ["8.1", "0.80", "8.7", "0.75"] and "field-checked" in lines[3]
    assert lines[4].split()[2:] == ["nan", "nan", "nan", "5.1", "0.26", "nan", "nan", "nan"]
    assert "registered 26/100" in lines[5]


def test_keep_run_leaves_a_run_that_loads_and_poses_as_benchmarked(tmp_path):
    """``--keep-run DIR``: the benchmark's gen-lifting run is kept in nerfstudio's layout (config.yml + the last step's
    checkpoint); loading it gives the pose errors the benchmark wrote, and the JSON carries the centre-error keys."""
    from gen_lifting.inference import load_pipeline
    from test_lifting_method import make_tiny_lego

    data = make_tiny_lego(tmp_path / "lego", n_train=4, n_eval=2)
    out, keep = tmp_path / "bench.json", tmp_path / "runs"
    proc = subprocess.run([sys.executable, str(BENCH / "lifting.py"), "--methods", "gen-lifting", "--scenes", str(data),
                           "--max-steps", "2", "--budget-s", "600", "--threads", "1", "--eval-images", "2",
                           "--log-every-s", "0", "--keep-run", str(keep), "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = json.loads(out.read_text())["scenes"][str(data)]["gen-lifting"]
    assert m["steps"] == 2 and all(key in m for key in ("center_angle_err_median_deg", "center_dist_median"))
    (config,) = keep.rglob("config.yml")
    assert [p.name for p in (config.parent / "nerfstudio_models").iterdir()] == ["step-000000001.ckpt"]
    loaded = load_pipeline(config, test_mode="val")
    poses = loaded.evaluate_poses()
    assert poses["rot_err_median_deg"] == pytest.approx(m["rot_err_median_deg"], abs=1e-4)
    assert poses["center_angle_err_median_deg"] == pytest.approx(m["center_angle_err_median_deg"], abs=1e-4)

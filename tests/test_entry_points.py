"""Plugin wiring as a user meets it: ``ns-train --help`` lists the gen-lifting family, bad --data is one line."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def ns_train_help() -> str:
    exe = BIN / "ns-train"
    if not exe.exists():
        pytest.skip("ns-train not installed in this environment")
    result = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_ns_train_lists_gen_lifting_methods(ns_train_help):
    for name in ("gen-lifting", "gen-lifting-refine", "gen-lifting-ae", "gen-lifting-single", "gen-lifting-gpu",
                 "gen-lifting-oracle",
                 "gen-lifting-single-oracle"):
        assert name in ns_train_help


def test_unused_inherited_flags_are_hidden():
    exe = BIN / "ns-train"
    if not exe.exists():
        pytest.skip("ns-train not installed in this environment")
    result = subprocess.run([str(exe), "gen-lifting", "--help"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--pipeline.datamanager.images-per-batch" in result.stdout
    assert "train-num-rays-per-batch" not in result.stdout


def test_gen_lifting_cli_help_lists_commands():
    result = subprocess.run([str(BIN / "gen-lifting"), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    for sub in ("demo", "predict-pose", "sample", "orbit", "pose-vs-noise"):
        assert sub in result.stdout


def test_predict_pose_missing_config_is_one_line(tmp_path):
    result = subprocess.run([str(BIN / "gen-lifting"), "predict-pose", "--load-config", str(tmp_path / "nope.yml"),
                             "--image", str(tmp_path / "x.png")], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0 and "config.yml" in result.stderr

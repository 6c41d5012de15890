"""End-to-end CLI on tiny images: train -> segment -> sample -> eval, resume, and one-line errors on bad input."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from factorized_seg.cli import main

TINY_TRAIN = [
    "--resolution", "8", "--model.base-channels", "8", "--model.channel-mults", "1", "2", "--model.norm-groups", "4",
    "--model.num-res-blocks", "1", "--model.no-mid-attention", "--diffusion.num-timesteps", "50",
    "--batch-size", "4", "--max-steps", "2", "--sample-every", "2", "--sample-generate-steps", "2",
    "--checkpoint-every", "1", "--no-progress", "--threads", "1", "--device", "cpu",
]


def make_data(root: Path, n: int = 6, size: int = 12) -> tuple:
    """Coloured discs on a background, with their masks (0 bg, 255 fg, 128 on the disc's rim)."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        cy, cx, r = rng.integers(4, size - 4, 2).tolist() + [3]
        d = np.hypot(yy - cy, xx - cx)
        img = np.where((d < r)[..., None], rng.integers(150, 255, 3), rng.integers(0, 100, 3)).astype(np.uint8)
        Image.fromarray(img).save(root / "images" / f"im{i}.png")
        mask = np.where(d < r - 0.5, 255, 0).astype(np.uint8)
        mask[np.abs(d - r) < 0.5] = 128
        Image.fromarray(mask).save(root / "masks" / f"im{i}.png")
    return root / "images", root / "masks"


def run_cli(args, capsys):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("seg")
    images, masks = make_data(root / "data")
    run = root / "run"
    assert main(["train", "--data", str(images), "--output-dir", str(run), *TINY_TRAIN]) == 0
    return root, images, masks, run


def test_train_writes_config_checkpoints_tensorboard_and_grids(trained):
    _, _, _, run = trained
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["max_steps"] == 2 and cfg["model"]["base_channels"] == 8
    ckpt = torch.load(run / "checkpoints" / "latest.pt", weights_only=False)
    assert ckpt["step"] == 2 and {"model", "ema_model", "optimizer", "ema_state"} <= set(ckpt)
    assert (run / "checkpoints" / "ema.pt").is_file()
    assert list((run / "tensorboard").iterdir())
    assert (run / "samples" / "step-0000002.png").is_file()
    assert not list(run.rglob(".tmp-*"))


def test_segment_sample_eval(trained, capsys):
    root, images, masks, run = trained
    out = root / "seg"
    code, _, err = run_cli(["segment", "--run", run, "--images", images, "--output-dir", out, "--t", 5,
                            "--batch-size", 4, "--save-soft", "--no-progress"], capsys)
    assert code == 0, err
    labels = sorted((out / "masks").glob("*.png"))
    assert len(labels) == 6
    lab = np.asarray(Image.open(labels[0]))
    assert lab.shape == (12, 12) and lab.max() <= 1  # original size, label indices
    soft = np.load(out / "soft" / "im0.npz")["masks"]
    assert soft.shape == (2, 8, 8) and np.allclose(soft.astype(np.float32).sum(0), 1, atol=1e-2)
    assert (out / "overlays" / "im0.png").is_file()
    # Deterministic given the seed, and independent of the batch size.
    out2 = root / "seg2"
    assert main(["segment", "--run", str(run), "--images", str(images), "--output-dir", str(out2), "--t", "5",
                 "--batch-size", "5", "--no-progress", "--no-save-overlays"]) == 0
    for f in labels:
        assert np.array_equal(np.asarray(Image.open(f)), np.asarray(Image.open(out2 / "masks" / f.name)))

    # A glob pattern selects files.
    code, _, err = run_cli(["segment", "--run", run, "--images", f"{images}/im[0-2].png", "--output-dir",
                            root / "seg-glob", "--t", 5, "--no-progress", "--no-save-overlays"], capsys)
    assert code == 0, err
    assert len(list((root / "seg-glob" / "masks").glob("*.png"))) == 3

    for sampler, steps in (("ddpm", 0), ("ddim", 3), ("dpm", 3)):
        sout = root / f"sample-{sampler}"
        code, _, err = run_cli(["sample", "--run", run, "--output-dir", sout, "--num", 3, "--sampler", sampler,
                                "--steps", max(steps, 1), "--no-progress"], capsys)
        assert code == 0, err
        assert (sout / "grid.png").is_file()
        assert len(list((sout / "images").glob("*.png"))) == 3
        assert len(list((sout / "masks").glob("*.png"))) == 3

    code, stdout, err = run_cli(["eval", "--pred", out / "masks", "--masks", masks, "--fit-fraction", 0.34,
                                 "--output", root / "eval.json"], capsys)
    assert code == 0, err
    result = json.loads((root / "eval.json").read_text())
    assert result["num_images"] == 6 and result["num_fit"] == 2 and result["num_eval"] == 4
    for proto in ("strict", "iem"):
        assert all(0.0 <= result[proto][m] <= 1.0 for m in ("acc", "iou", "dice"))
    assert result["iem"]["iou"] >= result["iem_on_strict_images"]["iou"] - 1.0  # both present
    assert "strict" in stdout and "iem" in stdout


def test_resume_continues_at_saved_step_with_identical_ema(trained, tmp_path):
    _, images, _, run = trained
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    before = torch.load(resumed / "checkpoints" / "latest.pt", weights_only=False)
    # Resuming with the same max_steps does no step: EMA and step unchanged.
    assert main(["train", "--data", str(images), "--output-dir", str(resumed), *TINY_TRAIN, "--resume",
                 "--sample-every", "0"]) == 0
    same = torch.load(resumed / "checkpoints" / "latest.pt", weights_only=False)
    assert same["step"] == 2
    for a, b in zip(before["ema_state"]["shadow_params"], same["ema_state"]["shadow_params"]):
        assert torch.equal(a, b)
    # 2 + 2 resumed steps == 4 straight steps (optimiser, EMA and RNG state all restored).
    assert main(["train", "--data", str(images), "--output-dir", str(resumed), *TINY_TRAIN, "--resume",
                 "--max-steps", "4", "--sample-every", "0"]) == 0
    straight = tmp_path / "straight"
    assert main(["train", "--data", str(images), "--output-dir", str(straight), *TINY_TRAIN, "--max-steps", "4",
                 "--sample-every", "0"]) == 0
    r = torch.load(resumed / "checkpoints" / "latest.pt", weights_only=False)
    s = torch.load(straight / "checkpoints" / "latest.pt", weights_only=False)
    assert r["step"] == s["step"] == 4
    for k in s["ema_model"]:
        torch.testing.assert_close(r["ema_model"][k], s["ema_model"][k])


def assert_one_line_error(code, err, *words):
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1, err
    for w in words:
        assert w in lines[0], lines[0]


def test_bad_inputs_give_one_line_errors_and_write_nothing(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "out"
    code, _, err = run_cli(["train", "--data", empty, "--output-dir", out, *TINY_TRAIN], capsys)
    assert_one_line_error(code, err, "no images")
    assert not out.exists()

    bad = tmp_path / "bad"
    images, masks = make_data(bad)
    (images / "broken.png").write_bytes(b"not a png")
    code, _, err = run_cli(["train", "--data", images, "--output-dir", out, *TINY_TRAIN], capsys)
    assert_one_line_error(code, err, "broken.png")
    assert not out.exists()

    code, _, err = run_cli(["train", "--data", "no-such-dataset", "--output-dir", out, *TINY_TRAIN], capsys)
    assert_one_line_error(code, err, "flowers17")
    assert not out.exists()

    code, _, err = run_cli(["train", "--data", images, "--output-dir", out, *TINY_TRAIN, "--model.num-regions", "0"],
                           capsys)
    assert_one_line_error(code, err, "K")
    assert not out.exists()

    # eval: a mask without a prediction, then a prediction of the wrong size.
    pred = tmp_path / "pred"
    pred.mkdir()
    for f in sorted(masks.glob("*.png"))[:-1]:
        Image.fromarray(np.zeros((12, 12), np.uint8)).save(pred / f.name)
    code, _, err = run_cli(["eval", "--pred", pred, "--masks", masks, "--output", tmp_path / "e.json"], capsys)
    assert_one_line_error(code, err, "no prediction")
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(pred / sorted(masks.glob("*.png"))[-1].name)
    code, _, err = run_cli(["eval", "--pred", pred, "--masks", masks, "--output", tmp_path / "e.json"], capsys)
    assert_one_line_error(code, err, "5x5")
    assert not (tmp_path / "e.json").exists()

    code, _, err = run_cli(["segment", "--run", tmp_path / "nope", "--images", images], capsys)
    assert_one_line_error(code, err, "checkpoint")


def test_bundled_flowers_resolves():
    from factorized_seg.data import bundled_masks, list_images, resolve_data

    assert len(list_images(resolve_data("flowers17"))) == 1360
    assert len(list(bundled_masks("flowers17").glob("*.png"))) == 846


def test_class_conditional_training(tmp_path, capsys):
    images, _ = make_data(tmp_path / "data")
    labels = tmp_path / "labels.txt"
    labels.write_text("".join(f"im{i}.png {'cat' if i % 2 else 'dog'}\n" for i in range(6)))
    run = tmp_path / "run"
    code, _, err = run_cli(["train", "--data", images, "--labels", labels, "--output-dir", run, *TINY_TRAIN,
                            "--sample-every", "0"], capsys)
    assert code == 0, err
    ckpt = torch.load(run / "checkpoints" / "ema.pt", weights_only=False)
    assert ckpt["classes"] == ["cat", "dog"] and ckpt["model_config"]["num_classes"] == 2
    code, _, err = run_cli(["sample", "--run", run, "--output-dir", tmp_path / "s", "--num", 2, "--steps", 2,
                            "--class-label", 1, "--no-progress"], capsys)
    assert code == 0, err


def test_console_script_and_ddp_two_processes(tmp_path):
    """One subprocess for the installed console script, one torchrun with 2 CPU processes (gloo)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    exe = Path(sys.executable).parent / "factorized-seg"
    res = subprocess.run([str(exe), "--help"], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0 and "segment" in res.stdout
    images, _ = make_data(tmp_path / "data")
    run = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "factorized_seg.cli", "train", "--data", str(images), "--output-dir", str(run), *TINY_TRAIN,
           "--sample-every", "0"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    ckpt = torch.load(run / "checkpoints" / "latest.pt", weights_only=False)
    assert ckpt["step"] == 2 and len(ckpt["rng"]) == 2

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
    ckpt = torch.load(run / "checkpoints" / "latest.pt", weights_only=True)
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
    before = torch.load(resumed / "checkpoints" / "latest.pt", weights_only=True)
    # Resuming with the same max_steps does no step: EMA and step unchanged.
    assert main(["train", "--data", str(images), "--output-dir", str(resumed), *TINY_TRAIN, "--resume",
                 "--sample-every", "0"]) == 0
    same = torch.load(resumed / "checkpoints" / "latest.pt", weights_only=True)
    assert same["step"] == 2
    for a, b in zip(before["ema_state"]["shadow_params"], same["ema_state"]["shadow_params"]):
        assert torch.equal(a, b)
    # 2 + 2 resumed steps == 4 straight steps (optimiser, EMA and RNG state all restored).
    assert main(["train", "--data", str(images), "--output-dir", str(resumed), *TINY_TRAIN, "--resume",
                 "--max-steps", "4", "--sample-every", "0"]) == 0
    straight = tmp_path / "straight"
    assert main(["train", "--data", str(images), "--output-dir", str(straight), *TINY_TRAIN, "--max-steps", "4",
                 "--sample-every", "0"]) == 0
    r = torch.load(resumed / "checkpoints" / "latest.pt", weights_only=True)
    s = torch.load(straight / "checkpoints" / "latest.pt", weights_only=True)
    assert r["step"] == s["step"] == 4
    for k in s["ema_model"]:
        torch.testing.assert_close(r["ema_model"][k], s["ema_model"][k])
    # --ema-decay given on resume takes effect (as --lr does) and is what the next checkpoint stores
    assert main(["train", "--data", str(images), "--output-dir", str(resumed), *TINY_TRAIN, "--resume",
                 "--max-steps", "5", "--sample-every", "0", "--ema-decay", "0.5"]) == 0
    assert torch.load(resumed / "checkpoints" / "latest.pt", weights_only=True)["ema_state"]["decay"] == 0.5


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
    assert_one_line_error(code, err, "--model.num-regions")
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
    ckpt = torch.load(run / "checkpoints" / "ema.pt", weights_only=True)
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
    ckpt = torch.load(run / "checkpoints" / "latest.pt", weights_only=True)
    assert ckpt["step"] == 2 and len(ckpt["rng"]) == 2


def test_checkpoints_are_tensors_and_plain_types_with_a_round_tripping_config(trained):
    from factorized_seg.checkpoints import config_from_dict, config_to_dict
    from factorized_seg.trainer import TrainConfig

    _, _, _, run = trained
    latest = torch.load(run / "checkpoints" / "latest.pt", weights_only=True)
    ema = torch.load(run / "checkpoints" / "ema.pt", weights_only=True)
    assert latest["step"] == ema["step"] == 2 and latest["format"] == ema["format"] == "factorized-seg"
    assert not {"model", "optimizer", "ema_state", "rng"} & set(ema)
    for k in latest["ema_model"]:
        assert torch.equal(latest["ema_model"][k], ema["ema_model"][k])
    cfg = config_from_dict(TrainConfig, latest["train_config"])
    assert cfg.max_steps == 2 and cfg.model.channel_mults == (1, 2) and cfg.output_dir == run
    assert config_to_dict(cfg) == latest["train_config"]


def test_config_dict_round_trip_for_every_preset():
    from factorized_seg.checkpoints import config_from_dict, config_to_dict
    from factorized_seg.presets import PRESETS
    from factorized_seg.trainer import TrainConfig

    for preset in PRESETS.values():
        plain = json.loads(json.dumps(config_to_dict(preset)))  # what a JSON file or a checkpoint keeps
        assert config_from_dict(TrainConfig, plain) == preset
    partial = config_to_dict(PRESETS["cpu"])
    del partial["model"]["mask_pool"]  # a checkpoint from before a field existed: the default fills it
    assert config_from_dict(TrainConfig, partial).model.mask_pool == TrainConfig().model.mask_pool
    with pytest.raises(ValueError, match="no_such_field"):
        config_from_dict(TrainConfig, {**partial, "no_such_field": 1})


def test_16bit_pngs_keep_their_range(tmp_path):
    """A 16-bit greyscale PNG at half scale reads as mid-grey (Pillow's convert('RGB') would clip it to white)."""
    import cv2

    from factorized_seg.data import load_images, read_mask, read_rgb

    grey = tmp_path / "grey16.png"
    Image.fromarray(np.full((4, 6), 32768, np.uint16)).save(grey)
    assert Image.open(grey).mode.startswith("I")
    assert np.asarray(read_rgb(grey)).max() == 128 and read_rgb(grey).size == (6, 4)
    colour = tmp_path / "rgb16.png"
    cv2.imwrite(str(colour), np.full((4, 6, 3), 16384, np.uint16))  # 48-bit RGB PNG
    assert np.asarray(read_rgb(colour)).max() == 64
    assert int(load_images([grey], 8, progress=False).max()) == 128
    mask = tmp_path / "mask16.png"
    Image.fromarray(np.array([[0, 32896, 65535]], np.uint16)).save(mask)
    assert read_mask(mask).tolist() == [[0, 128, 255]]


def test_eval_counts_scored_and_skipped_and_reads_16bit_masks(tmp_path, capsys):
    images, masks = make_data(tmp_path / "data")
    pred = tmp_path / "pred"
    pred.mkdir()
    rng = np.random.default_rng(1)
    for f in sorted(masks.glob("*.png")):
        Image.fromarray(rng.integers(0, 2, (12, 12)).astype(np.uint8)).save(pred / f.name)
    Image.fromarray(np.zeros((12, 12), np.uint8)).save(pred / "no_mask_for_me.png")
    masks16 = tmp_path / "masks16"
    masks16.mkdir()
    for f in sorted(masks.glob("*.png")):
        Image.fromarray(np.asarray(Image.open(f)).astype(np.uint16) * 257).save(masks16 / f.name)
    results = []
    for name, folder in (("e8.json", masks), ("e16.json", masks16)):
        code, stdout, err = run_cli(["eval", "--pred", pred, "--masks", folder, "--fit-fraction", 0.34,
                                     "--output", tmp_path / name], capsys)
        assert code == 0, err
        assert "scored 6 predictions; skipped 1 without a ground-truth mask (e.g. no_mask_for_me)" in stdout
        results.append(json.loads((tmp_path / name).read_text()))
    assert results[0]["num_scored"] == 6 and results[0]["num_skipped_no_mask"] == 1
    assert results[0]["skipped_no_mask"] == ["no_mask_for_me"]
    assert results[0] == results[1]  # 16-bit masks (0 / 32896 / 65535) score exactly like their 8-bit copies


def test_interrupted_checkpoint_pair_is_repaired_and_temporaries_removed(tmp_path, capsys):
    """A kill between the writes of latest.pt and ema.pt leaves ema.pt one interval behind, and a kill during a
    write leaves a .tmp-* file: inference reads latest.pt's EMA weights, and resume repairs both."""
    from factorized_seg.checkpoints import load_for_inference

    images, _ = make_data(tmp_path / "data")
    run = tmp_path / "run"
    args = ["train", "--data", images, "--output-dir", run, *TINY_TRAIN, "--sample-every", "0"]
    assert run_cli([*args, "--max-steps", 1], capsys)[0] == 0
    old_ema = (run / "checkpoints" / "ema.pt").read_bytes()
    assert run_cli([*args, "--resume"], capsys)[0] == 0
    (run / "checkpoints" / "ema.pt").write_bytes(old_ema)  # as if killed before ema.pt was replaced
    (run / "checkpoints" / ".tmp-abc123.pt").write_bytes(b"half a checkpoint")
    (run / "samples").mkdir(exist_ok=True)
    (run / "samples" / ".tmp-xyz.png").write_bytes(b"half a png")

    latest = torch.load(run / "checkpoints" / "latest.pt", weights_only=True)
    model, _, meta = load_for_inference(run)
    assert meta["step"] == latest["step"] == 2
    for k, v in model.state_dict().items():
        assert torch.equal(v, latest["ema_model"][k])

    assert run_cli([*args, "--resume"], capsys)[0] == 0  # no step to do: only the repairs
    ema = torch.load(run / "checkpoints" / "ema.pt", weights_only=True)
    assert ema["step"] == 2 and all(torch.equal(ema["ema_model"][k], latest["ema_model"][k]) for k in ema["ema_model"])
    assert not list(run.rglob(".tmp-*"))


def test_odd_but_valid_images_train_and_segment(tmp_path, capsys):
    """1x1, mixed sizes, greyscale, RGBA, palette and 16-bit images are accepted; masks come out at each
    image's own size."""
    folder = tmp_path / "odd"
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (1, 1, 3)).astype(np.uint8)).save(folder / "tiny.png")
    Image.fromarray(rng.integers(0, 255, (30, 7, 3)).astype(np.uint8)).save(folder / "tall.jpg")
    Image.fromarray(rng.integers(0, 255, (9, 13)).astype(np.uint8)).save(folder / "grey.png")
    Image.fromarray(rng.integers(0, 255, (10, 10, 4)).astype(np.uint8)).save(folder / "alpha.png")
    Image.fromarray(rng.integers(0, 255, (10, 10, 3)).astype(np.uint8)).convert("P").save(folder / "palette.png")
    Image.fromarray(rng.integers(0, 65535, (11, 5)).astype(np.uint16)).save(folder / "deep.png")
    run = tmp_path / "run"
    code, _, err = run_cli(["train", "--data", folder, "--output-dir", run, *TINY_TRAIN, "--max-steps", 1,
                            "--sample-every", "0"], capsys)
    assert code == 0, err
    code, _, err = run_cli(["segment", "--run", run, "--images", folder, "--output-dir", tmp_path / "seg", "--t", 5,
                            "--no-progress"], capsys)
    assert code == 0, err
    sizes = {p.stem: Image.open(p).size for p in (tmp_path / "seg" / "masks").glob("*.png")}
    assert sizes == {"tiny": (1, 1), "tall": (7, 30), "grey": (13, 9), "alpha": (10, 10), "palette": (10, 10),
                     "deep": (5, 11)}


def test_outputs_get_ordinary_permissions(trained, tmp_path):
    """Atomic writes must not leave outputs private to their owner (tempfile.mkstemp's 0600)."""
    _, _, _, run = trained
    umask = os.umask(0o022)
    os.umask(umask)
    expected = 0o666 & ~umask
    for path in (run / "checkpoints" / "latest.pt", run / "checkpoints" / "ema.pt", run / "config.json",
                 run / "samples" / "step-0000002.png"):
        assert path.stat().st_mode & 0o777 == expected, path


def test_init_from_a_plain_run_warm_starts_everything_but_the_mask_generator(trained, tmp_path):
    from factorized_seg.trainer import load_for_inference, warm_start
    from factorized_seg.model import FactorizedUNetConfig

    root, images, _, _ = trained
    plain_run = tmp_path / "plain"
    assert main(["train", "--data", str(images), "--output-dir", str(plain_run), *TINY_TRAIN,
                 "--model.scheme", "plain", "--sample-every", "0"]) == 0
    plain, _, _ = load_for_inference(plain_run)
    torch.manual_seed(0)
    cfg = FactorizedUNetConfig(base_channels=8, channel_mults=(1, 2), norm_groups=4, num_res_blocks=1,
                               mid_attention=False)
    model = cfg.setup()
    fresh_mask_gen = {k: v.clone() for k, v in model.mask_generator.state_dict().items()}
    copied = warm_start(model, plain_run)
    assert copied == len(plain.state_dict())  # every plain weight has a home in the factorized model
    for name, value in plain.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], value)
    for name, value in model.mask_generator.state_dict().items():
        torch.testing.assert_close(value, fresh_mask_gen[name])
    # and through the CLI: a factorized run started from the plain one trains
    run = tmp_path / "warm"
    assert main(["train", "--data", str(images), "--output-dir", str(run), *TINY_TRAIN, "--sample-every", "0",
                 "--init-from", str(plain_run)]) == 0


def test_init_from_an_incompatible_run_is_one_line(trained, tmp_path, capsys):
    _, images, _, run = trained
    code, _, err = run_cli(["train", "--data", images, "--output-dir", tmp_path / "wide", *TINY_TRAIN,
                            "--model.base-channels", "16", "--init-from", run], capsys)
    assert code == 2 and "--init-from" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "wide").exists()

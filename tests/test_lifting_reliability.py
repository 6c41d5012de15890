"""gen-lifting under failure, as a user meets it: divergence stops the run without saving NaN weights, 16-bit PNGs,
kill -9 and ``--load-dir`` resume, deterministic mode, and the viewer of a trained run bound to 127.0.0.1.

The faulty command lines (wrong scene kind, out-of-range flags, bad scene folders) are cases of
tests/test_faulty_inputs.py; this module holds what needs a training run or a server.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import torch
from PIL import Image

from gen_lifting.data_checks import SceneDataError, validate_scene
from gen_lifting.datasets import BUNDLED_DIR
from test_lifting_method import make_tiny_lego, setup_pipeline, tiny_config

pytestmark = pytest.mark.filterwarnings("ignore")

BIN = Path(sys.executable).parent

TINY_FLAGS: List[str] = [
    # tiny_config (tests/test_lifting_method.py) as ns-train flags
    "--vis", "tensorboard", "--machine.device-type", "cpu",
    "--pipeline.datamanager.images-per-batch", "3", "--pipeline.datamanager.loss-pixels-per-image", "32",
    "--pipeline.datamanager.score-pixels-per-image", "16", "--pipeline.datamanager.noise-warmup-steps", "0",
    "--pipeline.model.num-samples", "16", "--pipeline.model.field.resolution", "16",
    "--pipeline.model.field.coarse-to-fine-steps", "0", "--pipeline.model.random-route-prob", "0",
    "--pipeline.model.tv-loss-mult", "0", "--pipeline.model.pose-encoder.trunk.base-channels", "8",
    "--pipeline.model.pose-encoder.trunk.channel-mults", "1", "2", "--pipeline.model.pose-encoder.trunk.num-res-blocks",
    "1", "--pipeline.model.pose-encoder.trunk.norm-groups", "4", "--pipeline.model.pose-encoder.trunk.mid-attention",
    "False", "--pipeline.model.pose-encoder.trunk.downsample-last", "True",
    "--steps-per-eval-batch", "1000000", "--steps-per-eval-image", "1000000", "--steps-per-eval-all-images", "1000000",
]


def ns_train(data: Path, out: Path, run: str, *extra: str) -> List[str]:
    """An ``ns-train gen-lifting`` command line writing to out/tiny/gen-lifting/<run>."""
    return [str(BIN / "ns-train"), "gen-lifting", "--data", str(data), "--output-dir", str(out),
            "--experiment-name", "tiny", "--timestamp", run, *TINY_FLAGS, *extra]


def env(**extra: str) -> Dict[str, str]:
    base = {k: v for k, v in os.environ.items() if k != "GEN_LIFTING_DETERMINISTIC"}
    return {**base, "OMP_NUM_THREADS": "1", **extra}


def checkpoints(folder: Path) -> List[Path]:
    return sorted(folder.glob("step-*.ckpt"))


def complete(path: Path) -> bool:
    """A fully written torch.save archive (its zip central directory is there)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return bool(archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def tensors(tree, prefix: str = "") -> Dict[str, torch.Tensor]:
    """Every tensor of a (nested) checkpoint, by path."""
    if isinstance(tree, torch.Tensor):
        return {prefix: tree}
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, (list, tuple)):
        items = enumerate(tree)
    else:
        return {}
    found: Dict[str, torch.Tensor] = {}
    for key, value in items:
        found.update(tensors(value, f"{prefix}/{key}"))
    return found


@pytest.fixture(scope="module")
def tiny_lego(tmp_path_factory) -> Path:
    return make_tiny_lego(tmp_path_factory.mktemp("reliability") / "lego")


# ------------------------------------------------------------------------------------------------ divergence


def test_nonfinite_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, tiny_lego, monkeypatch):
    """A loss that turns NaN at step 3: the run stops with one line naming step 3 and the learning-rate flags,
    step 2's checkpoint (the last good one) stays on disk, finite, and nothing of step 3 or later is saved."""
    from nerfstudio.scripts.train import main

    from gen_lifting.pipeline import GenLiftingPipeline

    original = GenLiftingPipeline.get_train_loss_dict

    def poisoned(self, step: int):
        outputs, loss, metrics = original(self, step)
        if step >= 3:
            loss = {key: value * float("nan") for key, value in loss.items()}
        return outputs, loss, metrics

    monkeypatch.setattr(GenLiftingPipeline, "get_train_loss_dict", poisoned)
    config = tiny_config(tiny_lego)
    config.max_num_iterations, config.steps_per_save, config.vis = 10, 1, "tensorboard"
    config.output_dir = tmp_path / "outputs"
    with pytest.raises(SystemExit) as stop:
        main(config)
    message = str(stop.value.code)
    assert "\n" not in message
    assert "diverged at step 3" in message and "--optimizers.fields.optimizer.lr" in message
    assert "--optimizers.pose-encoder.optimizer.lr" in message and "step-000000002.ckpt" in message
    saved = list((tmp_path / "outputs").rglob("step-*.ckpt"))
    assert [p.name for p in saved] == ["step-000000002.ckpt"]
    for name, value in tensors(load(saved[0])["pipeline"]).items():
        if value.is_floating_point():
            assert torch.isfinite(value).all(), name


def test_guard_is_installed_and_finite_runs_finish(tmp_path, tiny_lego):
    """A finite run trains to the end with the guard installed (it is one of the pipeline's callbacks)."""
    from gen_lifting.guards import NonFiniteGuard

    config = tiny_config(tiny_lego)
    config.max_num_iterations, config.steps_per_save, config.vis = 3, 1000, "tensorboard"
    config.output_dir = tmp_path / "outputs"
    config.set_timestamp()
    trainer = config.setup(local_rank=0, world_size=1)
    trainer.setup()
    assert any(isinstance(cb.func, NonFiniteGuard) for cb in trainer.callbacks)
    trainer.train()
    assert [p.name for p in (tmp_path / "outputs").rglob("*.ckpt")] == ["step-000000002.ckpt"]


# ------------------------------------------------------------------------------------------------ 16-bit PNGs


def _rgb16(path: Path, value: int, size: int, channels: int = 3) -> None:
    import cv2

    cv2.imwrite(str(path), np.full((size, size, channels), value, np.uint16))


def test_16bit_rgb_pngs_are_read_with_their_range(tmp_path):
    """Half-scale 16-bit RGB(A) frames read as 0.5 by the Blender and the LLFF loaders (not white, not wrapped)."""
    import shutil

    lego = make_tiny_lego(tmp_path / "lego", n_train=3, n_eval=1)
    for frame in sorted((lego / "train").glob("*.png")):
        _rgb16(frame, 32768, 64, channels=4)  # lego frames are RGBA: colour and alpha at half scale
    pipe = setup_pipeline(lego)
    train = pipe.datamanager.train_images  # composited on the white background: c * a + (1 - a), a = c = 128/255
    half = 128 / 255
    assert torch.allclose(train, torch.full_like(train, half * half + 1 - half), atol=1e-3)

    from gen_lifting.llff_dataparser import LLFFDataParserConfig

    fern = tmp_path / "fern"
    (fern / "images_8").mkdir(parents=True)
    shutil.copy(BUNDLED_DIR / "fern" / "poses_bounds.npy", fern)
    for src in sorted((BUNDLED_DIR / "fern" / "images_8").glob("*.png")):
        _rgb16(fern / "images_8" / src.name, 32768, 16)
    assert validate_scene(fern) == "llff"
    for factor in (1, 2):  # as stored, and through the downscaled copies
        outputs = LLFFDataParserConfig(data=fern, downscale_factor=factor).setup().get_dataparser_outputs("train")
        with Image.open(outputs.image_filenames[0]) as image:
            assert image.mode == "RGB"
            assert abs(np.asarray(image).astype(float).mean() - 128) <= 1


def test_16bit_grayscale_is_refused_with_a_fix_that_keeps_its_range(tmp_path, cache_dir):
    """16-bit grayscale has no 8-bit decoding (convert('RGB') clips it to white): refused with one line whose fix,
    applied as written, gives the right grey."""
    lego = make_tiny_lego(tmp_path / "lego", n_train=3, n_eval=1)
    frame = sorted((lego / "train").glob("*.png"))[1]
    Image.fromarray(np.full((64, 64), 32768, np.uint16)).save(frame)
    with pytest.raises(SceneDataError) as err:
        validate_scene(lego)
    message = str(err.value)
    assert "\n" not in message and frame.name in message and "16-bit" in message
    fix = message.split("e.g. ")[1].split(" (")[0]
    exec(fix, {"np": np, "Image": Image, "p": frame})  # the suggested one-liner, on the file
    with Image.open(frame) as fixed:
        assert fixed.mode == "RGB" and abs(np.asarray(fixed).astype(float).mean() - 127.5) <= 1
    assert validate_scene(lego) == "blender"

    from gen_lifting.llff_dataparser import LLFFDataParserConfig

    fern = tmp_path / "fern"
    (fern / "images_8").mkdir(parents=True)
    (fern / "poses_bounds.npy").write_bytes((BUNDLED_DIR / "fern" / "poses_bounds.npy").read_bytes())
    for src in sorted((BUNDLED_DIR / "fern" / "images_8").glob("*.png")):
        Image.fromarray(np.full((8, 8), 32768, np.uint16)).save(fern / "images_8" / src.name)
    with pytest.raises(SceneDataError, match="16-bit"):  # the dataparser alone (e.g. llff-data for nerfacto)
        LLFFDataParserConfig(data=fern, downscale_factor=2).setup().get_dataparser_outputs("train")
    assert not list(cache_dir.rglob("*.png")), "no clipped downscaled copy may be cached"


# ------------------------------------------------------------------------------------------------ kill -9, resume


def test_kill_9_then_load_dir_resumes_step_optimiser_and_pose_encoder(tmp_path, tiny_lego):
    """``ns-train gen-lifting`` killed with SIGKILL between checkpoints, then resumed with ``--load-dir``: the run goes
    on from the saved step, with the saved Adam state (its step count continues) and the saved pose encoder (the
    resumed run uses another --machine.seed, so a fresh init would be far from the saved weights)."""
    out = tmp_path / "outputs"
    ckpt_dir = out / "tiny" / "gen-lifting" / "first" / "nerfstudio_models"
    first = subprocess.Popen(ns_train(tiny_lego, out, "first", "--max-num-iterations", "100000",
                                      "--steps-per-save", "5"),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env())
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            done = [p for p in checkpoints(ckpt_dir) if complete(p)]
            if done and int(done[-1].stem.split("-")[1]) >= 10:
                break
            assert first.poll() is None, "training ended before it was killed"
            time.sleep(0.02)
        else:
            pytest.fail("no checkpoint at step >= 10 within 120 s")
        first.send_signal(signal.SIGKILL)  # right after a save: the next one is 5 steps away
    finally:
        first.kill()
        first.wait()
    saved = checkpoints(ckpt_dir)
    assert saved and all(complete(p) for p in saved), [p.name for p in saved]
    before = load(saved[-1])
    step = before["step"]

    resumed = subprocess.run(ns_train(tiny_lego, out, "resumed", "--load-dir", str(ckpt_dir), "--max-num-iterations",
                                      "2", "--steps-per-save", "1000", "--machine.seed", "1"),
                             capture_output=True, text=True, env=env(), timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after_files = checkpoints(out / "tiny" / "gen-lifting" / "resumed" / "nerfstudio_models")
    after = load(after_files[-1])
    assert after["step"] == step + 2
    for name, state in after["optimizers"].items():  # Adam's per-parameter step count went on from the checkpoint
        counts = {int(s["step"]) for s in state["state"].values()}
        assert counts == {step + 3}, (name, counts, step)
    lr = 3e-3  # the preset's pose-encoder learning rate: two Adam steps move a weight by at most ~2 * 3.2 * lr
    encoder = {k: v for k, v in before["pipeline"].items() if ".pose_encoder." in k and v.is_floating_point()}
    assert encoder
    for key, value in encoder.items():
        assert (after["pipeline"][key] - value).abs().max() <= 2 * 3.5 * lr, key
    far = max((after["pipeline"][k] - v).abs().max() for k, v in encoder.items())
    assert far > 0, "the resumed run did not train the pose encoder"


# ------------------------------------------------------------------------------------------------ determinism


def test_deterministic_mode_gives_bit_identical_checkpoints(tmp_path, tiny_lego):
    """GEN_LIFTING_DETERMINISTIC=1: two 4-step runs with one seed write bit-identical checkpoints (weights and
    optimiser state), even when the shell asks for different thread counts."""
    runs = []
    for i, threads in enumerate(("1", "2")):
        out = tmp_path / f"out{i}"
        result = subprocess.run(ns_train(tiny_lego, out, "run", "--max-num-iterations", "4", "--steps-per-save",
                                         "1000"),
                                capture_output=True, text=True, timeout=300,
                                env=env(GEN_LIFTING_DETERMINISTIC="1", OMP_NUM_THREADS=threads))
        assert result.returncode == 0, result.stderr[-3000:]
        runs.append(tensors(load(checkpoints(out / "tiny" / "gen-lifting" / "run" / "nerfstudio_models")[-1])))
    assert runs[0].keys() == runs[1].keys()
    different = [k for k in runs[0] if not torch.equal(runs[0][k], runs[1][k])]
    assert not different, different[:10]


# ------------------------------------------------------------------------------------------------ viewer


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _listening(port: int) -> List[str]:
    """Local addresses listening on ``port`` (``ss -ltn``)."""
    lines = subprocess.run(["ss", "-ltnH"], capture_output=True, text=True, check=True).stdout.splitlines()
    return [line.split()[3] for line in lines if len(line.split()) > 3 and line.split()[3].endswith(f":{port}")]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_lego) -> Path:
    config = tiny_config(tiny_lego)
    config.max_num_iterations, config.steps_per_save, config.vis = 2, 1000, "tensorboard"
    config.output_dir = tmp_path_factory.mktemp("viewer") / "outputs"
    config.set_timestamp()
    config.save_config()
    trainer = config.setup(local_rank=0, world_size=1)
    trainer.setup()
    trainer.train()
    return trainer.base_dir / "config.yml"


@pytest.mark.skipif(subprocess.run(["which", "ss"], capture_output=True).returncode != 0, reason="needs ss")
def test_view_command_binds_localhost_only(trained_run):
    """``gen-lifting view --load-config RUN/config.yml`` serves nerfstudio's viewer on 127.0.0.1 (ns-viewer's
    default is 0.0.0.0): the port listens on the loopback address only and answers there."""
    port = _free_port()
    proc = subprocess.Popen([str(BIN / "gen-lifting"), "view", "--load-config", str(trained_run), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env())
    try:
        deadline = time.time() + 120
        while not _listening(port):
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.time() < deadline, "the viewer did not listen within 120 s"
            time.sleep(0.2)
        assert _listening(port) == [f"127.0.0.1:{port}"]
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

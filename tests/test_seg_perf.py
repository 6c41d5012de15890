"""Throughput options of the factorized-seg trainer: channels_last, torch.compile, deferred host reads (the cuda
loop's non-finite-loss check), images on the training device. GPU-only behaviour is tested where CUDA exists."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import factorized_seg.trainer as trainer
from factorized_seg.checkpoints import read_checkpoint
from factorized_seg.data import SegDataError, augment
from factorized_seg.model import FactorizedUNetConfig
from factorized_seg.trainer import (
    AugmentConfig, TrainConfig, TrainingDiverged, augment_batch, train, validate_train_config,
)
from diffusion_utils.schedule import DiffusionScheduleConfig

TINY_MODEL = FactorizedUNetConfig(num_regions=2, base_channels=8, channel_mults=(1, 2), num_res_blocks=1,
                                  norm_groups=4, mid_attention=False)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("perf_images")
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(root / f"im{i}.png")
    return root


def tiny(images: Path, out: Path, **kw) -> TrainConfig:
    base = TrainConfig(data=str(images), output_dir=out, resolution=8, model=TINY_MODEL,
                       diffusion=DiffusionScheduleConfig(num_timesteps=50),
                       augment=AugmentConfig(flip=True, min_crop=0.8, max_shift=1), batch_size=4, max_steps=3,
                       warmup_steps=1, sample_every=0, checkpoint_every=0, progress=False, threads=1, device="cpu")
    return dataclasses.replace(base, **kw)


def final_weights(run: Path) -> dict:
    return read_checkpoint(run / "checkpoints" / "latest.pt", ("model",), mmap=False)["model"]


def test_channels_last_trains_like_contiguous(images, tmp_path):
    plain = train(tiny(images, tmp_path / "nchw"))
    nhwc = train(tiny(images, tmp_path / "nhwc", use_channels_last=True))
    assert plain.step == nhwc.step == 3
    assert nhwc.last_loss == pytest.approx(plain.last_loss, rel=1e-4)
    a, b = final_weights(tmp_path / "nchw"), final_weights(tmp_path / "nhwc")
    assert a.keys() == b.keys()
    conv = b["encoder.conv_in.weight"]  # the run really trained in NHWC
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    for key in a:
        torch.testing.assert_close(b[key].contiguous(), a[key], rtol=1e-4, atol=1e-5, msg=key)
    assert plain.compile_s == 0.0


def test_augment_batch_draws_like_data_augment():
    x = torch.rand(6, 3, 10, 10)
    for cfg in (AugmentConfig(flip=True, min_crop=0.7, max_shift=2), AugmentConfig(flip=False, max_shift=1)):
        ga, gb = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        want = augment(x, ga, cfg.flip, cfg.min_crop, cfg.max_shift)
        torch.testing.assert_close(augment_batch(x, gb, cfg), want, rtol=0, atol=0)
        assert torch.equal(ga.get_state(), gb.get_state())  # the same draws: later batches stay the same too


def test_compile_flag_trains_and_reports_compile_time(images, tmp_path):
    """aot_eager: dynamo's graph capture and AOT autograd, without generating kernels (fast on any machine)."""
    eager = train(tiny(images, tmp_path / "eager", max_steps=2))
    compiled = train(tiny(images, tmp_path / "compiled", max_steps=2, use_compile=True, compile_backend="aot_eager"))
    assert compiled.compile_s > 0
    assert compiled.last_loss == pytest.approx(eager.last_loss, rel=1e-4)
    assert final_weights(tmp_path / "compiled").keys() == final_weights(tmp_path / "eager").keys()  # no _orig_mod.


@pytest.mark.slow
def test_compile_inductor_on_cpu(images, tmp_path):
    missing = trainer.missing_cpp_compiler()
    if missing:
        pytest.skip(missing)
    if os.environ.get("SEG_PERF_INDUCTOR") != "1":
        pytest.skip("inductor's CPU kernels for even an 8-px model took 268-286 s to build cold on the 2-core "
                    "machine (seconds once cached); set SEG_PERF_INDUCTOR=1 to run it")
    eager = train(tiny(images, tmp_path / "eager", max_steps=2))
    compiled = train(tiny(images, tmp_path / "compiled", max_steps=2, use_compile=True))
    assert compiled.compile_s > 0
    assert compiled.last_loss == pytest.approx(eager.last_loss, rel=1e-3)


def test_compile_flags_are_validated(images, tmp_path, monkeypatch):
    with pytest.raises(SegDataError, match="--compile-backend"):
        validate_train_config(tiny(images, tmp_path / "a", use_compile=True, compile_backend="no-such-backend"))
    validate_train_config(tiny(images, tmp_path / "b", compile_backend="no-such-backend"))  # unused without the flag
    monkeypatch.setattr(trainer, "missing_cpp_compiler", lambda: "no C++ compiler (test)")
    with pytest.raises(SegDataError, match="--use-compile on CPU: no C\\+\\+ compiler"):
        validate_train_config(tiny(images, tmp_path / "c", use_compile=True))
    validate_train_config(tiny(images, tmp_path / "d", use_compile=True, compile_backend="aot_eager"))


@pytest.mark.parametrize("checkpoint_every", [0, 1])
def test_deferred_nonfinite_check_names_the_same_step_and_saves_nothing_nonfinite(
    images, tmp_path, monkeypatch, checkpoint_every
):
    """The cuda loop's check (a flag on the device, read every log_every steps and before every save), run on the
    CPU, stops with the same message as the exact per-step check and never writes non-finite weights."""
    kw = dict(lr=1e30, warmup_steps=0, max_steps=20, log_every=5, checkpoint_every=checkpoint_every)
    with pytest.raises(TrainingDiverged) as exact:
        train(tiny(images, tmp_path / "exact", **kw))
    monkeypatch.setattr(trainer, "defers_host_reads", lambda device: True)
    with pytest.raises(TrainingDiverged) as deferred:
        train(tiny(images, tmp_path / "deferred", **kw))
    assert "not finite" in str(exact.value)
    assert str(deferred.value) == str(exact.value)
    ckpt = tmp_path / "deferred" / "checkpoints" / "latest.pt"
    assert ckpt.exists() == bool(checkpoint_every)
    if ckpt.exists():
        assert all(torch.isfinite(v).all() for v in final_weights(tmp_path / "deferred").values())


def test_first_nonfinite_step_reads_the_flag():
    assert trainer._first_nonfinite_step(torch.tensor(0), world=1) == 0
    assert trainer._first_nonfinite_step(torch.tensor(7), world=1) == 7


def test_images_fit_on_cpu_always():
    assert trainer.images_fit_on(torch.device("cpu"), torch.zeros(10, 3, 8, 8, dtype=torch.uint8))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_loop_trains_with_images_on_the_device_and_stops_on_nonfinite_loss(images, tmp_path):
    run = train(tiny(images, tmp_path / "cuda", device="cuda", use_channels_last=True, use_bf16=True, max_steps=6,
                     log_every=4))
    assert run.step == 6 and np.isfinite(run.last_loss)
    with pytest.raises(TrainingDiverged, match="not finite"):
        train(tiny(images, tmp_path / "nan", device="cuda", lr=1e30, warmup_steps=0, max_steps=20, log_every=5))
    assert not (tmp_path / "nan" / "checkpoints" / "latest.pt").exists()


def test_deferred_check_under_torchrun_stops_every_process_without_hanging(images, tmp_path):
    """The cuda loop's collective checks (2 gloo processes, the deferred path forced): a check before the rank-0-only
    sample grid must run on every process, or the other one waits forever."""
    script = tmp_path / "deferred_train.py"
    script.write_text("import sys\nimport factorized_seg.trainer as t\nfrom factorized_seg.cli import main\n"
                      "t.defers_host_reads = lambda device: True\nsys.exit(main(sys.argv[1:]))\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           "train", "--data", str(images), "--output-dir", str(tmp_path / "run"), "--resolution", "8",
           "--model.base-channels", "8", "--model.channel-mults", "1", "2", "--model.norm-groups", "4",
           "--model.no-mid-attention", "--diffusion.num-timesteps", "50", "--batch-size", "4", "--max-steps", "8",
           "--lr", "1e30", "--warmup-steps", "0", "--log-every", "5", "--sample-every", "1",
           "--sample-generate-steps", "1", "--checkpoint-every", "0", "--no-progress", "--threads", "1",
           "--device", "cpu"]
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                         timeout=120)
    assert res.returncode != 0
    assert res.stderr.count("training diverged at step 2: the loss is not finite") == 2, res.stderr[-3000:]

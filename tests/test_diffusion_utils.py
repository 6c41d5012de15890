"""Closed-form checks of the shared DDPM maths and the U-Net trunk wiring."""

import subprocess
import sys

import pytest
import torch

from diffusion_utils.schedule import DiffusionSchedule, DiffusionScheduleConfig, to_image_range, to_model_range
from diffusion_utils.unet_blocks import (
    TimestepEmbedder,
    UNetDecoder,
    UNetEncoder,
    UNetMiddle,
    UNetTrunkConfig,
    set_padding_mode,
)


@pytest.fixture(scope="module")
def sched() -> DiffusionSchedule:
    return DiffusionScheduleConfig(num_timesteps=100).setup()


def test_linear_betas_and_alpha_bar_monotone(sched):
    assert torch.allclose(sched.betas[0], torch.tensor(1e-4)) and torch.allclose(sched.betas[-1], torch.tensor(0.02))
    diffs = sched.alphas_cumprod[1:] - sched.alphas_cumprod[:-1]
    assert (diffs < 0).all()
    # closed form: abar_t = prod (1 - beta_s)
    assert torch.allclose(sched.alphas_cumprod, torch.cumprod(1 - sched.betas.double(), 0).float(), atol=1e-6)


def test_forward_noise_statistics(sched):
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((20000, 1), 0.5)
    t = torch.full((20000,), 70)
    xt = sched.add_noise(x0, t, torch.randn(x0.shape, generator=g))
    abar = sched.alphas_cumprod[70]
    assert abs(xt.mean() - abar.sqrt() * 0.5) < 0.02
    assert abs(xt.var() - (1 - abar)) < 0.02


def test_per_sample_t_and_conversions_roundtrip(sched):
    x0 = torch.rand(4, 3, 5, 5) * 2 - 1
    eps = torch.randn_like(x0)
    t = torch.tensor([0, 10, 50, 99])
    xt = sched.add_noise(x0, t, eps)
    assert torch.allclose(sched.x0_from_eps(xt, t, eps), x0, atol=1e-4)
    assert torch.allclose(sched.eps_from_x0(xt, t, x0), eps, atol=1e-3)
    # each sample used its own t
    assert torch.allclose(xt[1], sched.add_noise(x0[1:2], t[1:2], eps[1:2])[0])


def test_step_with_true_eps_gives_posterior_mean(sched):
    x0 = torch.rand(3, 3, 4, 4) * 2 - 1
    eps = torch.randn_like(x0)
    t = torch.tensor([5, 40, 99])
    xt = sched.add_noise(x0, t, eps)
    g = torch.Generator().manual_seed(1)
    x_prev, x0_hat = sched.step(eps, t, xt, generator=g)
    mean = sched.posterior_mean(x0, xt, t)
    assert torch.allclose(x0_hat, x0, atol=1e-4)
    noise = x_prev - mean
    std = sched.posterior_variance[t].sqrt().reshape(-1, 1, 1, 1)
    z = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(noise, std * z, atol=1e-4)
    # x0-prediction gives the same step for the same x0
    x_prev2, _ = sched.step(x0, t, xt, prediction="sample", generator=torch.Generator().manual_seed(1))
    assert torch.allclose(x_prev, x_prev2, atol=1e-4)


def test_last_step_adds_no_noise(sched):
    x0 = torch.zeros(2, 3, 2, 2)
    xt = torch.randn_like(x0)
    t = torch.zeros(2, dtype=torch.long)
    a, _ = sched.step(x0, t, xt, prediction="sample", generator=torch.Generator().manual_seed(0))
    b, _ = sched.step(x0, t, xt, prediction="sample", generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_step_matches_diffusers(sched):
    x0 = torch.rand(2, 3, 4, 4) * 2 - 1
    eps_hat = torch.randn_like(x0)
    xt = torch.randn_like(x0)
    for tt in (1, 37, 99):
        t = torch.full((2,), tt)
        ours, _ = sched.step(eps_hat, t, xt, generator=torch.Generator().manual_seed(3))
        ref = sched.scheduler.step(eps_hat, tt, xt, generator=torch.Generator().manual_seed(3)).prev_sample
        assert torch.allclose(ours, ref, atol=1e-4), tt


def test_range_conversion_roundtrip():
    x = torch.rand(3, 4)
    assert torch.allclose(to_image_range(to_model_range(x)), x)


def _tiny_cfg(**kw) -> UNetTrunkConfig:
    return UNetTrunkConfig(base_channels=8, channel_mults=(1, 2), num_res_blocks=1, norm_groups=4, **kw)


@pytest.mark.parametrize("attn", [(), (1,)])
def test_unet_trunk_shapes(attn):
    cfg = _tiny_cfg(attention_levels=attn)
    emb = TimestepEmbedder(cfg.base_channels, cfg.temb_channels)
    enc = UNetEncoder(cfg)
    mid = UNetMiddle(cfg, enc.out_channels)
    dec = UNetDecoder(cfg, enc.skip_channels, enc.out_channels, out_channels=5)
    x = torch.randn(2, 3, 16, 16)
    temb = emb(torch.tensor([3, 900]))
    h, skips = enc(x, temb)
    assert [s.shape[1] for s in skips] == enc.skip_channels
    assert h.shape[-1] == 8
    out = dec(mid(h, temb), skips, temb)
    assert out.shape == (2, 5, 16, 16)
    assert len(skips) == dec.num_skips  # decoder did not consume the shared tuple


def test_encoder_downsample_last():
    cfg = _tiny_cfg(downsample_last=True)
    enc = UNetEncoder(cfg)
    h, skips = enc(torch.randn(1, 3, 16, 16), torch.zeros(1, cfg.temb_channels))
    assert h.shape[-1] == 4
    with pytest.raises(ValueError):
        UNetDecoder(cfg, enc.skip_channels, enc.out_channels, 3)


def test_padding_mode_changes_border_behaviour():
    cfg = _tiny_cfg(padding_mode="replicate")
    enc = UNetEncoder(cfg)
    convs = [m for m in enc.modules() if isinstance(m, torch.nn.Conv2d) and m.padding != (0, 0)]
    assert convs and all(m.padding_mode == "replicate" for m in convs)
    with pytest.raises(ValueError):
        set_padding_mode(enc, "mirror")


def test_class_embedding_changes_temb():
    emb = TimestepEmbedder(8, 32, num_classes=3)
    t = torch.tensor([5, 5])
    a = emb(t, torch.tensor([0, 1]))
    assert not torch.allclose(a[0], a[1])
    assert emb(t).shape == (2, 32)


def test_diffusion_utils_imports_neither_half():
    code = (
        "import sys, diffusion_utils.schedule, diffusion_utils.unet_blocks;"
        "bad=[m for m in sys.modules if m.split('.')[0] in ('nerfstudio','gen_lifting','factorized_seg')];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)

"""Contracts of the mask options and mask terms (ours): hard masks, nearest resizing, balance, confidence and
equivariance. Tiny tensors and models, CPU, a few seconds."""

import math

import pytest
import torch
import torch.nn.functional as F

from diffusion_utils.schedule import DiffusionScheduleConfig
from factorized_seg.losses import (
    EquivarianceConfig,
    MaskLossConfig,
    SegObjective,
    equivariance_error,
    mutual_information_gap,
    pixel_entropy,
    random_view_grid,
    usage_balance,
    warp,
)
from factorized_seg.model import FactorizedUNetConfig, straight_through_one_hot

TINY = dict(base_channels=8, channel_mults=(1, 2), num_res_blocks=1, norm_groups=4)


def test_straight_through_is_one_hot_forward_and_soft_backward():
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    probs = torch.softmax(logits, dim=1)
    hard = straight_through_one_hot(probs)
    onehot = F.one_hot(probs.argmax(1), 3).permute(0, 3, 1, 2).float()
    torch.testing.assert_close(hard.detach(), onehot)  # exact up to float rounding of (p - p)
    assert torch.equal(hard.detach().argmax(1), probs.detach().argmax(1))
    (hard * torch.randn_like(hard)).sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_hard_masks_reach_the_mask_generator_and_gate_the_decoder():
    torch.manual_seed(0)
    model = FactorizedUNetConfig(**TINY, mask_mode="hard", padding_mode="reflect").setup()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 500])
    out = model(x, t)
    # the forward pass used one-hot masks: recompute eps with the one-hot masks by hand
    h_mid, skips, temb = model.encode(x, t)
    probs = model.masks(h_mid, skips, temb)
    onehot = F.one_hot(probs.argmax(1), 2).permute(0, 3, 1, 2).float()
    eps_k = model._region_eps(h_mid, skips, temb, onehot)
    torch.testing.assert_close(out.eps, (eps_k * onehot.unsqueeze(2)).sum(1))
    out.eps.pow(2).mean().backward()
    grads = [p.grad for p in model.mask_generator.parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("mode", ["area", "nearest"])
def test_resized_masks_stay_a_partition_of_unity(mode):
    torch.manual_seed(0)
    model = FactorizedUNetConfig(**TINY, num_regions=3, mask_resize=mode).setup()
    out = model(torch.randn(2, 3, 8, 8), torch.tensor([1, 2]))
    for size in ((4, 4), (2, 2)):
        m = model._resize(out.masks, size)
        torch.testing.assert_close(m.sum(1), torch.ones(2, *size))


def test_nearest_resizing_keeps_a_lattice_split_from_averaging_out():
    cols = (torch.arange(8) % 2).float().expand(8, 8)
    masks = torch.stack([cols, 1 - cols])[None]
    area = FactorizedUNetConfig(**TINY, mask_resize="area").setup()._resize(masks, (4, 4))
    nearest = FactorizedUNetConfig(**TINY, mask_resize="nearest").setup()._resize(masks, (4, 4))
    torch.testing.assert_close(area, torch.full_like(area, 0.5))  # the split vanishes one level down ...
    assert set(nearest.unique().tolist()) == {0.0, 1.0}  # ... or stays a hard choice


def test_balance_is_zero_at_uniform_usage_and_largest_at_one_region():
    uniform = torch.full((2, 2, 4, 4), 0.5)
    half = torch.zeros(2, 2, 4, 4)
    half[:, 0, :, :2] = 1
    half[:, 1, :, 2:] = 1
    one = torch.zeros(2, 2, 4, 4)
    one[:, 0] = 1
    assert usage_balance(uniform).item() == pytest.approx(0.0, abs=1e-6)
    assert usage_balance(half).item() == pytest.approx(0.0, abs=1e-6)
    assert usage_balance(one).item() == pytest.approx(1.0, abs=1e-6)
    skewed = torch.cat([torch.full((1, 1, 4, 4), 0.8), torch.full((1, 1, 4, 4), 0.2)], dim=1)
    assert 0 < usage_balance(skewed).item() < 1


def test_pixel_entropy_separates_one_hot_from_uniform_masks():
    one_hot = F.one_hot(torch.randint(0, 3, (2, 4, 4)), 3).permute(0, 3, 1, 2).float()
    assert pixel_entropy(one_hot).item() == pytest.approx(0.0, abs=1e-6)
    assert pixel_entropy(torch.full((2, 3, 4, 4), 1 / 3)).item() == pytest.approx(1.0, abs=1e-6)


def test_flip_and_shift_grids_map_pixels_exactly():
    x = torch.arange(2 * 64, dtype=torch.float32).reshape(2, 1, 8, 8)
    gen = torch.Generator().manual_seed(0)
    grid = random_view_grid(2, 8, 8, EquivarianceConfig(flip=True, max_shift=2), gen)
    y = warp(x, grid, padding_mode="zeros")
    inside = (grid.abs() <= 1).all(-1)
    # every pixel of the second view that lies inside the first is an exact copy of one of its pixels
    values = set(x.flatten().tolist())
    assert all(v in values for v in y[:, 0][inside].tolist())


def _content_masks(x: torch.Tensor) -> torch.Tensor:
    """An equivariant toy segmenter: region 0 where the image is bright."""
    fg = torch.sigmoid(20 * (x.mean(1, keepdim=True) - 0.5))
    return torch.cat([fg, 1 - fg], dim=1)


@pytest.mark.parametrize("cfg", [EquivarianceConfig(flip=True, max_shift=3),
                                 EquivarianceConfig(flip=True, max_shift=1, min_scale=0.6)])
def test_equivariance_is_zero_for_content_masks_and_positive_for_positional_ones(cfg):
    gen = torch.Generator().manual_seed(0)
    x = torch.zeros(4, 3, 16, 16)
    x[:, :, 3:9, 2:7] = 1.0  # an off-centre bright square
    grid = random_view_grid(4, 16, 16, cfg, gen)
    x_b = warp(x, grid)
    content = equivariance_error(_content_masks(x), _content_masks(x_b), grid)
    yy, xx = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    blob = (((yy - 7.5) ** 2 + (xx - 7.5) ** 2) < 25).float()[None, None].expand(4, 1, 16, 16)
    centre = torch.cat([blob, 1 - blob], dim=1)
    stripes = (xx % 2)[None, None].expand(4, 1, 16, 16)
    lattice = torch.cat([stripes, 1 - stripes], dim=1)
    positional = [equivariance_error(m, m, grid).item() for m in (centre, lattice)]
    assert content.item() < 0.02
    assert min(positional) > 10 * content.item() + 0.05


def test_mutual_information_gap_is_low_only_for_confident_balanced_equivariant_masks():
    gen = torch.Generator().manual_seed(0)
    x = torch.zeros(4, 3, 16, 16)
    x[:, :, 2:10, 3:11] = 1.0  # a bright square covering about a quarter of the image
    cfg = EquivarianceConfig(flip=True, max_shift=2)
    grid = random_view_grid(4, 16, 16, cfg, gen)
    x_b = warp(x, grid)
    content = mutual_information_gap(_content_masks(x), _content_masks(x_b), grid).item()
    uniform = torch.full((4, 2, 16, 16), 0.5)
    one = torch.cat([torch.ones(4, 1, 16, 16), torch.zeros(4, 1, 16, 16)], dim=1)
    assert content < 0.4  # I(z_a; z_b) = H(foreground share ~ 0.25) = 0.81 bits of 1: gap ~ 0.19
    assert mutual_information_gap(uniform, uniform, grid).item() == pytest.approx(1.0, abs=1e-4)
    assert mutual_information_gap(one, one, grid).item() == pytest.approx(1.0, abs=1e-4)


def test_objective_without_mask_terms_is_the_papers_denoising_loss():
    torch.manual_seed(0)
    model = FactorizedUNetConfig(**TINY).setup()
    schedule = DiffusionScheduleConfig().setup()
    x, t = torch.randn(3, 3, 8, 8), torch.tensor([1, 50, 900])
    noise = torch.randn_like(x)
    loss, logs = SegObjective(model, schedule, MaskLossConfig())(x, t, noise)
    expected = F.mse_loss(model(schedule.add_noise(x, t, noise), t).eps, noise)
    torch.testing.assert_close(loss, expected)
    assert "loss/equivariance" not in logs


def test_objective_adds_each_enabled_term_and_trains_the_mask_generator():
    torch.manual_seed(0)
    model = FactorizedUNetConfig(**TINY, padding_mode="reflect").setup()
    schedule = DiffusionScheduleConfig().setup()
    x, t = torch.randn(3, 3, 8, 8), torch.tensor([1, 50, 900])
    noise = torch.randn_like(x)
    cfg = MaskLossConfig(balance_loss_mult=0.5, confidence_loss_mult=0.25, equivariance_loss_mult=2.0,
                         mutual_information_loss_mult=0.5)
    loss, logs = SegObjective(model, schedule, cfg)(x, t, noise, generator=torch.Generator().manual_seed(1))
    expected = (logs["loss/denoise"] + 0.5 * logs["masks/usage_imbalance"] + 0.25 * logs["masks/pixel_entropy"]
                + 2.0 * logs["loss/equivariance"] + 0.5 * logs["loss/mutual_information_gap"])
    torch.testing.assert_close(loss.detach(), expected)
    assert logs["loss/equivariance"] > 0
    loss.backward()
    assert all(p.grad is not None for p in model.mask_generator.parameters())


def test_equivariance_max_t_skips_noisy_samples():
    torch.manual_seed(0)
    model = FactorizedUNetConfig(**TINY).setup()
    schedule = DiffusionScheduleConfig().setup()
    x, noise = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    cfg = MaskLossConfig(equivariance_loss_mult=1.0, equivariance=EquivarianceConfig(max_t=100))
    _, logs = SegObjective(model, schedule, cfg)(x, torch.tensor([500, 900]), noise,
                                                 generator=torch.Generator().manual_seed(0))
    assert logs["loss/equivariance"].item() == 0.0


def test_negative_weights_are_refused():
    with pytest.raises(ValueError, match="balance-loss-mult"):
        MaskLossConfig(balance_loss_mult=-1).validate()
    with pytest.raises(ValueError, match="min-scale"):
        MaskLossConfig(equivariance=EquivarianceConfig(min_scale=0)).validate()
    assert math.isclose(usage_balance(torch.ones(1, 1, 2, 2)).item(), 0.0)


def test_logit_centering_removes_a_constant_preference_for_one_region():
    torch.manual_seed(0)
    model = FactorizedUNetConfig(**TINY, mask_logit_norm="center").setup()
    with torch.no_grad():
        model.mask_generator.conv_out.bias.copy_(torch.tensor([8.0, -8.0]))  # a generator that "collapsed"
    x, t = torch.randn(4, 3, 8, 8), torch.tensor([1, 2, 3, 4])
    h_mid, skips, temb = model.encode(x, t)
    centred = model.mask_logit_norm(model.mask_generator(h_mid, skips, temb))
    torch.testing.assert_close(centred.mean(dim=(2, 3)), torch.zeros(4, 2), atol=1e-5, rtol=0)
    usage = model.masks(h_mid, skips, temb).mean(dim=(2, 3))
    assert usage.min() > 0.2  # every image uses both regions; without centering region 0 holds ~all pixels
    model.eval()  # per-image statistics: the same masks in eval mode and for an image alone
    torch.testing.assert_close(model.masks(*model.encode(x[:1], t[:1])), model.masks(h_mid, skips, temb)[:1],
                               atol=1e-5, rtol=1e-4)


def test_vertical_flips_are_drawn_only_when_asked():
    gen = torch.Generator().manual_seed(0)
    grids = random_view_grid(64, 4, 4, EquivarianceConfig(flip=False, vflip=True, max_shift=0), gen)
    rows = grids[:, :, 0, 1]  # y coordinate sampled along the first column
    assert (rows[:, 0] > rows[:, -1]).any() and (rows[:, 0] < rows[:, -1]).any()
    grids = random_view_grid(64, 4, 4, EquivarianceConfig(flip=False, vflip=False, max_shift=0), gen)
    assert (grids[:, 0, 0, 1] < grids[:, -1, 0, 1]).all()


def test_standardized_logits_can_neither_collapse_nor_fade_to_uniform():
    torch.manual_seed(0)
    model = FactorizedUNetConfig(**TINY, mask_logit_norm="standardize", mask_logit_gain=3.0).setup()
    with torch.no_grad():  # a generator whose logits are nearly constant: uniform soft masks without the norm
        model.mask_generator.conv_out.weight.mul_(1e-3)
        model.mask_generator.conv_out.bias.copy_(torch.tensor([8.0, -8.0]))
    x, t = torch.randn(4, 3, 8, 8), torch.tensor([1, 2, 3, 4])
    masks = model.masks(*model.encode(x, t))
    assert masks.mean(dim=(0, 2, 3)).min() > 0.2  # both regions used
    assert masks.amax(dim=1).mean() > 0.8  # and confident
    model.eval()
    assert torch.isfinite(model.masks(*model.encode(x[:1], t[:1]))).all()


def test_same_noise_moves_the_first_views_noise_with_the_view():
    """With ``same_noise`` view b is exactly view a (image and noise) moved by the transform: a model whose masks
    follow x_t pixel-wise then has zero equivariance error, which fresh noise would not give."""
    torch.manual_seed(0)
    model = FactorizedUNetConfig(**TINY).setup()
    schedule = DiffusionScheduleConfig().setup()
    x, noise, t = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8), torch.tensor([10, 700])
    objective = SegObjective(model, schedule, MaskLossConfig(
        equivariance_loss_mult=1.0, equivariance=EquivarianceConfig(same_noise=True, max_shift=0)))
    captured = {}
    encode = model.encode

    def spy(x_t, *args):
        captured.setdefault("inputs", []).append(x_t)
        return encode(x_t, *args)

    model.encode = spy
    objective(x, t, noise, generator=torch.Generator().manual_seed(3))
    grid = random_view_grid(2, 8, 8, objective.config.equivariance, torch.Generator().manual_seed(3))
    expected = warp(schedule.add_noise(x, t, noise), grid)
    torch.testing.assert_close(captured["inputs"][-1], expected)
    with pytest.raises(ValueError, match="same-noise"):
        MaskLossConfig(equivariance=EquivarianceConfig(same_noise=True, min_scale=0.5)).validate()


def test_stop_gradient_sends_the_equivariance_gradient_through_the_second_view_only():
    masks_a = torch.rand(1, 2, 4, 4, requires_grad=True)
    masks_b = torch.rand(1, 2, 4, 4, requires_grad=True)
    grid = random_view_grid(1, 4, 4, EquivarianceConfig(), torch.Generator().manual_seed(0))
    equivariance_error(masks_a.detach(), masks_b, grid).backward()
    assert masks_a.grad is None and masks_b.grad.abs().sum() > 0
    torch.manual_seed(0)
    model = FactorizedUNetConfig(**TINY).setup()
    schedule = DiffusionScheduleConfig().setup()
    x, noise, t = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8), torch.tensor([10, 20])
    grads = []
    for stop in (False, True):  # the denoising part is the same; only the equivariance gradient can differ
        model.zero_grad()
        cfg = MaskLossConfig(equivariance_loss_mult=1.0, equivariance=EquivarianceConfig(stop_gradient=stop))
        SegObjective(model, schedule, cfg)(x, t, noise, generator=torch.Generator().manual_seed(0))[0].backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.mask_generator.parameters()]))
    assert not torch.allclose(grads[0], grads[1])

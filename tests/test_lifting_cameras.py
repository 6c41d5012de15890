"""Camera parameterisation and pose encoder: shapes and geometric invariants."""

import math

import pytest
import torch

from gen_lifting.cameras import candidate_positions, look_at_origin, octant_signs, rotvec_translation_to_c2w
from gen_lifting.pose_encoder import PoseEncoderConfig
from diffusion_utils.unet_blocks import UNetTrunkConfig


def test_octant_signs_layouts():
    up = octant_signs("upper", 12)
    assert up.shape == (12, 3) and (up[:, 2] == 1).all()
    assert len(torch.unique(up, dim=0)) == 4
    sphere = octant_signs("sphere", 8)
    assert len(torch.unique(sphere, dim=0)) == 8
    with pytest.raises(ValueError):
        octant_signs("upper", 10)
    with pytest.raises(ValueError):
        octant_signs("cube", 8)


def test_candidates_on_sphere_in_their_octant():
    signs = octant_signs("sphere", 16)
    raw = torch.randn(5, 16, 3) * 3
    pos = candidate_positions(raw, signs, radius=4.0)
    assert torch.allclose(pos.norm(dim=-1), torch.full((5, 16), 4.0), atol=1e-5)
    assert (torch.sign(pos) == signs).all()


def test_look_at_is_orthonormal_and_points_at_origin():
    pos = candidate_positions(torch.randn(7, 12, 3), octant_signs("upper", 12), 4.0)
    c2w = look_at_origin(pos)
    rot = c2w[..., :3]
    eye = torch.eye(3).expand_as(rot)
    assert torch.allclose(rot.transpose(-1, -2) @ rot, eye, atol=1e-5)
    assert torch.allclose(torch.linalg.det(rot), torch.ones(7, 12), atol=1e-5)
    # optical axis (-z) from the centre passes through the origin
    forward = -rot[..., 2]
    assert torch.allclose(c2w[..., 3] + 4.0 * forward, torch.zeros(7, 12, 3), atol=1e-4)
    # zero roll: the camera's x axis is horizontal
    assert torch.allclose(rot[..., 2, 0], torch.zeros(7, 12), atol=1e-5)


def test_rotvec_c2w_identity_and_orthonormal():
    c2w = rotvec_translation_to_c2w(torch.zeros(2, 3), torch.tensor([[1.0, 2, 3], [0, 0, 0]]))
    assert torch.allclose(c2w[:, :, :3], torch.eye(3).expand(2, 3, 3))
    rot = rotvec_translation_to_c2w(torch.randn(4, 3), torch.zeros(4, 3))[..., :3]
    assert torch.allclose(rot.transpose(-1, -2) @ rot, torch.eye(3).expand(4, 3, 3), atol=1e-5)


def _tiny_trunk() -> UNetTrunkConfig:
    return UNetTrunkConfig(base_channels=8, channel_mults=(1, 2), num_res_blocks=1, norm_groups=4,
                           mid_attention=False, downsample_last=True)


def test_pose_encoder_shapes_and_spread():
    enc = PoseEncoderConfig(num_candidates=12, trunk=_tiny_trunk()).setup()
    c2w, scores = enc(torch.randn(3, 3, 16, 16), torch.tensor([0, 50, 99]))
    assert c2w.shape == (3, 12, 3, 4) and scores.shape == (3, 12)
    assert torch.allclose(c2w[..., 3].norm(dim=-1), torch.full((3, 12), 4.0), atol=1e-4)
    # the 3 candidates of one quadrant start at different elevations
    z = c2w[0, :3, 2, 3]
    assert len(torch.unique(z.round(decimals=3))) == 3
    groups = {}
    enc.get_param_groups(groups)
    assert sum(p.numel() for p in groups["pose_encoder"]) == sum(p.numel() for p in enc.parameters())


def test_pose_encoder_input_size_reads_an_area_downsampled_copy():
    """input_size 8: a 16x16 x_t is read as its 2x2-average copy (the same output as giving that copy with the option
    off); an input already at that size, and non-square inputs (longer side to 8), pass through."""
    torch.manual_seed(0)
    small = PoseEncoderConfig(num_candidates=4, trunk=_tiny_trunk(), input_size=8).setup()
    plain = PoseEncoderConfig(num_candidates=4, trunk=_tiny_trunk()).setup()
    plain.load_state_dict(small.state_dict())
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 40])
    pooled = torch.nn.functional.avg_pool2d(x, 2)
    for a, b in zip(small(x, t), plain(pooled, t)):
        torch.testing.assert_close(a, b)
    for a, b in zip(small(pooled, t), plain(pooled, t)):
        torch.testing.assert_close(a, b)
    c2w, scores = small(torch.randn(2, 3, 16, 24), t)
    assert c2w.shape == (2, 4, 3, 4) and torch.isfinite(scores).all()


def test_pose_encoder_single_mode_starts_at_identity():
    enc = PoseEncoderConfig(mode="single", trunk=_tiny_trunk()).setup()
    c2w, scores = enc(torch.randn(2, 3, 16, 16), torch.tensor([1, 2]))
    assert c2w.shape == (2, 1, 3, 4) and scores.shape == (2, 1)
    assert torch.allclose(c2w[:, 0, :, :3], torch.eye(3).expand(2, 3, 3))


def test_pose_encoder_pool_grid_keeps_where_features_are():
    """pool_grid 2: the heads read the last feature map averaged over a 2x2 grid (4x the channels), whose cells
    average to the global mean that pool_grid 1 reads; square and non-square inputs give the same head size."""
    torch.manual_seed(0)
    grid = PoseEncoderConfig(num_candidates=4, trunk=_tiny_trunk(), pool_grid=2).setup()
    mean = PoseEncoderConfig(num_candidates=4, trunk=_tiny_trunk()).setup()
    trunk_state = {k: v for k, v in grid.state_dict().items() if "_head" not in k}
    mean.load_state_dict(trunk_state, strict=False)
    channels = grid.encoder.out_channels
    assert grid.direction_head.in_features == 4 * channels and mean.direction_head.in_features == channels
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 40])
    cells = grid.features(x, t).reshape(2, channels, 4)
    torch.testing.assert_close(cells.mean(-1), mean.features(x, t))
    assert not torch.allclose(cells[..., 0], cells[..., 3])  # the cells differ: position is kept
    for size in [(16, 16), (16, 24), (24, 16)]:
        c2w, scores = grid(torch.randn(2, 3, *size), t)
        assert c2w.shape == (2, 4, 3, 4) and scores.shape == (2, 4) and torch.isfinite(scores).all()
    with pytest.raises(ValueError, match="pool_grid"):
        PoseEncoderConfig(trunk=_tiny_trunk(), pool_grid=0).setup()


def test_fit_world_up_recovers_a_tilted_up_and_look_at_honours_it():
    """Zero-roll look-at cameras about an up tilted 5 deg from z: ``fit_world_up`` returns that up (signed toward +z)
    from the cameras alone, and their right axes are orthogonal to it (not to z)."""
    from gen_lifting.cameras import fit_world_up

    tilt = math.radians(5.0)
    up = torch.tensor([math.sin(tilt), 0.0, math.cos(tilt)])
    pos = candidate_positions(torch.randn(50, 12, 3), octant_signs("upper", 12), 4.0).reshape(-1, 3)
    c2w = look_at_origin(pos, up=up)
    assert torch.allclose(c2w[:, :, 0] @ up, torch.zeros(len(pos)), atol=1e-5)
    assert (c2w[:, :, 0] @ torch.tensor([0.0, 0.0, 1.0])).abs().max() > 0.01
    torch.testing.assert_close(fit_world_up(c2w), up, atol=1e-5, rtol=0)
    torch.testing.assert_close(fit_world_up(look_at_origin(pos)), torch.tensor([0.0, 0.0, 1.0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(look_at_origin(pos, up=torch.tensor([0.0, 0.0, 1.0])), look_at_origin(pos))

"""Offline LPIPS: real AlexNet weights from the vendored npz, no network, no torch.hub, nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gen_lifting import lpips_offline
from gen_lifting.lpips_offline import ALEXNET_FILE, load_npz_weights, make_lpips, nerfstudio_models_offline


def _refuse(url, *args, **kwargs):
    raise OSError(f"network disabled in tests: {url}")


@pytest.fixture(scope="module")
def offline_lpips(tmp_path_factory):
    """make_lpips() built with an empty user hub cache, an empty project cache and no network."""
    root = tmp_path_factory.mktemp("lpips")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_HOME", str(root / "user_torch_home"))
        mp.setenv("GEN_LIFTING_CACHE_DIR", str(root / "project_cache"))
        mp.setattr(torch.hub, "download_url_to_file", _refuse)
        mp.setattr(torch.hub, "_hub_dir", None)  # follow $TORCH_HOME, whatever earlier tests set
        metric = make_lpips()
        assert torch.hub._hub_dir is None, "make_lpips must not touch torch.hub"
        assert not (root / "user_torch_home").exists(), "the user's cache must not be written"
        assert not (root / "project_cache").exists(), "make_lpips needs no cache"
    return metric


def _images(seed: int = 0) -> torch.Tensor:
    return torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def test_lpips_of_identical_images_is_zero(offline_lpips):
    x = _images()
    assert offline_lpips(x, x).item() == pytest.approx(0.0, abs=1e-7)


def test_lpips_grows_monotonically_with_noise(offline_lpips):
    x = _images()
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    scores = [offline_lpips(x, (x + level * noise).clamp(0, 1)).item() for level in (0.02, 0.05, 0.1, 0.2, 0.4)]
    assert all(a < b for a, b in zip(scores, scores[1:])), scores
    assert scores[0] > 0


def test_alexnet_features_are_the_npz_weights(offline_lpips):
    """Proves LPIPS runs the real AlexNet, not a randomly initialised one."""
    npz = load_npz_weights("features.")
    backbone = offline_lpips.net.net  # torchmetrics' Alexnet: slice1..slice5 keep torchvision's layer indices
    loaded = {f"features.{name.split('.', 1)[1]}": p for name, p in backbone.named_parameters()}
    assert sorted(loaded) == sorted(npz)
    for name, tensor in npz.items():
        assert torch.equal(loaded[name], tensor), name


def test_torchmetrics_linear_heads_equal_npz(offline_lpips):
    for name, tensor in load_npz_weights("lin").items():
        assert torch.equal(offline_lpips.net.get_parameter(name), tensor), name


def test_equals_torchmetrics_public_metric(offline_lpips, cache_dir, no_network, restore_hub_dir):
    """The same numbers as torchmetrics' LearnedPerceptualImagePatchSimilarity(net_type='alex', normalize=True)."""
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    with nerfstudio_models_offline():
        reference = LearnedPerceptualImagePatchSimilarity(net_type="alex", normalize=True)
    x, y = _images(0), _images(1)
    torch.testing.assert_close(offline_lpips(x, y), reference(x, y))


def test_built_checkpoint_has_nan_classifier_and_is_small(cache_dir: Path):
    path = lpips_offline.build_alexnet_checkpoint(cache_dir / ALEXNET_FILE)
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert state["classifier.6.weight"].shape == (1000, 4096)
    assert torch.isnan(state["classifier.1.weight"]).all()
    assert path.stat().st_size < 20e6  # stride-0 NaN classifier: only features.* take space


def test_nerfstudio_models_offline_is_scoped(tmp_path, cache_dir, no_network, restore_hub_dir, monkeypatch):
    """nerfstudio's own models (benchmarks' nerfacto) build their LPIPS inside the context; outside it torch.hub
    is exactly as before, so nobody else ever loads the NaN-classifier file."""
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "user"))
    torch.hub._hub_dir = None
    with nerfstudio_models_offline() as hub:
        assert hub == cache_dir / "torch_hub" and Path(torch.hub.get_dir()) == hub
        LearnedPerceptualImagePatchSimilarity(normalize=True)  # what nerfacto does in populate_modules
    assert torch.hub._hub_dir is None and Path(torch.hub.get_dir()) == tmp_path / "user" / "hub"
    assert not (tmp_path / "user").exists()


def test_vendored_npz_is_the_shared_weights_file(shared_data):
    source = shared_data / "weights" / "lpips_alexnet.npz"
    assert source.read_bytes() == lpips_offline.LPIPS_NPZ.read_bytes()

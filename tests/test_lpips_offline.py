"""Offline LPIPS: real AlexNet weights from the vendored npz, no network, no writes to the user's cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gen_lifting import lpips_offline
from gen_lifting.lpips_offline import ALEXNET_FILE, ensure_lpips_weights, load_npz_weights, make_lpips


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
        hub_before = torch.hub._hub_dir
        metric = make_lpips()
        assert torch.hub._hub_dir == hub_before, "make_lpips must leave torch.hub's dir as it found it"
        assert (root / "project_cache" / "torch_hub" / "checkpoints" / ALEXNET_FILE).is_file()
        assert not (root / "user_torch_home").exists(), "the user's cache must not be written"
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


def test_built_checkpoint_has_nan_classifier_and_is_small(cache_dir: Path):
    path = lpips_offline.build_alexnet_checkpoint(cache_dir / ALEXNET_FILE)
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert state["classifier.6.weight"].shape == (1000, 4096)
    assert torch.isnan(state["classifier.1.weight"]).all()
    assert path.stat().st_size < 20e6  # stride-0 NaN classifier: only features.* take space


def test_ensure_points_hub_to_project_dir_only_when_user_cache_lacks_alexnet(
    tmp_path, cache_dir, no_network, restore_hub_dir, monkeypatch
):
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "user"))
    torch.hub._hub_dir = None
    hub = ensure_lpips_weights()
    assert hub == cache_dir / "torch_hub" and Path(torch.hub.get_dir()) == hub
    assert not (tmp_path / "user").exists()
    # what every nerfstudio model does in populate_modules, now offline:
    LearnedPerceptualImagePatchSimilarity(normalize=True)
    assert ensure_lpips_weights() is None  # idempotent: torch.hub already points at a dir with the file


def test_ensure_leaves_a_user_cache_that_has_alexnet_alone(tmp_path, cache_dir, restore_hub_dir, monkeypatch):
    user_file = tmp_path / "user" / "hub" / "checkpoints" / ALEXNET_FILE
    user_file.parent.mkdir(parents=True)
    user_file.write_bytes(b"user's own file")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "user"))
    torch.hub._hub_dir = None
    assert ensure_lpips_weights() is None
    assert torch.hub._hub_dir is None and user_file.read_bytes() == b"user's own file"
    assert not cache_dir.exists()


def test_vendored_npz_is_the_shared_weights_file(shared_data):
    source = shared_data / "weights" / "lpips_alexnet.npz"
    assert source.read_bytes() == lpips_offline.LPIPS_NPZ.read_bytes()

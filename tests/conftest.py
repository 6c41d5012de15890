"""Shared fixtures: the read-only shared data (skipped when absent) and an isolated package cache dir."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``<repo>/../shared/data``; tests that need it are skipped where it does not exist (e.g. CI)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point the package cache (``gen_lifting.compat.project_cache_dir``) at a fresh temp dir."""
    path = tmp_path / "gen_lifting_cache"
    monkeypatch.setenv("GEN_LIFTING_CACHE_DIR", str(path))
    return path


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any torch.hub download fail, as on an offline machine."""

    def refuse(url, *args, **kwargs):
        raise OSError(f"network disabled in tests: {url}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


@pytest.fixture
def restore_hub_dir():
    """Restore torch.hub's explicit dir (None = follow $TORCH_HOME) after a test that changes it."""
    previous = torch.hub._hub_dir
    yield
    torch.hub._hub_dir = previous

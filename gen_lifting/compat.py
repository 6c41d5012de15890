"""The package's cache folder, and the one process-level fix gen-lifting makes: ffmpeg for ``ns-render``.

Nothing here runs at import. Checkpoints need no fix (gen-lifting's configs use no learning-rate scheduler, so
its checkpoints hold no numpy scalars and load under torch's ``weights_only`` default), and the spiral camera path
works because gen-lifting's datamanager gives its cameras float32 intrinsics.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Optional


def project_cache_dir() -> Path:
    """``$GEN_LIFTING_CACHE_DIR``, else ``$XDG_CACHE_HOME/gen_lifting``, else ``~/.cache/gen_lifting``."""
    if os.environ.get("GEN_LIFTING_CACHE_DIR"):
        return Path(os.environ["GEN_LIFTING_CACHE_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "gen_lifting"


def ffmpeg_on_path() -> Optional[Path]:
    """Make ``ffmpeg`` findable on PATH when it is not, from imageio-ffmpeg's bundled binary; returns the folder added
    (None when PATH already had an ffmpeg or imageio-ffmpeg has no binary here).

    Called when a gen-lifting run is loaded (``GenLiftingPipeline.load_pipeline``), never at import: ``ns-render``
    calls ``install_checks.check_ffmpeg_installed()`` (``shutil.which("ffmpeg")``) even for image output. The binary
    has a versioned name, so it is linked as ``ffmpeg`` in our cache dir and that dir is *appended* to PATH: it only
    ever supplies an ffmpeg where there was none and never shadows another program.
    """
    if shutil.which("ffmpeg") is not None:
        return None
    try:
        import imageio_ffmpeg

        exe = Path(imageio_ffmpeg.get_ffmpeg_exe())
    except (ImportError, RuntimeError):  # not installed, or its binary is missing on this platform
        return None
    bin_dir = project_cache_dir() / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    link = bin_dir / "ffmpeg"
    if not (link.is_symlink() and Path(os.readlink(link)) == exe):
        tmp = bin_dir / f".ffmpeg.{os.getpid()}"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(exe)
        os.replace(tmp, link)  # atomic: concurrent processes never see a half-made link
    os.environ["PATH"] = f"{os.environ.get('PATH', '')}{os.pathsep}{bin_dir}"
    return bin_dir

"""Run-time fixes that let nerfstudio 1.1.5's own CLIs (ns-render, ns-eval, ns-viewer) work with our pins.

``apply()`` is called once when the plugin loads; it is cheap and idempotent. Each fix is narrow and says
why it exists. ``project_cache_dir()`` is the one folder this package writes caches to.
"""

from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path

import numpy as np
import torch


def project_cache_dir() -> Path:
    """``$GEN_LIFTING_CACHE_DIR``, else ``$XDG_CACHE_HOME/gen_lifting``, else ``~/.cache/gen_lifting``."""
    if os.environ.get("GEN_LIFTING_CACHE_DIR"):
        return Path(os.environ["GEN_LIFTING_CACHE_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "gen_lifting"


def numpy_safe_globals() -> list:
    """The numpy globals a pickled numpy *scalar* needs: the reconstructor and the numeric dtype classes.

    nerfstudio checkpoints hold numpy scalars because its ExponentialDecayScheduler computes learning rates
    with ``np.exp``/``np.cos``: they land in the optimizer's ``param_groups[*]['lr']`` and the scheduler's
    ``_last_lr``. numpy arrays (``_reconstruct``/``ndarray``) are deliberately not allowed.
    """
    scalar_reconstructors = []
    for module_name in ("numpy.core.multiarray", "numpy._core.multiarray"):  # numpy 1.x and 2.x pickles
        try:
            module = __import__(module_name, fromlist=["scalar"])
            scalar_reconstructors.append(module.scalar)
        except (ImportError, AttributeError):
            pass
    dtype_classes = {type(np.dtype(code)) for code in "?bBhHiIlLqQefdgFDG"}
    return [*dict.fromkeys(scalar_reconstructors), np.dtype, *sorted(dtype_classes, key=lambda c: c.__name__)]


def _allow_numpy_scalars_in_checkpoints() -> None:
    # torch >= 2.6 loads with weights_only=True by default; nerfstudio's eval_utils/trainer call
    # torch.load(path, map_location="cpu") and die on "Unsupported global: numpy.core.multiarray.scalar".
    # Allow-listing the scalar reconstructor and dtypes keeps the safe unpickler (no arbitrary code).
    torch.serialization.add_safe_globals(numpy_safe_globals())


def _ffmpeg_on_path() -> None:
    # ns-render calls install_checks.check_ffmpeg_installed() (shutil.which("ffmpeg")) even for image output;
    # mediapy also looks ffmpeg up on PATH. imageio-ffmpeg ships a static binary under a versioned name, so we
    # link it as `ffmpeg` in our cache dir and prepend that dir to PATH (never touching system dirs).
    if shutil.which("ffmpeg") is not None:
        return
    try:
        import imageio_ffmpeg

        exe = Path(imageio_ffmpeg.get_ffmpeg_exe())
    except (ImportError, RuntimeError):  # not installed, or its binary is missing on this platform
        return
    bin_dir = project_cache_dir() / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    link = bin_dir / "ffmpeg"
    if not (link.is_symlink() and Path(os.readlink(link)) == exe):
        tmp = bin_dir / f".ffmpeg.{os.getpid()}"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(exe)
        os.replace(tmp, link)  # atomic: concurrent processes never see a half-made link
    os.environ["PATH"] = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"


def _same_dtype_viewmatrix() -> None:
    # nerfstudio's blender dataparser passes a numpy.float64 focal length; Cameras turns it into a float64 fx
    # (torch.tensor([np.float64])) while camera_to_worlds stay float32. camera_paths.get_spiral_path then builds
    # `target` from fx (float64) and `up` from the c2w (float32), and viewmatrix's torch.cross raises
    # "expected scalar type Float but found Double". We cast lookat/pos to the dtype of `up` (the camera's
    # c2w dtype), which is also what get_spiral_path later multiplies the result with.
    from nerfstudio.cameras import camera_utils

    original = camera_utils.viewmatrix
    if getattr(original, "_gen_lifting_patched", False):
        return

    @functools.wraps(original)
    def viewmatrix(lookat: torch.Tensor, up: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return original(lookat.to(up.dtype), up, pos.to(up.dtype))

    viewmatrix._gen_lifting_patched = True  # type: ignore[attr-defined]
    camera_utils.viewmatrix = viewmatrix


def apply() -> None:
    """Apply all fixes (idempotent: every step checks whether it is already in place)."""
    _allow_numpy_scalars_in_checkpoints()
    _ffmpeg_on_path()
    _same_dtype_viewmatrix()

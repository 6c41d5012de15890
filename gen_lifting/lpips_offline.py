"""LPIPS (AlexNet) that works offline, from the vendored ``weights/lpips_alexnet.npz``.

torchmetrics' LPIPS builds ``torchvision.models.alexnet(weights=DEFAULT)``, which reads
``<torch hub dir>/checkpoints/alexnet-owt-7be5be79.pth`` and downloads it when missing (URLError offline).
Every nerfstudio model builds one in ``populate_modules``. We rebuild that file from the npz (the real
torchvision AlexNet ``features.*`` conv weights) in a project-owned hub dir, and point torch.hub there only
when the user's own hub cache lacks it. The LPIPS linear heads ship inside torchmetrics
(``functional/image/lpips_models/alex.pth``) and equal the npz ``lin*`` (checked in tests).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Dict, Iterator, Optional

import numpy as np
import torch

from gen_lifting.compat import project_cache_dir

LPIPS_NPZ = Path(__file__).resolve().parent / "weights" / "lpips_alexnet.npz"
ALEXNET_FILE = "alexnet-owt-7be5be79.pth"
"""File name torchvision's ``AlexNet_Weights.IMAGENET1K_V1`` is cached under (hash prefix checked only on download)."""

# torchvision AlexNet classifier shapes. LPIPS uses only `features.*` (torchmetrics keeps `model.features`
# and discards the classifier), but AlexNet's strict load_state_dict needs these keys. We do not have the
# classifier weights, so they are NaN: anyone who classifies with this file gets NaN, never a silent answer.
# Each is a stride-0 view of one NaN, so torch.save stores one float and the file stays ~10 MB.
_CLASSIFIER_SHAPES = {
    "classifier.1.weight": (4096, 9216), "classifier.1.bias": (4096,),
    "classifier.4.weight": (4096, 4096), "classifier.4.bias": (4096,),
    "classifier.6.weight": (1000, 4096), "classifier.6.bias": (1000,),
}


def project_hub_dir() -> Path:
    """The torch.hub dir this package owns (``<project cache>/torch_hub``)."""
    return project_cache_dir() / "torch_hub"


def load_npz_weights(prefix: str = "") -> Dict[str, torch.Tensor]:
    """Tensors from the vendored npz whose names start with ``prefix`` (``features.`` or ``lin``)."""
    with np.load(LPIPS_NPZ) as npz:
        return {k: torch.from_numpy(npz[k].copy()) for k in npz.files if k.startswith(prefix)}


def build_alexnet_checkpoint(path: Path) -> Path:
    """Write a torchvision-layout AlexNet state dict (real ``features.*``, NaN classifier) atomically."""
    state = load_npz_weights("features.")
    nan = torch.full((1,), float("nan"))
    state.update({k: nan.expand(shape) for k, shape in _CLASSIFIER_SHAPES.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def _has_alexnet(hub_dir: Path) -> bool:
    return (hub_dir / "checkpoints" / ALEXNET_FILE).is_file()


def ensure_lpips_weights() -> Optional[Path]:
    """Make torchvision's AlexNet weights loadable offline; call once at plugin import.

    Returns None when the user's hub cache already holds the file (nothing changed), else the project hub
    dir that torch.hub now points to (built from the npz if needed). Never writes to the user's cache.
    """
    if _has_alexnet(Path(torch.hub.get_dir())):
        return None
    hub_dir = project_hub_dir()
    if not _has_alexnet(hub_dir):
        build_alexnet_checkpoint(hub_dir / "checkpoints" / ALEXNET_FILE)
    torch.hub.set_dir(str(hub_dir))
    return hub_dir


@contextlib.contextmanager
def _hub_dir_restored() -> Iterator[None]:
    # torch.hub keeps an explicit set_dir() in `_hub_dir` (None = follow $TORCH_HOME); restore exactly that.
    previous = torch.hub._hub_dir
    try:
        yield
    finally:
        torch.hub._hub_dir = previous


def make_lpips() -> "torch.nn.Module":
    """torchmetrics LPIPS(net_type='alex', normalize=True): inputs in [0, 1], shape [batch, 3, H, W].

    Uses the user's cached torchvision AlexNet when present, else the npz-built copy; leaves torch.hub's
    dir as it found it.
    """
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    with _hub_dir_restored():
        ensure_lpips_weights()
        return LearnedPerceptualImagePatchSimilarity(net_type="alex", normalize=True)

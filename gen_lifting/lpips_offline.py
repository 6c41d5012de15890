"""LPIPS (AlexNet) that works offline, from the vendored ``weights/lpips_alexnet.npz``, without touching torch.hub.

torchmetrics' ``LearnedPerceptualImagePatchSimilarity`` builds ``torchvision.models.alexnet(weights=DEFAULT)``, which
reads ``<torch hub dir>/checkpoints/alexnet-owt-7be5be79.pth`` and downloads it when missing (URLError offline).
``make_lpips`` builds the same torchmetrics network (``_NoTrainLpips``, AlexNet v0.1, its linear heads from the
file torchmetrics ships) with a randomly initialised AlexNet, then loads the real torchvision AlexNet ``features.*``
weights from the npz into it: no download, no hub dir, nothing written, nothing changed for the rest of the process.
The npz ``lin*`` equal torchmetrics' heads (checked in tests). ``_NoTrainLpips`` is torchmetrics-private (pinned
1.9.0): its public class offers no way to skip the torchvision download.

``nerfstudio_models_offline`` is for running nerfstudio's *own* models (the nerfacto baselines of
``benchmarks/lifting.py``) offline: they construct the public class, so inside that context only, torch.hub points
at a project-owned folder holding a torchvision-layout AlexNet checkpoint built from the npz.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Dict, Iterator

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor, nn

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


def load_npz_weights(prefix: str = "") -> Dict[str, torch.Tensor]:
    """Tensors from the vendored npz whose names start with ``prefix`` (``features.`` or ``lin``)."""
    with np.load(LPIPS_NPZ) as npz:
        return {k: torch.from_numpy(npz[k].copy()) for k in npz.files if k.startswith(prefix)}


class OfflineLPIPS(nn.Module):
    """LPIPS(net='alex', v0.1) of images in [0, 1], [batch, 3, H, W]; returns the batch mean, as torchmetrics'
    ``LearnedPerceptualImagePatchSimilarity(net_type='alex', normalize=True)`` does."""

    def __init__(self) -> None:
        super().__init__()
        from torchmetrics.functional.image.lpips import _NoTrainLpips

        self.net = _NoTrainLpips(net="alex", pnet_rand=True)  # random AlexNet (no download), torchmetrics' heads
        features = load_npz_weights("features.")
        backbone = self.net.net  # slice1..slice5 keep torchvision's `features` indices: slice2.3 is features.3
        with torch.no_grad():
            for name, param in backbone.named_parameters():
                param.copy_(features[f"features.{name.split('.', 1)[1]}"])

    def forward(
        self, img1: Float[Tensor, "batch 3 height width"], img2: Float[Tensor, "batch 3 height width"]
    ) -> Float[Tensor, ""]:
        from torchmetrics.functional.image.lpips import _lpips_update

        return _lpips_update(img1, img2, net=self.net, normalize=True).mean()


def make_lpips() -> OfflineLPIPS:
    """The LPIPS (AlexNet) metric of gen-lifting's models."""
    return OfflineLPIPS()


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


@contextlib.contextmanager
def nerfstudio_models_offline() -> Iterator[Path]:
    """Inside: torch.hub reads ``<project cache>/torch_hub``, which holds the npz-built AlexNet checkpoint (so that
    nerfstudio's own models can build their LPIPS offline). On exit torch.hub's dir is exactly what it was."""
    hub_dir = project_cache_dir() / "torch_hub"
    if not (hub_dir / "checkpoints" / ALEXNET_FILE).is_file():
        build_alexnet_checkpoint(hub_dir / "checkpoints" / ALEXNET_FILE)
    previous = torch.hub._hub_dir  # an explicit set_dir(), or None (= follow $TORCH_HOME): restored as it was
    torch.hub.set_dir(str(hub_dir))
    try:
        yield hub_dir
    finally:
        torch.hub._hub_dir = previous

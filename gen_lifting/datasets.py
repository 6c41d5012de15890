"""Bundled datasets and ``--data`` name resolution (``--data lego`` or ``--data /path/to/scene``)."""

from __future__ import annotations

from pathlib import Path
from typing import Dict

BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"

BUNDLED: Dict[str, str] = {
    "lego": "NeRF-synthetic Lego, 64x64, Blender transforms_*.json (360 scene)",
    "fern": "LLFF Fern, images_8 + poses_bounds.npy (forward-facing scene)",
}


class DataNotFoundError(ValueError):
    """A ``--data`` value that is neither a bundled dataset name nor an existing path."""


def resolve_data(data: str | Path) -> Path:
    """Map a bundled dataset name to its folder; pass existing paths through; fail with a one-line error."""
    path = Path(data).expanduser()
    if path.exists():
        return path
    name = str(data)
    if name in BUNDLED:
        return BUNDLED_DIR / name
    names = ", ".join(sorted(BUNDLED))
    raise DataNotFoundError(
        f"--data {name!r} is neither an existing path nor a bundled dataset; use one of: {names}, or a path"
    )

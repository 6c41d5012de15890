"""Checkpoint files: tensors and plain types only, loaded with ``torch.load(..., weights_only=True)``.

A run folder holds ``checkpoints/latest.pt`` (everything ``--resume`` needs, including the EMA weights) and
``checkpoints/ema.pt`` (the EMA weights and what inference needs, a small file to share). Both are written from
one snapshot, latest.pt first, each atomically (temporary file + ``os.replace``). latest.pt is the authority: a
kill between the two writes leaves ema.pt one interval older, which ``repair_ema_file`` (called on start and
resume) rewrites from latest.pt, and inference on a run folder reads the EMA weights from latest.pt. So resume
and inference always see the same step. Configs are stored as plain dicts (``config_to_dict``) and rebuilt with
``config_from_dict``, which follows the dataclass' type hints (nested dataclasses, tuples, paths, optionals).
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import re
import types
import typing
import warnings
import zipfile
from pathlib import Path
from typing import Any, Dict, Iterable, List, Literal, Mapping, Tuple, Type, TypeVar, Union

import torch

from diffusion_utils.schedule import DiffusionSchedule, DiffusionScheduleConfig
from factorized_seg.data import SegDataError
from factorized_seg.model import FactorizedUNet, FactorizedUNetConfig
from factorized_seg.viz import TEMP_PREFIX, temporary_file

FORMAT = "factorized-seg"
FORMAT_VERSION = 2
CHECKPOINT = "checkpoints/latest.pt"
EMA_WEIGHTS = "checkpoints/ema.pt"
INFERENCE_KEYS = ("model_config", "diffusion", "resolution", "ema_model")
RESUME_KEYS = INFERENCE_KEYS + ("step", "model", "optimizer", "ema_state", "rng")

T = TypeVar("T")


class CheckpointError(SegDataError):
    """A file that is not a usable factorized-seg checkpoint (one line: the file and why)."""


# ---------------------------------------------------------------------------------------------- configs <-> dicts


def config_to_dict(cfg: Any) -> Any:
    """A (nested) config dataclass as JSON-able plain types: dataclasses -> dicts, tuples -> lists, paths -> str."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: config_to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [config_to_dict(v) for v in cfg]
    if isinstance(cfg, Mapping):
        return {str(k): config_to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, Path):
        return str(cfg)
    if cfg is None or isinstance(cfg, (bool, int, float, str)):
        return cfg
    raise TypeError(f"cannot store a {type(cfg).__name__} in a checkpoint config")


def config_from_dict(cls: Type[T], data: Mapping[str, Any], where: str = "") -> T:
    """Inverse of ``config_to_dict``: rebuilds ``cls`` following its type hints. Missing keys take the dataclass'
    defaults (a checkpoint from before a field existed); unknown keys raise ValueError."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{where or cls.__name__}: expected a dict, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{where or cls.__name__}: unknown setting {unknown[0]!r}")
    return cls(**{k: _from_plain(hints[k], v, f"{where}{k}") for k, v in data.items()})


def _from_plain(tp: Any, value: Any, where: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return config_from_dict(tp, value, where + ".")
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        return _from_plain(options[0], value, where) if len(options) == 1 else value
    if origin in (tuple, Tuple) or tp is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {type(value).__name__}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_from_plain(args[0], v, where) for v in value)
        return tuple(_from_plain(a, v, where) for a, v in zip(args, value)) if args else tuple(value)
    if origin in (list, List) or tp is list:
        return [_from_plain(args[0], v, where) for v in value] if args else list(value)
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{where}: {value!r} is not one of {args}")
        return value
    if tp is Path:
        return Path(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


# ------------------------------------------------------------------------------------------------ atomic writes


def atomic_torch_save(obj: Any, path: Path) -> None:
    """torch.save to a temporary file in the same folder, then os.replace: the old file or the new, never half."""
    tmp = temporary_file(Path(path).parent, ".pt")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    tmp = temporary_file(Path(path).parent)
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def remove_stale_temporaries(folders: Iterable[Path]) -> List[Path]:
    """Delete the ``.tmp-*`` files an interrupted (killed) writer left in these folders; returns them."""
    removed = []
    for folder in folders:
        if Path(folder).is_dir():
            for p in Path(folder).glob(TEMP_PREFIX + "*"):
                if p.is_file():
                    p.unlink(missing_ok=True)
                    removed.append(p)
    return removed


# ------------------------------------------------------------------------------------------------------ reading


def _not_a_checkpoint(path: Path, why: str) -> CheckpointError:
    return CheckpointError(f"not a factorized-seg checkpoint: {path} ({why})")


def read_checkpoint(path: Path, required: Tuple[str, ...] = INFERENCE_KEYS, mmap: bool = True) -> Dict[str, Any]:
    """The checkpoint dict, loaded with ``weights_only=True`` (no code runs, whatever the file holds).

    ``mmap``: tensors are paged in when used (cheap when only the EMA weights of a large latest.pt are needed);
    pass False when the tensors will be updated in place (resume). Raises CheckpointError (one line) for a
    missing, truncated, foreign or crafted file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}: give a run folder made by 'factorized-seg train' or a .pt "
                              "file")
    try:
        with warnings.catch_warnings():  # a crafted file's "unusual pickle protocol" warning: the error says it all
            warnings.simplefilter("ignore", UserWarning)
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except pickle.UnpicklingError as err:
        code = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
        if code:
            raise _not_a_checkpoint(path, f"it refers to Python code ({code.group(1)}); refused to load it: only "
                                          "tensors and plain types are read") from None
        raise _not_a_checkpoint(path, "not a pickle of tensors and plain types; refused to unpickle it") from None
    except Exception as err:  # torch.load's many ways to fail on a truncated or foreign file: all mean the same
        detail = str(err).strip().splitlines()[0][:80] if isinstance(err, RuntimeError) and str(err).strip() else ""
        raise _not_a_checkpoint(path, "truncated or not a torch file" + (f": {detail}" if detail else "")) from None
    if not isinstance(ckpt, dict):
        raise _not_a_checkpoint(path, f"it holds a {type(ckpt).__name__}, not a dict")
    if ckpt.get("format", FORMAT) != FORMAT:
        raise _not_a_checkpoint(path, f"its format is {ckpt.get('format')!r}")
    missing = [k for k in required if k not in ckpt]
    if missing:
        raise _not_a_checkpoint(path, f"no {missing[0]!r} entry")
    for key in ("ema_model", "model"):
        weights = ckpt.get(key, {})
        if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
            raise _not_a_checkpoint(path, f"{key!r} is not a dict of tensors")
    return ckpt


def checkpoint_step(path: Path) -> int | None:
    """The step stored in a checkpoint, or None if the file is missing or unreadable."""
    try:
        return int(read_checkpoint(path, required=("step",))["step"])
    except (CheckpointError, TypeError, ValueError):
        return None


def nonfinite_entries(tree: Any, prefix: str = "") -> List[str]:
    """Names of the floating-point tensors in a (nested) dict / list that hold NaN or inf."""
    if isinstance(tree, torch.Tensor):
        return [prefix or "tensor"] if tree.is_floating_point() and not torch.isfinite(tree).all() else []
    if isinstance(tree, Mapping):
        return [n for k, v in tree.items() for n in nonfinite_entries(v, f"{prefix}.{k}" if prefix else str(k))]
    if isinstance(tree, (list, tuple)):
        return [n for i, v in enumerate(tree) for n in nonfinite_entries(v, f"{prefix}[{i}]")]
    return []


def repair_ema_file(run_dir: Path, latest: Mapping[str, Any] | None = None) -> bool:
    """Make ema.pt hold latest.pt's step (after a kill between the two writes); True if it was rewritten.

    ``latest``: latest.pt's contents when the caller has already read them."""
    if latest is None:
        if not (run_dir / CHECKPOINT).is_file():
            return False
        latest = read_checkpoint(run_dir / CHECKPOINT)
    ema = run_dir / EMA_WEIGHTS
    if checkpoint_step(ema) == int(latest.get("step", -1)):
        return False
    atomic_torch_save(inference_part(latest), ema)
    return True


def inference_part(ckpt: Mapping[str, Any]) -> Dict[str, Any]:
    """What ema.pt holds: the EMA weights and the metadata inference needs (not the optimiser or raw weights)."""
    return {k: v for k, v in ckpt.items() if k not in ("model", "optimizer", "ema_state", "rng")}


def load_for_inference(run_or_ckpt: Path, device: str = "cpu") -> Tuple[FactorizedUNet, DiffusionSchedule, dict]:
    """EMA model, schedule and metadata (``resolution``, ``classes``, ``step``, ...) from a run folder or a
    checkpoint file. A run folder's weights are the EMA weights in latest.pt (ema.pt if latest.pt is absent).

    Refuses (CheckpointError, one line) a file that is not a factorized-seg checkpoint and one whose weights are
    not finite (a diverged run)."""
    path = Path(run_or_ckpt)
    if path.is_dir():
        path = path / CHECKPOINT if (path / CHECKPOINT).is_file() else path / EMA_WEIGHTS
    ckpt = read_checkpoint(path)
    bad = nonfinite_entries(ckpt["ema_model"])
    if bad:
        raise CheckpointError(f"{path} holds non-finite weights ({len(bad)} tensor(s), e.g. {bad[0]}; step "
                              f"{ckpt.get('step', '?')}): the run diverged; retrain with a lower --lr")
    try:
        model_cfg = config_from_dict(FactorizedUNetConfig, ckpt["model_config"])
        schedule_cfg = config_from_dict(DiffusionScheduleConfig, ckpt["diffusion"])
        resolution = int(ckpt["resolution"])
        if resolution < 1:
            raise ValueError(f"resolution {resolution}")
        model = model_cfg.setup()
        model.load_state_dict(ckpt["ema_model"])
        schedule = schedule_cfg.setup()
    except (ValueError, TypeError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0][:100] if str(err).strip() else type(err).__name__
        raise _not_a_checkpoint(path, f"its settings or weights do not fit: {first}") from None
    return model.to(device).eval(), schedule, inference_part(ckpt)

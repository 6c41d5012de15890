"""nerfstudio's Trainer with crash-safe checkpoints: atomic saves, and ``--load-dir`` that survives a cut-short save.

nerfstudio's ``Trainer.save_checkpoint`` writes ``step-*.ckpt`` with ``torch.save`` in place, so a kill -9 (or a full
disk) during a save leaves a truncated newest checkpoint, and ``--load-dir`` then fails with a traceback. Here:

- a checkpoint is written to a temporary file, flushed to disk and ``os.replace``d onto its name, so a
  ``step-*.ckpt`` is either complete or absent; older checkpoints are deleted (``save_only_latest_checkpoint``, as
  nerfstudio does) only after the new one is complete;
- the temporary file lies in the run folder (``nerfstudio_models/..``, same file system), not in ``nerfstudio_models``:
  nerfstudio's loaders (``eval_utils.eval_load_checkpoint``, used by ns-eval / ns-render / ns-viewer and the
  ``gen-lifting`` commands) parse the step out of *every* name in that folder and fail on any other file;
- stale temporaries (a save killed mid-write) are removed when a trainer of that run folder starts;
- ``--load-dir`` without ``--load-step`` skips, with a one-line warning, newest checkpoints that cannot be read (e.g.
  cut short by nerfstudio's own in-place save) and resumes from the newest readable one; anything else that cannot be
  loaded is a one-line error. Checkpoints are read with ``weights_only=True``.
"""

from __future__ import annotations

import os
import pickle
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Tuple, Type

import torch
from nerfstudio.engine.trainer import Trainer, TrainerConfig
from nerfstudio.utils.decorators import check_main_thread
from nerfstudio.utils.rich_utils import CONSOLE

TEMPORARY_GLOB = ".step-*.ckpt.tmp"
"""Names of checkpoints being written (in the run folder, see the module docstring)."""

_UNREADABLE = (EOFError, RuntimeError, OSError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile)
"""What ``torch.load`` raises on a truncated, empty or foreign file (a cut-short zip archive: RuntimeError / OSError,
an empty file: EOFError, a non-tensor pickle under ``weights_only``: UnpicklingError)."""


class CheckpointError(SystemExit):
    """A checkpoint that cannot be loaded; the message is one line naming the file and what to do."""

    def __init__(self, message: str) -> None:
        super().__init__(f"error: {message}")


@dataclass
class GenLiftingTrainerConfig(TrainerConfig):
    """nerfstudio's TrainerConfig, building the crash-safe GenLiftingTrainer (same flags)."""

    _target: Type = field(default_factory=lambda: GenLiftingTrainer)


def checkpoint_step(path: Path) -> Optional[int]:
    """The step of a ``step-<step>.ckpt`` name (None for any other name)."""
    prefix, _, digits = path.stem.partition("-")
    return int(digits) if prefix == "step" and path.suffix == ".ckpt" and digits.isdigit() else None


def read_checkpoint(path: Path) -> dict:
    """A nerfstudio checkpoint as a dict (``weights_only``); raises one of ``_UNREADABLE`` when it cannot be read."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not {"step", "pipeline", "optimizers", "scalers"} <= state.keys():
        raise ValueError("not a nerfstudio checkpoint")
    return state


def _reason(err: BaseException) -> str:
    text = (str(err).strip().splitlines() or [""])[0].split(". ")[0][:100]  # torch's first sentence names the damage
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def newest_readable_checkpoint(load_dir: Path) -> Tuple[Path, dict]:
    """The newest ``step-*.ckpt`` of ``load_dir`` that can be read, warning (one line each) about newer ones that
    cannot; a CheckpointError when there is none."""
    if not load_dir.is_dir():
        raise CheckpointError(f"--load-dir {load_dir} is not a folder; pass the nerfstudio_models folder of a run")
    found = sorted((p for p in load_dir.iterdir() if checkpoint_step(p) is not None), key=checkpoint_step,
                   reverse=True)
    if not found:
        raise CheckpointError(f"--load-dir {load_dir} holds no step-*.ckpt checkpoint; pass the nerfstudio_models "
                              "folder of a run")
    skipped: List[Tuple[Path, str]] = []
    for path in found:
        try:
            state = read_checkpoint(path)
        except _UNREADABLE as err:
            skipped.append((path, _reason(err)))
            continue
        for bad, reason in skipped:
            print(f"warning: skipping checkpoint {bad}, it cannot be read ({reason}; cut short while saving?); "
                  f"resuming from {path.name}", file=sys.stderr)
        return path, state
    listed = ", ".join(f"{bad.name} ({reason})" for bad, reason in skipped)
    raise CheckpointError(f"no readable checkpoint in --load-dir {load_dir}: {listed}; "
                          "start without --load-dir or pass another run's nerfstudio_models folder")


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX; a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class GenLiftingTrainer(Trainer):
    """nerfstudio's Trainer with atomic checkpoint saves and a ``--load-dir`` that skips a cut-short newest save."""

    config: GenLiftingTrainerConfig

    @property
    def temporary_dir(self) -> Path:
        """Where checkpoints are written before their rename: the run folder holding ``nerfstudio_models``."""
        return self.checkpoint_dir.parent

    def setup(self, test_mode="val") -> None:
        self.remove_stale_temporaries()
        super().setup(test_mode=test_mode)

    @check_main_thread  # the process that saves (other DDP ranks return None)
    def remove_stale_temporaries(self) -> List[Path]:
        """Delete checkpoints left half-written in this run folder by a killed save; returns what was removed."""
        stale = sorted(self.temporary_dir.glob(TEMPORARY_GLOB)) if self.temporary_dir.is_dir() else []
        for path in stale:
            path.unlink(missing_ok=True)
        if stale:
            CONSOLE.print(f"Removed {len(stale)} half-written checkpoint(s) left by an interrupted save",
                          soft_wrap=True)
        return stale

    def checkpoint_state(self, step: int) -> dict:
        """What nerfstudio's ``Trainer.save_checkpoint`` saves (nerfstudio 1.1.5; the keys are checked against it in
        tests/test_lifting_checkpoints.py). Written out because nerfstudio builds it inline in the save."""
        pipeline = self.pipeline.module if hasattr(self.pipeline, "module") else self.pipeline
        return {
            "step": step,
            "pipeline": pipeline.state_dict(),  # type: ignore[union-attr]
            "optimizers": {k: v.state_dict() for (k, v) in self.optimizers.optimizers.items()},
            "schedulers": {k: v.state_dict() for (k, v) in self.optimizers.schedulers.items()},
            "scalers": self.grad_scaler.state_dict(),
        }

    @check_main_thread
    def save_checkpoint(self, step: int) -> None:
        """Save the model and optimisers atomically (temporary file, fsync, ``os.replace``), then, with
        ``save_only_latest_checkpoint``, delete the older checkpoints."""
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        ckpt_path = self.checkpoint_dir / f"step-{step:09d}.ckpt"
        tmp = self.temporary_dir / f".{ckpt_path.name}.tmp"
        try:
            with open(tmp, "wb") as file:
                torch.save(self.checkpoint_state(step), file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(tmp, ckpt_path)
        except BaseException:
            tmp.unlink(missing_ok=True)  # an exception (not a kill): leave no temporary; the older checkpoints stay
            raise
        _fsync_dir(self.checkpoint_dir)
        if self.config.save_only_latest_checkpoint:
            for path in self.checkpoint_dir.glob("*.ckpt"):
                if path != ckpt_path:
                    path.unlink()

    def _load_checkpoint(self) -> None:
        """nerfstudio's loading of ``--load-dir`` / ``--load-checkpoint``, with the newest readable checkpoint of
        ``--load-dir`` and one-line errors (nerfstudio's method takes no path, so its last steps are repeated)."""
        load_dir, load_step, load_checkpoint = self.config.load_dir, self.config.load_step, self.config.load_checkpoint
        if load_dir is not None and load_step is None:
            path, state = newest_readable_checkpoint(Path(load_dir))
        elif load_dir is not None or load_checkpoint is not None:
            path = Path(load_dir) / f"step-{load_step:09d}.ckpt" if load_dir is not None else Path(load_checkpoint)
            flag = "--load-step" if load_dir is not None else "--load-checkpoint"
            if not path.is_file():
                raise CheckpointError(f"checkpoint {path} does not exist; check {flag}")
            try:
                state = read_checkpoint(path)
            except _UNREADABLE as err:
                message = f"checkpoint {path} cannot be read ({_reason(err)}); pass another {flag}"
                raise CheckpointError(message) from None
        else:
            return super()._load_checkpoint()  # training from scratch
        self._start_step = state["step"] + 1
        self.pipeline.load_pipeline(state["pipeline"], state["step"])
        self.optimizers.load_optimizers(state["optimizers"])
        if "schedulers" in state and self.config.load_scheduler:
            self.optimizers.load_schedulers(state["schedulers"])
        self.grad_scaler.load_state_dict(state["scalers"])
        CONSOLE.print(f"Done loading Nerfstudio checkpoint from {path}", soft_wrap=True)

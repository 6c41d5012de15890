"""Faulty inputs to the command-line tools, one parametrised sweep.

Every case builds its own tiny inputs inside a fresh workspace (``tmp_path``), runs one command and checks:
the exit code, a single stderr line that names the problem (``expect``), that no traceback was printed, that
nothing in the workspace was created, changed or deleted (except the paths listed in ``may_write``), and that
no crafted pickle ran (``Workspace.marker`` never appears). A case may add its own assertions (``check``).

To add cases: append ``Case(...)`` objects to ``CASES`` (or to a new list concatenated into it). ``tool`` picks
the runner in ``RUNNERS``; ``build(ws)`` makes the inputs and returns the argument list (without the tool name).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import math
import os
import pickle
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pytest
import torch
from PIL import Image

from factorized_seg.cli import main as seg_main

# --------------------------------------------------------------------------------------------------- framework


@dataclass(frozen=True)
class Case:
    """One faulty input: how to build and run it, and what must come out."""

    id: str
    """pytest id (tool-what)."""
    tool: str
    """Key of RUNNERS."""
    build: Callable[["Workspace"], Sequence[object]]
    """Makes the inputs inside the workspace and returns the command's arguments."""
    expect: Tuple[str, ...]
    """Substrings the one error line must contain (the problem, the flag or file it names)."""
    code: int = 2
    """Expected exit code."""
    may_write: Tuple[str, ...] = ()
    """Glob patterns (relative to the workspace) that the command may create or change."""
    check: Optional[Callable[["Workspace"], None]] = None
    """Extra assertions after the run."""
    setup: Optional[Callable[["Workspace"], object]] = None
    """Damage done to the inputs before ``build`` (a truncated checkpoint, a corrupt file)."""


class Workspace:
    """A fresh folder per case plus lazily made tiny inputs (images, a trained run, crafted files)."""

    def __init__(self, root: Path, trained_run: Callable[[], Path]) -> None:
        self.root = root
        self._trained_run = trained_run
        self.marker = root / "PWNED"
        """A crafted pickle would create this file when unpickled."""

    def images(self, name: str = "data", n: int = 6, size: int = 12) -> Path:
        """n small RGB images (a bright disc on a dark background) and their masks, in name/images, name/masks."""
        folder = self.root / name
        if not (folder / "images").is_dir():
            make_images(folder, n, size)
        return folder / "images"

    def masks(self, name: str = "data") -> Path:
        self.images(name)
        return self.root / name / "masks"

    def run(self, name: str = "run") -> Path:
        """A copy of a 2-step tiny trained run (config.json, checkpoints/latest.pt and ema.pt)."""
        dst = self.root / name
        if not dst.exists():
            shutil.copytree(self._trained_run(), dst)
        return dst

    def file(self, name: str, data: bytes) -> Path:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path

    def folder(self, name: str) -> Path:
        path = self.root / name
        path.mkdir(parents=True, exist_ok=True)
        return path


def make_images(root: Path, n: int, size: int) -> None:
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        cy, cx = rng.integers(3, size - 3, 2)
        disc = np.hypot(yy - cy, xx - cx) < 3
        img = np.where(disc[..., None], rng.integers(150, 255, 3), rng.integers(0, 100, 3)).astype(np.uint8)
        Image.fromarray(img).save(root / "images" / f"im{i}.png")
        Image.fromarray(np.where(disc, 255, 0).astype(np.uint8)).save(root / "masks" / f"im{i}.png")


def snapshot(root: Path) -> Dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def run_seg_in_process(args: Sequence[str], capsys: pytest.CaptureFixture) -> Tuple[int, str, str]:
    capsys.readouterr()
    code = seg_main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def console_script(name: str) -> Callable[[Sequence[str], pytest.CaptureFixture], Tuple[int, str, str]]:
    """Runs the installed console script in a subprocess: what a user sees, warnings and all (slower: ~6 s)."""

    def run(args: Sequence[str], capsys: pytest.CaptureFixture) -> Tuple[int, str, str]:
        exe = Path(sys.executable).parent / name
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        res = subprocess.run([str(exe), *args], capture_output=True, text=True, env=env, timeout=300)
        return res.returncode, res.stdout, res.stderr

    return run


def _in_process(main: Callable[[List[str]], object]) -> Callable[[Sequence[str], pytest.CaptureFixture],
                                                                   Tuple[int, str, str]]:
    """Runs a command whose errors are ``SystemExit``s in this process (as Python would print and exit)."""

    def run(args: Sequence[str], capsys: pytest.CaptureFixture) -> Tuple[int, str, str]:
        capsys.readouterr()
        code: object = 0
        try:
            main(list(args))
        except SystemExit as exit:
            code = exit.code
        if isinstance(code, str):  # SystemExit("error: ...") prints the message to stderr and exits with 1
            print(code, file=sys.stderr)
            code = 1
        out = capsys.readouterr()
        return int(code or 0), out.out, out.err

    return run


def ns_train_main(args: List[str]) -> None:
    """``ns-train ARGS`` in this process (nerfstudio's entry point without its accent colour)."""
    import tyro
    from nerfstudio.configs.method_configs import AnnotatedBaseConfigUnion
    from nerfstudio.scripts.train import main

    main(tyro.cli(AnnotatedBaseConfigUnion, args=args))


def gen_lifting_main(args: List[str]) -> None:
    from gen_lifting.scripts.cli import entrypoint

    entrypoint(args)


RUNNERS: Dict[str, Callable[[Sequence[str], pytest.CaptureFixture], Tuple[int, str, str]]] = {
    "factorized-seg": run_seg_in_process,
    "factorized-seg-console": console_script("factorized-seg"),
    "ns-train": _in_process(ns_train_main),
    "gen-lifting": _in_process(gen_lifting_main),
}


# ------------------------------------------------------------------------------------------ factorized-seg inputs

TINY = [
    "--resolution", "8", "--model.base-channels", "8", "--model.channel-mults", "1", "2", "--model.norm-groups", "4",
    "--model.num-res-blocks", "1", "--model.no-mid-attention", "--diffusion.num-timesteps", "50",
    "--batch-size", "4", "--max-steps", "2", "--sample-every", "0", "--checkpoint-every", "1", "--no-progress",
    "--threads", "1", "--device", "cpu",
]


def train(ws: Workspace, *extra: object, out: str = "out") -> List[object]:
    return ["train", "--data", ws.images(), "--output-dir", ws.root / out, *TINY, *extra]


def train_run(ws: Workspace, *extra: object) -> List[object]:
    """Train into (a copy of) the tiny trained run."""
    ws.run()
    return train(ws, *extra, out="run")


def segment(ws: Workspace, run: object, *extra: object) -> List[object]:
    return ["segment", "--run", run, "--images", ws.images(), "--output-dir", ws.root / "seg", "--no-progress",
            *extra]


def sample(ws: Workspace, run: object, *extra: object) -> List[object]:
    return ["sample", "--run", run, "--output-dir", ws.root / "samples", "--num", "2", "--steps", "2",
            "--no-progress", *extra]


def evaluate(ws: Workspace, pred: object, *extra: object) -> List[object]:
    return ["eval", "--pred", pred, "--masks", ws.masks(), "--output", ws.root / "eval.json", *extra]


def predictions(ws: Workspace, value: int = 1) -> Path:
    """Label PNGs named like the masks (made once)."""
    folder = ws.root / "pred"
    if not folder.is_dir():
        folder.mkdir()
        for m in sorted(ws.masks().glob("*.png")):
            Image.fromarray(np.full((12, 12), value, np.uint8)).save(folder / m.name)
    return folder


class _Touch:
    """Unpickling this opens (creates) a file: stands for any code a crafted checkpoint could run."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def crafted_pickle(ws: Workspace, protocol: int = pickle.DEFAULT_PROTOCOL) -> Path:
    """A plain pickle whose unpickling creates ws.marker (torch.load reads it as a legacy checkpoint)."""
    return ws.file(f"crafted-{protocol}.pt", pickle.dumps({"ema_model": _Touch(ws.marker)}, protocol=protocol))


def crafted_torch_file(ws: Workspace) -> Path:
    """A torch.save zip archive whose pickle creates ws.marker."""
    path = ws.root / "crafted-zip.pt"
    torch.save({"model_config": {}, "ema_model": _Touch(ws.marker)}, path)
    assert not ws.marker.exists()
    return path


def truncated_checkpoint(ws: Workspace) -> Path:
    data = (ws.run() / "checkpoints" / "ema.pt").read_bytes()
    return ws.file("truncated.pt", data[: len(data) // 2])


def random_bytes(ws: Workspace) -> Path:
    return ws.file("random.pt", np.random.default_rng(0).bytes(4096))


def foreign_torch_file(ws: Workspace) -> Path:
    path = ws.root / "foreign.pt"
    torch.save({"state_dict": {"weight": torch.zeros(3)}}, path)
    return path


def poison(ws: Workspace, value: float = math.nan) -> Path:
    """The trained run with one EMA weight set to NaN in both checkpoint files (as a diverged run would be)."""
    run = ws.run()
    for name in ("latest.pt", "ema.pt"):
        path = run / "checkpoints" / name
        ckpt = torch.load(path, weights_only=True)
        key = next(k for k, v in ckpt["ema_model"].items() if v.is_floating_point())
        ckpt["ema_model"][key].view(-1)[0] = value
        if "ema_state" in ckpt:
            ckpt["ema_state"]["shadow_params"][0].view(-1)[0] = value
        torch.save(ckpt, path)
    return run


def broken_file(path: Path, data: bytes) -> Path:
    """Write (or overwrite) path with bytes that are not what its name promises."""
    path.write_bytes(data)
    return path


def mask_without_prediction(ws: Workspace) -> None:
    predictions(ws)
    shutil.copy(ws.masks() / "im0.png", ws.masks() / "extra.png")


def truncate_latest(ws: Workspace) -> Path:
    latest = ws.run() / "checkpoints" / "latest.pt"
    latest.write_bytes(latest.read_bytes()[:1000])
    return ws.run()


def craft_latest(ws: Workspace) -> Path:
    (ws.run() / "checkpoints" / "latest.pt").write_bytes(crafted_pickle(ws).read_bytes())
    return ws.run()


def corrupt_jpeg(ws: Workspace) -> Path:
    images = ws.images()
    good = images / "im0.png"
    buf = images.parent / "tmp.jpg"
    Image.open(good).save(buf, format="JPEG")
    (images / "broken.jpg").write_bytes(buf.read_bytes()[:60])
    buf.unlink()
    return images


def checkpoints_finite_and_paired(ws: Workspace) -> None:
    """Whatever is in run/checkpoints is finite, and latest.pt and ema.pt hold the same step."""
    ckpts = ws.root / "run" / "checkpoints"
    latest = torch.load(ckpts / "latest.pt", weights_only=True)
    ema = torch.load(ckpts / "ema.pt", weights_only=True)
    assert latest["step"] == ema["step"]
    for v in list(latest["model"].values()) + list(ema["ema_model"].values()):
        assert torch.isfinite(v).all()
    assert not list(ckpts.glob(".tmp-*"))


SEG_CASES: List[Case] = [
    # --- train: data
    Case("seg-train-empty-folder", "factorized-seg",
         lambda ws: ["train", "--data", ws.folder("empty"), "--output-dir", ws.root / "out", *TINY], ("no images",)),
    Case("seg-train-missing-folder", "factorized-seg",
         lambda ws: ["train", "--data", ws.root / "nope", "--output-dir", ws.root / "out", *TINY],
         ("neither an existing folder",)),
    Case("seg-train-corrupt-jpeg", "factorized-seg",
         lambda ws: ["train", "--data", corrupt_jpeg(ws), "--output-dir", ws.root / "out", *TINY], ("broken.jpg",)),
    Case("seg-train-label-file-missing-a-label", "factorized-seg",
         lambda ws: train(ws, "--labels", ws.file("labels.txt", b"im0.png cat\n")), ("no label",)),
    Case("seg-train-output-dir-is-a-file", "factorized-seg",
         lambda ws: train(ws, out="taken.txt"), ("--output-dir",), setup=lambda ws: ws.file("taken.txt", b"x")),
    # --- train: out-of-range flags (validated before anything is read or written)
    Case("seg-train-batch-size-0", "factorized-seg", lambda ws: train(ws, "--batch-size", 0), ("--batch-size",)),
    Case("seg-train-lr-negative", "factorized-seg", lambda ws: train(ws, "--lr", -1), ("--lr",)),
    Case("seg-train-lr-nan", "factorized-seg", lambda ws: train(ws, "--lr", "nan"), ("--lr",)),
    Case("seg-train-max-steps-0", "factorized-seg", lambda ws: train(ws, "--max-steps", 0), ("--max-steps",)),
    Case("seg-train-warmup-negative", "factorized-seg", lambda ws: train(ws, "--warmup-steps", -5),
         ("--warmup-steps",)),
    Case("seg-train-ema-decay-above-1", "factorized-seg", lambda ws: train(ws, "--ema-decay", 1.5),
         ("--ema-decay",)),
    Case("seg-train-grad-clip-negative", "factorized-seg", lambda ws: train(ws, "--grad-clip", -1),
         ("--grad-clip",)),
    Case("seg-train-t-power-0", "factorized-seg", lambda ws: train(ws, "--t-power", 0), ("--t-power",)),
    Case("seg-train-resolution-0", "factorized-seg", lambda ws: train(ws, "--resolution", 0), ("--resolution",)),
    Case("seg-train-resolution-not-divisible", "factorized-seg", lambda ws: train(ws, "--resolution", 7),
         ("--resolution",)),
    Case("seg-train-min-crop-0", "factorized-seg", lambda ws: train(ws, "--augment.min-crop", 0),
         ("--augment.min-crop",)),
    Case("seg-train-max-shift-too-large", "factorized-seg", lambda ws: train(ws, "--augment.max-shift", 8),
         ("--augment.max-shift",)),
    Case("seg-train-num-timesteps-0", "factorized-seg", lambda ws: train(ws, "--diffusion.num-timesteps", 0),
         ("--diffusion.num-timesteps",)),
    Case("seg-train-beta-end-above-1", "factorized-seg", lambda ws: train(ws, "--diffusion.beta-end", 2),
         ("--diffusion.beta-end",)),
    Case("seg-train-num-regions-0", "factorized-seg", lambda ws: train(ws, "--model.num-regions", 0),
         ("--model.num-regions",)),
    Case("seg-train-base-channels-0", "factorized-seg", lambda ws: train(ws, "--model.base-channels", 0),
         ("--model.base-channels",)),
    Case("seg-train-log-every-0", "factorized-seg", lambda ws: train(ws, "--log-every", 0), ("--log-every",)),
    Case("seg-train-checkpoint-every-negative", "factorized-seg", lambda ws: train(ws, "--checkpoint-every", -1),
         ("--checkpoint-every",)),
    Case("seg-train-time-budget-0", "factorized-seg", lambda ws: train(ws, "--time-budget-s", 0),
         ("--time-budget-s",)),
    Case("seg-train-threads-negative", "factorized-seg", lambda ws: train(ws, "--threads", -2), ("--threads",)),
    # --- train: existing runs, resume
    Case("seg-train-existing-run-without-resume", "factorized-seg", lambda ws: train_run(ws),
         ("already holds a run", "--resume")),
    Case("seg-train-resume-without-checkpoint", "factorized-seg", lambda ws: train(ws, "--resume"),
         ("no checkpoint",)),
    Case("seg-train-resume-truncated-checkpoint", "factorized-seg",
         lambda ws: train_run(ws, "--resume"), ("not a factorized-seg checkpoint", "latest.pt"),
         setup=truncate_latest),
    Case("seg-train-resume-crafted-checkpoint", "factorized-seg",
         lambda ws: train_run(ws, "--resume"), ("not a factorized-seg checkpoint", "latest.pt"),
         setup=craft_latest),
    Case("seg-train-resume-other-architecture", "factorized-seg",
         lambda ws: train_run(ws, "--resume", "--model.base-channels", "16"),
         ("--model.base-channels", "8")),
    Case("seg-train-resume-nonfinite-checkpoint", "factorized-seg",
         lambda ws: train_run(ws, "--resume", "--max-steps", 4), ("non-finite",), setup=poison),
    # --- train: divergence stops with one line and keeps the last good (finite) checkpoint pair
    Case("seg-train-diverges-fresh-run", "factorized-seg",
         lambda ws: train(ws, "--lr", "1e30", "--warmup-steps", 0, "--max-steps", 20, out="run"),
         ("diverged", "step", "--lr"),
         may_write=("run/config.json", "run/tensorboard/*", "run/checkpoints/*.pt"),
         check=lambda ws: checkpoints_finite_and_paired(ws) if (ws.root / "run/checkpoints/latest.pt").exists()
         else None),
    Case("seg-train-diverges-on-resume", "factorized-seg",
         lambda ws: train_run(ws, "--resume", "--lr", "1e30", "--warmup-steps", 0, "--max-steps", 20),
         ("diverged", "step", "--lr"),
         may_write=("run/config.json", "run/tensorboard/*", "run/checkpoints/*.pt"),
         check=checkpoints_finite_and_paired),
    # --- command-line parsing (tyro's error box becomes one line)
    Case("seg-train-batch-size-not-a-number", "factorized-seg", lambda ws: train(ws, "--batch-size", "abc"),
         ("--batch-size", "abc")),
    Case("seg-segment-unknown-flag", "factorized-seg", lambda ws: segment(ws, ws.run(), "--no-such-flag"),
         ("Unrecognized", "--no-such-flag")),
    Case("seg-segment-missing-run-flag", "factorized-seg", lambda ws: ["segment", "--images", ws.images()],
         ("missing", "--run")),
    Case("seg-sample-unknown-sampler", "factorized-seg", lambda ws: sample(ws, ws.run(), "--sampler", "euler"),
         ("--sampler", "euler")),
    # --- the installed console script, as a user runs it (no warning or traceback around the one line)
    Case("seg-console-segment-crafted-pickle", "factorized-seg-console", lambda ws: segment(ws, crafted_pickle(ws)),
         ("not a factorized-seg checkpoint", "crafted-")),
    Case("seg-console-train-diverges", "factorized-seg-console",
         lambda ws: train(ws, "--lr", "1e6", "--warmup-steps", 0, "--max-steps", 200, "--checkpoint-every", 1000,
                          out="run"),
         ("diverged", "no checkpoint was written", "--lr"), may_write=("run/config.json", "run/tensorboard/*")),
    # --- segment
    Case("seg-segment-missing-run", "factorized-seg", lambda ws: segment(ws, ws.root / "nope"), ("no checkpoint",)),
    Case("seg-segment-truncated-checkpoint", "factorized-seg", lambda ws: segment(ws, truncated_checkpoint(ws)),
         ("not a factorized-seg checkpoint", "truncated.pt")),
    Case("seg-segment-random-bytes", "factorized-seg", lambda ws: segment(ws, random_bytes(ws)),
         ("not a factorized-seg checkpoint", "random.pt")),
    Case("seg-segment-crafted-pickle", "factorized-seg", lambda ws: segment(ws, crafted_pickle(ws)),
         ("not a factorized-seg checkpoint", "crafted-")),
    Case("seg-segment-crafted-pickle-protocol-2", "factorized-seg", lambda ws: segment(ws, crafted_pickle(ws, 2)),
         ("not a factorized-seg checkpoint", "crafted-2.pt", "io.open")),
    Case("seg-segment-text-file", "factorized-seg", lambda ws: segment(ws, ws.file("notes.pt", b"hello\n" * 10)),
         ("not a factorized-seg checkpoint", "notes.pt")),
    Case("seg-segment-empty-file", "factorized-seg", lambda ws: segment(ws, ws.file("empty.pt", b"")),
         ("not a factorized-seg checkpoint", "empty.pt")),
    Case("seg-segment-crafted-torch-file", "factorized-seg", lambda ws: segment(ws, crafted_torch_file(ws)),
         ("not a factorized-seg checkpoint", "crafted-zip.pt", "io.open")),
    Case("seg-segment-foreign-torch-file", "factorized-seg", lambda ws: segment(ws, foreign_torch_file(ws)),
         ("not a factorized-seg checkpoint", "foreign.pt")),
    Case("seg-segment-nonfinite-checkpoint", "factorized-seg", lambda ws: segment(ws, poison(ws)), ("non-finite",)),
    Case("seg-segment-inf-checkpoint-file", "factorized-seg",
         lambda ws: segment(ws, poison(ws, math.inf) / "checkpoints" / "ema.pt"), ("non-finite",)),
    Case("seg-segment-t-out-of-range", "factorized-seg", lambda ws: segment(ws, ws.run(), "--t", 50), ("--t",)),
    Case("seg-segment-batch-size-0", "factorized-seg", lambda ws: segment(ws, ws.run(), "--batch-size", 0),
         ("--batch-size",)),
    Case("seg-segment-class-label-on-unconditional-model", "factorized-seg",
         lambda ws: segment(ws, ws.run(), "--class-label", 3), ("--class-label",)),
    Case("seg-segment-bad-device", "factorized-seg", lambda ws: segment(ws, ws.run(), "--device", "gpu0"),
         ("--device",)),
    Case("seg-segment-corrupt-image", "factorized-seg",
         lambda ws: segment(ws, ws.run()),
         ("zz.png",), setup=lambda ws: broken_file(ws.images() / "zz.png", b"\x89PNG\r\n\x1a\nbroken")),
    Case("seg-segment-empty-folder", "factorized-seg",
         lambda ws: ["segment", "--run", ws.run(), "--images", ws.folder("empty"), "--output-dir", ws.root / "seg"],
         ("no images",)),
    Case("seg-segment-output-dir-is-a-file", "factorized-seg",
         lambda ws: ["segment", "--run", ws.run(), "--images", ws.images(), "--output-dir",
                     ws.file("seg.txt", b"x"), "--no-progress"], ("--output-dir",)),
    # --- sample
    Case("seg-sample-truncated-checkpoint", "factorized-seg", lambda ws: sample(ws, truncated_checkpoint(ws)),
         ("not a factorized-seg checkpoint",)),
    Case("seg-sample-crafted-pickle", "factorized-seg", lambda ws: sample(ws, crafted_pickle(ws)),
         ("not a factorized-seg checkpoint",)),
    Case("seg-sample-nonfinite-checkpoint", "factorized-seg", lambda ws: sample(ws, poison(ws)), ("non-finite",)),
    Case("seg-sample-num-0", "factorized-seg", lambda ws: sample(ws, ws.run(), "--num", 0), ("--num",)),
    Case("seg-sample-steps-0", "factorized-seg", lambda ws: sample(ws, ws.run(), "--steps", 0), ("--steps",)),
    Case("seg-sample-batch-size-0", "factorized-seg", lambda ws: sample(ws, ws.run(), "--batch-size", 0),
         ("--batch-size",)),
    # --- eval
    Case("seg-eval-missing-predictions", "factorized-seg", lambda ws: evaluate(ws, ws.root / "nope"),
         ("does not exist",)),
    Case("seg-eval-fit-fraction-above-1", "factorized-seg",
         lambda ws: evaluate(ws, predictions(ws), "--fit-fraction", 1.5), ("--fit-fraction",)),
    Case("seg-eval-num-labels-0", "factorized-seg", lambda ws: evaluate(ws, predictions(ws), "--num-labels", 0),
         ("--num-labels",)),
    Case("seg-eval-num-labels-below-predicted", "factorized-seg",
         lambda ws: evaluate(ws, predictions(ws, value=3), "--num-labels", 2), ("--num-labels",)),
    Case("seg-eval-fit-names-missing", "factorized-seg",
         lambda ws: evaluate(ws, predictions(ws), "--fit-names", ws.root / "nope.txt"), ("--fit-names",)),
    Case("seg-eval-corrupt-mask", "factorized-seg",
         lambda ws: evaluate(ws, predictions(ws)), ("im0.png",),
         setup=lambda ws: broken_file(predictions(ws).parent / "data" / "masks" / "im0.png", b"broken")),
    Case("seg-eval-mask-without-prediction", "factorized-seg",
         lambda ws: evaluate(ws, predictions(ws)), ("no prediction",),
         setup=mask_without_prediction),
]


# --------------------------------------------------------------------------------------------- gen-lifting inputs
# ns-train runs in this process. nerfstudio writes RUN/config.yml before any plugin code sees --data, so the cases
# that reach the scene may leave that one file (``WROTE_CONFIG``); flag errors are raised while tyro parses the
# command line, before anything is written.

WROTE_CONFIG = ("outputs/*/config.yml",)


def ns_train(ws: Workspace, method: str, data: object, *extra: object) -> List[object]:
    return [method, "--data", data, "--output-dir", ws.root / "outputs", "--vis", "tensorboard",
            "--machine.device-type", "cpu", *extra]


def lego(ws: Workspace, n: int = 3) -> Path:
    """A Blender scene of n bundled 64x64 lego frames per split (made once per workspace)."""
    from gen_lifting.datasets import BUNDLED_DIR

    root = ws.root / "lego"
    if not root.is_dir():
        src = BUNDLED_DIR / "lego"
        for split in ("train", "val", "test"):
            meta = json.loads((src / f"transforms_{split}.json").read_text())
            meta["frames"] = meta["frames"][:n]
            (root / split).mkdir(parents=True)
            for frame in meta["frames"]:
                shutil.copy(src / (frame["file_path"][2:] + ".png"), root / (frame["file_path"][2:] + ".png"))
            (root / f"transforms_{split}.json").write_text(json.dumps(meta))
    return root


def llff(ws: Workspace, n: int = 4) -> Path:
    """An LLFF scene: the first n poses of the bundled fern and n small random images (made once per workspace)."""
    from gen_lifting.datasets import BUNDLED_DIR

    root = ws.root / "fern"
    if not root.is_dir():
        (root / "images_8").mkdir(parents=True)
        np.save(root / "poses_bounds.npy", np.load(BUNDLED_DIR / "fern" / "poses_bounds.npy")[:n])
        rng = np.random.default_rng(0)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)).save(root / "images_8" / f"im{i}.png")
    return root


def lego_frame(ws: Workspace, index: int = 1) -> Path:
    return sorted((lego(ws) / "train").glob("*.png"))[index]


def gray16(path: Path, size: Tuple[int, int] = (64, 64)) -> Path:
    """Overwrite path with a 16-bit grayscale PNG at half scale (mode I;16)."""
    Image.fromarray(np.full(size[::-1], 32768, np.uint16)).save(path)
    return path


def resize_frame(path: Path, size: Tuple[int, int]) -> Path:
    with Image.open(path) as image:
        image.resize(size).save(path)
    return path


def edit_json(path: Path, edit: Callable[[dict], None]) -> Path:
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))
    return path


def no_checkpoint(ws: Workspace) -> None:
    assert not list((ws.root / "outputs").rglob("*.ckpt")), "a checkpoint was written by a diverged run"


def lifting_run(ws: Workspace) -> Path:
    """config.yml of a 2-step tiny gen-lifting run on lego(ws), trained in this process (~5 s)."""
    from test_lifting_method import tiny_config

    config = tiny_config(lego(ws))
    config.max_num_iterations, config.vis, config.output_dir = 2, "tensorboard", ws.root / "lifting-run"
    config.set_timestamp()
    config.save_config()
    trainer = config.setup(local_rank=0, world_size=1)
    trainer.setup()
    trainer.train()
    from nerfstudio.utils import writer

    for event_writer in writer.EVENT_WRITERS:  # tensorboard flushes from a thread: finish now, not mid-case
        flush = getattr(getattr(event_writer, "tb_writer", None), "flush", None)
        if flush is not None:
            flush()
    return trainer.base_dir / "config.yml"


def lifting_flag(flag: str, value: object, method: str = "gen-lifting") -> Case:
    """An out-of-range flag: refused while parsing, nothing written."""
    name = flag.rsplit(".", 1)[-1]
    return Case(f"lifting-{method}-{name}-{value}", "ns-train", lambda ws: ns_train(ws, method, "lego", flag, value),
                (flag, str(value)), code=1)


LIFTING_CASES: List[Case] = [
    # --- wrong scene kind for the method (the 49-line FileNotFoundError)
    Case("lifting-gen-lifting-on-llff-fern", "ns-train", lambda ws: ns_train(ws, "gen-lifting", "fern"),
         ("--data fern", "LLFF", "use ns-train gen-lifting-single --data fern"), code=1, may_write=WROTE_CONFIG),
    Case("lifting-single-on-blender-lego", "ns-train", lambda ws: ns_train(ws, "gen-lifting-single", "lego"),
         ("--data lego", "Blender", "use ns-train gen-lifting --data lego"), code=1, may_write=WROTE_CONFIG),
    Case("lifting-oracle-on-llff-fern", "ns-train", lambda ws: ns_train(ws, "gen-lifting-oracle", "fern"),
         ("LLFF", "use ns-train gen-lifting-single-oracle"), code=1, may_write=WROTE_CONFIG),
    Case("lifting-single-oracle-on-blender-lego", "ns-train",
         lambda ws: ns_train(ws, "gen-lifting-single-oracle", "lego"),
         ("Blender", "use ns-train gen-lifting-oracle"), code=1, may_write=WROTE_CONFIG),
    Case("lifting-ae-on-llff-folder", "ns-train", lambda ws: ns_train(ws, "gen-lifting-ae", llff(ws)),
         ("LLFF", "gen-lifting-single"), code=1, may_write=WROTE_CONFIG),
    # --- out-of-range flags: refused while parsing, before anything is written
    lifting_flag("--pipeline.datamanager.images-per-batch", 0),
    lifting_flag("--pipeline.datamanager.images-per-batch", 0, method="gen-lifting-single"),
    lifting_flag("--pipeline.datamanager.loss-pixels-per-image", -1),
    lifting_flag("--pipeline.datamanager.score-pixels-per-image", 0),
    lifting_flag("--pipeline.model.num-samples", 0),
    lifting_flag("--pipeline.datamanager.eval-timestep", 100),
    lifting_flag("--pipeline.datamanager.eval-timestep", -1),
    lifting_flag("--pipeline.datamanager.noise-warmup-steps", -5),
    lifting_flag("--pipeline.datamanager.noise-start-steps", -1),
    lifting_flag("--pipeline.datamanager.timestep-power", 0),
    lifting_flag("--pipeline.datamanager.diffusion.num-timesteps", 0),
    Case("lifting-gen-lifting-num-timesteps-too-few-for-scaled-betas", "ns-train",
         lambda ws: ns_train(ws, "gen-lifting", "lego", "--pipeline.datamanager.diffusion.num-timesteps", 10),
         ("--pipeline.datamanager.diffusion.beta-end", "below 1"), code=1),
    # --- scene folders
    Case("lifting-missing-data", "ns-train", lambda ws: ns_train(ws, "gen-lifting", ws.root / "nope"),
         ("neither an existing path nor a bundled dataset",), code=1, may_write=WROTE_CONFIG),
    Case("lifting-empty-folder", "ns-train", lambda ws: ns_train(ws, "gen-lifting", ws.folder("empty")),
         ("neither transforms_train.json", "poses_bounds.npy"), code=1, may_write=WROTE_CONFIG),
    Case("lifting-data-is-a-file", "ns-train", lambda ws: ns_train(ws, "gen-lifting", ws.file("x.txt", b"x")),
         ("is a file",), code=1, may_write=WROTE_CONFIG),
    Case("lifting-blender-16bit-gray-png", "ns-train", lambda ws: ns_train(ws, "gen-lifting", lego(ws)),
         ("16-bit", "r_1.png", "// 257"), code=1, may_write=WROTE_CONFIG,
         setup=lambda ws: gray16(lego_frame(ws))),
    Case("lifting-llff-16bit-gray-png", "ns-train", lambda ws: ns_train(ws, "gen-lifting-single", llff(ws)),
         ("16-bit", "im2.png"), code=1, may_write=WROTE_CONFIG,
         setup=lambda ws: gray16(llff(ws) / "images_8" / "im2.png", (16, 12))),
    Case("lifting-blender-corrupt-png", "ns-train", lambda ws: ns_train(ws, "gen-lifting", lego(ws)),
         ("corrupt", "r_1.png"), code=1, may_write=WROTE_CONFIG,
         setup=lambda ws: broken_file(lego_frame(ws), b"\x89PNG\r\n\x1a\nbroken")),
    Case("lifting-blender-mixed-sizes", "ns-train", lambda ws: ns_train(ws, "gen-lifting", lego(ws)),
         ("mixed sizes",), code=1, may_write=WROTE_CONFIG, setup=lambda ws: resize_frame(lego_frame(ws), (32, 32))),
    Case("lifting-blender-missing-image", "ns-train", lambda ws: ns_train(ws, "gen-lifting", lego(ws)),
         ("r_1.png", "missing"), code=1, may_write=WROTE_CONFIG, setup=lambda ws: lego_frame(ws).unlink()),
    Case("lifting-blender-broken-transforms", "ns-train", lambda ws: ns_train(ws, "gen-lifting", lego(ws)),
         ("transforms_train.json", "not a Blender transforms file"), code=1, may_write=WROTE_CONFIG,
         setup=lambda ws: edit_json(lego(ws) / "transforms_train.json", lambda meta: meta.pop("frames"))),
    Case("lifting-llff-image-count-mismatch", "ns-train", lambda ws: ns_train(ws, "gen-lifting-single", llff(ws)),
         ("3 images but poses_bounds.npy has 4",), code=1, may_write=WROTE_CONFIG,
         setup=lambda ws: (llff(ws) / "images_8" / "im3.png").unlink()),
    Case("lifting-llff-poses-bounds-wrong-shape", "ns-train", lambda ws: ns_train(ws, "gen-lifting-single", llff(ws)),
         ("poses_bounds.npy", "expected [num_images, 17]"), code=1, may_write=WROTE_CONFIG,
         setup=lambda ws: np.save(llff(ws) / "poses_bounds.npy", np.zeros((4, 15)))),
    # --- divergence: stops at the step with one line, no checkpoint of NaN weights
    Case("lifting-train-diverges", "ns-train",
         lambda ws: ns_train(ws, "gen-lifting", lego(ws), "--optimizers.fields.optimizer.lr", "1e30",
                             "--optimizers.pose-encoder.optimizer.lr", "1e30", "--steps-per-save", 1,
                             "--pipeline.datamanager.images-per-batch", 2, "--max-num-iterations", 20),
         ("diverged at step", "no checkpoint was written", "--optimizers.fields.optimizer.lr 1e+29"), code=1,
         may_write=("outputs/*",), check=no_checkpoint),
    # --- gen-lifting view (nerfstudio's viewer on 127.0.0.1)
    Case("lifting-view-missing-config", "gen-lifting",
         lambda ws: ["view", "--load-config", ws.root / "nope" / "config.yml"], ("does not exist", "config.yml"),
         code=1),
    Case("lifting-view-port-out-of-range", "gen-lifting",
         lambda ws: ["view", "--load-config", ws.file("config.yml", b"x"), "--port", 70000], ("--port", "70000"),
         code=1),
    # --- gen-lifting predict-pose: a 16-bit grayscale photo (convert("RGB") would pose an all-white image)
    Case("lifting-predict-pose-16bit-gray-photo", "gen-lifting",
         lambda ws: ["predict-pose", "--load-config", lifting_run(ws), "--image", ws.root / "photo.png",
                     "--output-dir", ws.root / "pose"],
         ("16-bit", "photo.png", "// 257"), code=1, setup=lambda ws: gray16(ws.root / "photo.png")),
]

CASES: List[Case] = SEG_CASES + LIFTING_CASES


# ---------------------------------------------------------------------------------------------------- the sweep


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Callable[[], Path]:
    """Trains the tiny model once per module, on first use."""
    cache: Dict[str, Path] = {}

    def get() -> Path:
        if "run" not in cache:
            root = tmp_path_factory.mktemp("faulty-trained")
            make_images(root / "data", 6, 12)
            run = root / "run"
            assert seg_main(["train", "--data", str(root / "data" / "images"), "--output-dir", str(run),
                             *TINY]) == 0
            cache["run"] = run
        return cache["run"]

    return get


def test_case_ids_are_unique():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_faulty_input(case: Case, tmp_path: Path, trained_run, capsys) -> None:
    ws = Workspace(tmp_path, trained_run)
    if case.setup is not None:
        case.setup(ws)
    args = [str(a) for a in case.build(ws)]
    assert args, "the case's build returned no command"
    before = snapshot(ws.root)
    code, out, err = RUNNERS[case.tool](args, capsys)
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == case.code, f"exit code {code}; stderr:\n{err}"
    assert len(lines) == 1, f"expected one error line, got:\n{err}"
    print(f"{case.id}: {lines[0]}")  # the sweep's messages, for review: pytest -s -k ...
    assert "Traceback" not in out + err
    for word in case.expect:
        assert word in lines[0], f"{word!r} not in: {lines[0]}"
    assert not ws.marker.exists(), "a crafted pickle ran code"
    after = snapshot(ws.root)

    def allowed(rel: str) -> bool:
        return any(fnmatch.fnmatch(rel, pattern) for pattern in case.may_write)

    created = [p for p in after if p not in before and not allowed(p)]
    changed = [p for p in after if p in before and after[p] != before[p] and not allowed(p)]
    deleted = [p for p in before if p not in after]
    assert not created and not changed and not deleted, f"created {created}, changed {changed}, deleted {deleted}"
    if case.check is not None:
        case.check(ws)

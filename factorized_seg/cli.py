"""``factorized-seg``: train | segment | sample | eval (tyro; every flag is listed by ``--help``)."""

from __future__ import annotations

import os
import sys

# Set before torch starts OpenMP: the default busy-wait policy makes a step ~3.5x slower on a loaded machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import contextlib  # noqa: E402
import io  # noqa: E402
import re  # noqa: E402
from typing import Callable, Dict, List, Optional, Type, TypeVar  # noqa: E402

import tyro  # noqa: E402

from factorized_seg.data import SegDataError  # noqa: E402

USAGE = """usage: factorized-seg {train,segment,sample,eval} [--help] [flags]

Factorized diffusion U-Net that learns unsupervised segmentation while learning to generate.

subcommands:
  train     image folder (or bundled dataset) -> run folder with checkpoints, tensorboard, sample grids
  segment   images -> label PNGs / soft masks / overlays (noise to t=30, one forward pass)
  sample    generate images and their masks (ddpm, ddim or dpm sampler)
  eval      Acc / IoU / DICE of label PNGs against a mask folder (strict and IEM protocols)

'factorized-seg SUBCOMMAND --help' lists that subcommand's flags."""


T = TypeVar("T")


def _box_to_line(box: str) -> str:
    """tyro's error box (title, wrapped text, separators, help excerpt; drawn with box characters on a terminal,
    with dashes elsewhere) -> its first section on one line."""
    sections: List[List[str]] = [[]]
    title = None
    for raw in box.splitlines():
        line = raw.strip().strip("│╭╮╰╯|+").strip()
        framed = re.fullmatch(r"[─-]+ (.+?) [─-]{3,}", line)
        if framed and title is None and not any(sections):
            title = framed.group(1)
        elif line and set(line) <= set("─-=━ "):
            sections.append([])
        elif line:
            sections[-1].append(line)
    if title is None and len(sections) > 1 and len(sections[0]) == 1:  # unframed: "Title", dashes, body
        title, sections = sections[0][0], sections[1:]
    body = next((sec for sec in sections if sec), [])
    missing = [t.split()[0] for t in body if t.startswith("--")]
    if body and body[0].startswith("Missing") and missing:
        return f"missing required flag(s): {', '.join(missing)}"
    return " ".join(body) or title or "invalid arguments"


def _parse(cls: Type[T], args: List[str], prog: str, **kwargs) -> T:
    """tyro.cli, with a parsing error (unknown flag, wrong type, missing value) turned into one line."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            parsed = tyro.cli(cls, args=args, prog=prog, description=cls.__doc__, **kwargs)
    except SystemExit as exc:
        if exc.code in (0, None):
            sys.stderr.write(err.getvalue())
            raise
        raise SegDataError(f"{_box_to_line(err.getvalue())} (see {prog} --help)") from None
    sys.stderr.write(err.getvalue())
    return parsed


def _preset_name(args: List[str]) -> str:
    for i, a in enumerate(args):
        if a == "--preset" and i + 1 < len(args):
            return args[i + 1]
        if a.startswith("--preset="):
            return a.split("=", 1)[1]
    return "custom"


def cmd_train(args: List[str]) -> None:
    from factorized_seg.presets import PRESETS
    from factorized_seg.trainer import TrainConfig, train

    name = _preset_name(args)
    if name not in PRESETS:
        raise SegDataError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    cfg = _parse(TrainConfig, args, "factorized-seg train", default=PRESETS[name])
    result = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"trained to step {result.step} in {result.train_s:.0f} s; run folder: {result.run_dir}")


def cmd_segment(args: List[str]) -> None:
    from factorized_seg.segment import SegmentConfig, run_segment

    cfg = _parse(SegmentConfig, args, "factorized-seg segment")
    written = run_segment(cfg)
    print(f"wrote {len(written)} label PNGs to {cfg.output_dir / 'masks'}")


def cmd_sample(args: List[str]) -> None:
    from factorized_seg.sample import SampleConfig, run_sample

    cfg = _parse(SampleConfig, args, "factorized-seg sample")
    grid = run_sample(cfg)
    print(f"wrote {cfg.num} samples; grid: {grid}")


def cmd_eval(args: List[str]) -> None:
    from factorized_seg.evaluate import EvalConfig, evaluate, format_table

    cfg = _parse(EvalConfig, args, "factorized-seg eval")
    result = evaluate(cfg)
    print(format_table(result))


COMMANDS: Dict[str, Callable[[List[str]], None]] = {
    "train": cmd_train, "segment": cmd_segment, "sample": cmd_sample, "eval": cmd_eval,
}


def main(argv: Optional[List[str]] = None) -> int:
    """Run one subcommand; known errors become a one-line message and exit code 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if argv[0] not in COMMANDS:
        print(f"factorized-seg: error: unknown subcommand {argv[0]!r}; choose one of {', '.join(COMMANDS)}",
              file=sys.stderr)
        return 2
    try:
        COMMANDS[argv[0]](argv[1:])
    except (SegDataError, ValueError) as err:
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"factorized-seg {argv[0]}: error: {msg}", file=sys.stderr)
        return 2
    except OSError as err:  # missing or unwritable path, full disk: the OS's reason and the path, one line
        where = f": {err.filename}" if err.filename else ""
        print(f"factorized-seg {argv[0]}: error: {err.strerror or type(err).__name__}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted (the last checkpoint is kept; continue with --resume)", file=sys.stderr)
        return 130
    return 0


def entrypoint() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entrypoint()

"""``factorized-seg``: train | segment | sample | eval (tyro; every flag is listed by ``--help``)."""

from __future__ import annotations

import os
import sys

# Set before torch starts OpenMP: the default busy-wait policy makes a step ~3.5x slower on a loaded machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from typing import Callable, Dict, List, Optional  # noqa: E402

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
    cfg = tyro.cli(TrainConfig, default=PRESETS[name], args=args, prog="factorized-seg train",
                   description=TrainConfig.__doc__)
    result = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"trained to step {result.step} in {result.train_s:.0f} s; run folder: {result.run_dir}")


def cmd_segment(args: List[str]) -> None:
    from factorized_seg.segment import SegmentConfig, run_segment

    cfg = tyro.cli(SegmentConfig, args=args, prog="factorized-seg segment", description=SegmentConfig.__doc__)
    written = run_segment(cfg)
    print(f"wrote {len(written)} label PNGs to {cfg.output_dir / 'masks'}")


def cmd_sample(args: List[str]) -> None:
    from factorized_seg.sample import SampleConfig, run_sample

    cfg = tyro.cli(SampleConfig, args=args, prog="factorized-seg sample", description=SampleConfig.__doc__)
    grid = run_sample(cfg)
    print(f"wrote {cfg.num} samples; grid: {grid}")


def cmd_eval(args: List[str]) -> None:
    from factorized_seg.evaluate import EvalConfig, evaluate, format_table

    cfg = tyro.cli(EvalConfig, args=args, prog="factorized-seg eval", description=EvalConfig.__doc__)
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

"""Cost of one factorized-seg training step against the plain U-Net of the same width, measured in one run.

    OMP_NUM_THREADS=1 python benchmarks/seg_step_cost.py --steps 30 --warmup 5

Every variant is the ``--preset`` model (cpu: 32x32, C=16, batch 32) with ``model.scheme`` / ``num_regions``
changed: plain, factorized K=2, factorized K=3, and, with ``--proposals``, prototypes of cheaper factorized models
built here (not in factorized_seg) to size model-level savings. A step is what the trainer's loop does after the
batch is drawn: ``SegObjective`` forward (the preset's loss terms), backward, gradient clipping, Adam, EMA. One
thread by default; in every round each variant runs one step, in an order rotated from round to round (drift and
other jobs on a shared machine hit every variant alike); median and min of ``--steps`` rounds after ``--warmup``.
The headline ratio is the median over rounds of (factorized step / plain step) from the same round.

Also: stage costs (forward + backward of the encoder + middle, the mask generator, the decoder on B and on B*K
rows) timed the same way, FLOPs of every variant (torch.utils.flop_counter), and a torch.profiler table of the
factorized K=2 step (top ops by self CPU time) written next to the JSON. ``--with-channels-last`` adds plain and
K=2 in channels_last (the trainer's ``--use-channels-last``) to the same rounds.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # an idle OpenMP pool must not spin against other jobs

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable, Dict, List, Optional  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from diffusers.training_utils import EMAModel  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from diffusion_utils.unet_blocks import UNetDecoder  # noqa: E402
from factorized_seg.losses import SegObjective  # noqa: E402
from factorized_seg.model import FactorizedUNet, FactorizedUNetConfig  # noqa: E402
from factorized_seg.presets import PRESETS  # noqa: E402
from factorized_seg.trainer import TrainConfig, compile_denoiser  # noqa: E402
from lifting import git_commit, write_result  # noqa: E402  (one result format for every benchmark)

RESULTS = Path(__file__).resolve().parent / "results"


# ---------------------------------------------------------------------------------------------------- prototypes
class CoarseMaskUNet(FactorizedUNet):
    """Prototype (not the product): the mask generator stops at the level whose resolution is the image's /
    ``mask_pool`` (the coarsest level at least) and its logits are upsampled bilinearly to the image. The product's
    generator computes full-resolution logits and then average-pools them by ``mask_pool`` (4 in the cpu preset),
    so its finer levels are paid for and averaged away."""

    def __init__(self, config: FactorizedUNetConfig) -> None:
        super().__init__(config)
        levels = len(config.channel_mults)
        finest = min(max(config.mask_pool, 1).bit_length() - 1, levels - 1)  # level index of resolution / pool
        used = levels - finest
        trunk = dataclasses.replace(config.trunk, channel_mults=config.channel_mults[-used:])
        skip_c = self.encoder.skip_channels[-used * (config.num_res_blocks + 1):]
        self.mask_generator = UNetDecoder(trunk, skip_c, self.encoder.out_channels, config.num_regions)

    def masks(self, h_mid, skips, temb):
        n = self.mask_generator.num_skips
        logits = self.mask_generator(h_mid, skips[-n:], temb)
        logits = F.interpolate(logits, size=skips[0].shape[-2:], mode="bilinear", align_corners=False)
        return torch.softmax(logits, dim=1)


class HalfWidthMaskUNet(FactorizedUNet):
    """Prototype (not the product): the mask generator has half the decoder's width at every level (and a linear
    map of the time embedding to its half width)."""

    def __init__(self, config: FactorizedUNetConfig) -> None:
        super().__init__(config)
        trunk = dataclasses.replace(config.trunk, base_channels=config.base_channels // 2,
                                    norm_groups=max(1, config.norm_groups // 2))
        self.mask_generator = UNetDecoder(trunk, self.encoder.skip_channels, self.encoder.out_channels,
                                          config.num_regions)
        self.mask_temb = torch.nn.Linear(config.trunk.temb_channels, trunk.temb_channels)

    def masks(self, h_mid, skips, temb):
        return self._softmax_masks(self.mask_generator(h_mid, skips, self.mask_temb(temb)))


PROTOTYPES = {"coarse-mask": CoarseMaskUNet, "half-mask": HalfWidthMaskUNet}


# ---------------------------------------------------------------------------------------------------- steps
@dataclasses.dataclass
class Variant:
    """One model of the comparison: a name, its config and (for prototypes) the class that builds it."""

    name: str
    model: FactorizedUNetConfig
    cls: Optional[type] = None
    channels_last: bool = False
    """channels_last for this variant even when the config says otherwise."""


def variants(preset: TrainConfig, ks=(2, 3), proposals: bool = False, channels_last: bool = False) -> List[Variant]:
    """plain, factorized K=... of the preset's width, (``proposals``) the prototypes at K=2, and (``channels_last``)
    plain and K=2 in channels_last."""
    base = preset.model
    out = [Variant("plain", dataclasses.replace(base, scheme="plain"))]
    out += [Variant(f"factorized K={k}", dataclasses.replace(base, scheme="factorized", num_regions=k)) for k in ks]
    if proposals:
        k2 = dataclasses.replace(base, scheme="factorized", num_regions=2)
        out += [Variant(f"K=2 {name}", k2, cls) for name, cls in PROTOTYPES.items()]
    if channels_last:
        out += [Variant(f"{v.name} NHWC", v.model, channels_last=True) for v in out[:2]]
    return out


def make_step(cfg: TrainConfig, variant: Variant, batch: int, device: torch.device, seed: int = 0) -> Callable:
    """A function that runs one training step of ``variant`` on a fixed batch, as the trainer's loop does after
    the batch is drawn: loss (``SegObjective``, the config's mask terms), backward, clipping, Adam, EMA. The
    model follows ``cfg.use_channels_last`` / ``use_compile`` / ``use_bf16``. ``step.compile_s`` holds the
    compile time (0 without compiling); ``step.model`` the model."""
    torch.manual_seed(seed)
    if variant.channels_last:
        cfg = dataclasses.replace(cfg, use_channels_last=True)
    model = (variant.cls(variant.model) if variant.cls is not None else variant.model.setup()).to(device)
    fmt = torch.channels_last if cfg.use_channels_last else torch.contiguous_format
    if cfg.use_channels_last:
        model = model.to(memory_format=torch.channels_last)
    schedule = cfg.diffusion.setup()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    ema = EMAModel(model.parameters(), decay=cfg.ema_decay)
    ema.to(device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.use_bf16 and device.type == "cuda")
    compile_s = compile_denoiser(model, cfg, batch, device, autocast, 0) if cfg.use_compile else 0.0
    objective = SegObjective(model, schedule, cfg.mask_losses)
    gen = torch.Generator().manual_seed(seed)
    res = cfg.resolution
    x0 = (torch.rand(batch, 3, res, res, generator=gen) * 2 - 1).to(device).contiguous(memory_format=fmt)
    noise = torch.randn(batch, 3, res, res, generator=gen).to(device).contiguous(memory_format=fmt)
    t = torch.randint(0, schedule.num_timesteps, (batch,), generator=gen).to(device)

    def step() -> torch.Tensor:
        with autocast:
            loss, _ = objective(x0, t, noise, None, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        ema.step(model.parameters())
        return loss.detach()

    step.compile_s = compile_s
    step.model = model
    return step


def stage_steps(cfg: TrainConfig, k: int, batch: int, device: torch.device) -> Dict[str, Callable]:
    """Forward + backward of each stage of the factorized K model alone, on inputs that need gradients (as inside
    the full step): encoder + middle on B rows, mask generator on B rows, decoder on B rows (plain) and on B*K."""
    torch.manual_seed(0)
    model = dataclasses.replace(cfg.model, scheme="factorized", num_regions=k).setup().to(device)
    fmt = torch.channels_last if cfg.use_channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    res = cfg.resolution
    x = torch.randn(batch, 3, res, res, device=device).contiguous(memory_format=fmt)
    t = torch.randint(0, 1000, (batch,), device=device)
    with torch.no_grad():
        h_mid, skips, temb = model.encode(x, t)

    def leaf(z: torch.Tensor, rows: int = 1) -> torch.Tensor:
        return z.repeat_interleave(rows, dim=0).detach().requires_grad_(True)

    def enc_mid():
        h, s, e = model.encode(x, t)
        (h.sum() + sum(v.sum() for v in s) + e.sum()).backward()

    def mask_gen():
        model.mask_generator(leaf(h_mid), tuple(leaf(s) for s in skips), leaf(temb)).sum().backward()

    def decoder(rows: int):
        def run():
            model.decoder(leaf(h_mid, rows), tuple(leaf(s, rows) for s in skips), leaf(temb, rows)).sum().backward()
        return run

    return {"encoder+middle (B)": enc_mid, "mask generator (B)": mask_gen, "decoder (B)": decoder(1),
            f"decoder (B*{k})": decoder(k)}


def timed(fn: Callable, device: torch.device, repeat: int = 1) -> float:
    """Seconds per call of ``fn`` over ``repeat`` calls (waits for the device before and after)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync()
    return (time.perf_counter() - start) / repeat


def alternate(fns: Dict[str, Callable], rounds: int, warmup: int, device: torch.device,
              budget_s: Optional[float] = None, repeat: int = 1) -> Dict[str, List[float]]:
    """Per-round times of every function: each round runs all of them once, the order rotated by one each round.
    Stops early (after at least one timed round) when ``budget_s`` seconds have passed."""
    names = list(fns)
    times: Dict[str, List[float]] = {n: [] for n in names}
    start = time.perf_counter()
    for r in range(warmup + rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        row = {n: timed(fns[n], device, repeat) for n in order}
        if r >= warmup:
            for n in names:
                times[n].append(row[n])
        if budget_s is not None and r >= warmup and time.perf_counter() - start > budget_s:
            break
    return times


def summary(times: List[float]) -> Dict[str, float]:
    return {"median_s": statistics.median(times), "min_s": min(times), "n": len(times)}


def paired_ratio(a: List[float], b: List[float]) -> float:
    """Median over rounds of a[r] / b[r]."""
    return statistics.median(x / y for x, y in zip(a, b))


def step_flops(step: Callable) -> int:
    """FLOPs of one call (forward + backward; the optimiser's elementwise work is not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def profile_table(step: Callable, steps: int, rows: int) -> str:
    from torch.profiler import ProfilerActivity, profile

    step()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
        for _ in range(steps):
            step()
    by_op = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)
    return by_op


# ---------------------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cpu", choices=sorted(PRESETS), help="model, resolution and batch")
    parser.add_argument("--batch", type=int, default=None, help="images per step (default: the preset's)")
    parser.add_argument("--steps", type=int, default=30, help="timed rounds (one step of every variant each)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed rounds first")
    parser.add_argument("--proposals", action="store_true", help="also time the cheaper-model prototypes")
    parser.add_argument("--profile-steps", type=int, default=5, help="factorized K=2 steps under the profiler")
    parser.add_argument("--channels-last", action="store_true", help="every variant in channels_last (the "
                        "trainer's --use-channels-last)")
    parser.add_argument("--with-channels-last", action="store_true", help="also plain and K=2 in channels_last, "
                        "in the same rounds")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: share the machine)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=RESULTS / "seg_step_cost.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    commit = git_commit()
    device = torch.device(args.device)
    cfg = dataclasses.replace(PRESETS[args.preset], use_channels_last=args.channels_last)
    batch = args.batch or cfg.batch_size
    vs = variants(cfg, proposals=args.proposals, channels_last=args.with_channels_last)
    steps = {v.name: make_step(cfg, v, batch, device) for v in vs}
    params = {v.name: sum(p.numel() for p in steps[v.name].model.parameters()) for v in vs}
    flops = {v.name: step_flops(steps[v.name]) for v in vs}
    stages = stage_steps(cfg, 2, batch, device)
    print(f"{args.preset} preset, batch {batch}, {args.threads} thread(s), {args.steps} rounds after {args.warmup}"
          + (", channels_last" if args.channels_last else ""))
    times = alternate({**steps, **stages}, args.steps, args.warmup, device)

    base = times["plain"]
    rows = {}
    for v in vs:
        rows[v.name] = {**summary(times[v.name]), "ratio_to_plain": paired_ratio(times[v.name], base),
                        "ratio_of_min": min(times[v.name]) / min(base), "params": params[v.name],
                        "flops": flops[v.name], "flops_ratio": flops[v.name] / flops["plain"]}
    stage_rows = {name: summary(times[name]) for name in stages}
    med = {name: r["median_s"] for name, r in stage_rows.items()}
    # What K=2 would cost with a free mask generator: encoder + middle and two decoder passes, over plain's one.
    free_mask_bound = (med["encoder+middle (B)"] + med["decoder (B*2)"]) / (med["encoder+middle (B)"]
                                                                          + med["decoder (B)"])
    print(f"{'variant':26s} {'median ms':>10s} {'min ms':>8s} {'x plain':>8s} {'x min':>7s} {'FLOPs x':>8s} "
          f"{'params':>9s}")
    for name, r in rows.items():
        print(f"{name:26s} {1e3 * r['median_s']:10.1f} {1e3 * r['min_s']:8.1f} {r['ratio_to_plain']:8.2f} "
              f"{r['ratio_of_min']:7.2f} {r['flops_ratio']:8.2f} {r['params']:9d}")
    print(f"\n{'stage (forward + backward)':26s} {'median ms':>10s} {'min ms':>8s}")
    for name, r in stage_rows.items():
        print(f"{name:26s} {1e3 * r['median_s']:10.1f} {1e3 * r['min_s']:8.1f}")
    print(f"K=2 with a free mask generator would cost {free_mask_bound:.2f}x plain (from the stage medians)")

    profile_path = args.out.with_name(args.out.stem + "_profile.txt")
    if args.profile_steps > 0:
        table = profile_table(steps["factorized K=2"], args.profile_steps, rows=30)
        profile_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = profile_path.with_suffix(".txt.tmp")
        tmp.write_text(f"factorized K=2 training step, {args.preset} preset, batch {batch}, {args.threads} "
                       f"thread(s), {args.profile_steps} steps; commit {commit}\n"
                       f"command: {' '.join(sys.argv)}\n\n{table}\n")
        os.replace(tmp, profile_path)
        print(f"wrote {profile_path}")
    write_result(args.out, commit, preset=args.preset, batch=batch, resolution=cfg.resolution, device=str(device),
                 channels_last=args.channels_last, threads=args.threads,
                 rounds=args.steps, warmup=args.warmup, shared_machine_note="timings on a shared machine: compare "
                 "ratios from the same run, not absolute times across runs",
                 variants=rows, stages=stage_rows, k2_free_mask_generator_ratio=free_mask_bound, step_times_s=times,
                 profile=profile_path.name if args.profile_steps > 0 else None)


if __name__ == "__main__":
    main()

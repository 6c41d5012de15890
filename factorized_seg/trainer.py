"""Training loop: image folder -> run folder (config, checkpoints, tensorboard scalars, sample grids).

Single process, or data-parallel under ``torchrun`` (DDP; gloo on CPU, nccl on GPU). Only rank 0 writes.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Literal, Optional, Tuple

import torch
import torch.distributed as dist
from diffusers.training_utils import EMAModel
from jaxtyping import Float
from torch import Tensor
from tqdm import tqdm

from diffusion_utils.schedule import DiffusionScheduleConfig, to_image_range, to_model_range
from factorized_seg.checkpoints import (  # noqa: F401 (load_for_inference, config_from_dict: re-exported)
    CHECKPOINT, EMA_WEIGHTS, FORMAT, FORMAT_VERSION, RESUME_KEYS, CheckpointError, atomic_torch_save,
    atomic_write_text, config_from_dict, config_to_dict, inference_part, load_for_inference, nonfinite_entries,
    read_checkpoint, remove_stale_temporaries, repair_ema_file,
)
from factorized_seg.data import (
    SegDataError, augment, check_output_dir, list_images, load_images, read_labels, resolve_data,
)
from factorized_seg.inference import sample_images, segment_tensor
from factorized_seg.losses import MaskLossConfig, SegObjective
from factorized_seg.model import FactorizedUNetConfig
from factorized_seg.viz import atomic_save_image, image_mask_grid, to_uint8


@dataclass(frozen=True)
class AugmentConfig:
    """Random augmentation of training images (hides absolute position from the mask generator)."""

    flip: bool = True
    """Random horizontal flips."""
    min_crop: float = 1.0
    """Random crops covering this fraction of the image area or more, resized back (1.0 = no crop)."""
    max_shift: int = 0
    """Random translation by up to this many pixels, with reflect padding (0 = none)."""


@dataclass(frozen=True)
class TrainConfig:
    """``factorized-seg train``: learn the factorized DDPM (and its masks) on a folder of images."""

    preset: Literal["cpu", "paper64", "paper128", "custom"] = "custom"
    """Preset that sets the defaults of every other flag (flags given explicitly override it): cpu (32x32,
    C=16, K=3, minutes on 2 cores), paper64 / paper128 (the thesis' 64x64 / 128x128 models, K=3, C=128, for a GPU)."""
    data: str = "flowers17"
    """Image folder (jpg/png, any size; a folder with an images/ subfolder also works) or a bundled dataset name."""
    output_dir: Path = Path("runs/factorized-seg")
    """Run folder: config.json, checkpoints/, tensorboard/, samples/."""
    labels: Optional[Path] = None
    """Class-label file ('filename label' per line) for class-conditional training; None = unconditional."""
    resolution: int = 32
    """Images are resized (whole image) to resolution x resolution."""
    model: FactorizedUNetConfig = field(default_factory=FactorizedUNetConfig)
    """Architecture."""
    diffusion: DiffusionScheduleConfig = field(default_factory=DiffusionScheduleConfig)
    """Noise schedule (the paper's: T = 1000, linear 1e-4 .. 0.02)."""
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    """Data augmentation."""
    mask_losses: MaskLossConfig = field(default_factory=MaskLossConfig)
    """Mask terms added to the denoising loss (ours; all 0 = the paper's loss alone)."""
    batch_size: int = 32
    """Images per optimiser step (over all processes under torchrun)."""
    max_steps: int = 2000
    """Stop after this many optimiser steps."""
    time_budget_s: Optional[float] = None
    """Also stop (and checkpoint) after this many seconds of training in this invocation; None = no limit."""
    lr: float = 2e-4
    """Adam learning rate (after warm-up)."""
    warmup_steps: int = 100
    """Linear learning-rate warm-up steps."""
    grad_clip: float = 1.0
    """Clip the gradient norm to this (0 = no clipping)."""
    ema_decay: float = 0.999
    """Maximum EMA decay (diffusers' EMAModel, which ramps the decay up as (1+n)/(10+n) early on)."""
    t_power: float = 1.0
    """Timestep sampling t = floor(T * u^p), u ~ U(0, 1): 1.0 is the paper's uniform t; p > 1 favours small t."""
    seed: int = 0
    """Seed of the model initialisation, data order, augmentation and noise."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to train (auto: cuda when available)."""
    use_bf16: bool = False
    """bfloat16 autocast on cuda (ignored on CPU)."""
    use_channels_last: bool = False
    """Keep the U-Net's weights and inputs in channels_last memory format (NHWC): faster convolutions on recent
    GPUs, usually slower on CPU. Same model and checkpoints."""
    use_compile: bool = False
    """torch.compile the denoiser. Compiling happens once before the first step (on a dummy batch); its time is
    logged and returned as compile_s, not counted in the step time or in --time-budget-s. On CPU, inductor needs a
    C++ compiler and takes minutes."""
    compile_backend: str = "inductor"
    """torch.compile backend used with --use-compile (aot_eager: capture graphs without generating kernels, to
    debug)."""
    threads: int = 0
    """torch CPU threads per process (0 = torch's default). Set 1 on a shared machine."""
    log_every: int = 25
    """Tensorboard scalars every N steps. On cuda the step never waits for the GPU in between: the loss shown by the
    progress bar and the non-finite-loss check are read every N steps (and before every checkpoint)."""
    sample_every: int = 500
    """Sample grid (training images + colour-coded masks, and generated images + masks) every N steps; 0 = never."""
    sample_generate_steps: int = 20
    """DDIM steps for the generated part of the periodic grid (0 = only segment training images)."""
    checkpoint_every: int = 500
    """Checkpoint every N steps (and always at the end)."""
    resume: bool = False
    """Continue from output_dir/checkpoints/latest.pt (same step, optimiser, EMA and RNG state)."""
    init_from: Optional[Path] = None
    """Warm start (ours): a run folder or checkpoint whose weights initialise every tensor of this model with the
    same name and shape (e.g. the encoder, middle block and decoder of a ``--model.scheme plain`` run; the mask
    generator then starts fresh). Ignored by --resume, which continues its own run."""
    progress: bool = True
    """Show a progress bar (it/s and ETA)."""


class TrainingDiverged(SegDataError):
    """Non-finite loss or weights during training (one line: the step, the checkpoint kept, a lower --lr)."""


def _flag(path: str) -> str:
    return "--" + path.replace("_", "-")


def missing_cpp_compiler() -> Optional[str]:
    """Why inductor cannot generate CPU kernels here (no C++ compiler), or None when it can."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception as err:  # inductor raises its own InvalidCxxCompiler; any failure means no CPU kernels
        first = (str(err).strip() or type(err).__name__).splitlines()[0][:80]
        return f"torch.compile's inductor backend found no C++ compiler ({first})"
    return None


def validate_train_config(cfg: TrainConfig) -> None:
    """Raise SegDataError naming the first out-of-range flag. Called before anything is read or written."""
    m, a, d = cfg.model, cfg.augment, cfg.diffusion
    finite = math.isfinite
    mults_ok = len(m.channel_mults) >= 1 and all(c >= 1 for c in m.channel_mults)
    factor = m.downsample_factor if mults_ok else 1
    checks = [  # (config path, value, ok, what it must be)
        ("batch_size", cfg.batch_size, cfg.batch_size >= 1, ">= 1"),
        ("max_steps", cfg.max_steps, cfg.max_steps >= 1, ">= 1"),
        ("time_budget_s", cfg.time_budget_s, cfg.time_budget_s is None or cfg.time_budget_s > 0, "> 0 (or None)"),
        ("lr", cfg.lr, finite(cfg.lr) and cfg.lr > 0, "a finite number > 0"),
        ("warmup_steps", cfg.warmup_steps, cfg.warmup_steps >= 0, ">= 0"),
        ("grad_clip", cfg.grad_clip, finite(cfg.grad_clip) and cfg.grad_clip >= 0, ">= 0 (0 = no clipping)"),
        ("ema_decay", cfg.ema_decay, 0.0 <= cfg.ema_decay <= 1.0, "in [0, 1]"),
        ("t_power", cfg.t_power, finite(cfg.t_power) and cfg.t_power > 0, "a finite number > 0"),
        ("seed", cfg.seed, 0 <= cfg.seed < 2 ** 31, "in [0, 2^31)"),
        ("threads", cfg.threads, cfg.threads >= 0, ">= 0 (0 = torch's default)"),
        ("log_every", cfg.log_every, cfg.log_every >= 1, ">= 1"),
        ("sample_every", cfg.sample_every, cfg.sample_every >= 0, ">= 0 (0 = never)"),
        ("sample_generate_steps", cfg.sample_generate_steps, cfg.sample_generate_steps >= 0, ">= 0"),
        ("checkpoint_every", cfg.checkpoint_every, cfg.checkpoint_every >= 0, ">= 0 (0 = only at the end)"),
        ("model.num_regions", m.num_regions, m.num_regions >= 1, ">= 1"),
        ("model.num_subregions", m.num_subregions, m.num_subregions >= 1, ">= 1"),
        ("model.image_channels", m.image_channels, m.image_channels == 3, "3 (training reads RGB images)"),
        ("model.base_channels", m.base_channels, m.base_channels >= 1, ">= 1"),
        ("model.channel_mults", m.channel_mults, mults_ok, "one or more integers >= 1"),
        ("model.num_res_blocks", m.num_res_blocks, m.num_res_blocks >= 1, ">= 1"),
        ("model.attention_levels", m.attention_levels,
         all(0 <= i < len(m.channel_mults) for i in m.attention_levels), f"level indices < {len(m.channel_mults)}"),
        ("model.norm_groups", m.norm_groups,
         m.norm_groups >= 1 and all((c * m.base_channels) % m.norm_groups == 0 for c in m.channel_mults),
         "a divisor of every level width (base-channels x channel-mults)"),
        ("model.dropout", m.dropout, 0.0 <= m.dropout < 1.0, "in [0, 1)"),
        ("model.num_classes", m.num_classes, m.num_classes >= 0, ">= 0"),
        ("model.mask_pool", m.mask_pool, m.mask_pool >= 1, ">= 1"),
        ("resolution", cfg.resolution, cfg.resolution >= 1 and cfg.resolution % factor == 0,
         f"a positive multiple of {factor} (2 ^ (levels - 1))"),
        ("augment.min_crop", a.min_crop, 0.0 < a.min_crop <= 1.0, "in (0, 1]"),
        ("augment.max_shift", a.max_shift, 0 <= a.max_shift < cfg.resolution,
         f"in [0, resolution) = [0, {cfg.resolution})"),
        ("diffusion.num_timesteps", d.num_timesteps, d.num_timesteps >= 1, ">= 1"),
        ("diffusion.beta_start", d.beta_start, 0.0 < d.beta_start < 1.0, "in (0, 1)"),
        ("diffusion.beta_end", d.beta_end, d.beta_start <= d.beta_end < 1.0, "in [beta-start, 1)"),
    ]
    for path, value, ok, want in checks:
        if not ok:
            shown = " ".join(map(str, value)) if isinstance(value, tuple) else value
            raise SegDataError(f"{_flag(path)} must be {want}, got {shown if shown != '' else '(nothing)'}")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise SegDataError("--device cuda: no CUDA device is available here; use --device cpu (or auto)")
    if cfg.use_compile:
        import torch._dynamo  # late: only compiled runs pay for the import

        backends = torch._dynamo.list_backends(exclude_tags=())
        if cfg.compile_backend not in backends:
            raise SegDataError(f"--compile-backend must be a torch.compile backend ({', '.join(backends)}), got "
                               f"{cfg.compile_backend!r}")
        on_cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
        missing = missing_cpp_compiler() if on_cpu and cfg.compile_backend == "inductor" else None
        if missing:
            raise SegDataError(f"--use-compile on CPU: {missing}; install g++ (or set CXX) or drop --use-compile")
    check_output_dir(cfg.output_dir)
    for part in (m, cfg.mask_losses):  # the configs' own checks (their messages name the setting)
        try:
            part.validate()
        except ValueError as err:
            raise SegDataError(str(err)) from None


def _resume_mismatch(ckpt: Dict[str, Any], cfg: TrainConfig, model_cfg: FactorizedUNetConfig) -> Optional[str]:
    """The first setting that differs between the run being resumed and these flags (None if they fit)."""
    stored = {("model." + k): v for k, v in ckpt["model_config"].items()}
    stored.update({("diffusion." + k): v for k, v in ckpt["diffusion"].items()})
    stored["resolution"] = ckpt["resolution"]
    given = {("model." + k): v for k, v in config_to_dict(model_cfg).items()}
    given.update({("diffusion." + k): v for k, v in config_to_dict(cfg.diffusion).items()})
    given["resolution"] = cfg.resolution
    for key, value in given.items():
        if key in stored and stored[key] != value:
            show = (lambda v: " ".join(map(str, v)) if isinstance(v, list) else str(v))
            return (f"--resume: the run in {cfg.output_dir} was trained with {_flag(key)} {show(stored[key])}, "
                    f"not {show(value)}: drop the flag or pick another --output-dir")
    return None


def warm_start(model: torch.nn.Module, source: Path) -> int:
    """Copy the EMA weights of a trained run (or checkpoint) into the tensors of ``model`` with the same names (the
    rest, e.g. a mask generator the source lacks, keep their initialisation); returns how many were copied. A name
    both have with different shapes means another architecture: one-line error."""
    src, _, _ = load_for_inference(Path(source))
    own = model.state_dict()
    shared = {k: v for k, v in src.state_dict().items() if k in own}
    clash = [k for k, v in shared.items() if own[k].shape != v.shape]
    if clash or not shared:
        why = f"{clash[0]} is {tuple(shared[clash[0]].shape)} there" if clash else "no weight names in common"
        raise SegDataError(f"--init-from {source}: another architecture ({why}); warm-start from a run with the same "
                           "--model.base-channels, --model.channel-mults and --model.num-res-blocks")
    model.load_state_dict(shared, strict=False)
    return len(shared)


def _lr_at(cfg: TrainConfig, step: int) -> float:
    return cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup_steps))



def _nonfinite_anywhere(loss: Tensor, world: int) -> bool:
    """True on every process if the loss is NaN or inf on any of them (so all stop at the same step)."""
    flag = (~torch.isfinite(loss.detach())).float().reshape(1)
    if world > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def defers_host_reads(device: torch.device) -> bool:
    """Whether the loop reads the loss (and checks that it is finite) only every ``log_every`` steps instead of every
    step: on cuda, where every read waits for the GPU to finish the queued work."""
    return device.type == "cuda"


def _first_nonfinite_step(first_bad: Tensor, world: int) -> int:
    """The earliest step (1-based) at which any process saw a non-finite loss, 0 if none: the value of
    ``first_bad``, which the loop updates on the device without waiting for it. Reading it waits for the GPU."""
    never = torch.iinfo(torch.long).max
    flag = torch.where(first_bad > 0, first_bad, never).reshape(1)
    if world > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    first = int(flag.item())
    return 0 if first == never else first


def images_fit_on(device: torch.device, images: Tensor, share: float = 0.25) -> bool:
    """True when ``images`` take at most ``share`` of ``device``'s free memory (always True for the CPU)."""
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return images.numel() * images.element_size() <= share * free


def augment_batch(
    x: Float[Tensor, "batch 3 height width"], generator: torch.Generator, cfg: AugmentConfig
) -> Float[Tensor, "batch 3 height width"]:
    """``data.augment`` for a batch on any device, with the same random draws from the CPU ``generator`` in the same
    order (so CPU and GPU runs see the same batches). ``data.augment`` applies its flip with a mask that lives on
    the CPU, which a CUDA batch cannot use, so the flip is drawn (as ``data.augment`` draws it) and applied here."""
    x = augment(x, generator, False, cfg.min_crop, cfg.max_shift)
    if not cfg.flip:
        return x
    flip = (torch.rand(x.shape[0], generator=generator) < 0.5).to(x.device, non_blocking=True)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def compile_denoiser(model: torch.nn.Module, cfg: TrainConfig, batch: int, device: torch.device,
                     autocast: Any, num_classes: int) -> float:
    """``torch.compile`` the model in place (its state-dict keys stay the same) and compile it now: one forward and
    backward on a zero batch of the training shapes, under the training autocast, with the RNG state restored and
    the gradients dropped afterwards. Returns the seconds it took."""
    model.compile(backend=cfg.compile_backend)
    fmt = torch.channels_last if cfg.use_channels_last else torch.contiguous_format
    x = torch.zeros(batch, 3, cfg.resolution, cfg.resolution, device=device).contiguous(memory_format=fmt)
    t = torch.zeros(batch, dtype=torch.long, device=device)
    labels = torch.zeros(batch, dtype=torch.long, device=device) if num_classes > 0 else None
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        with autocast:
            out = model(x, t, labels)
        dummy = out.eps.float().mean() + (out.masks.float().mean() if out.masks is not None else 0.0)
        dummy.backward()
    model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _dist_info() -> Tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    return rank, world


@dataclass
class TrainResult:
    """What a finished ``train`` call reports."""

    run_dir: Path
    step: int
    train_s: float
    """Seconds of training in this invocation (compiling not included)."""
    last_loss: float
    compile_s: float = 0.0
    """Seconds spent compiling the model before the first step (``--use-compile``; 0 without it)."""


def train(cfg: TrainConfig) -> TrainResult:
    """Train (or resume) and return the run folder, the final step and the time spent."""
    rank, world = _dist_info()
    validate_train_config(cfg)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    if cfg.batch_size % world:
        raise SegDataError(f"--batch-size {cfg.batch_size} must be divisible by the number of processes ({world})")
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.device == "auto" else cfg.device))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick the fastest convolution once
    out_dir = Path(cfg.output_dir)
    ckpt_path = out_dir / CHECKPOINT
    if cfg.resume and not ckpt_path.is_file():
        raise SegDataError(f"--resume: no checkpoint at {ckpt_path}; drop --resume to start a new run")
    if not cfg.resume and ckpt_path.is_file():
        raise SegDataError(f"{out_dir} already holds a run: pass --resume to continue it or pick another --output-dir")

    # 1. data, architecture and the run to resume (everything is checked before anything is written)
    files = list_images(resolve_data(cfg.data))
    labels, classes = (read_labels(cfg.labels, files) if cfg.labels is not None else (None, []))
    if cfg.labels is not None and cfg.model.num_classes != len(classes):
        model_cfg = dataclasses.replace(cfg.model, num_classes=len(classes))
    else:
        model_cfg = cfg.model
    ckpt = None
    if cfg.resume:
        ckpt = read_checkpoint(ckpt_path, RESUME_KEYS, mmap=False)
        bad = nonfinite_entries({k: ckpt[k] for k in ("model", "ema_state", "optimizer")})
        if bad:
            raise CheckpointError(f"{ckpt_path} holds non-finite values ({bad[0]}, step {ckpt['step']}): this run "
                                  "diverged and cannot be resumed; start a new one with a lower --lr")
        mismatch = _resume_mismatch(ckpt, cfg, model_cfg)
        if mismatch:
            raise SegDataError(mismatch)
    images = load_images(files, cfg.resolution, progress=cfg.progress and rank == 0)
    # The uint8 images live where the model trains when they fit (one copy now instead of one per step).
    data_device = device if images_fit_on(device, images) else torch.device("cpu")
    images = images.to(data_device)
    if labels is not None:
        labels = labels.to(data_device)

    # 2. model, optimiser, EMA
    torch.manual_seed(cfg.seed)
    model = model_cfg.setup().to(device)
    if cfg.use_channels_last:  # before the optimiser and EMA copy the parameters: their state follows the layout
        model = model.to(memory_format=torch.channels_last)
    if ckpt is None and cfg.init_from is not None:
        warm_start(model, cfg.init_from)  # before the optimiser and the EMA copy are made
    schedule = cfg.diffusion.setup()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    ema = EMAModel(model.parameters(), decay=cfg.ema_decay)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + rank)
    step = 0
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
            ema.load_state_dict(ckpt["ema_state"])
            ema.decay = cfg.ema_decay  # the flags of this invocation rule, as for --lr (the stored decay would win)
            step = int(ckpt["step"])
            gen.set_state(ckpt["rng"][rank] if rank < len(ckpt["rng"]) else ckpt["rng"][0])
        except (RuntimeError, ValueError, KeyError, TypeError) as err:
            first = str(err).strip().splitlines()[0][:100] if str(err).strip() else type(err).__name__
            raise CheckpointError(f"not a factorized-seg checkpoint: {ckpt_path} (cannot resume from it: "
                                  f"{first})") from None
    last_saved = step if ckpt is not None else None
    ema.to(device)
    per_rank = cfg.batch_size // world
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.use_bf16 and device.type == "cuda")
    compile_s = (compile_denoiser(model, cfg, per_rank, device, autocast, model_cfg.num_classes)
                 if cfg.use_compile else 0.0)
    objective = SegObjective(model, schedule, cfg.mask_losses)
    ddp = torch.nn.parallel.DistributedDataParallel(objective) if world > 1 else objective

    writer = None
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter  # imported late: slow, and only rank 0 logs

        # First writes of this invocation: drop what a killed run left half-written, pair ema.pt with latest.pt.
        remove_stale_temporaries([out_dir, out_dir / "checkpoints", out_dir / "samples"])
        if ckpt is not None:
            repair_ema_file(out_dir, ckpt)
        atomic_write_text(out_dir / "config.json", json.dumps(
            {**config_to_dict(cfg), "model": config_to_dict(model_cfg), "classes": classes,
             "num_images": len(files)}, indent=2))
        writer = SummaryWriter(str(out_dir / "tensorboard"))
        if cfg.use_compile:
            writer.add_scalar("train/compile_s", compile_s, step)
            if cfg.progress:
                tqdm.write(f"compiled the model in {compile_s:.1f} s (not counted in the training time)")
    grid_idx = torch.linspace(0, len(files) - 1, steps=min(8, len(files))).long()

    def snapshot() -> Dict[str, Any]:
        ema_model = copy.deepcopy(model).cpu()
        ema.copy_to(ema_model.parameters())
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "model_config": config_to_dict(model_cfg),
                "diffusion": config_to_dict(cfg.diffusion), "resolution": cfg.resolution, "classes": classes,
                "step": step, "train_config": config_to_dict(dataclasses.replace(cfg, model=model_cfg)),
                "ema_model": ema_model.state_dict()}

    def gather_rng() -> list:
        state = gen.get_state()
        if world == 1:
            return [state]
        states = [None] * world
        dist.all_gather_object(states, state)
        return states

    def fail(err: Exception) -> None:
        bar.close()
        if writer is not None:
            writer.close()
        raise err

    def diverged(what: str) -> TrainingDiverged:
        if last_saved is None:
            kept, retry = "no checkpoint was written", f"--lr {cfg.lr / 10:g}"
        else:
            kept, retry = f"{CHECKPOINT} (step {last_saved}) is kept", f"--resume --lr {cfg.lr / 10:g}"
        return TrainingDiverged(f"training diverged at step {step}: {what}; {kept}; retry with a lower --lr "
                                f"(now {cfg.lr:g}), e.g. {retry}")

    def check_loss() -> None:
        """Stop (one line naming the step) if a step since the last check had a non-finite loss (cuda: the flag the
        loop keeps on the device; on the CPU every step is checked as it happens)."""
        nonlocal step
        if check_on_device:
            bad = _first_nonfinite_step(first_bad, world)
            if bad:
                step = bad
                fail(diverged("the loss is not finite"))

    def save_checkpoint() -> None:
        """latest.pt (everything resume needs, EMA weights included), then ema.pt from the same snapshot; never
        with non-finite values (every rank checks its identical copy, so all stop together)."""
        nonlocal last_saved
        check_loss()
        bad = nonfinite_entries({"model": model.state_dict(), "ema": ema.shadow_params,
                                 "optimizer": opt.state_dict()["state"]})
        if bad:
            fail(diverged(f"non-finite weights ({bad[0]})"))
        rng = gather_rng()
        if rank != 0:
            last_saved = step
            return
        snap = snapshot()
        atomic_torch_save({**snap, "model": model.state_dict(), "optimizer": opt.state_dict(),
                           "ema_state": ema.state_dict(), "rng": rng}, ckpt_path)
        atomic_torch_save(inference_part(snap), out_dir / EMA_WEIGHTS)
        last_saved = step

    def save_grid() -> None:
        ema_model = model_cfg.setup()
        ema_model.load_state_dict(snapshot()["ema_model"])
        ema_model = ema_model.to(device).eval()
        x0 = to_model_range(images[grid_idx].float().div(255)).to(device)
        lab = labels[grid_idx].to(device) if labels is not None else None
        parts = []
        if model_cfg.num_masks:
            masks = segment_tensor(ema_model, schedule, x0, min(30, schedule.num_timesteps - 1),
                                   seeds=range(len(grid_idx)), labels=lab)
            parts.append(image_mask_grid(to_image_range(x0).cpu(), masks.cpu(), nrow=len(grid_idx)))
        if cfg.sample_generate_steps > 0:
            gx, gm = sample_images(ema_model, schedule, len(grid_idx), cfg.resolution, seed=cfg.seed,
                                   sampler="ddim", steps=cfg.sample_generate_steps, labels=lab, device=device,
                                   progress=False)
            parts.append(image_mask_grid(to_image_range(gx).cpu(), None if gm is None else gm.cpu(),
                                         nrow=len(grid_idx)))
        if parts:
            atomic_save_image(to_uint8(torch.cat(parts, dim=1)), out_dir / "samples" / f"step-{step:07d}.png")

    # 3. loop. On cuda nothing in a step waits for the GPU (no .item(), no blocking copy): the loss is read, and
    # the non-finite-loss flag kept on the device is checked, every log_every steps and before anything is saved.
    # On the CPU reading them is free, so every step is checked exactly.
    check_on_device = defers_host_reads(device)
    first_bad = torch.zeros((), dtype=torch.long, device=device)  # first step with a non-finite loss (0 = none)
    start = time.time()
    last_loss = torch.full((), float("nan"))
    bar = tqdm(total=cfg.max_steps, initial=step, desc="train", disable=not (cfg.progress and rank == 0),
               unit="step", dynamic_ncols=True)
    fmt = torch.channels_last if cfg.use_channels_last else torch.contiguous_format
    ddp.train()
    stop_flag = torch.zeros(1, device=device)
    while step < cfg.max_steps:
        idx = torch.randint(0, len(files), (per_rank,), generator=gen)
        idx_data = idx.to(data_device, non_blocking=True)
        x0 = to_model_range(images[idx_data].float().div(255))
        x0 = augment_batch(x0, gen, cfg.augment).to(device, non_blocking=True).contiguous(memory_format=fmt)
        lab = labels[idx_data].to(device, non_blocking=True) if labels is not None else None
        t = schedule.sample_timesteps(per_rank, generator=gen, power=cfg.t_power).to(device, non_blocking=True)
        noise = torch.randn(x0.shape, generator=gen).to(device, non_blocking=True).contiguous(memory_format=fmt)
        for g in opt.param_groups:
            g["lr"] = _lr_at(cfg, step)
        with autocast:
            loss, terms = ddp(x0, t, noise, lab, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if check_on_device:
            first_bad = torch.where((first_bad == 0) & ~torch.isfinite(loss.detach()), step + 1, first_bad)
        elif _nonfinite_anywhere(loss, world):
            step += 1  # the step that failed, 1-based like the saved steps
            fail(diverged("the loss is not finite"))
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        ema.step(model.parameters())
        step += 1
        last_loss = loss.detach()
        bar.update(1)
        read_now = not check_on_device or step % cfg.log_every == 0
        if read_now:
            check_loss()
            logging = writer is not None and step % cfg.log_every == 0
            # one transfer for the loss and the logged terms
            values = torch.stack([last_loss.float(), *(v.float() for v in terms.values() if logging)]).tolist()
            bar.set_postfix(loss=f"{values[0]:.4f}")
            if logging:
                writer.add_scalar("train/loss", values[0], step)
                writer.add_scalar("train/lr", _lr_at(cfg, step - 1), step)
                writer.add_scalar("train/images_per_s", (bar.format_dict.get("rate") or 0.0) * per_rank, step)
                for name, value in zip(terms, values[1:]):
                    writer.add_scalar(name, value, step)
        if cfg.sample_every and step % cfg.sample_every == 0:
            check_loss()  # on every process: under torchrun on cuda it is a collective
            if rank == 0:
                save_grid()
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.max_steps:
            save_checkpoint()
        if cfg.time_budget_s is not None:
            out_of_time = time.time() - start >= cfg.time_budget_s
            if world > 1:  # every process stops at the same step (on cuda they agree when the loop reads anyway)
                stop_flag.fill_(float(out_of_time))
                if read_now:
                    dist.all_reduce(stop_flag, op=dist.ReduceOp.MAX)
                out_of_time = read_now and stop_flag.item() > 0
            if out_of_time:
                break
    bar.close()
    train_s = time.time() - start
    save_checkpoint()
    if rank == 0 and cfg.sample_every:
        save_grid()
    if writer is not None:
        writer.close()
    if world > 1:
        dist.barrier()
    return TrainResult(run_dir=out_dir, step=step, train_s=train_s, last_loss=float(last_loss),
                       compile_s=compile_s)

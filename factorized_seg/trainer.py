"""Training loop: image folder -> run folder (config, checkpoints, tensorboard scalars, sample grids).

Single process, or data-parallel under ``torchrun`` (DDP; gloo on CPU, nccl on GPU). Only rank 0 writes.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Literal, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from diffusers.training_utils import EMAModel
from jaxtyping import Float
from torch import Tensor
from tqdm import tqdm

from diffusion_utils.schedule import DiffusionSchedule, DiffusionScheduleConfig, to_image_range, to_model_range
from factorized_seg.data import SegDataError, augment, list_images, load_images, read_labels, resolve_data
from factorized_seg.inference import sample_images, segment_tensor
from factorized_seg.losses import MaskLossConfig, SegObjective
from factorized_seg.model import FactorizedUNet, FactorizedUNetConfig
from factorized_seg.viz import atomic_save_image, image_mask_grid, to_uint8

CHECKPOINT = "checkpoints/latest.pt"
EMA_WEIGHTS = "checkpoints/ema.pt"


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
    C=16, K=2, minutes on 2 cores), paper64 / paper128 (the thesis' 64x64 / 128x128 models, K=3, C=128, for a GPU)."""
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
    threads: int = 0
    """torch CPU threads per process (0 = torch's default). Set 1 on a shared machine."""
    log_every: int = 25
    """Tensorboard scalars every N steps."""
    sample_every: int = 500
    """Sample grid (training images + colour-coded masks, and generated images + masks) every N steps; 0 = never."""
    sample_generate_steps: int = 20
    """DDIM steps for the generated part of the periodic grid (0 = only segment training images)."""
    checkpoint_every: int = 500
    """Checkpoint every N steps (and always at the end)."""
    resume: bool = False
    """Continue from output_dir/checkpoints/latest.pt (same step, optimiser, EMA and RNG state)."""
    progress: bool = True
    """Show a progress bar (it/s and ETA)."""


def config_to_dict(cfg: Any) -> Dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def model_config_from_dict(d: Dict[str, Any]) -> FactorizedUNetConfig:
    d = dict(d)
    for k in ("channel_mults", "attention_levels"):
        d[k] = tuple(d[k])
    return FactorizedUNetConfig(**d)


def atomic_torch_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".pt", prefix=".tmp-")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def load_for_inference(run_or_ckpt: Path, device: str = "cpu") -> Tuple[FactorizedUNet, DiffusionSchedule, dict]:
    """EMA model, schedule and saved metadata from a run folder or a checkpoint file."""
    path = Path(run_or_ckpt)
    if path.is_dir():
        path = path / EMA_WEIGHTS
    if not path.is_file():
        raise SegDataError(f"no checkpoint at {path}: give a run folder made by 'factorized-seg train' or a .pt file")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    model = model_config_from_dict(ckpt["model_config"]).setup()
    model.load_state_dict(ckpt["ema_model"])
    schedule = DiffusionScheduleConfig(**ckpt["diffusion"]).setup()
    return model.to(device).eval(), schedule, ckpt


def _lr_at(cfg: TrainConfig, step: int) -> float:
    return cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup_steps))


def sample_t(schedule: DiffusionSchedule, batch: int, power: float, gen: torch.Generator) -> Tensor:
    if power == 1.0:
        return schedule.sample_timesteps(batch, generator=gen)
    u = torch.rand(batch, generator=gen)
    return (schedule.num_timesteps * u.pow(power)).long().clamp(0, schedule.num_timesteps - 1)


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
    last_loss: float


def train(cfg: TrainConfig) -> TrainResult:
    """Train (or resume) and return the run folder, the final step and the time spent."""
    rank, world = _dist_info()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    if cfg.batch_size % world:
        raise SegDataError(f"batch_size {cfg.batch_size} must be divisible by the number of processes ({world})")
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
    out_dir = Path(cfg.output_dir)
    ckpt_path = out_dir / CHECKPOINT
    if cfg.resume and not ckpt_path.is_file():
        raise SegDataError(f"--resume: no checkpoint at {ckpt_path}; drop --resume to start a new run")
    if not cfg.resume and ckpt_path.is_file():
        raise SegDataError(f"{out_dir} already holds a run: pass --resume to continue it or pick another --output-dir")

    # 1. data and architecture (everything is checked before anything is written)
    cfg.model.validate()
    files = list_images(resolve_data(cfg.data))
    labels, classes = (read_labels(cfg.labels, files) if cfg.labels is not None else (None, []))
    if cfg.labels is not None and cfg.model.num_classes != len(classes):
        model_cfg = dataclasses.replace(cfg.model, num_classes=len(classes))
    else:
        model_cfg = cfg.model
    if cfg.resolution % model_cfg.downsample_factor:
        raise SegDataError(f"resolution {cfg.resolution} must be divisible by {model_cfg.downsample_factor}")
    images = load_images(files, cfg.resolution, progress=cfg.progress and rank == 0)

    # 2. model, optimiser, EMA
    torch.manual_seed(cfg.seed)
    model = model_cfg.setup().to(device)
    schedule = cfg.diffusion.setup()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    ema = EMAModel(model.parameters(), decay=cfg.ema_decay)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + rank)
    step = 0
    if cfg.resume:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        ema.load_state_dict(ckpt["ema_state"])
        step = int(ckpt["step"])
        gen.set_state(ckpt["rng"][rank] if rank < len(ckpt["rng"]) else ckpt["rng"][0])
    ema.to(device)
    objective = SegObjective(model, schedule, cfg.mask_losses)
    ddp = torch.nn.parallel.DistributedDataParallel(objective) if world > 1 else objective

    writer = None
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter  # imported late: slow, and only rank 0 logs

        atomic_write_text(out_dir / "config.json", json.dumps(
            {**config_to_dict(cfg), "model": config_to_dict(model_cfg), "classes": classes,
             "num_images": len(files)}, indent=2))
        writer = SummaryWriter(str(out_dir / "tensorboard"))
    grid_idx = torch.linspace(0, len(files) - 1, steps=min(8, len(files))).long()

    def snapshot() -> Dict[str, Any]:
        ema_model = copy.deepcopy(model).cpu()
        ema.copy_to(ema_model.parameters())
        return {"model_config": config_to_dict(model_cfg), "diffusion": config_to_dict(cfg.diffusion),
                "resolution": cfg.resolution, "classes": classes, "step": step,
                "ema_model": ema_model.state_dict()}

    def gather_rng() -> list:
        state = gen.get_state()
        if world == 1:
            return [state]
        states = [None] * world
        dist.all_gather_object(states, state)
        return states

    def save_checkpoint() -> None:
        rng = gather_rng()
        if rank != 0:
            return
        snap = snapshot()
        atomic_torch_save(snap, out_dir / EMA_WEIGHTS)
        atomic_torch_save({**snap, "model": model.state_dict(), "optimizer": opt.state_dict(),
                           "ema_state": ema.state_dict(), "rng": rng}, ckpt_path)

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

    # 3. loop
    per_rank = cfg.batch_size // world
    start = time.time()
    last_loss = float("nan")
    bar = tqdm(total=cfg.max_steps, initial=step, desc="train", disable=not (cfg.progress and rank == 0),
               unit="step", dynamic_ncols=True)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.use_bf16 and device.type == "cuda")
    ddp.train()
    stop_flag = torch.zeros(1, device=device)
    while step < cfg.max_steps:
        idx = torch.randint(0, len(files), (per_rank,), generator=gen)
        x0 = to_model_range(images[idx].float().div(255))
        x0 = augment(x0, gen, cfg.augment.flip, cfg.augment.min_crop, cfg.augment.max_shift).to(device)
        lab = labels[idx].to(device) if labels is not None else None
        t = sample_t(schedule, per_rank, cfg.t_power, gen).to(device)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        for g in opt.param_groups:
            g["lr"] = _lr_at(cfg, step)
        with autocast:
            loss, terms = ddp(x0, t, noise, lab, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        ema.step(model.parameters())
        step += 1
        last_loss = float(loss.detach())
        bar.update(1)
        bar.set_postfix(loss=f"{last_loss:.4f}")
        if writer is not None and step % cfg.log_every == 0:
            writer.add_scalar("train/loss", last_loss, step)
            writer.add_scalar("train/lr", _lr_at(cfg, step - 1), step)
            writer.add_scalar("train/images_per_s", (bar.format_dict.get("rate") or 0.0) * per_rank, step)
            for name, value in terms.items():
                writer.add_scalar(name, float(value), step)
        if cfg.sample_every and step % cfg.sample_every == 0 and rank == 0:
            save_grid()
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.max_steps:
            save_checkpoint()
        if cfg.time_budget_s is not None:
            stop_flag.fill_(float(time.time() - start >= cfg.time_budget_s))
            if world > 1:
                dist.all_reduce(stop_flag, op=dist.ReduceOp.MAX)
            if stop_flag.item() > 0:
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
    return TrainResult(run_dir=out_dir, step=step, train_s=train_s, last_loss=last_loss)

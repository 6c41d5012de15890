"""The prepared GPU check of issue 12: one command, at most 8 minutes, nothing installed or downloaded.

    python benchmarks/gpu_check.py                  # a machine with one H100/H200-class GPU
    python benchmarks/gpu_check.py --smoke          # anywhere (CPU): tiny sizes, a few steps, < 2 minutes

Items (each in its own subprocess with a wall-clock limit, so a slow compile, a hang or an out-of-memory error
costs that item only; items that no longer fit the total budget are recorded as not run):
  env                         torch / CUDA / cuDNN versions, the GPU, which of tinycudann, nerfacc, nerfstudio
                              import.
  lifting/<sampler>/<hash>    gen-lifting-gpu steps (candidate scoring + the winner's render, forward + backward,
                              built and timed by benchmarks/sampling_cost.py's helpers) for every sampler name in
                              ``SAMPLERS`` that ``GenLiftingModelConfig.sampler`` accepts, and every hash-grid
                              implementation usable here (``torch``: the index_select lookup; ``tcnn``); records
                              the hash implementation the built model uses. ``occupancy`` (nerfacc's grid) is
                              CUDA-only: on a CPU it is recorded as skipped, with the reason. An item that cannot
                              run here is recorded as skipped with ``why``, never as an error.
  seg/paper64/b<N>/<mode>     factorized-seg ``paper64`` training step (loss, backward, clipping, Adam, EMA; built
                              by benchmarks/seg_step_cost.py) with bf16 autocast and channels_last, batch 64 and 128,
                              eager and torch.compile'd (compile time separate); plus the plain U-Net of the same
                              width at batch 128 (the factorized/plain ratio on a GPU).
  lifting/nerfacc-build       where an occupancy item will run (CUDA): nerfacc's CUDA extension compiled in the
                              background from the end of the env item (NERFACC_BUILD_LIMIT_S, NERFACC_CUB_SHIM);
                              the first occupancy item waits for it; its time and the items it overlapped are
                              recorded. A failed build skips the occupancy items with its error.
  seg/trainer-syncs           the real ``factorized-seg train`` loop under CUDA's sync debug mode: host syncs per
                              step, and the source lines that cause them.
Writes ONE JSON (default benchmarks/results/gpu_check.json, or gpu_check_smoke.json with --smoke): machine, GPU,
versions, commit, command, and per item its numbers or its error. Prints a table.
On a copy of the tree without .git, pass the commit: ``BENCH_COMMIT=<sha> python benchmarks/gpu_check.py``.

The H200 image has torch but not nerfstudio, diffusers, tyro and their import-time needs (``DEVICE_WHEELS``), and
no network. Before the run, on a machine with the package registry, ``python benchmarks/gpu_check.py --wheels``
prints the ``pip download`` command that puts them (this environment's versions, Python 3.12, about 30 MB) into
``.whl/``; ``benchmarks/gpu_check.sh`` installs them from that folder (``--no-index``) and runs the check:

    device run:  carry [".whl"], command "BENCH_COMMIT=<sha> bash benchmarks/gpu_check.sh", timeout 540 s

(the .sh writes the JSON to $OUT/gpu_check.json when $OUT is set; copy it to benchmarks/results/gpu_check.json).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(BENCH))

SAMPLERS = ("uniform", "proposal", "occupancy")
"""Sampler names to try; those GenLiftingModelConfig.sampler does not accept, or that cannot run here, are
recorded as skipped."""
HASHES = ("torch", "tcnn")
DEVICE_WHEELS = ("appdirs", "defusedxml", "diffusers", "dill", "docstring-parser", "gsplat", "msgspec", "nerfacc",
                 "nerfstudio", "pyquaternion", "pysocks", "pytorch-msssim", "rawpy", "roma", "splines", "tensorly",
                 "torch-fidelity", "truststore", "tyro", "viser", "websockets")
"""Distributions that importing factorized_seg, gen_lifting and these benchmarks loads here and that the H200 image
(/work/.library/device/KINDS.md, 2026-11-17) does not have."""
TOTAL_S = 450.0
"""Budget of the whole check (8 minutes minus start-up and margin)."""
NERFACC_BUILD_LIMIT_S = 300.0
"""nerfacc 0.5.2 from PyPI compiles its CUDA extension on first use (minutes). The check builds it in the background
from the end of the env item (MAX_JOBS=5: the GPU items leave the CPU cores idle) and waits for it, at most this
long and never past the budget, before the first occupancy item; the wait counts against the budget."""
NERFACC_CUB_SHIM = """#pragma once
#include <cub/version.cuh>
#if CUB_VERSION >= 300000  /* CUDA 13's CCCL 3 removed cub::Equality, which nerfacc 0.5.2's scan.cu uses */
#include <cuda/std/functional>
namespace cub { using Equality = ::cuda::std::equal_to<>; }
#endif
#include <cmath>
#include <math.h>
#if __cplusplus > 201703L  /* C++20's math.h puts std::lerp in the global namespace: nerfacc's own lerp clashes */
#define lerp nerfacc_lerp
#endif
"""
"""Pre-included into nerfacc's .cu files for this check's build only (``NVCC_APPEND_FLAGS``): the H200 image's nvcc
is 13.0 and torch builds extensions as C++20; nerfacc 0.5.2's sources compile under neither unmodified (seen with
this machine's nvcc 13.0 and torch 2.14: ``cub::Equality`` missing, ``lerp`` redeclared; with this shim its four
.cu files compile for sm_90)."""


# ---------------------------------------------------------------------------------------------------- plan
@dataclasses.dataclass
class Item:
    """One measurement: ``kind`` picks the function, ``args`` its arguments; ``limit_s`` kills its subprocess,
    ``budget_s`` bounds its timed loop; it is not started with less than ``min_s`` of the total budget left."""

    name: str
    kind: str
    args: Dict[str, Any]
    limit_s: float
    budget_s: float
    min_s: float


def plan(smoke: bool, only: Optional[List[str]] = None) -> List[Item]:
    s = 0.25 if smoke else 1.0  # smoke: tiny sizes, shorter budgets
    lift = {"images": 1, "loss_pixels": 32, "score_pixels": 8} if smoke else \
        {"images": 16, "loss_pixels": 1024, "score_pixels": 256}  # gen-lifting-gpu's own batch
    seg_preset = "cpu" if smoke else "paper64"
    batches = (2, 4) if smoke else (64, 128)
    backend = "aot_eager" if smoke else "inductor"  # CPU inductor builds take minutes: smoke checks the path only
    items = [Item("env", "env", {"lifting": True}, 60, 0, 10)]

    def seg(batch: int, mode: str, scheme: str = "factorized", limit: float = 90, budget: float = 15) -> Item:
        return Item(f"seg/{seg_preset}/b{batch}/{mode}" + ("" if scheme == "factorized" else f"/{scheme}"), "seg",
                    {"preset": seg_preset, "batch": batch, "compile": mode == "compiled", "backend": backend,
                     "scheme": scheme, "smoke": smoke},
                    limit * (0.5 if smoke else 1), budget * s, 20 if smoke else (120 if mode == "compiled" else 40))

    def lifting(sampler: str, impl: str) -> Item:
        return Item(f"lifting/{sampler}/{impl}", "lifting", {"sampler": sampler, "impl": impl, **lift,
                                                             "smoke": smoke}, 75, 25 * s, 20 if smoke else 35)

    items += [seg(batches[1], "eager"), seg(batches[1], "compiled", limit=240)]
    # the issue's headline pair first (occupancy vs proposal), so a slow compile above cannot crowd them out
    items += [lifting("proposal", "torch"), lifting("occupancy", "torch"), lifting("uniform", "torch")]
    items += [Item("seg/trainer-syncs", "syncs", {"smoke": smoke}, 90 * (0.5 if smoke else 1), 0,
                   20 if smoke else 40)]
    items += [lifting(smp, impl) for impl in HASHES for smp in SAMPLERS if (smp, impl) not in
              (("proposal", "torch"), ("occupancy", "torch"), ("uniform", "torch"))]
    items += [seg(batches[0], "eager"), seg(batches[1], "eager", scheme="plain"),
              seg(batches[0], "compiled", limit=200)]
    if smoke:  # the cheap seg items first: on a slow CPU the lifting items are the ones left out
        items.sort(key=lambda it: it.kind == "lifting")
    if only:
        items = [it for it in items if it.name == "env" or it.name.startswith(tuple(only))]
    items[0].args["lifting"] = any(it.kind == "lifting" for it in items)  # env probes gen_lifting only if needed
    return items


# ---------------------------------------------------------------------------------------------------- items
def device_name() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed_loop(step: Callable[[], Any], budget_s: float, warmup: int, chunk: int, max_steps: int) -> Dict[str, Any]:
    """``warmup`` untimed steps, then chunks of ``chunk`` steps between device syncs until ``budget_s`` has passed
    or ``max_steps`` were timed. Per-step seconds of every chunk; median and min over chunks."""
    for _ in range(warmup):
        step()
    sync()
    per_step: List[float] = []
    start = time.perf_counter()
    while len(per_step) * chunk < max_steps and (not per_step or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        for _ in range(chunk):
            step()
        sync()
        per_step.append((time.perf_counter() - t0) / chunk)
    med = statistics.median(per_step)
    return {"step_s_median": med, "step_s_min": min(per_step), "steps_per_s": 1.0 / med,
            "timed_steps": len(per_step) * chunk, "chunk": chunk, "warmup_steps": warmup}


def peak_memory() -> Dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        return {}
    return {"peak_memory_gib": torch.cuda.max_memory_allocated() / 2 ** 30}


def run_env(args: Dict[str, Any], budget_s: float) -> Dict[str, Any]:
    import torch

    out: Dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda,
                           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
                           "python": platform.python_version(), "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        out.update(gpu=props.name, gpu_memory_gib=props.total_memory / 2 ** 30,
                   capability=f"{props.major}.{props.minor}")
    imports = {}
    mods = ("tinycudann", "nerfacc", "nerfstudio", "gen_lifting") if args.get("lifting") else ()
    for mod in mods + ("diffusers", "factorized_seg"):
        try:
            m = __import__(mod)
            imports[mod] = f"ok {getattr(m, '__version__', '')}".strip()
        except Exception as err:  # any import failure is the answer here, not a crash
            imports[mod] = f"not importable: {type(err).__name__}: {str(err).strip()[:160]}"
    out["imports"] = imports
    if args.get("lifting"):
        try:
            out["samplers"] = accepted_samplers()
        except Exception as err:  # gen_lifting not importable: every lifting item will say so
            out["samplers_error"] = f"{type(err).__name__}: {str(err).strip()[:160]}"
        else:
            out["sampler_unavailable"] = {name: why for name in SAMPLERS if (why := sampler_unavailable(name))}
        out["tcnn"] = hash_available("tcnn") is None
    return out


def accepted_samplers() -> List[str]:
    """The sampler names ``GenLiftingModelConfig.sampler`` accepts (its Literal type)."""
    import typing

    from gen_lifting.model import GenLiftingModelConfig

    return list(typing.get_args(typing.get_type_hints(GenLiftingModelConfig)["sampler"]))


def sampler_unavailable(sampler: str) -> Optional[str]:
    """None if a sampler GenLiftingModelConfig accepts can run here, else why not (the occupancy grid: CUDA only)."""
    if sampler != "occupancy":
        return None
    from gen_lifting.occupancy import cuda_unavailable_reason

    why = cuda_unavailable_reason(device_name())
    return f"CUDA-only (nerfacc's occupancy-grid sampling): {why}" if why else None


def hash_available(impl: str) -> Optional[str]:
    """None if the hash-grid implementation can run here, else why not."""
    if impl == "torch":
        return None
    from gen_lifting.hash_field import tcnn_available

    return None if tcnn_available() else "tinycudann is not importable here (or no CUDA device)"


def run_lifting(args: Dict[str, Any], budget_s: float) -> Dict[str, Any]:
    """gen-lifting-gpu steps through benchmarks/sampling_cost.py's build_pipeline / time_step."""
    import copy

    import torch

    accepted = accepted_samplers()
    if args["sampler"] not in accepted:
        return {"status": "skipped", "why": f"GenLiftingModelConfig.sampler accepts {', '.join(accepted)}"}
    why = sampler_unavailable(args["sampler"]) or hash_available(args["impl"])
    if why:
        return {"status": "skipped", "why": why}
    import method_configs.gen_lifting as specs
    import sampling_cost

    # build_pipeline reads specs.gen_lifting_gpu: in this (item-only) process, point it at a copy with the hash
    # implementation asked for, on both the field and the proposal networks.
    spec = specs.gen_lifting_gpu
    config = copy.deepcopy(spec.config)
    model = config.pipeline.model
    for part in (model.field, model.proposal):
        if hasattr(part, "implementation"):
            part.implementation = args["impl"]
    specs.gen_lifting_gpu = dataclasses.replace(spec, config=config)
    ns = argparse.Namespace(scene="lego", images=args["images"], loss_pixels=args["loss_pixels"],
                            score_pixels=args["score_pixels"], device=device_name())
    try:
        t0 = time.perf_counter()
        pipe, callbacks = sampling_cost.build_pipeline(args["sampler"], ns)
        build_s = time.perf_counter() - t0
    finally:
        specs.gen_lifting_gpu = spec
    from gen_lifting.hash_field import hash_implementation

    model = pipe.model
    occupancy = getattr(model, "occupancy", None)
    if occupancy is not None:  # step 0: nerfacc's warm-up update estimates every cell of the grid from the field
        sampling_cost.time_step(pipe, callbacks, 0)
    step_no = [10_000]  # past nerfacto's proposal-update warm-up, as sampling_cost.py

    def step() -> None:
        sampling_cost.time_step(pipe, callbacks, step_no[0])
        step_no[0] += 1

    smoke = args["smoke"]
    res = timed_loop(step, budget_s, warmup=1 if smoke else 3, chunk=1 if smoke else 5,
                     max_steps=2 if smoke else 100)
    extra: Dict[str, Any] = {"hash_impl_field": hash_implementation(model.field)}
    if getattr(model, "proposal", None) is not None:
        extra["hash_impl_proposal"] = hash_implementation(model.proposal.networks)
    if occupancy is not None:  # after the timing: how sparse the (untrained field's) grid made the renders
        counts: List[float] = []
        hook = occupancy.register_forward_hook(
            lambda module, inputs, out: counts.append(float(out["num_samples_per_ray"].float().mean())))
        try:
            step()
        finally:
            hook.remove()
        extra.update(grid_occupied_fraction=float(occupancy.grid.binaries.float().mean()),
                     samples_per_ray_winner=counts[-1], samples_per_ray_scoring=statistics.fmean(counts[:-1] or [0]),
                     render_step_size=occupancy.render_step_size)
    try:
        height = int(pipe.datamanager.train_dataset.cameras.height.reshape(-1)[0])
    except (AttributeError, IndexError, TypeError):  # informative only
        height = None
    return {**res, "build_s": build_s, "images_per_step": args["images"],
            "images_per_s": res["steps_per_s"] * args["images"], "loss_pixels": args["loss_pixels"],
            "score_pixels": args["score_pixels"], "view_size": height, "what": "forward + backward (no optimizer)",
            **extra, **peak_memory(), "device": str(pipe.device), "torch_threads": torch.get_num_threads()}


def run_seg(args: Dict[str, Any], budget_s: float) -> Dict[str, Any]:
    """factorized-seg step through benchmarks/seg_step_cost.py's make_step (bf16, channels_last on CUDA)."""
    import torch

    from factorized_seg.presets import PRESETS
    from seg_step_cost import Variant, make_step

    device = torch.device(device_name())
    if device.type == "cuda":  # as the trainer sets them
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    preset = PRESETS[args["preset"]]
    cfg = dataclasses.replace(preset, use_bf16=True, use_channels_last=True, use_compile=args["compile"],
                              compile_backend=args["backend"])
    if args["smoke"]:  # the code path only: a small model at 16 px
        cfg = dataclasses.replace(cfg, resolution=16, model=dataclasses.replace(
            cfg.model, base_channels=8, channel_mults=(1, 2), norm_groups=4, mid_attention=False))
    model = dataclasses.replace(cfg.model, scheme=args["scheme"])
    step = make_step(cfg, Variant(args["scheme"], model), args["batch"], device)
    smoke = args["smoke"]
    res = timed_loop(step, budget_s, warmup=1 if smoke else 5, chunk=1 if smoke else 5,
                     max_steps=2 if smoke else 200)
    loss = float(step())
    return {**res, "compile_s": step.compile_s, "compile_backend": args["backend"] if args["compile"] else None,
            "images_per_s": res["steps_per_s"] * args["batch"], "batch": args["batch"], "resolution": cfg.resolution,
            "num_regions": model.num_regions, "scheme": model.scheme, "bf16": device.type == "cuda",
            "channels_last": True, "params": sum(p.numel() for p in step.model.parameters()), "last_loss": loss,
            **peak_memory()}


def run_nerfacc_build(args: Dict[str, Any], budget_s: float) -> Dict[str, Any]:
    """Build (or load) nerfacc's CUDA extension, through the same check the occupancy sampler makes at setup."""
    t0 = time.perf_counter()
    from gen_lifting.occupancy import nerfacc_extension_problem

    why = nerfacc_extension_problem()
    res = {"build_or_load_s": time.perf_counter() - t0, "max_jobs": os.environ.get("MAX_JOBS"),
           "nvcc_append_flags": os.environ.get("NVCC_APPEND_FLAGS"),
           "extensions_dir": os.environ.get("TORCH_EXTENSIONS_DIR")}
    if why:
        res.update(status="error", error=why)
    return res


def nerfacc_build_env(tmp: Path) -> Dict[str, str]:
    """Environment of the nerfacc build and the occupancy items: the shim, a fresh extensions folder, the CUDA
    headers of the nvidia pip wheels (cuBLAS's are not in every toolkit folder) searched after the toolkit's, and
    CUDA_HOME where torch would guess a folder without CUDA's headers (an nvcc outside the toolkit's bin/)."""
    import shutil
    import site

    shim = tmp / "nerfacc_cub_compat.h"
    shim.write_text(NERFACC_CUB_SHIM)
    env = dict(os.environ, MAX_JOBS=os.environ.get("MAX_JOBS", "5"),
               TORCH_EXTENSIONS_DIR=str(tmp / "torch_extensions"))
    env["NVCC_APPEND_FLAGS"] = f"{os.environ.get('NVCC_APPEND_FLAGS', '')} -include {shim}".strip()
    includes = sorted(str(inc) for root in site.getsitepackages() for inc in Path(root).glob("nvidia/*/include"))
    extra = [os.environ["CPLUS_INCLUDE_PATH"]] if os.environ.get("CPLUS_INCLUDE_PATH") else []
    env["CPLUS_INCLUDE_PATH"] = os.pathsep.join(extra + includes)  # like -isystem, after the command line's
    nvcc = shutil.which("nvcc")
    guessed = Path(nvcc).resolve().parent.parent if nvcc else None
    if (not os.environ.get("CUDA_HOME") and guessed is not None and not (guessed / "include/cuda_runtime.h").exists()
            and Path("/usr/local/cuda/include/cuda_runtime.h").exists()):
        env["CUDA_HOME"] = "/usr/local/cuda"
    return env


def run_syncs(args: Dict[str, Any], budget_s: float) -> Dict[str, Any]:
    """The real trainer loop (cpu preset model, bundled flowers17) under CUDA's sync debug mode."""
    import warnings

    import torch

    from factorized_seg.presets import PRESETS
    from factorized_seg.trainer import train

    smoke = args["smoke"]
    steps, log_every = (3, 2) if smoke else (120, 50)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = dataclasses.replace(PRESETS["cpu"], output_dir=Path(tmp) / "run", max_steps=steps, log_every=log_every,
                                  checkpoint_every=0, sample_every=0, progress=False, use_channels_last=True,
                                  batch_size=4 if smoke else 32)
        if not torch.cuda.is_available():
            result = train(cfg)
            return {"steps": result.step, "train_s": result.train_s,
                    "syncs": "not counted: CUDA's sync debug mode needs a GPU"}
        where: Dict[str, int] = {}

        def record(message, category, filename, lineno, file=None, line=None):
            if "synchroniz" in str(message):
                key = f"{os.path.relpath(filename, REPO)}:{lineno}"
                where[key] = where.get(key, 0) + 1

        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            torch.cuda.set_sync_debug_mode("warn")
            try:
                result = train(cfg)
            finally:
                torch.cuda.set_sync_debug_mode("default")
    total = sum(where.values())
    per_step_lines = {k: v for k, v in where.items() if v >= steps}
    return {"steps": result.step, "log_every": log_every, "train_s": result.train_s, "syncs_total": total,
            "lines_syncing_every_step": per_step_lines,
            "syncs_by_line": dict(sorted(where.items(), key=lambda kv: -kv[1])[:25])}


KINDS = {"env": run_env, "lifting": run_lifting, "seg": run_seg, "syncs": run_syncs, "nerfacc_build": run_nerfacc_build}


def child(spec: str, out: Path) -> None:
    """Run one item (``--item``) and write its result JSON to ``out``."""
    item = json.loads(spec)
    import torch

    torch.manual_seed(0)
    if not torch.cuda.is_available():
        torch.set_num_threads(1)
    t0 = time.perf_counter()
    try:
        res = KINDS[item["kind"]](item["args"], item["budget_s"])
        res.setdefault("status", "ok")
    except Exception as err:  # recorded per item; the check goes on with the next one
        tb = traceback.format_exc().strip().splitlines()
        res = {"status": "error", "error": f"{type(err).__name__}: {str(err).strip()[:400]}",
               "traceback_tail": tb[-8:]}
    res["item_s"] = time.perf_counter() - t0
    out.write_text(json.dumps(res, default=str))


# ---------------------------------------------------------------------------------------------------- parent
def unavailable(item: Item, env: Dict[str, Any]) -> Optional[str]:
    """Why a lifting item cannot run here (from the env item's findings), or None."""
    if item.kind != "lifting" or env.get("status") != "ok":
        return None
    samplers = env.get("samplers")
    if samplers is not None and item.args["sampler"] not in samplers:
        return f"GenLiftingModelConfig.sampler accepts {', '.join(samplers)}"
    if item.args["sampler"] in env.get("sampler_unavailable", {}):
        return env["sampler_unavailable"][item.args["sampler"]]
    if item.args["impl"] == "tcnn" and not env.get("tcnn"):
        return "tinycudann is not importable here (or no CUDA device)"
    return None


class Started:
    """An item's subprocess, started now (in its own process group, so a timeout also ends what it spawned, e.g. a
    compiler); ``finish`` waits for its result."""

    def __init__(self, item: Item, env: Optional[Dict[str, str]] = None) -> None:
        self.tmp = tempfile.TemporaryDirectory()
        self.out = Path(self.tmp.name) / "result.json"
        spec = json.dumps({"kind": item.kind, "args": item.args, "budget_s": item.budget_s})
        cmd = [sys.executable, str(Path(__file__).resolve()), "--item", spec, "--item-out", str(self.out)]
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                                     env=env, start_new_session=True)

    def finish(self, limit_s: float) -> Dict[str, Any]:
        try:
            try:
                stdout, stderr = self.proc.communicate(timeout=max(limit_s - (time.perf_counter() - self.t0), 0.1))
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.communicate()
                return {"status": "timeout", "error": f"killed after its {limit_s:.0f} s limit",
                        "item_s": time.perf_counter() - self.t0}
            if self.out.is_file():
                return json.loads(self.out.read_text())
            tail = (stderr or stdout).strip().splitlines()[-6:]
            return {"status": "error", "error": f"exit code {self.proc.returncode} without a result",
                    "stderr_tail": tail, "item_s": time.perf_counter() - self.t0}
        finally:
            self.tmp.cleanup()


def run_item(item: Item, limit_s: float, env: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    return Started(item, env).finish(limit_s)


BUILD_NAME = "lifting/nerfacc-build"


def is_occupancy(item: Item) -> bool:
    return item.kind == "lifting" and item.args["sampler"] == "occupancy"


def wheels_command() -> str:
    """``pip download`` of DEVICE_WHEELS at this environment's versions, for the device's Python 3.12."""
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for name in DEVICE_WHEELS:
        try:
            pins.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            pins.append(name)
    platforms = " ".join(f"--platform {p}" for p in ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64",
                                                      "manylinux_2_17_x86_64", "manylinux2014_x86_64",
                                                      "manylinux1_x86_64"))
    return (f"{sys.executable} -m pip download --no-deps --only-binary=:all: --python-version 3.12 "
            f"--implementation cp {platforms} -d .whl {' '.join(pins)}")


def fmt(v: Any, spec: str) -> str:
    return format(v, spec) if isinstance(v, (int, float)) else "-"


def print_table(items: Dict[str, Dict[str, Any]]) -> None:
    print(f"\n{'item':34s} {'status':13s} {'steps/s':>8s} {'images/s':>9s} {'compile s':>9s} {'item s':>7s}  note")
    for name, r in items.items():
        if name == "env":
            continue
        note = r.get("why") or r.get("error") or ""
        if name == "seg/trainer-syncs" and r.get("status") == "ok":
            note = (f"{r.get('syncs_total', r.get('syncs'))} syncs in {r.get('steps')} steps; every step: "
                    f"{r.get('lines_syncing_every_step', '-')}")
        print(f"{name:34s} {r.get('status', '?'):13s} {fmt(r.get('steps_per_s'), '8.2f')} "
              f"{fmt(r.get('images_per_s'), '9.1f')} {fmt(r.get('compile_s'), '9.1f')} "
              f"{fmt(r.get('item_s'), '7.1f')}  {str(note)[:110]}")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes and a few steps (CPU, < 2 minutes)")
    parser.add_argument("--only", nargs="+", default=None, help="only items whose names start with one of these "
                        "(env always runs)")
    parser.add_argument("--total-s", type=float, default=None, help=f"budget of the whole check (default {TOTAL_S:.0f}"
                        " s; 115 s with --smoke)")
    parser.add_argument("--out", type=Path, default=None, help="result JSON (default benchmarks/results/"
                        "gpu_check.json, gpu_check_smoke.json with --smoke)")
    parser.add_argument("--wheels", action="store_true", help="print the pip download command that prepares .whl/ "
                        "for the GPU machine, and exit")
    parser.add_argument("--item", help=argparse.SUPPRESS)
    parser.add_argument("--item-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.item:
        child(args.item, args.item_out)
        return 0
    if args.wheels:
        print(wheels_command())
        return 0
    from lifting import git_commit, write_result  # one result format for every benchmark

    total = args.total_s or (115.0 if args.smoke else TOTAL_S)
    out = args.out or BENCH / "results" / ("gpu_check_smoke.json" if args.smoke else "gpu_check.json")
    commit = git_commit() or "unknown (no .git here: set BENCH_COMMIT=<commit>)"
    start = time.perf_counter()
    results: Dict[str, Dict[str, Any]] = {}
    items = plan(args.smoke, args.only)
    build_tmp = tempfile.TemporaryDirectory()
    build_env = nerfacc_build_env(Path(build_tmp.name))
    build: Optional[Started] = None  # nerfacc's extension, built in the background (NERFACC_BUILD_LIMIT_S)
    build_since, during_build = 0.0, []
    for item in items:
        left = total - (time.perf_counter() - start)
        why = unavailable(item, results.get("env", {}))
        if not why and is_occupancy(item) and build is not None:  # its kernels first
            if BUILD_NAME not in results:
                results[BUILD_NAME] = {**build.finish(min(NERFACC_BUILD_LIMIT_S, left)),
                                       "started_at_s": build_since, "ran_during": during_build}
                left = total - (time.perf_counter() - start)
                r = results[BUILD_NAME]
                print(f"[{time.perf_counter() - start:5.0f} s] {BUILD_NAME}: {r.get('status')} "
                      f"{fmt(r.get('build_or_load_s'), '.0f')} s {r.get('error') or ''}", flush=True)
            if results[BUILD_NAME].get("status") != "ok":
                why = f"nerfacc's CUDA extension: {results[BUILD_NAME].get('error')}"
        if why:
            results[item.name] = {"status": "skipped", "why": why}
            continue
        if left < item.min_s:
            results[item.name] = {"status": "not run", "why": f"{left:.0f} s of the {total:.0f} s budget left"}
            continue
        if build is not None and BUILD_NAME not in results:
            during_build.append(item.name)
        results[item.name] = run_item(item, min(item.limit_s, left), build_env if is_occupancy(item) else None)
        r = results[item.name]
        print(f"[{time.perf_counter() - start:5.0f} s] {item.name}: {r.get('status')} "
              f"{fmt(r.get('steps_per_s'), '.2f')} steps/s {r.get('why') or r.get('error') or ''}", flush=True)
        if item.name == "env" and any(is_occupancy(it) and not unavailable(it, r) for it in items):
            build_since = time.perf_counter() - start
            build = Started(Item(BUILD_NAME, "nerfacc_build", {}, NERFACC_BUILD_LIMIT_S, 0, 0), build_env)
    if build is not None and BUILD_NAME not in results:  # no occupancy item was reached: end it
        ended = build.finish(0)
        results[BUILD_NAME] = {**ended, "status": ended["status"] if ended["status"] == "ok" else "not run",
                               "why": "no occupancy item was reached; the background build was ended",
                               "started_at_s": build_since, "ran_during": during_build}
    build_tmp.cleanup()
    env = results.get("env", {})
    print_table(results)
    write_result(out, commit, gpu=env.get("gpu", "none"), torch=env.get("torch"),
                 cuda=env.get("cuda"), cudnn=env.get("cudnn"), smoke=args.smoke, total_budget_s=total,
                 wall_s=time.perf_counter() - start, items=results)
    return 0


if __name__ == "__main__":
    sys.exit(main())

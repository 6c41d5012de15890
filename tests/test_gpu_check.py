"""benchmarks/gpu_check.py: its --smoke run on the CPU (the seg items, and one lifting item: under a minute here),
per-item limits, and items this machine cannot run recorded as such instead of crashing the check."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import gpu_check  # noqa: E402


def smoke(tmp_path: Path, *only: str) -> dict:
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, str(BENCH / "gpu_check.py"), "--smoke", "--only", *only, "--out", str(out)],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "steps/s" in proc.stdout  # the table
    result = json.loads(out.read_text())
    assert result["smoke"] is True and result["commit"] and result["machine"]
    assert result["items"]["env"]["status"] == "ok"
    return result


def test_smoke_seg_items(tmp_path):
    """One batch size (the other only changes a number) and the trainer-loop item."""
    items = smoke(tmp_path, "seg/cpu/b4/", "seg/trainer-syncs")["items"]
    seg = {k: v for k, v in items.items() if k.startswith("seg/") and k != "seg/trainer-syncs"}
    assert set(seg) == {"seg/cpu/b4/eager", "seg/cpu/b4/compiled", "seg/cpu/b4/eager/plain"}
    for name, r in seg.items():
        assert r["status"] == "ok", (name, r)
        assert r["steps_per_s"] > 0 and r["images_per_s"] == pytest.approx(r["steps_per_s"] * r["batch"])
        assert (r["compile_s"] > 0) == name.endswith("compiled"), (name, r["compile_s"])
    assert seg["seg/cpu/b4/eager/plain"]["scheme"] == "plain"
    syncs = items["seg/trainer-syncs"]
    assert syncs["status"] == "ok" and syncs["steps"] == 3, syncs


def test_smoke_lifting_uniform_item(tmp_path):
    """The uniform item runs and records the hash implementation it used; the CUDA-only occupancy sampler is
    recorded as skipped with the reason where there is no CUDA."""
    result = smoke(tmp_path, "lifting/uniform/torch", "lifting/occupancy/torch")
    items = result["items"]
    assert {"uniform", "proposal", "occupancy"} <= set(items["env"]["samplers"])
    r = items["lifting/uniform/torch"]
    assert r["status"] == "ok", r
    assert r["steps_per_s"] > 0 and r["build_s"] > 0 and r["images_per_step"] == 1
    assert r["hash_impl_field"] == "torch-index-select"
    occ = items["lifting/occupancy/torch"]
    if torch.cuda.is_available():
        assert occ["status"] == "ok" and occ["samples_per_ray_winner"] > 0, occ
    else:
        assert occ["status"] == "skipped" and "CUDA" in occ["why"], occ


def test_items_that_cannot_run_are_recorded_not_run():
    env = {"status": "ok", "samplers": ["uniform", "proposal"], "tcnn": False}
    by_name = {it.name: it for it in gpu_check.plan(smoke=False)}
    assert gpu_check.unavailable(by_name["lifting/occupancy/torch"], env).startswith("GenLiftingModelConfig.sampler")
    assert "tinycudann" in gpu_check.unavailable(by_name["lifting/proposal/tcnn"], env)
    assert gpu_check.unavailable(by_name["lifting/proposal/torch"], env) is None
    assert gpu_check.unavailable(by_name["seg/paper64/b128/eager"], env) is None
    cpu_env = {**env, "samplers": ["uniform", "proposal", "occupancy"],
               "sampler_unavailable": {"occupancy": "CUDA-only (nerfacc's occupancy-grid sampling): no CUDA device"}}
    assert "CUDA-only" in gpu_check.unavailable(by_name["lifting/occupancy/torch"], cpu_env)
    assert gpu_check.unavailable(by_name["lifting/uniform/torch"], cpu_env) is None


def test_occupancy_reason_comes_from_the_sampler_itself():
    reason = gpu_check.sampler_unavailable("occupancy")
    assert (reason is None) == torch.cuda.is_available()
    assert gpu_check.sampler_unavailable("proposal") is None


def test_full_plan_fits_eight_minutes():
    items = gpu_check.plan(smoke=False)
    assert gpu_check.TOTAL_S <= 8 * 60 - 30
    assert {"seg/paper64/b64/eager", "seg/paper64/b64/compiled", "seg/paper64/b128/eager",
            "seg/paper64/b128/compiled"} <= {it.name for it in items}
    assert all(it.budget_s < it.limit_s for it in items if it.budget_s)
    names = [it.name for it in items]  # the occupancy/proposal pair runs before the optional items
    assert names.index("lifting/occupancy/torch") < names.index("seg/trainer-syncs") < names.index(
        "seg/paper64/b64/eager")


def test_an_item_over_its_limit_is_killed_and_recorded():
    item = gpu_check.Item("env", "env", {}, limit_s=0.5, budget_s=0, min_s=0)
    r = gpu_check.run_item(item, limit_s=0.5)
    assert r["status"] == "timeout" and "limit" in r["error"], r


@pytest.mark.parametrize("build_status", ["error", "ok"])
def test_occupancy_items_wait_for_the_nerfacc_build(tmp_path, monkeypatch, build_status):
    """The control flow of a CUDA run, with the items' subprocesses replaced: the build starts after env, the first
    occupancy item waits for it and runs in the build's environment; a failed build skips the occupancy items with
    its error."""
    ran, started = [], []

    def fake_run_item(item, limit_s, env=None):
        ran.append((item.name, env is not None))
        if item.name == "env":
            return {"status": "ok", "cuda_available": True, "samplers": ["uniform", "proposal", "occupancy"],
                    "sampler_unavailable": {}, "tcnn": False}
        return {"status": "ok", "steps_per_s": 1.0}

    class FakeBuild:
        def __init__(self, item, env):
            started.append((item.name, list(ran), env["NVCC_APPEND_FLAGS"]))

        def finish(self, limit_s):
            return {"status": build_status, **({"error": "nvcc failed"} if build_status == "error" else {})}

    monkeypatch.setattr(gpu_check, "run_item", fake_run_item)
    monkeypatch.setattr(gpu_check, "Started", FakeBuild)
    out = tmp_path / "r.json"
    assert gpu_check.main(["--only", "lifting/", "--out", str(out)]) == 0
    items = json.loads(out.read_text())["items"]
    assert started and started[0][0] == gpu_check.BUILD_NAME and started[0][1] == [("env", False)]
    assert "-include" in started[0][2]
    assert items[gpu_check.BUILD_NAME]["status"] == build_status
    assert items[gpu_check.BUILD_NAME]["ran_during"] == ["lifting/proposal/torch"]
    assert items["lifting/uniform/torch"]["status"] == "ok"
    if build_status == "ok":
        assert ("lifting/occupancy/torch", True) in ran and items["lifting/occupancy/torch"]["status"] == "ok"
        return
    occ = items["lifting/occupancy/torch"]
    assert occ["status"] == "skipped" and "nvcc failed" in occ["why"], occ
    assert items["lifting/occupancy/tcnn"]["status"] == "skipped"  # (tinycudann is absent in this fake env)
    assert ("lifting/occupancy/torch", True) not in ran


def test_nerfacc_build_env_has_the_shim(tmp_path):
    env = gpu_check.nerfacc_build_env(tmp_path)
    shim = tmp_path / "nerfacc_cub_compat.h"
    assert f"-include {shim}" in env["NVCC_APPEND_FLAGS"] and env["TORCH_EXTENSIONS_DIR"].startswith(str(tmp_path))
    text = shim.read_text()
    assert "namespace cub { using Equality" in text and "#define lerp nerfacc_lerp" in text
    assert "CPLUS_INCLUDE_PATH" in env and "CPATH" not in set(env) - set(os.environ)

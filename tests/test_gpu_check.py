"""benchmarks/gpu_check.py: its --smoke run on the CPU (the seg items, and one lifting item: under a minute here),
per-item limits, and items this machine cannot run recorded as such instead of crashing the check."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

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
    result = smoke(tmp_path, "lifting/uniform/torch")
    items = result["items"]
    assert "uniform" in items["env"]["samplers"]
    r = items["lifting/uniform/torch"]
    assert r["status"] == "ok", r
    assert r["steps_per_s"] > 0 and r["build_s"] > 0 and r["images_per_step"] == 1


def test_items_that_cannot_run_are_recorded_not_run():
    env = {"status": "ok", "samplers": ["uniform", "proposal"], "tcnn": False}
    by_name = {it.name: it for it in gpu_check.plan(smoke=False)}
    assert gpu_check.unavailable(by_name["lifting/occupancy/torch"], env).startswith("GenLiftingModelConfig.sampler")
    assert "tinycudann" in gpu_check.unavailable(by_name["lifting/proposal/tcnn"], env)
    assert gpu_check.unavailable(by_name["lifting/proposal/torch"], env) is None
    assert gpu_check.unavailable(by_name["seg/paper64/b128/eager"], env) is None


def test_full_plan_fits_eight_minutes():
    items = gpu_check.plan(smoke=False)
    assert gpu_check.TOTAL_S <= 8 * 60 - 30
    assert {"seg/paper64/b64/eager", "seg/paper64/b64/compiled", "seg/paper64/b128/eager",
            "seg/paper64/b128/compiled"} <= {it.name for it in items}
    assert all(it.budget_s < it.limit_s for it in items if it.budget_s)


def test_an_item_over_its_limit_is_killed_and_recorded():
    item = gpu_check.Item("env", "env", {}, limit_s=0.5, budget_s=0, min_s=0)
    r = gpu_check.run_item(item, limit_s=0.5)
    assert r["status"] == "timeout" and "limit" in r["error"], r

"""Markdown table of gen-lifting benchmark results (README), from benchmarks/results/lifting*.json.

    python benchmarks/lifting_table.py benchmarks/results/lifting.json benchmarks/results/lifting_*.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def main(paths: list[str]) -> None:
    print("| scene | method | overrides, seed | result file @ commit | steps | PSNR | SSIM | LPIPS | rot. err. median (deg) | within 15 deg |")
    print("| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for path in paths:
        data = json.loads(Path(path).read_text())
        words = data["command"].split()
        sets = words[words.index("--set") + 1 :] if "--set" in words else []
        sets = [w.rsplit(".", 1)[-1] for w in sets if "=" in w]
        note = ", ".join(sets + [f"seed {data.get('seed', 0)}"])
        for scene, rows in data["scenes"].items():
            for method, m in rows.items():
                print(f"| {scene} | {method} | {note} | {Path(path).name} @ {data['commit']} | {int(m['steps'])} | "
                      f"{m['psnr']:.2f} | {m['ssim']:.3f} | {m['lpips']:.3f} | "
                      f"{fmt(m.get('rot_err_median_deg'), '.1f')} | {fmt(m.get('within_15deg'), '.2f')} |")


if __name__ == "__main__":
    main(sys.argv[1:])

"""Markdown tables of gen-lifting benchmark results (README), from benchmarks/results/lifting*.json.

    python benchmarks/lifting_table.py benchmarks/results/lifting.json benchmarks/results/lifting_*.json
    python benchmarks/lifting_table.py --by-seed benchmarks/results/lifting_3seed_*.json
    python benchmarks/lifting_table.py --colmap benchmarks/results/lifting_colmap.json

The first form prints one row per file, scene and method. ``--by-seed`` groups the rows by scene, method and
overrides and prints, per group, the seeds it holds, the value of every seed and the mean over seeds.
``--colmap`` prints the COLMAP baseline's rows (registered views, share of all training views within 15 deg,
median error of the registered ones, wall time). Values a method does not have (COLMAP's PSNR) show as '-'.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Dict, Iterator, List, Tuple


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def rows(paths: List[str]) -> Iterator[Tuple[str, str, str, int, str, Dict]]:
    """(scene, method, overrides, seed, file @ commit, metrics) for every result in the files."""
    for path in paths:
        data = json.loads(Path(path).read_text())
        words = data["command"].split()
        sets = words[words.index("--set") + 1 :] if "--set" in words else []
        sets = [w.partition("=")[0].rsplit(".", 1)[-1] + "=" + w.partition("=")[2] for w in sets if "=" in w]
        for scene, methods in data["scenes"].items():
            for method, m in methods.items():
                own = sets
                if method == "gen-lifting-ae":  # the clean-image model never reads the noise settings
                    own = [s for s in sets if not s.startswith("noise_warmup_steps=")]
                yield scene, method, ", ".join(own), data.get("seed", 0), f"{Path(path).name} @ {data['commit']}", m


def per_file(paths: List[str]) -> None:
    print("| scene | method | overrides, seed | result file @ commit | steps | PSNR | SSIM | LPIPS "
          "| rot. err. median (deg), train / held-out | within 15 deg, train / held-out |")
    print("| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for scene, method, sets, seed, source, m in rows(paths):
        note = ", ".join(([sets] if sets else []) + [f"seed {seed}"])
        print(f"| {scene} | {method} | {note} | {source} | {fmt(m.get('steps'), '.0f')} | "
              f"{fmt(m.get('psnr'), '.2f')} | {fmt(m.get('ssim'), '.3f')} | {fmt(m.get('lpips'), '.3f')} | "
              f"{pair(m, 'rot_err_median_deg', '.1f')} | {pair(m, 'within_15deg', '.2f')} |")


def pair(m: Dict, key: str, spec: str) -> str:
    """'train / held-out' for a pose metric; files written before held-out pose errors existed show '-' for it."""
    if m.get(key) is None:
        return "-"
    return f"{fmt(m.get(key), spec)} / {fmt(m.get('test_' + key), spec)}"


def by_seed(paths: List[str]) -> None:
    groups: Dict[Tuple[str, str, str], List[Tuple[int, Dict]]] = defaultdict(list)
    for scene, method, sets, seed, _, m in rows(paths):
        groups[(scene, method, sets)].append((seed, m))

    def cell(items: List[Tuple[int, Dict]], key: str, spec: str) -> str:
        values = [m.get(key) for _, m in items]
        if any(v is None for v in values):
            return "-"
        return " / ".join(format(v, spec) for v in values) + f" (mean {format(statistics.fmean(values), spec)})"

    print("| scene | method | overrides | seeds | rot. err. median (deg) | held-out rot. err. median (deg) "
          "| within 15 deg | PSNR | steps |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for (scene, method, sets), items in groups.items():
        items.sort(key=lambda item: item[0])
        seeds = ", ".join(str(seed) for seed, _ in items)
        print(f"| {scene} | {method} | {sets or '-'} | {seeds} | {cell(items, 'rot_err_median_deg', '.1f')} | "
              f"{cell(items, 'test_rot_err_median_deg', '.1f')} | {cell(items, 'within_15deg', '.2f')} | "
              f"{cell(items, 'psnr', '.2f')} | {cell(items, 'steps', '.0f')} |")


def colmap(paths: List[str]) -> None:
    print("| scene | px | registered | within 15 deg (all views) | rot. err. median (deg, registered) | seconds "
          "| result file @ commit |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for scene, method, _, seed, source, m in rows(paths):
        if "registered" not in m:
            continue
        px = max(m["image_width"], m["image_height"])
        print(f"| {scene} | {px} | {m['registered']}/{m['num_views']} | {m['within_15deg']:.2f} | "
              f"{fmt(m['rot_err_median_deg'], '.2f')} | {m['train_s']:.1f} | {source}, seed {seed} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", help="result JSON files of benchmarks/lifting.py")
    parser.add_argument("--by-seed", action="store_true", help="one row per scene/method/overrides over seeds")
    parser.add_argument("--colmap", action="store_true", help="the COLMAP baseline's rows")
    args = parser.parse_args()
    (colmap if args.colmap else by_seed if args.by_seed else per_file)(args.files)


if __name__ == "__main__":
    main()

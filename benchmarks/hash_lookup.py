"""Speed of the pure-torch hash-grid lookup: nerfstudio's ``table[idx]`` vs ``index_select`` (gen_lifting.hash_field).

    python benchmarks/hash_lookup.py --points 200000 --repeats 5

Forward + backward of one 16-level HashEncoding (2^19 entries per level) on the same random points, both
variants timed alternately in the same run (median of ``--repeats`` after a warm-up). Prints a table and writes
JSON with machine, command and commit. On a GPU machine it times CUDA too.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lifting import git_commit, write_result  # noqa: E402  (same result format as the lifting benchmark)


def time_variant(enc, x: torch.Tensor) -> float:
    if x.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    enc(x).square().sum().backward()
    if x.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    from nerfstudio.field_components.encodings import HashEncoding

    from gen_lifting.hash_field import IndexSelectHashEncoding

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", type=int, default=200_000, help="points per forward + backward")
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions per variant")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "hash_lookup.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    commit = git_commit()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = {}
    for device in devices:
        torch.manual_seed(0)
        ref = HashEncoding(num_levels=16, min_res=16, max_res=1024, log2_hashmap_size=19,
                           implementation="torch").to(device)
        fast = HashEncoding(num_levels=16, min_res=16, max_res=1024, log2_hashmap_size=19,
                            implementation="torch").to(device)
        fast.__class__ = IndexSelectHashEncoding
        x = torch.rand(args.points, 3, device=device)
        times = {"table[idx] (nerfstudio)": [], "index_select": []}
        for enc in (ref, fast):  # warm-up
            time_variant(enc, x)
        for _ in range(args.repeats):
            times["table[idx] (nerfstudio)"].append(time_variant(ref, x))
            times["index_select"].append(time_variant(fast, x))
        med = {k: statistics.median(v) for k, v in times.items()}
        rows[device] = {"median_s": med, "speedup": med["table[idx] (nerfstudio)"] / med["index_select"]}
    print(f"{'device':6s} {'table[idx] s':>13s} {'index_select s':>15s} {'speed-up':>9s}")
    for device, r in rows.items():
        m = r["median_s"]
        print(f"{device:6s} {m['table[idx] (nerfstudio)']:13.3f} {m['index_select']:15.3f} {r['speedup']:8.2f}x")
    write_result(args.out, commit, points=args.points, repeats=args.repeats, results=rows)


if __name__ == "__main__":
    main()

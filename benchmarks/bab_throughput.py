"""Domains per second of the ReLU-split branch and bound (beta-CROWN) on one VNN-COMP instance.

Runs ``verify`` on a benchmark instance for a fixed time and prints how many domains the search
bounded, with and without the interval refinement of each batch of children
(``SplitOptions.refine_rows``; 0 turns it off). An instance that no setting proves within the time
(the default, mnist_fc 256x4 prop_8_0.03, unsat) measures throughput alone:

    OMP_NUM_THREADS=1 python benchmarks/bab_throughput.py --seconds 90

The setting is applied by wrapping ``relu_split.split_search``, so the script also measures an
older revision: ``PYTHONPATH=<checkout>/src python benchmarks/bab_throughput.py``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2] / "shared" / "benchmarks"


def run(onnx: Path, vnnlib: Path, seconds: float, refine_rows: int) -> dict:
    """The verdict and the search's statistics after ``seconds`` (loading included)."""
    from boundprop.bab import relu_split
    from boundprop.bab.verifier import verify

    original = relu_split.split_search

    def with_setting(bounder, root, deadline, opts, *args, **kwargs):
        opts.refine_rows = refine_rows
        return original(bounder, root, deadline, opts, *args, **kwargs)

    relu_split.split_search = with_setting
    try:
        start = time.perf_counter()
        result = verify(onnx, vnnlib, timeout=seconds)
        wall = time.perf_counter() - start
    finally:
        relu_split.split_search = original
    stats = result.stats
    search_s = wall - stats.get("relu_split_root_s", 0.0)
    return {"verdict": result.verdict, "wall_s": wall, "domains": stats.get("relu_split_domains", 0),
            "steps": stats.get("relu_split_steps", 0), "search_s": search_s}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--benchmark", default="mnist_fc")
    p.add_argument("--onnx", default="onnx/mnist-net_256x4.onnx")
    p.add_argument("--vnnlib", default="vnnlib/prop_8_0.03.vnnlib")
    p.add_argument("--seconds", type=float, default=90.0)
    p.add_argument("--refine-rows", type=int, nargs="+", default=[16384, 0], help="settings to run, in turn")
    p.add_argument("--root", type=Path, default=ROOT)
    args = p.parse_args()
    torch.set_num_threads(1)
    folder = args.root / args.benchmark
    print(f"{args.benchmark} {args.onnx} {args.vnnlib}, {args.seconds:.0f} s per run, torch {torch.__version__}")
    print("| refine_rows | verdict | domains | steps | search (s) | domains/s |")
    print("|---:|---|---:|---:|---:|---:|")
    for rows in args.refine_rows:
        r = run(folder / args.onnx, folder / args.vnnlib, args.seconds, rows)
        rate = r["domains"] / max(r["search_s"], 1e-9)
        print(f"| {rows} | {r['verdict']} | {r['domains']} | {r['steps']} | {r['search_s']:.1f} | {rate:.0f} |",
              flush=True)


if __name__ == "__main__":
    main()

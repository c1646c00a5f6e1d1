"""Before/after of a whole change: the cost of a bound call with the code of a git revision against the
working tree, each in fresh processes, alternating.

``paired_ab.py`` compares settings of one code base in one process; a change to code paths (not to a
module constant) needs two code bases. This script checks the revision out into a temporary
worktree and runs, for each round, one process on each side in ABBA order. Each process keeps freed
memory (as the ``boundprop`` command does), warms up, and then times calls for ``--seconds``, each
right after its own burst of forward passes (as ``peer_compare.py`` does); it reports the median
cost in forwards. The result is each side's costs, the per-round ratios and their median.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/revision_ab.py 2412ae8 resnet_small 1 CROWN-IBP --rounds 4
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: What one process runs: argv = source root, model, batch, method, seconds. Prints the median cost.
_MEASURE = """
import statistics, sys, time
sys.path.insert(0, sys.argv[1] + "/src")
sys.path.insert(0, {benchmarks!r})
import torch
import boundprop
from boundprop import PerturbationLpNorm, compute_bounds
from boundprop.runtime import keep_freed_memory
from peer_compare import forward_burst, load
assert boundprop.__file__.startswith(sys.argv[1]), boundprop.__file__
torch.set_num_threads(1)
keep_freed_memory()
model, data = load(sys.argv[2], int(sys.argv[3]))
x = data["x"]
graph = boundprop.capture(model, x)
ptb = {{graph.inputs[0]: PerturbationLpNorm(data["eps"])}}
costs = []
with torch.no_grad():
    for _ in range(3):
        compute_bounds(graph, (x,), ptb, method=sys.argv[4])
    end = time.perf_counter() + float(sys.argv[5])
    while time.perf_counter() < end or len(costs) < 3:
        unit, _ = forward_burst(model, x)
        start = time.perf_counter()
        compute_bounds(graph, (x,), ptb, method=sys.argv[4])
        costs.append((time.perf_counter() - start) / unit)
print(statistics.median(costs))
"""


def measure(source: Path, args: argparse.Namespace) -> float:
    code = _MEASURE.format(benchmarks=str(ROOT / "benchmarks"))
    out = subprocess.run([sys.executable, "-c", code, str(source), args.model, str(args.batch), args.method,
                          str(args.seconds)], check=True, capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("revision", help="the 'before' side (the 'after' side is the working tree)")
    parser.add_argument("model")
    parser.add_argument("batch", type=int)
    parser.add_argument("method")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=4.0, help="timed calls per process")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        before = Path(tmp) / "before"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(before), args.revision],
                       check=True)
        try:
            costs: dict[str, list[float]] = {"before": [], "after": []}
            for i in range(args.rounds):
                for side in ("before", "after") if i % 2 == 0 else ("after", "before"):
                    costs[side].append(measure(before if side == "before" else ROOT, args))
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(before)], check=True)
    ratios = [a / b for a, b in zip(costs["after"], costs["before"])]
    print(f"{args.model} batch {args.batch} {args.method}, {args.rounds} rounds against {args.revision}: "
          f"before {', '.join(f'{c:.2f}' for c in costs['before'])} forwards; "
          f"after {', '.join(f'{c:.2f}' for c in costs['after'])}; "
          f"after / before per round {', '.join(f'{r:.3f}' for r in ratios)}, median {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()

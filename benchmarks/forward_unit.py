"""The forward-pass unit of ``peer_compare.py`` under the C library's allocator regimes.

``peer_compare.py`` divides every call's time by the time of one plain forward pass. That pass is
not a fixed quantity on Linux: glibc's ``malloc`` serves blocks above its *mmap threshold* (128
KiB at start) with fresh pages, one page fault per 4 KiB, and raises the threshold only after a
larger block has been freed. So a forward pass with large activations runs in one of two regimes
depending on what the process did before. This script times the forward pass of each peer model,
in a fresh interpreter per case, on one thread, in three regimes:

* ``fresh``: glibc's defaults, timed right after loading the model (nothing large freed yet);
* ``after a call``: glibc's defaults, timed after one CROWN-IBP call (as ``peer_compare.py
  --malloc default`` times it);
* ``kept``: after :func:`boundprop.runtime.keep_freed_memory` (as ``peer_compare.py`` times it);

with the page faults per pass, next to auto_LiRPA's forward time from its own run.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/forward_unit.py
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from results_file import write_result

RESULTS = Path(__file__).parent / "results" / "forward_unit.md"
PEER = Path("/work/shared/peer")
REGIMES = ("fresh", "after a call", "kept")


def child(model_name: str, batch: int, regime: str, reps: int) -> dict:
    import torch

    torch.set_num_threads(1)
    if regime == "kept":
        from boundprop.runtime import keep_freed_memory

        assert keep_freed_memory()
    sys.path.insert(0, str(Path(__file__).parent))
    from peer_compare import load  # noqa: PLC0415

    model, data = load(model_name, batch)
    x = data["x"]
    with torch.no_grad():
        if regime == "after a call":
            import boundprop  # noqa: PLC0415

            graph = boundprop.capture(model, x)
            boundprop.compute_bounds(graph, (x,), {graph.inputs[0]: boundprop.PerturbationLpNorm(data["eps"])},
                                     method="CROWN-IBP")
        model(x)
        times, faults = [], []
        for _ in range(reps):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    times.sort()
    faults.sort()
    return {"ms": times[len(times) // 2] * 1e3, "faults": faults[len(faults) // 2]}


def measure(model_name: str, batch: int, regime: str, reps: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("BOUNDPROP_MALLOC", None)
    out = subprocess.run([sys.executable, __file__, "--child", model_name, str(batch), regime, str(reps)],
                         env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        name, batch, regime, reps = args.child
        print(json.dumps(child(name, int(batch), regime, int(reps))))
        return
    with open(PEER / "results.csv") as f:
        peer = {(r["model"], int(r["batch"])): float(r["forward_s"]) * 1e3 for r in csv.DictReader(f)}
    header = ("| model | batch | auto_LiRPA's (ms, its run) | "
              + " | ".join(f"{r} (ms) | faults per pass ({r})" for r in REGIMES) + " |")
    lines = [header, "|---|---:|---:|" + "---:|---:|" * len(REGIMES)]
    print(header, flush=True)
    for name, batch in sorted(peer, key=lambda k: (["mlp", "cnn", "resnet_small"].index(k[0]), k[1])):
        cells = [f"{peer[name, batch]:.3f}"]
        for regime in REGIMES:
            r = measure(name, batch, regime, args.reps)
            cells += [f"{r['ms']:.3f}", str(r["faults"])]
        lines.append(f"| {name} | {batch} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    text = ("# The forward-pass unit under glibc's allocator regimes\n\n" + "\n".join(lines)
            + "\n\nMedian of " + str(args.reps) + " plain forward passes per case, one thread, a fresh interpreter "
            "per case; faults: median minor page faults per pass. Command: "
            "`OMP_NUM_THREADS=1 .venv/bin/python benchmarks/forward_unit.py`.\n")
    write_result(args.out, text)


if __name__ == "__main__":
    main()

"""Peak resident memory of CROWN at batch 32: patches against dense one-hot specs (``conv_mode="matrix"``).

Each configuration runs in a fresh Python subprocess (so that peaks do not carry over): it builds
the model, captures it, measures the baseline peak RSS (``resource.getrusage(RUSAGE_SELF).ru_maxrss``)
after one plain forward pass, runs one CROWN call under ``torch.no_grad()`` and reports the new peak,
the call's wall and CPU time and the mean bound width. One thread, L-inf eps = 0.01 around a
standard normal input.

Models: the zoo ResNet (``boundprop.zoo.resnet``: stem + 2 basic blocks with BatchNorm, widths 4, 8)
and the zoo CNN-7 with BatchNorm (``boundprop.zoo.cnn7_bn``: 5 conv-BN-ReLU, FC-BN-ReLU, FC, width
4), both on CIFAR-sized 3x32x32 inputs.

Writes ``benchmarks/results/memory.md`` (prose from ``memory.notes.md`` beside it, if present).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/memory_bench.py
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/memory_bench.py --models resnet --modes patches --out /tmp/m.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
from pathlib import Path

from results_file import write_result

RESULTS = Path(__file__).parent / "results" / "memory.md"

CHILD = r"""
import json, resource, sys, time, warnings
import torch
import boundprop
from boundprop import PerturbationLpNorm, compute_bounds
from boundprop import zoo
torch.set_num_threads(1)
name, mode, batch, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
kw = {"size": size} if name == "cnn7_bn" else {}
model, shape = zoo.build(name, **kw)
shape = (shape[0], size, size)
x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(0))
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    graph = boundprop.capture(model, x[:1])
with torch.no_grad():
    model(x)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
ptb = {graph.inputs[0]: PerturbationLpNorm(0.01)}
w, c = time.perf_counter(), time.process_time()
with torch.no_grad():
    res = compute_bounds(graph, (x,), ptb, method="CROWN", opts={"conv_mode": mode})
wall, cpu = time.perf_counter() - w, time.process_time() - c
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"base_mib": base / 1024, "peak_mib": peak / 1024, "wall": wall, "cpu": cpu,
                  "width": float((res.upper - res.lower).mean()),
                  "params": sum(p.numel() for p in model.parameters())}))
"""


def measure(name: str, mode: str, batch: int, size: int, timeout: float) -> dict:
    cmd = [sys.executable, "-c", CHILD, name, mode, str(batch), str(size)]
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"over {timeout:.0f} s"}
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["?"])[-1][:200]}
    return json.loads(out.stdout.strip().splitlines()[-1])


HEADER = ("| model | input | batch | conv_mode | peak RSS (MiB) | baseline RSS (MiB) | CROWN increase (MiB) | "
          "wall (s) | CPU (s) | mean bound width |\n|---|---|---:|---|---:|---:|---:|---:|---:|---:|")


def format_row(r: dict) -> str:
    head = f"| {r['model']} | 3x{r['size']}x{r['size']} | {r['batch']} | {r['mode']} |"
    if "error" in r:
        return head + f" {r['error']} | | | | | |"
    return (head + f" {r['peak_mib']:.0f} | {r['base_mib']:.0f} | {r['peak_mib'] - r['base_mib']:.0f} | "
            f"{r['wall']:.1f} | {r['cpu']:.1f} | {r['width']:.5g} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet", "cnn7_bn"])
    parser.add_argument("--modes", nargs="+", default=["patches", "matrix"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    print(HEADER, flush=True)
    rows = []
    for name in args.models:
        for mode in args.modes:
            r = {"model": name, "mode": mode, "batch": args.batch, "size": args.size,
                 **measure(name, mode, args.batch, args.size, args.timeout)}
            rows.append(r)
            print(format_row(r), flush=True)
    notes = (f"\n\n{datetime.date.today()}, torch from `{sys.executable}`, {platform.machine()}, one thread, "
             "L-inf eps = 0.01, one CROWN call per fresh subprocess; peak RSS = `ru_maxrss` after the call, "
             "baseline = after capture and one forward pass.\n")
    write_result(args.out, "# Peak memory of CROWN: patches against dense specs\n\n" + "\n".join(
        [HEADER] + [format_row(r) for r in rows]) + notes)
    print(notes)


if __name__ == "__main__":
    main()

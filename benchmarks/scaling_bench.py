"""CROWN time against depth and width (fully connected ReLU networks), one thread.

For each configuration (``boundprop.zoo.mlp(in_dim, hidden, out=10, depth)``, L-inf ball of radius
``eps`` around a standard normal input):

* the CPU time of one CROWN call (median of ``--reps`` calls after a warm-up), under
  ``torch.no_grad()``, and the CPU time of one plain forward pass of the same batch (``cost`` =
  the ratio; CPU time, because the shared machine preempts long calls more than short ones);
* the work CROWN schedules: hidden layer ``k`` (1-based) needs its pre-activation interval, which
  costs a backward walk through the ``k`` affine layers below it with one row per neuron that IBP
  leaves unstable (``u_k``, the union over the batch); the first layer is exact by IBP and needs
  no walk; the final walk has 10 rows through ``depth + 1`` layers. ``rows`` = the rows of all
  walks, ``row-layers`` = the number of (row, layer) products, ``sum k u_k`` plus the final walk's;
  with every neuron unstable this is ``width (L(L+1)/2 - 1) + 10 (L + 1)``, the O(L^2) of CROWN's
  worst case ("worst-case row-layers");
* the time per 1000 row-layers, which stays roughly flat when the cost follows the work.

Writes ``benchmarks/results/scaling.md``.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/scaling_bench.py
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/scaling_bench.py --depths 2 4 --widths 64 --out /tmp/s.md
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time
import warnings
from pathlib import Path

import torch
from results_file import write_result

import boundprop
from boundprop import PerturbationLpNorm, compute_bounds
from boundprop.zoo import mlp

RESULTS = Path(__file__).parent / "results" / "scaling.md"


def median_time(fn, reps: int, clock=time.perf_counter) -> float:
    """Median time of ``fn()`` by ``clock`` (wall clock by default) over ``reps`` calls after a warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        start = clock()
        fn()
        times.append(clock() - start)
    return statistics.median(times)


def cpu_median(fn, reps: int) -> float:
    return median_time(fn, reps, time.process_time)


def forward_cpu(model, x) -> float:
    """CPU time of one forward pass: median over blocks of calls (one call is below the clock's grain)."""
    with torch.no_grad():
        model(x)
        n = 1
        while True:
            start = time.process_time()
            for _ in range(n):
                model(x)
            if time.process_time() - start > 0.02:
                break
            n *= 2
        return cpu_median(lambda: [model(x) for _ in range(n)], 5) / n


def screened_rows(graph, x, ptb) -> list[int]:
    """``u_k``: rows of each hidden layer's walk = neurons unstable under the IBP screening the walk met.

    Recomputed with IBP only (CROWN-IBP keeps the IBP intervals) would overstate them; instead the
    CROWN intervals of layer ``k-1`` feed an IBP step to layer ``k``, exactly what CROWN's screening does.
    """
    with torch.no_grad():
        crown = compute_bounds(graph, (x,), ptb, method="CROWN")
    linears = [n.name for n in graph.nodes if n.target == torch.ops.aten.linear.default]
    batch = x.shape[0]
    rows = []
    for prev, name in zip(linears[:-2], linears[1:-1]):
        p = crown.intervals[prev]
        w = graph.param_values()[graph.node(name).args[1].name]
        b = graph.param_values()[graph.node(name).args[2].name]
        lo, hi = p.lower.clamp_min(0), p.upper.clamp_min(0)
        c, r = (lo + hi) / 2, (hi - lo) / 2
        zc, zr = c @ w.T + b, r @ w.abs().T
        rows.append(int(((zc - zr < 0) & (zc + zr > 0)).reshape(batch, -1).any(0).sum()))
    return rows


def run(depths, widths, batch: int, in_dim: int, eps: float, reps: int) -> list[dict]:
    torch.set_num_threads(1)
    out = []
    for width in widths:
        for depth in depths:
            model = mlp(in_dim=in_dim, hidden=width, out=10, depth=depth)
            x = torch.randn(batch, in_dim, generator=torch.Generator().manual_seed(0))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                graph = boundprop.capture(model, x[:1])
            ptb = {graph.inputs[0]: PerturbationLpNorm(eps)}

            def call(graph=graph, x=x, ptb=ptb):
                with torch.no_grad():
                    return compute_bounds(graph, (x,), ptb, method="CROWN")

            t = cpu_median(call, reps)
            fwd = forward_cpu(model, x)
            rows = screened_rows(graph, x, ptb)
            # the walk from hidden layer k (k >= 2) crosses k affine layers; the final walk (10 rows) depth + 1
            row_layers = sum((k + 2) * u for k, u in enumerate(rows)) + 10 * (depth + 1)
            worst = sum(k * width for k in range(2, depth + 1)) + 10 * (depth + 1)
            rows = rows + [10]
            res = call()
            row = {"width": width, "depth": depth, "batch": batch, "time": t, "forward": fwd, "cost": t / fwd,
                   "rows": sum(rows), "row_layers": row_layers, "worst": worst,
                   "per_krl": t / max(1, row_layers) * 1e6,
                   "bound_width": float((res.upper - res.lower).mean())}
            out.append(row)
            print(format_row(row), flush=True)
    return out


HEADER = ("| width | depth | batch | CROWN (ms, CPU) | forward (ms) | cost (forwards) | rows | row-layers | "
          "worst-case row-layers | ms per 1000 row-layers | mean bound width |\n"
          "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")


def format_row(r: dict) -> str:
    return (f"| {r['width']} | {r['depth']} | {r['batch']} | {r['time'] * 1e3:.3g} | {r['forward'] * 1e3:.3g} | "
            f"{r['cost']:.0f} | {r['rows']} | {r['row_layers']} | {r['worst']} | {r['per_krl']:.3g} | "
            f"{r['bound_width']:.4g} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--depths", nargs="+", type=int, default=[2, 4, 8, 16])
    parser.add_argument("--widths", nargs="+", type=int, default=[64, 256])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--in-dim", type=int, default=64)
    parser.add_argument("--eps", type=float, default=0.01)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    print(HEADER, flush=True)
    rows = run(args.depths, args.widths, args.batch, args.in_dim, args.eps, args.reps)
    notes = (f"\n\n{datetime.date.today()}, torch {torch.__version__}, {platform.machine()}, one thread; "
             f"`boundprop.zoo.mlp(in_dim={args.in_dim}, hidden=width, out=10, depth)`, L-inf eps={args.eps}, "
             f"batch {args.batch}, CPU times (median of {args.reps}).\n")
    text = "\n".join([HEADER] + [format_row(r) for r in rows])
    write_result(args.out, "# CROWN time against depth and width\n\n" + text + notes)
    print(notes)


if __name__ == "__main__":
    main()

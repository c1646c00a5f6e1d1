"""boundprop against auto_LiRPA 0.7.1 on the peer models of ``/work/shared/peer``.

For each stored model and batch (``<model>_b<batch>.pt``: weights, input batch, eps, and
auto_LiRPA's bounds per method) and each method (IBP, CROWN-IBP, CROWN, forward, alpha-CROWN with
auto_LiRPA's 20 iterations and lr 0.5), on one thread:

* the wall time of ``compute_bounds`` calls after a warm-up call (``--reps`` calls, or one when a
  call takes longer than ``--long``), every method but alpha-CROWN under ``torch.no_grad()``,
  each call right after a burst of plain forward passes of the same model and batch;
* the cost of a call as a multiple of one forward pass of its burst, and the median of those
  costs (also in CPU time); pairing follows the drifts of a shared machine's speed;
* auto_LiRPA's cost in forwards (``results.csv``, measured on this machine kind) and the ratios
  (ours / theirs) of the wall-clock cost and of the CPU-time cost;
* by default with freed memory kept in the process (:func:`boundprop.runtime.keep_freed_memory`,
  as the ``boundprop`` command runs; ``--malloc default`` keeps glibc's defaults), for our calls
  and the forward passes alike;
* the mean bound width (mean of upper - lower) of both libraries and the largest difference
  between the bounds, relative to ``max(1, |auto_LiRPA's bound|)``.

Methods that raise ``NotImplementedError`` are noted and skipped; so are the combinations
auto_LiRPA did not run (alpha-CROWN on resnet_small, forward on resnet_small at batch 32) unless
``--all``. Writes a markdown table to stdout and to ``benchmarks/results/peer_compare.md``
(``--merge``: rows of that file for other model/batch/method triples are kept, so the table can
be built by several shorter runs).

    .venv/bin/python benchmarks/peer_compare.py
    .venv/bin/python benchmarks/peer_compare.py --models cnn --batches 1 --methods CROWN
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from results_file import write_result

import boundprop
from boundprop import PerturbationLpNorm, compute_bounds
from boundprop.runtime import keep_freed_memory

PEER = Path("/work/shared/peer")
RESULTS = Path(__file__).parent / "results" / "peer_compare.md"
METHODS = ("IBP", "CROWN-IBP", "CROWN", "forward", "alpha-CROWN")
ALPHA_OPTS = {"optimize_bound_args": {"iteration": 20, "lr_alpha": 0.5}}


def paired_cost(call, model: torch.nn.Module, x: torch.Tensor, reps: int, long_s: float):
    """Time ``call()`` ``reps`` times (once if a call is long, up to 100 times if it is short), each right
    after a burst of forward passes.

    Returns ``(median call wall time, median forward wall time, median of the per-call wall-time
    ratios, the same in CPU time, the last result)``. Pairing each call with the forward passes
    just before it follows drifts in the machine's speed, which on a shared host reach 1.5x within
    minutes; a median of ratios then ignores the calls that a drift or an interruption hit.
    """
    start = time.perf_counter()
    out = call()
    took = time.perf_counter() - start
    if took > long_s:
        reps = 1
    elif took < 0.05:  # short calls: more pairs, about a second's worth of calls
        reps = max(reps, min(100, int(1.0 / max(took, 1e-4))))
    walls, fwds, costs, cpu_costs = [], [], [], []
    for _ in range(reps):
        fwd_wall, fwd_cpu = forward_burst(model, x)
        w, c = time.perf_counter(), time.process_time()
        out = call()
        wall, cpu = time.perf_counter() - w, time.process_time() - c
        walls.append(wall)
        fwds.append(fwd_wall)
        costs.append(wall / fwd_wall)
        cpu_costs.append(cpu / fwd_cpu)
    med = statistics.median
    return med(walls), med(fwds), med(costs), med(cpu_costs), out


def forward_burst(model: torch.nn.Module, x: torch.Tensor, seconds: float = 0.02, least: int = 10):
    """Median wall and CPU time of one forward pass over a burst of at least ``least`` passes and ``seconds``."""
    walls, cpus = [], []
    start = time.perf_counter()
    with torch.no_grad():
        while len(walls) < least or time.perf_counter() - start < seconds:
            w, c = time.perf_counter(), time.process_time()
            model(x)
            walls.append(time.perf_counter() - w)
            cpus.append(time.process_time() - c)
    return statistics.median(walls), statistics.median(cpus)


def peer_costs() -> dict[tuple[str, int, str], float]:
    with open(PEER / "results.csv") as f:
        return {(r["model"], int(r["batch"]), r["method"]): float(r["cost_in_forwards"]) for r in csv.DictReader(f)}


def load(model_name: str, batch: int):
    sys.path.insert(0, str(PEER))
    import peer_models

    data = torch.load(PEER / f"{model_name}_b{batch}.pt", weights_only=False)
    model = peer_models.build_model(model_name)
    model.load_state_dict(data["state_dict"])
    return model.eval(), data


def rel_diff(ours: tuple[torch.Tensor, torch.Tensor], peer: tuple[torch.Tensor, torch.Tensor]) -> float:
    return max(float(((a - b).abs() / b.abs().clamp_min(1.0)).max()) for a, b in zip(ours, peer))


def run(args) -> list[dict]:
    torch.set_num_threads(1)
    costs = peer_costs()
    rows = []
    for model_name in args.models:
        for batch in args.batches:
            path = PEER / f"{model_name}_b{batch}.pt"
            if not path.exists():
                continue
            model, data = load(model_name, batch)
            x = data["x"]
            graph = boundprop.capture(model, x)
            ptb = {graph.inputs[0]: PerturbationLpNorm(data["eps"])}
            for method in args.methods:
                peer_bounds = data["bounds"].get(method)
                if peer_bounds is None and not args.all:
                    rows.append({"model": model_name, "batch": batch, "method": method,
                                 "note": "not run by auto_LiRPA (--all to run)"})
                    continue
                opts = ALPHA_OPTS if method == "alpha-CROWN" else None
                grad = method == "alpha-CROWN"
                def call(graph=graph, x=x, ptb=ptb, method=method, opts=opts):
                    return compute_bounds(graph, (x,), ptb, method=method, opts=opts)

                try:
                    with contextlib.nullcontext() if grad else torch.no_grad():
                        wall, fwd_wall, cost, cpu_cost, res = paired_cost(call, model, x, args.reps, args.long)
                except NotImplementedError as err:
                    rows.append({"model": model_name, "batch": batch, "method": method,
                                 "note": f"NotImplementedError: {err}"})
                    continue
                row = {"model": model_name, "batch": batch, "method": method, "time": wall, "forward": fwd_wall,
                       "cost": cost, "cpu_cost": cpu_cost,
                       "peer_cost": costs.get((model_name, batch, method)),
                       "width": float((res.upper - res.lower).mean())}
                if peer_bounds is not None:
                    row["peer_width"] = float((peer_bounds[1] - peer_bounds[0]).mean())
                    row["diff"] = rel_diff((res.lower.detach(), res.upper.detach()), peer_bounds)
                if row["peer_cost"]:
                    row["ratio"] = row["cost"] / row["peer_cost"]
                    row["cpu_ratio"] = row["cpu_cost"] / row["peer_cost"]
                rows.append(row)
                print(format_row(row), flush=True)
    return rows


def _fmt(v, spec: str) -> str:
    return "" if v is None else format(v, spec)


def format_row(r: dict) -> str:
    if "note" in r:
        return f"| {r['model']} | {r['batch']} | {r['method']} | {r['note']} |" + " |" * 9
    return (f"| {r['model']} | {r['batch']} | {r['method']} | {r['time']:.4g} | {r['forward'] * 1e3:.3f} | "
            f"{r['cost']:.1f} | {r['cpu_cost']:.1f} | {_fmt(r.get('peer_cost'), '.1f')} | "
            f"{_fmt(r.get('ratio'), '.2f')} | {_fmt(r.get('cpu_ratio'), '.2f')} | {r['width']:.6g} | "
            f"{_fmt(r.get('peer_width'), '.6g')} | "
            f"{_fmt(r.get('diff'), '.1e')} |")


HEADER = ("| model | batch | method | time (s) | forward (ms) | cost (forwards) | cost (CPU time) | "
          "auto_LiRPA cost | ratio | ratio (CPU) | mean width | auto_LiRPA width | max rel. diff |\n"
          "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")


def merged(old_text: str, rows: list[dict]) -> list[str]:
    """Table lines: the old table's rows for triples not run now, then this run's rows, in the usual order."""
    new = {(r["model"], str(r["batch"]), r["method"]): format_row(r) for r in rows}
    lines = dict(new)
    in_table = False
    for line in old_text.splitlines():  # the first table only (the notes after it may hold other tables)
        if not line.startswith("|"):
            if in_table:
                break
            continue
        in_table = True
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) > 3 and cells[1].isdigit():
            lines.setdefault((cells[0], cells[1], cells[2]), line)
    order = {m: i for i, m in enumerate(("mlp", "cnn", "resnet_small"))}
    return [lines[k] for k in sorted(lines, key=lambda k: (order.get(k[0], 9), k[0], int(k[1]),
                                                           METHODS.index(k[2]) if k[2] in METHODS else 9))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn", "resnet_small"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--reps", type=int, default=5, help="timed calls after the warm-up (median)")
    parser.add_argument("--long", type=float, default=20.0, help="seconds: a longer call is timed once")
    parser.add_argument("--all", action="store_true", help="also run what auto_LiRPA did not")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--merge", action="store_true", help="keep the output file's rows for triples not run now")
    parser.add_argument("--malloc", choices=("keep", "default"), default="keep",
                        help="keep freed memory in the process (boundprop.runtime) or glibc's defaults")
    args = parser.parse_args()
    kept = args.malloc == "keep" and keep_freed_memory()
    print(HEADER, flush=True)
    rows = run(args)
    lines = [format_row(r) for r in rows]
    if args.merge and args.out.exists():
        lines = merged(args.out.read_text(), rows)
    table = "\n".join([HEADER] + lines)
    notes = (f"\n\nboundprop vs auto_LiRPA 0.7.1 (`{PEER}/results.csv`), one thread, "
             f"{datetime.date.today()}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
             f"{'freed memory kept (boundprop.runtime)' if kept else 'glibc malloc defaults'}. "
             "cost = median over the timed calls of (time of the call / median time of one forward pass in "
             "a burst of at least 10 passes and 0.02 s just before it); time and forward: medians "
             "(wall clock; 'CPU time' uses process CPU time for both). ratio = cost / auto_LiRPA's cost "
             "(auto_LiRPA's is wall clock). "
             "max rel. diff = max |ours - auto_LiRPA| / max(1, |auto_LiRPA|) over both bounds.\n")
    write_result(args.out, "# boundprop vs auto_LiRPA on the peer models\n\n" + table + notes)
    print(notes)


if __name__ == "__main__":
    main()

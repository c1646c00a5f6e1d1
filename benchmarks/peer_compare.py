"""boundprop against auto_LiRPA 0.7.1 on the peer models of ``/work/shared/peer``.

For each stored model and batch (``<model>_b<batch>.pt``: weights, input batch, eps, and
auto_LiRPA's bounds per method) and each method (IBP, CROWN-IBP, CROWN, forward, alpha-CROWN with
auto_LiRPA's 20 iterations and lr 0.5), on one thread:

* the median wall time of one ``compute_bounds`` call after a warm-up call (``--reps`` calls, or
  one when a call takes longer than ``--long``), every method but alpha-CROWN under
  ``torch.no_grad()``;
* the median time of one plain forward pass of the same model and batch, measured right before
  the method in the same run, and the cost as a multiple of it (also in CPU time, which a shared,
  loaded machine disturbs less than wall time);
* auto_LiRPA's cost in forwards (``results.csv``, measured on this machine kind) and the ratios
  (ours / theirs) of the wall-clock cost and of the CPU-time cost. On a loaded machine the wall
  cost of a long call is inflated: the median of many short forward passes skips the ones the
  scheduler interrupted, a call of several milliseconds cannot; the CPU-time cost is not biased
  that way;
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

import boundprop
from boundprop import PerturbationLpNorm, compute_bounds

PEER = Path("/work/shared/peer")
RESULTS = Path(__file__).parent / "results" / "peer_compare.md"
METHODS = ("IBP", "CROWN-IBP", "CROWN", "forward", "alpha-CROWN")
ALPHA_OPTS = {"optimize_bound_args": {"iteration": 20, "lr_alpha": 0.5}}


def clocked(fn, reps: int, long_s: float) -> tuple[float, float, object]:
    """Median wall and CPU time of ``fn()`` after one warm-up call (one rep if a call is long)."""
    start = time.perf_counter()
    out = fn()
    if time.perf_counter() - start > long_s:
        reps = 1
    walls, cpus = [], []
    for _ in range(reps):
        w, c = time.perf_counter(), time.process_time()
        out = fn()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return statistics.median(walls), statistics.median(cpus), out


def forward_time(model: torch.nn.Module, x: torch.Tensor) -> tuple[float, float]:
    with torch.no_grad():
        model(x)
        start, n = time.perf_counter(), 0
        while n < 10 or (time.perf_counter() - start < 0.3 and n < 2000):
            model(x)
            n += 1
        wall, cpu, _ = clocked(lambda: model(x), max(10, min(n, 200)), 1e9)
    return wall, cpu


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

                fwd_wall, fwd_cpu = forward_time(model, x)
                try:
                    with contextlib.nullcontext() if grad else torch.no_grad():
                        wall, cpu, res = clocked(call, args.reps, args.long)
                except NotImplementedError as err:
                    rows.append({"model": model_name, "batch": batch, "method": method,
                                 "note": f"NotImplementedError: {err}"})
                    continue
                row = {"model": model_name, "batch": batch, "method": method, "time": wall, "forward": fwd_wall,
                       "cost": wall / fwd_wall, "cpu_cost": cpu / fwd_cpu,
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
    args = parser.parse_args()
    print(HEADER, flush=True)
    rows = run(args)
    lines = [format_row(r) for r in rows]
    if args.merge and args.out.exists():
        lines = merged(args.out.read_text(), rows)
    table = "\n".join([HEADER] + lines)
    notes = (f"\n\nboundprop vs auto_LiRPA 0.7.1 (`{PEER}/results.csv`), one thread, "
             f"{datetime.date.today()}, torch {torch.__version__}, {platform.processor() or platform.machine()}. "
             "cost = median time of one call / median time of one forward pass measured just before it "
             "(wall clock; 'CPU time' uses process CPU time for both). ratio = cost / auto_LiRPA's cost "
             "(auto_LiRPA's is wall clock). "
             "max rel. diff = max |ours - auto_LiRPA| / max(1, |auto_LiRPA|) over both bounds.\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    prose = args.out.with_suffix(".notes.md")  # hand-written analysis kept beside the generated table
    extra = "\n" + prose.read_text() if prose.exists() else ""
    args.out.write_text("# boundprop vs auto_LiRPA on the peer models\n\n" + table + notes + extra)
    print(notes)


if __name__ == "__main__":
    main()

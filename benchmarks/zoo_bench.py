"""Benchmark every bound method on every model of the zoo (:mod:`boundprop.zoo`).

For each model: the capture time, the time of one plain forward pass (the physical reference),
and per method (IBP, CROWN-IBP, CROWN, forward, alpha-CROWN) and batch size (1 and 32) the median
time of one ``compute_bounds`` call after a warm-up call, its cost as a multiple of a forward pass
of the same batch, and the mean bound width (mean of upper - lower over the logits, L-inf ball of
radius ``eps`` around a standard normal input). One thread; every method but alpha-CROWN runs
under ``torch.no_grad()`` (alpha-CROWN optimises by gradients: it runs with autograd on).

Methods that raise ``NotImplementedError`` for a model are skipped and noted; so are calls
predicted to take too long (see ``--skip-after``).

    .venv/bin/python benchmarks/zoo_bench.py               # writes benchmarks/results/zoo.md (+ zoo.notes.md)
    .venv/bin/python benchmarks/zoo_bench.py --models mlp cnn --batches 1
    python benchmarks/zoo_bench.py --device cuda --out benchmarks/results/zoo_gpu.md   # on a GPU

On CUDA every timed call is bracketed by ``torch.cuda.synchronize()`` (the GPU runs asynchronously).
"""

from __future__ import annotations

import argparse
import contextlib
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
from boundprop.zoo import ZOO

METHODS = ("IBP", "CROWN-IBP", "CROWN", "forward", "alpha-CROWN")
GRAD_METHODS = {"alpha-CROWN"}  # run with autograd enabled
RESULTS = Path(__file__).parent / "results" / "zoo.md"


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, budget_s: float, min_reps: int = 3, max_reps: int = 20) -> tuple[float, object]:
    """Median wall time of ``fn()`` after one warm-up call; reps fill about ``budget_s`` (one rep when a
    call takes over 5 s)."""
    _synchronize()
    start = time.perf_counter()
    out = fn()
    _synchronize()
    first = time.perf_counter() - start
    reps = 1 if first > 5 else max(min_reps, min(max_reps, int(budget_s / max(first, 1e-6))))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        out = fn()
        _synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def forward_time(model: torch.nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        t, _ = timed(lambda: model(x), budget_s=0.3, min_reps=10, max_reps=2000)
    return t


def bench_method(graph, x: torch.Tensor, method: str, eps: float, opts: dict, budget_s: float):
    ptb = {graph.inputs[0]: PerturbationLpNorm(eps)}
    grad = contextlib.nullcontext() if method in GRAD_METHODS else torch.no_grad()

    def call():
        with grad:
            return compute_bounds(graph, (x,), ptb, method=method, opts=opts)

    t, res = timed(call, budget_s)
    width = float((res.upper - res.lower).detach().mean())
    return t, width


def fmt_ms(t: float) -> str:
    ms = t * 1e3
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def fmt_width(w: float) -> str:
    return f"{w:.4g}"


def run(models, methods, batches, eps, opts, budget_s, skip_after_s, seed=0, device: str = "cpu") -> str:
    torch.manual_seed(seed)
    # warm torch.export up on a trivial model, so the first zoo model's capture time is not inflated
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        boundprop.capture(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU()), torch.randn(1, 2))

    model_rows, method_rows, notes = [], [], []
    for name in models:
        factory, shape = ZOO[name]
        model = factory().to(device)
        n_params = sum(p.numel() for p in model.parameters())
        xs = {b: torch.randn(b, *shape, generator=torch.Generator().manual_seed(seed)).to(device) for b in batches}
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                graph = boundprop.capture(model, xs[batches[0]][:1])
            except NotImplementedError as error:
                notes.append(f"{name}: not captured ({type(error).__name__}: {str(error).splitlines()[0]})")
                model_rows.append((name, n_params, "n/a", *["" for _ in batches]))
                continue
        capture_s = time.perf_counter() - start
        fwd = {b: forward_time(model, xs[b]) for b in batches}
        model_rows.append((name, n_params, f"{capture_s:.2f}", *[fmt_ms(fwd[b]) for b in batches]))
        print(f"{name}: capture {capture_s:.2f}s, forward {[fmt_ms(fwd[b]) for b in batches]} ms", flush=True)
        for method in methods:
            cells = []
            slow = False
            for b in batches:
                if slow:
                    cells += ["skipped", "", ""]
                    continue
                try:
                    t, width = bench_method(graph, xs[b], method, eps, opts, budget_s)
                except NotImplementedError as error:
                    notes.append(f"{name} / {method}: not implemented ({str(error).splitlines()[0]})")
                    cells = ["n/i", "", ""] * len(batches)
                    break
                except Exception as error:  # noqa: BLE001 - a benchmark reports and goes on
                    notes.append(f"{name} / {method} / batch {b}: {type(error).__name__}: "
                                 f"{str(error).splitlines()[0][:200]}")
                    cells += ["error", "", ""]
                    continue
                cells += [fmt_ms(t), f"{t / fwd[b]:.0f}", fmt_width(width)]
                print(f"  {method:12s} batch {b:3d}: {fmt_ms(t):>8s} ms  x{t / fwd[b]:.0f}  width {width:.4g}",
                      flush=True)
                if t > skip_after_s and b != batches[-1]:
                    slow = True
                    notes.append(f"{name} / {method}: larger batches skipped (batch {b} took {t:.1f} s "
                                 f"> {skip_after_s} s)")
            method_rows.append((name, method, *cells))
    return render(model_rows, method_rows, notes, batches, eps, opts, device)


def render(model_rows, method_rows, notes, batches, eps, opts, device: str = "cpu") -> str:
    where = (f"{platform.machine()} CPU, {torch.get_num_threads()} thread" if device == "cpu"
             else f"{torch.cuda.get_device_name(torch.device(device))} ({device}), synchronised")
    lines = [
        "# boundprop on the model zoo",
        "",
        f"{datetime.date.today().isoformat()}; torch {torch.__version__}, {where}; "
        f"L-inf eps = {eps}; alpha-CROWN options {opts}. "
        "Times are medians of calls after a warm-up (ms); cost = time / one forward pass of the same batch. "
        "All methods but alpha-CROWN run under torch.no_grad() (alpha-CROWN needs autograd). "
        "The machine is shared: read absolute times as +-30 %, costs as more stable.",
        "",
        "| model | params | capture (s) | " + " | ".join(f"forward b{b} (ms)" for b in batches) + " |",
        "|---|---:|---:|" + "---:|" * len(batches),
    ]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in model_rows]
    lines += ["", "| model | method | " + " | ".join(
        f"b{b} ms | b{b} cost | b{b} width" for b in batches) + " |",
        "|---|---|" + "---:|---:|---:|" * len(batches)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in method_rows]
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=list(ZOO), choices=list(ZOO))
    parser.add_argument("--methods", nargs="*", default=list(METHODS))
    parser.add_argument("--batches", nargs="*", type=int, default=[1, 32])
    parser.add_argument("--eps", type=float, default=0.01)
    parser.add_argument("--alpha-iterations", type=int, default=20)
    parser.add_argument("--budget", type=float, default=1.0, help="seconds of repeated calls per cell")
    parser.add_argument("--skip-after", type=float, default=10.0,
                        help="skip larger batches of a method once a call takes longer (s)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (time the zoo on a GPU)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    opts = {"optimize_bound_args": {"iteration": args.alpha_iterations}}
    table = run(args.models, args.methods, sorted(args.batches), args.eps, opts, args.budget, args.skip_after,
                device=args.device)
    print()
    print(table)
    write_result(args.out, table)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()

"""``boundprop bounds``: bound a model's outputs on a few inputs with several methods, side by side.

Every method bounds the samples in :func:`boundprop.compute_bounds` calls of ``--batch-size``
samples (default: all of them in one call; 1 times each sample alone), after two untimed warm-up
calls (IBP, CROWN) that pay torch's first-call costs. Reported per sample and method: the mean
width of the bounds and, with the margin specification, the smallest lower bound of the margins
``y_true - y_j`` and whether it is positive (verified). A method that raises
``NotImplementedError`` is reported as ``n/a``, not as an error.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .. import PerturbationLpNorm, capture, compute_bounds
from ..algorithms import canonical_method
from ..graph import Graph, evaluate
from ..spec import margin_matrix
from .loaders import (
    CliError,
    LoadedModel,
    add_device_argument,
    add_threads_argument,
    apply_threads,
    device_from_args,
    load_inputs,
    load_model,
)

DEFAULT_METHODS = ("IBP", "CROWN-IBP", "CROWN", "alpha-CROWN", "forward")
DISPLAY_NAMES = {"ibp": "IBP", "crown-ibp": "CROWN-IBP", "crown": "CROWN", "alpha-crown": "alpha-CROWN",
                 "forward": "forward", "forward+backward": "forward+backward"}
NORMS = {"inf": math.inf, "2": 2.0, "1": 1.0}
DEFAULT_SAMPLES = 5


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "bounds", help="compare bound methods on a model (default: the bundled digits classifier)",
        description="Bound a model's outputs under an Lp perturbation of its inputs with several methods, "
                    "and print a table per sample and a summary per method. With no arguments: the bundled "
                    f"digits classifier on {DEFAULT_SAMPLES} real test images, eps 0.03, margin specification.")
    p.add_argument("--model", default=None,
                   help="module:factory, file.py:factory, a .pt file (pickled module, state dict with --arch, "
                        "or a boundprop bundle) or a .onnx file (default: the bundled digits classifier)")
    p.add_argument("--arch", default=None,
                   help="architecture of a state-dict .pt file: module:factory or a bundled name (digits_cnn, "
                        "digits_mlp)")
    p.add_argument("--input", default=None,
                   help="inputs, batch first: .pt (tensor, (x, y) or dict with x/y), .npy or .npz "
                        "(default: the bundled digits test images)")
    p.add_argument("--samples", type=int, default=None, metavar="N",
                   help=f"number of samples (default: {DEFAULT_SAMPLES} bundled ones, or all of --input)")
    p.add_argument("--eps", type=float, default=0.03, help="perturbation radius (default: 0.03)")
    p.add_argument("--norm", default="inf", choices=sorted(NORMS), help="Lp norm of the ball (default: inf)")
    p.add_argument("--method", action="append", default=None, metavar="M",
                   help="bound method(s), repeatable or comma-separated (default: " + ",".join(DEFAULT_METHODS)
                        + "); auto_LiRPA aliases accepted")
    p.add_argument("--clip", action=argparse.BooleanOptionalAction, default=None,
                   help="intersect the ball with the box [0, 1] (default: on for the bundled data, off otherwise)")
    p.add_argument("--spec", choices=("margin", "none"), default="margin",
                   help="margin: bounds of y_true - y_j, verified when all lower bounds > 0 (labels from the "
                        "data, else the model's predictions); none: bounds of the raw outputs")
    p.add_argument("--plot", default=None, metavar="OUT.png",
                   help="save per-class bound bars for the first sample (needs matplotlib)")
    p.add_argument("--batch-size", type=int, default=None, metavar="B",
                   help="samples per compute_bounds call (default: all in one call; 1 times every sample alone)")
    add_threads_argument(p)
    add_device_argument(p, "the model and its bounds")
    p.add_argument("--summary-only", action="store_true", help="print only the summary table")
    p.set_defaults(run=run)
    return p


def parse_methods(values: Sequence[str] | None) -> list[str]:
    """``["IBP,CROWN", "alpha-CROWN"]`` -> canonical names, in order, without duplicates."""
    names: list[str] = []
    for value in values or [",".join(DEFAULT_METHODS)]:
        for item in value.split(","):
            if not item.strip():
                continue
            try:
                method = canonical_method(item)
            except ValueError as err:
                raise CliError(str(err)) from err
            if method not in names:
                names.append(method)
    if not names:
        raise CliError("no method given")
    return names


@dataclass
class Outcome:
    """One (sample, method) cell: bounds and time, or the reason it is n/a."""

    lower: torch.Tensor | None = None
    upper: torch.Tensor | None = None
    ms: float = float("nan")
    na: str | None = None

    @property
    def width(self) -> float:
        return float((self.upper - self.lower).mean())


def _synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously: a timing must wait for it)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_ms(fn: Callable[[], object], device: torch.device, repeat: int = 20) -> float:
    times = []
    for _ in range(repeat):
        _synchronize(device)
        t0 = time.perf_counter()
        fn()
        _synchronize(device)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def _forward_fn(loaded: LoadedModel, graph: Graph) -> Callable[[torch.Tensor], torch.Tensor]:
    if loaded.module is not None:
        return loaded.module
    return lambda x: evaluate(graph, (x,))[graph.output]


def _fmt(value: float, spec: str) -> str:
    return "n/a" if value is None or math.isnan(value) else format(value, spec)


def _print_table(rows: list[list[str]], header: list[str], indent: str = "  ") -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: indent + "  ".join(  # noqa: E731
        str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    print(line(header))
    for r in rows:
        print(line(r))


def run(args: argparse.Namespace) -> int:
    methods = parse_methods(args.method)
    if args.eps < 0:
        raise CliError(f"--eps must be >= 0, got {args.eps}")
    for name in ("samples", "batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise CliError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.plot is not None:
        from .plot import require_matplotlib

        require_matplotlib()
    apply_threads(args.threads)
    device = device_from_args(args.device)

    loaded = load_model(args.model, args.arch)
    labels_from = "data"
    if args.input is not None:
        x, labels = load_inputs(args.input)
        bundled_data, source = False, args.input
    elif loaded.samples is not None:
        (x, labels), bundled_data, source = loaded.samples, True, f"test images bundled in {args.model}"
    else:  # the bundled digits images (a user model must then accept (batch, 1, 8, 8) inputs)
        from ..data import load_digits_samples

        (x, labels), bundled_data, source = load_digits_samples(), True, "bundled digits test images"
    n = args.samples if args.samples is not None else (DEFAULT_SAMPLES if bundled_data else x.shape[0])
    if n > x.shape[0]:
        raise CliError(f"asked for {n} samples, {source} hold {x.shape[0]}")
    x = x[:n].to(device)
    labels = labels[:n].to(device) if labels is not None else None
    if loaded.module is not None:
        loaded.module.to(device)
    clip = bundled_data if args.clip is None else args.clip
    if clip and bool(((x < 0) | (x > 1)).any()):
        raise CliError("--clip bounds the inputs to [0, 1], but some inputs lie outside; use --no-clip")

    t0 = time.perf_counter()
    try:
        graph = loaded.graph.to(device) if loaded.graph is not None else capture(loaded.module, x[:1])
    except NotImplementedError as err:  # UnsupportedOperatorError lists every unsupported op
        raise CliError(str(err)) from err
    capture_s = time.perf_counter() - t0
    forward = _forward_fn(loaded, graph)
    with torch.no_grad():
        try:
            logits = forward(x)
        except Exception as err:  # noqa: BLE001
            raise CliError(f"the model rejected inputs of shape {tuple(x.shape)}: {err}") from err
        forward_ms = _median_ms(lambda: forward(x[:1]), device)
    if logits.dim() != 2:
        if args.spec == "margin":
            raise CliError(f"the margin spec needs (batch, classes) outputs, got {tuple(logits.shape)}; "
                           "use --spec none")
    num_classes = logits.shape[-1]
    predicted = logits.argmax(-1) if logits.dim() == 2 else None
    if args.spec == "margin" and labels is None:
        labels, labels_from = predicted, "the model's predictions (no labels in the input file)"
    if labels is not None and args.spec == "margin" and int(labels.max()) >= num_classes:
        raise CliError(f"labels go up to {int(labels.max())} but the model has {num_classes} outputs")

    norm = NORMS[args.norm]
    batch = n if args.batch_size is None else args.batch_size

    def bound(s: slice, method: str) -> tuple[torch.Tensor, torch.Tensor]:
        xs = x[s]
        box = dict(x_L=torch.zeros_like(xs), x_U=torch.ones_like(xs)) if clip else {}
        ptb = PerturbationLpNorm(args.eps, norm, **box)
        C = margin_matrix(labels[s], num_classes, dtype=x.dtype) if args.spec == "margin" else None
        res = compute_bounds(graph, (xs,), {graph.inputs[0]: ptb}, method=method, C=C)
        # on the host for the report (the copy also waits for the device, so the timing is whole)
        return res.lower.detach().reshape(xs.shape[0], -1).cpu(), res.upper.detach().reshape(xs.shape[0], -1).cpu()

    for warm_up in ("ibp", "crown"):  # pay torch's first-call costs outside the timings
        bound(slice(0, 1), warm_up)
    outcomes: dict[str, list[Outcome]] = {}
    for method in methods:
        cells: list[Outcome] = []
        try:
            for start in range(0, n, batch):
                s = slice(start, min(n, start + batch))
                t0 = time.perf_counter()
                lo, hi = bound(s, method)
                ms = 1000 * (time.perf_counter() - t0) / lo.shape[0]
                cells += [Outcome(lo[k], hi[k], ms) for k in range(lo.shape[0])]
        except NotImplementedError as err:
            cells = [Outcome(na=str(err).splitlines()[0] or "not implemented")] * n
        outcomes[method] = cells

    x, labels, logits = x.cpu(), None if labels is None else labels.cpu(), logits.cpu()
    predicted = None if predicted is None else predicted.cpu()
    _report(args, loaded, source, labels_from, x, labels, logits, predicted, clip, capture_s, forward_ms,
            methods, outcomes, batch, device)
    if args.plot is not None:
        from .plot import plot_first_sample

        plot_first_sample(args.plot, methods=[DISPLAY_NAMES[m] for m in methods],
                          outcomes=[outcomes[m][0] for m in methods], nominal=logits[0], spec=args.spec,
                          label=None if labels is None else int(labels[0]), eps=args.eps, norm=args.norm)
        print(f"\nplot of sample 0 written to {args.plot}")
    return 0


def _report(args, loaded, source, labels_from, x, labels, logits, predicted, clip, capture_s, forward_ms,
            methods, outcomes, batch, device: torch.device) -> None:
    n = x.shape[0]
    margin = args.spec == "margin"
    shape = "x".join(str(s) for s in x.shape[1:])
    threads = torch.get_num_threads()
    print(f"model:  {loaded.description}")
    print(f"inputs: {n} {source} ({shape} each)" + (f"; labels: {labels_from}" if margin else ""))
    ball = f"L{args.norm} ball, eps = {args.eps:g}" + (", clipped to [0, 1]" if clip else "")
    spec = (f"margin (bounds of y_true - y_j, {logits.shape[-1] - 1} per sample; verified when all lower > 0)"
            if margin else "none (bounds of the raw outputs)")
    print(f"perturbation: {ball};  spec: {spec}")
    where = f"{threads} thread{'s' if threads > 1 else ''}" if device.type == "cpu" else f"device {device}"
    print(f"capture: {capture_s:.2f} s (once per model);  one forward pass: {forward_ms:.3f} ms (batch 1, {where})")
    calls = "one call per sample" if batch == 1 else f"batches of up to {batch} samples per call"
    print(f"timing: compute_bounds, {calls}; lower and upper bounds")
    per_sample_time = batch == 1
    header = ["method"] + (["time (ms)"] if per_sample_time else []) + ["mean width"]
    header += ["min margin LB", "verified"] if margin else []
    if not args.summary_only:
        for i in range(n):
            line = f"\nsample {i}:"
            if labels is not None:
                line += f" label {int(labels[i])},"
            if predicted is not None:
                line += f" predicted {int(predicted[i])}"
            if margin:
                others = torch.cat([logits[i, :labels[i]], logits[i, labels[i] + 1:]])
                line += f", nominal min margin {float(logits[i, labels[i]] - others.max()):.3f}"
                if predicted is not None and int(predicted[i]) != int(labels[i]):
                    line += " (misclassified: cannot be verified)"
            print(line)
            rows = []
            for m in methods:
                o = outcomes[m][i]
                if o.na is not None:
                    rows.append([DISPLAY_NAMES[m]] + ["n/a"] * (len(header) - 1))
                    continue
                row = [DISPLAY_NAMES[m]] + ([_fmt(o.ms, ".2f")] if per_sample_time else []) + [_fmt(o.width, ".3f")]
                if margin:
                    lb = float(o.lower.min())
                    row += [_fmt(lb, ".3f"), "yes" if lb > 0 else "no"]
                rows.append(row)
            _print_table(rows, header)
    print(f"\nsummary over {n} sample{'s' if n > 1 else ''}:")
    header = ["method", "total time (ms)", "per sample (ms)", "mean width"] + (["verified"] if margin else [])
    rows = []
    for m in methods:
        cells = outcomes[m]
        if cells[0].na is not None:
            rows.append([DISPLAY_NAMES[m]] + ["n/a"] * (len(header) - 1))
            continue
        total = sum(c.ms for c in cells)
        row = [DISPLAY_NAMES[m], _fmt(total, ".1f"), _fmt(total / n, ".2f"),
               _fmt(statistics.mean(c.width for c in cells), ".3f")]
        if margin:
            row.append(f"{sum(float(c.lower.min()) > 0 for c in cells)}/{n}")
        rows.append(row)
    _print_table(rows, header)
    for m in methods:
        if outcomes[m][0].na is not None:
            print(f"  n/a: {DISPLAY_NAMES[m]}: {outcomes[m][0].na}")

"""``boundprop certify``: certified accuracy of a classifier on a data set, per perturbation radius.

Model: ``--model`` as in ``boundprop bounds`` (default: the bundled digits classifier; ``.pt``,
``.onnx``, ``module:factory``). Data: ``--data`` (``.pt``/``.npy``/``.npz`` as ``--input`` of
``bounds``; without labels, the model's predictions are the labels) or, by default, the bundled
digits test set (450 images in ``[0, 1]``; the first 100 unless ``--samples`` says otherwise).
``--eps`` is a list of radii; ``--method`` any bound methods and/or ``complete`` (the verifier,
L-inf only). See :mod:`boundprop.certify` for what counts.

The samples are cut into batches of ``--batch-size``; every batch is done for every radius and
method, in this process or, with ``--ray [ADDRESS]``, as Ray tasks (same batches, same numbers).
``--output`` receives ``index,eps,method,result,margin_lb,time_s`` rows as each batch finishes; a
rerun with the same file skips the batches already complete (resume). At the end: a table of
certified accuracy per radius and method and, with ``--plot``, certified accuracy against eps.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import time
from pathlib import Path

from ..distributed import add_ray_arguments
from .loaders import (
    CliError,
    add_device_argument,
    add_threads_argument,
    apply_threads,
    device_from_args,
    ray_config_from_args,
    read_result_rows,
)

RESULT_HEADER = ["index", "eps", "method", "result", "margin_lb", "time_s"]
NORMS = {"inf": math.inf, "2": 2.0, "1": 1.0}
DEFAULT_EPS = "0.01,0.02,0.05,0.1"
DEFAULT_BUNDLED_SAMPLES = 100
DISPLAY = {"ibp": "IBP", "crown-ibp": "CROWN-IBP", "crown": "CROWN", "alpha-crown": "alpha-CROWN",
           "forward": "forward", "forward+backward": "forward+backward", "complete": "complete"}


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "certify", help="certified accuracy of a classifier on a data set, per eps (table and plot)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None,
                   help="module:factory, file.py:factory, a .pt file or a .onnx file (default: the bundled digits "
                        "classifier)")
    p.add_argument("--arch", default=None, help="architecture of a state-dict .pt file")
    p.add_argument("--data", default=None,
                   help="samples, batch first: .pt (tensor, (x, y) or dict with x/y), .npy or .npz (default: the "
                        "bundled digits test set)")
    p.add_argument("--samples", type=int, default=None, metavar="N",
                   help=f"the first N samples (default: all of --data, {DEFAULT_BUNDLED_SAMPLES} bundled test images)")
    p.add_argument("--eps", default=DEFAULT_EPS, metavar="E1,E2,...", help=f"radii (default: {DEFAULT_EPS})")
    p.add_argument("--norm", default="inf", choices=sorted(NORMS), help="Lp norm of the ball (default: inf)")
    p.add_argument("--method", action="append", default=None, metavar="M",
                   help="crown, alpha-crown, complete or any bound method; repeatable or comma-separated "
                        "(default: crown,alpha-crown)")
    p.add_argument("--clip", action=argparse.BooleanOptionalAction, default=None,
                   help="intersect the ball with [0, 1] (default: on for the bundled data, off otherwise)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per sample and eps of complete (default: 10)")
    p.add_argument("--batch-size", type=int, default=25, metavar="B", help="samples per batch / task (default: 25)")
    p.add_argument("--output", default=None, metavar="results.csv",
                   help="per-sample results; an existing one is resumed")
    p.add_argument("--plot", default=None, metavar="OUT.png", help="certified accuracy vs eps (needs matplotlib)")
    add_threads_argument(p)
    add_device_argument(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_ray_arguments(p)
    p.set_defaults(run=run)
    return p


def parse_eps(text: str) -> tuple[float, ...]:
    try:
        values = tuple(sorted({float(v) for v in text.split(",") if v.strip()}))
    except ValueError:
        raise CliError(f"--eps: expected numbers separated by commas, got {text!r}") from None
    if not values or any(v < 0 or not math.isfinite(v) for v in values):
        raise CliError(f"--eps: expected radii >= 0, got {text!r}")
    return values


def parse_methods(values: list[str] | None) -> tuple[str, ...]:
    from ..algorithms import canonical_method

    names: list[str] = []
    for value in values or ["crown,alpha-crown"]:
        for item in value.split(","):
            item = item.strip()
            if not item:
                continue
            if item.lower() == "complete":
                name = "complete"
            else:
                try:
                    name = canonical_method(item)
                except ValueError as err:
                    raise CliError(f"{err} (or complete)") from None
            if name not in names:
                names.append(name)
    if not names:
        raise CliError("no method given")
    return tuple(names)


def read_results(path: Path) -> dict[tuple[int, float, str], tuple]:
    """Rows of an existing results file by ``(index, eps, method)``."""
    out: dict[tuple[int, float, str], tuple] = {}
    for row in read_result_rows(path, RESULT_HEADER, "certify results"):
        try:
            index, eps, method = int(row[0]), float(row[1]), row[2].strip()
            out[(index, eps, method)] = (row[3].strip(), float(row[4]), float(row[5]))
        except (ValueError, IndexError):
            continue  # a row cut short by an interrupted run: redo it
    return out


def _load(args: argparse.Namespace, device: str = "cpu"):
    """``(ModelSource, description, x, labels, labels_from, data description, clip default)``."""
    import torch

    from ..certify import ModelSource
    from .loaders import load_inputs, load_model

    loaded = load_model(args.model, args.arch)
    if args.data is not None:
        x, labels = load_inputs(args.data)
        data_desc, bundled = args.data, False
    else:
        from ..training.data import load_digits_dataset

        _, test = load_digits_dataset()
        x, labels = test.tensors
        data_desc, bundled = f"bundled digits test set ({x.shape[0]} images)", True
    if args.samples is None and bundled:
        args.samples = DEFAULT_BUNDLED_SAMPLES
    if args.samples is not None:
        if not 0 < args.samples <= x.shape[0]:
            raise CliError(f"--samples must be in 1..{x.shape[0]}, got {args.samples}")
        x = x[:args.samples]
        labels = labels[:args.samples] if labels is not None else None
    shape = (1, *x.shape[1:])
    if loaded.graph is not None:
        source = ModelSource(shape, onnx=Path(args.model).read_bytes(), name=str(args.model), device=device)
    else:
        source = ModelSource(shape, module=loaded.module, name=loaded.description, device=device)
    labels_from = "data"
    if labels is None:
        try:
            net = source.network()
            with torch.no_grad():
                labels = net.forward(x.reshape(x.shape[0], -1)).argmax(1).cpu()
        except Exception as err:  # noqa: BLE001
            raise CliError(f"the model rejected inputs of shape {tuple(x.shape)}: {err}") from err
        labels_from = "the model's predictions (no labels in the data)"
    return source, loaded.description, x, labels.long(), labels_from, data_desc, bundled


def run(args: argparse.Namespace) -> int:

    from ..certify import CertifyOptions, Record, certify_batch, summarise
    from .bench import _Progress

    eps = parse_eps(args.eps)
    methods = parse_methods(args.method)
    if args.batch_size < 1:
        raise CliError(f"--batch-size must be >= 1, got {args.batch_size}")
    apply_threads(args.threads)
    ray_config = ray_config_from_args(args)
    if args.plot is not None:
        from .plot import require_matplotlib

        require_matplotlib()
    output = Path(args.output) if args.output else None
    if output is not None and not output.resolve().parent.is_dir():
        raise CliError(f"--output: folder {output.resolve().parent} does not exist")

    device = str(device_from_args(args.device, ray_config))
    source, model_desc, x, labels, labels_from, data_desc, bundled = _load(args, device)
    clip_on = bundled if args.clip is None else args.clip
    if clip_on and bool(((x < 0) | (x > 1)).any()):
        raise CliError("--clip bounds the inputs to [0, 1], but some inputs lie outside; use --no-clip")
    try:
        opts = CertifyOptions(eps=eps, methods=methods, norm=NORMS[args.norm], clip=(0.0, 1.0) if clip_on else None,
                              timeout=args.timeout)
    except ValueError as err:
        raise CliError(str(err)) from None

    n = x.shape[0]
    batches = [list(range(s, min(n, s + args.batch_size))) for s in range(0, n, args.batch_size)]
    wanted = [(e, m) for e in eps for m in methods]
    done = {}
    if output is not None:
        if output.is_file() and output.stat().st_size > 0:
            done = read_results(output)
        else:
            with output.open("w", newline="") as fh:
                csv.writer(fh).writerow(RESULT_HEADER)
    records: list[Record] = []
    todo = []
    for batch in batches:
        if all((i, e, m) in done for i in batch for e, m in wanted):
            records += [Record(i, e, m, *done[(i, e, m)]) for i in batch for e, m in wanted]
        else:
            todo.append(batch)
    if len(todo) < len(batches):
        print(f"resuming {output}: {len(batches) - len(todo)} of {len(batches)} batches already done", flush=True)
    progress = _Progress(len(todo), not args.quiet)

    def record(batch: list[int], rows: list[Record]) -> None:
        """One finished batch: kept for the summary, appended to the results file at once."""
        fresh = [r for r in rows if (r.index, r.eps, r.method) not in done]
        records.extend(rows)
        if output is not None and fresh:
            with output.open("a", newline="") as fh:
                writer = csv.writer(fh)
                for r in fresh:
                    writer.writerow([r.index, repr(r.eps), r.method, r.result, repr(r.margin_lb), f"{r.time_s:.4f}"])
        certified = sum(r.certified for r in rows if r.eps == eps[0])
        progress.update(f"samples {batch[0]}-{batch[-1]}: {certified} certified at eps {eps[0]:g}")

    started = time.perf_counter()
    try:
        if ray_config is not None:
            from ..distributed.ray_certify import run_batches

            try:
                run_batches(source, todo, x, labels, opts, ray_config, record, args.threads)
            except ValueError as err:
                raise CliError(str(err)) from None
        else:
            for batch in todo:
                record(batch, certify_batch(source, batch, x[batch], labels[batch], opts))
    finally:
        progress.close()
    elapsed = time.perf_counter() - started
    summary = summarise(records, opts)
    print()
    print(f"model:  {model_desc}")
    print(f"data:   {data_desc}; {n} samples; labels: {labels_from}")
    ball = f"L{args.norm} ball" + (", clipped to [0, 1]" if clip_on else "")
    print(f"perturbation: {ball};  clean accuracy {100 * summary.correct / max(1, summary.n):.1f}% "
          f"({summary.correct}/{summary.n})")
    where = "this process" if ray_config is None else f"Ray ({args.ray})"
    print(f"time: {elapsed:.1f} s in {where}" + (" (this run)" if len(todo) < len(batches) else ""))
    print()
    print_table(summary, eps, methods)
    if args.plot is not None:
        plot_certified(args.plot, summary, eps, methods, title=f"{Path(str(args.model or 'digits')).name}, "
                                                                f"{n} samples, L{args.norm}")
        print(f"\nplot written to {args.plot}")
    return 0


def print_table(summary, eps, methods) -> None:
    header = ["eps"] + [DISPLAY.get(m, m) for m in methods]
    rows = [[f"{e:g}"] + [f"{100 * summary.accuracy(e, m):.1f}%" for m in methods] for e in eps]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    print("certified accuracy")
    for r in [header, *rows]:
        print("  " + "  ".join(c.rjust(w) for c, w in zip(r, widths)))
    if "complete" in methods:
        print("complete: " + "; ".join(
            f"eps {e:g}: " + ", ".join(f"{k} {v}" for k, v in sorted(summary.counts.get((e, "complete"), {}).items()))
            for e in eps))
    print("time (s, summed over samples): " + ", ".join(f"{DISPLAY.get(m, m)} {summary.time_s.get(m, 0.0):.1f}"
                                                        for m in methods))
    sys.stdout.flush()


def plot_certified(path: str, summary, eps, methods, title: str = "") -> None:
    """Certified accuracy (%) against eps, one line per method; clean accuracy dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    styles = [("o", "-"), ("s", "--"), ("^", ":"), ("D", "-.")]
    for k, m in enumerate(methods):  # markers and dashes keep lines that coincide visible
        marker, dash = styles[k % len(styles)]
        ax.plot(eps, [100 * summary.accuracy(e, m) for e in eps], marker=marker, linestyle=dash,
                markersize=7 - k, label=DISPLAY.get(m, m))
    ax.axhline(100 * summary.correct / max(1, summary.n), color="grey", linestyle="--", linewidth=0.8,
               label="clean accuracy")
    ax.set_xlabel("eps")
    ax.set_ylabel("certified accuracy (%)")
    ax.set_ylim(0, 102)
    ax.set_title(title)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

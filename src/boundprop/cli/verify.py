"""``boundprop verify MODEL.onnx PROP.vnnlib``: decide one VNN-LIB property (VNN-COMP style).

Prints the verdict (``sat``, ``unsat``, ``timeout``, ``unknown``), the time and the search
statistics; ``--result-file`` writes the VNN-COMP result file (the verdict, and for ``sat`` the
counterexample ``((X_0 v) ... (Y_0 v) ...)``). The exit status is 0 for every verdict; a missing
or malformed file ends with one message and status 2.

``--timeout`` counts from the start of the process (imports and loading included), as VNN-COMP's wall clock.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from ..distributed import add_ray_arguments
from .loaders import (
    CliError,
    add_device_argument,
    add_threads_argument,
    apply_threads,
    device_from_args,
    ray_config_from_args,
)


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "verify", help="decide a VNN-LIB property of an ONNX model (sat / unsat / timeout / unknown)",
        description="Decide a VNN-LIB property of an ONNX model: falsification, bounds, then input-splitting "
                    "branch and bound. Prints the verdict and statistics; exit status 0 for every verdict.")
    p.add_argument("model", help="the network (.onnx)")
    p.add_argument("property", help="the property (.vnnlib, or .vnnlib.gz)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds, loading included (default: 60)")
    p.add_argument("--result-file", default=None, metavar="FILE", help="write the VNN-COMP result file here")
    p.add_argument("--batch-size", type=int, default=None, metavar="B", help="boxes bounded per step (default: 512)")
    add_threads_argument(p)
    add_device_argument(p)
    p.add_argument("--seed", type=int, default=0, help="random seed of the attacks (default: 0)")
    p.add_argument("-v", "--verbose", action="store_true", help="print search progress")
    p.add_argument("--parts", type=int, default=None, metavar="K",
                   help="with --ray: sub-boxes per input region at the start (default: 2 per worker)")
    add_ray_arguments(p)
    p.set_defaults(run=run)
    return p


def check_files(model: str | Path, prop: str | Path) -> None:
    """Raise :class:`CliError` unless both files exist."""
    for path, what in ((model, "model"), (prop, "property")):
        if not Path(path).is_file():
            raise CliError(f"{what} file not found: {path}")


def load_inputs(model: str | Path, prop: str | Path, float64: bool = True, device: Any = None):
    """``(Network, Property)`` for the two files; bad files raise :class:`CliError` (one line)."""
    from ..bab.verifier import Network
    from ..graph import UnsupportedOperatorError
    from ..spec.vnnlib import VnnlibError, read_vnnlib

    check_files(model, prop)
    try:
        spec = read_vnnlib(prop)
    except VnnlibError as err:
        raise CliError(f"bad property file: {err}") from None
    except (OSError, UnicodeDecodeError, EOFError) as err:
        raise CliError(f"cannot read property file {prop}: {err}") from None
    try:
        net = Network.from_onnx(model, float64, device)
    except UnsupportedOperatorError as err:
        raise CliError(f"unsupported model {model}: {err}") from None
    except Exception as err:  # onnx's parser raises its own (DecodeError, ValidationError...)
        raise CliError(f"cannot load model {model}: {type(err).__name__}: {err}") from None
    if net.n_inputs != spec.n_inputs:
        raise CliError(f"the property declares {spec.n_inputs} inputs X_i but the model takes {net.n_inputs} "
                       f"(input shape {list(net.input_shape)})")
    return net, spec


def format_stats(stats: dict[str, Any]) -> str:
    parts = []
    for key, value in stats.items():
        parts.append(f"{key}={value:.2f}" if isinstance(value, float) else f"{key}={value}")
    return " ".join(parts)


def run(args: argparse.Namespace) -> int:

    from ..bab.verifier import VerifierOptions, verify

    start = getattr(args, "started", time.perf_counter())
    if args.timeout <= 0:
        raise CliError(f"--timeout must be > 0, got {args.timeout}")
    if args.batch_size is not None and args.batch_size < 1:
        raise CliError(f"--batch-size must be >= 1, got {args.batch_size}")
    apply_threads(args.threads)
    if args.result_file is not None:
        parent = Path(args.result_file).resolve().parent
        if not parent.is_dir():
            raise CliError(f"--result-file: folder {parent} does not exist")
    ray_config = _ray_config(args)
    device = device_from_args(args.device, ray_config)
    net, spec = load_inputs(args.model, args.property, device=device)
    opts = VerifierOptions(seed=args.seed)
    if args.batch_size is not None:
        opts.batch_size = args.batch_size
    remaining = max(0.0, args.timeout - (time.perf_counter() - start))
    log = (lambda msg: print(f"  {msg}", flush=True)) if args.verbose else None
    if ray_config is not None:  # the property's regions split over Ray actors
        from ..distributed.ray_bab import verify_distributed

        try:
            result = verify_distributed(args.model, spec, remaining, config=ray_config, parts=args.parts,
                                        options=opts, log=log)
        except ValueError as err:
            raise CliError(str(err)) from None
    else:
        result = verify(net, spec, timeout=remaining, options=opts, log=log)
    elapsed = time.perf_counter() - start
    if args.result_file is not None:
        Path(args.result_file).write_text(result.vnncomp_text())
    print(f"result: {result.verdict}")
    print(f"time: {elapsed:.2f} s (search {result.time_s:.2f} s)")
    if result.stats:
        print(f"stats: {format_stats(result.stats)}")
    if result.verdict == "sat" and result.counterexample is not None:
        x, y = result.counterexample
        print(f"counterexample: x = {[round(float(v), 6) for v in x.reshape(-1)[:10].tolist()]}"
              + (" ..." if x.numel() > 10 else ""))
        print(f"                y = {[round(float(v), 6) for v in y.reshape(-1)[:10].tolist()]}"
              + (" ..." if y.numel() > 10 else ""))
    return 0


def _ray_config(args: argparse.Namespace):
    """The Ray settings of ``--ray`` (None without it); a missing Ray install is a one-line error."""
    if getattr(args, "ray", None) is None:
        if args.parts is not None:
            raise CliError("--parts applies to --ray")
        return None
    config = ray_config_from_args(args)
    if args.parts is not None and args.parts < 1:
        raise CliError(f"--parts must be >= 1, got {args.parts}")
    return config

"""Entry point of the ``boundprop`` command: ``boundprop <subcommand> [options]``.

Subcommands:

* ``bounds``: compare bound methods on a model and inputs (default: the bundled digits
  classifier on real test images), see :mod:`boundprop.cli.bounds`.
* ``verify``: decide a VNN-LIB property of an ONNX model, see :mod:`boundprop.cli.verify`.
* ``bench``: verify every instance of a VNN-COMP ``instances.csv``, see :mod:`boundprop.cli.bench`.
* ``train``: certified (IBP, CROWN-IBP, CROWN), PGD or natural training on the digits, see
  :mod:`boundprop.cli.train`.
* ``certify``: certified accuracy of a classifier on a data set per eps, see :mod:`boundprop.cli.certify`.

``bench``, ``certify`` and ``verify`` take ``--ray [ADDRESS]`` (optional Ray back end, see
:mod:`boundprop.distributed`).

The command keeps freed memory in the process (:func:`boundprop.runtime.keep_freed_memory`;
``BOUNDPROP_MALLOC=default`` keeps the C library's defaults).

User errors (bad method, missing file, ...) end with one message on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

from ..runtime import keep_freed_memory
from . import bench, bounds, certify, train, verify
from .loaders import CliError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="boundprop", description="Provable bounds on neural network outputs.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    bounds.add_parser(sub)
    verify.add_parser(sub)
    bench.add_parser(sub)
    train.add_parser(sub)
    certify.add_parser(sub)
    return parser


def process_started() -> float:
    """When this process started, on the ``time.perf_counter()`` clock (now where /proc is missing):
    a command's time limit then covers the interpreter's start and the imports (torch's alone take
    seconds), as a caller timing the whole process sees it."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: start time after boot
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        age = uptime - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        age = 0.0
    return time.perf_counter() - max(0.0, age)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default: ``sys.argv[1:]``, timed from the process's start);
    returns the exit status."""
    started = process_started() if argv is None else time.perf_counter()
    parser = build_parser()
    args = parser.parse_args(None if argv is None else list(argv))
    args.started = started
    keep_freed_memory()
    try:
        return int(args.run(args) or 0)
    except CliError as err:
        parser.exit(2, f"boundprop {args.command}: error: {err}\n")


if __name__ == "__main__":
    sys.exit(main())

"""Entry point of the ``boundprop`` command: ``boundprop <subcommand> [options]``.

Subcommands:

* ``bounds``: compare bound methods on a model and inputs (default: the bundled digits
  classifier on real test images), see :mod:`boundprop.cli.bounds`.
* ``verify``: decide a VNN-LIB property of an ONNX model, see :mod:`boundprop.cli.verify`.
* ``bench``: verify every instance of a VNN-COMP ``instances.csv``, see :mod:`boundprop.cli.bench`.
* ``train``: certified (IBP, CROWN-IBP, CROWN), PGD or natural training on the digits, see
  :mod:`boundprop.cli.train`.

User errors (bad method, missing file, ...) end with one message on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import bench, bounds, train, verify
from .loaders import CliError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="boundprop", description="Provable bounds on neural network outputs.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    bounds.add_parser(sub)
    verify.add_parser(sub)
    bench.add_parser(sub)
    train.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(None if argv is None else list(argv))
    try:
        return int(args.run(args) or 0)
    except CliError as err:
        parser.exit(2, f"boundprop {args.command}: error: {err}\n")


if __name__ == "__main__":
    sys.exit(main())

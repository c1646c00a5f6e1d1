"""Run `boundprop bench` on VNN-COMP benchmarks, whole or on an evenly spaced sample of instances.

For a sample, a folder ``<work>/<benchmark>`` is made with links to the benchmark's ``onnx/``,
``vnnlib/`` and ``groundtruth.csv`` and an ``instances.csv`` holding the chosen rows, so that the
paths (and the ground-truth check of `boundprop bench`) stay those of the benchmark.

    python benchmarks/verify_bench.py acasxu                      # the whole benchmark
    python benchmarks/verify_bench.py mnist_fc oval21 --sample 10  # 10 evenly spaced instances each

Results go to ``<work>/<benchmark>_results.csv`` (a rerun resumes); the summaries are printed.
The benchmarks are read from ``--root`` (default: ../shared/benchmarks beside the repository).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ROOT = REPO.parent / "shared" / "benchmarks"


def sample_rows(rows: list[str], n: int | None) -> list[str]:
    """``n`` rows evenly spaced over ``rows`` (all of them when ``n`` is None or large)."""
    if n is None or n >= len(rows):
        return rows
    step = len(rows) / n
    return [rows[int(i * step + step / 2)] for i in range(n)]


def prepare(bench: Path, work: Path, n: int | None) -> Path:
    """The instances file to run: the benchmark's own, or a sample in a linked folder."""
    if n is None:
        return bench / "instances.csv"
    rows = [line for line in (bench / "instances.csv").read_text().splitlines() if line.strip()]
    folder = work / bench.name
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("onnx", "vnnlib", "groundtruth.csv"):
        link = folder / name
        if (bench / name).exists() and not link.exists():
            os.symlink(bench / name, link)
    path = folder / "instances.csv"
    path.write_text("\n".join(sample_rows(rows, n)) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("benchmarks", nargs="+", help="benchmark folder names (e.g. acasxu mnist_fc)")
    p.add_argument("--sample", type=int, default=None, metavar="N", help="N evenly spaced instances per benchmark")
    p.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="folder of the benchmarks")
    p.add_argument("--work", type=Path, default=Path("verify_bench_work"), help="folder for samples and results")
    p.add_argument("--timeout-scale", default="1.0", help="passed to boundprop bench")
    p.add_argument("--threads", default=None, help="passed to boundprop bench")
    args = p.parse_args(argv)
    from boundprop.cli.main import main as boundprop_main

    args.work.mkdir(parents=True, exist_ok=True)
    for name in args.benchmarks:
        bench = args.root / name
        if not (bench / "instances.csv").is_file():
            print(f"no benchmark {bench}", file=sys.stderr)
            return 2
        instances = prepare(bench, args.work, args.sample)
        output = args.work / f"{name}_results.csv"
        command = ["bench", str(instances), "--output", str(output), "--timeout-scale", args.timeout_scale]
        if args.threads:
            command += ["--threads", args.threads]
        print(f"$ boundprop {' '.join(command)}", flush=True)
        boundprop_main(command)
    return 0


if __name__ == "__main__":
    sys.exit(main())

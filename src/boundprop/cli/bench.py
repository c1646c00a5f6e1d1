"""``boundprop bench INSTANCES.csv``: run the verifier on a VNN-COMP benchmark, in one process.

``INSTANCES.csv`` has rows ``onnx,vnnlib,timeout`` (no header), paths relative to the CSV's
folder. Every instance is verified in turn (each ONNX network is imported once and reused);
``--output`` receives ``onnx,vnnlib,result,time_s`` (paths as in the instances file), one row as
each result arrives, and a rerun with the same ``--output`` skips the instances already there
(resume). At the end a summary: verified (``unsat``), falsified (``sat``), timeout,
unknown/error, and, when a ``groundtruth.csv`` lies beside the instances file (columns
``onnx,vnnlib,timeout_s,expected,...``; ``expected`` sat/unsat, other values not scored), the
number of wrong answers; total and median time of the instances run.

``time_s`` is the wall time of the instance (verification plus the first import of its network).

``--ray [ADDRESS]`` runs the instances as Ray tasks (a local Ray instance, or the cluster at
ADDRESS) with the same verdicts, results file, resume and summary: see
:mod:`boundprop.distributed.ray_bench`.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
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

RESULT_HEADER = ["onnx", "vnnlib", "result", "time_s"]


@dataclass(frozen=True)
class Instance:
    onnx: str  # as written in the instances file
    vnnlib: str
    timeout: float

    @property
    def key(self) -> tuple[str, str]:
        return _key(self.onnx, self.vnnlib)


def _key(onnx: str, vnnlib: str) -> tuple[str, str]:
    return os.path.normpath(onnx.strip()), os.path.normpath(vnnlib.strip())


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "bench", help="verify every instance of a VNN-COMP instances.csv and summarise",
        description="Verify every instance of a VNN-COMP instances.csv (rows onnx,vnnlib,timeout relative to "
                    "the CSV's folder) in one process, write the results row by row, and print a summary "
                    "(checked against groundtruth.csv beside the instances file when there is one).")
    p.add_argument("instances", help="the instances.csv file")
    p.add_argument("--output", default=None, metavar="results.csv",
                   help="results file (onnx,vnnlib,result,time_s); an existing one is resumed")
    p.add_argument("--timeout-scale", type=float, default=1.0, help="multiply every timeout (default: 1.0)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N instances")
    add_threads_argument(p)
    add_device_argument(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_ray_arguments(p)
    p.set_defaults(run=run)
    return p


def read_instances(path: Path) -> list[Instance]:
    """The rows of an instances file (blank lines and a header row skipped)."""
    if not path.is_file():
        raise CliError(f"instances file not found: {path}")
    out = []
    with path.open(newline="") as fh:
        for number, row in enumerate(csv.reader(fh), 1):
            row = [cell.strip() for cell in row]
            if not row or not any(row):
                continue
            if len(row) < 3:
                raise CliError(f"{path}:{number}: expected onnx,vnnlib,timeout, got {','.join(row)!r}")
            try:
                timeout = float(row[2])
            except ValueError:
                if number == 1:
                    continue  # a header
                raise CliError(f"{path}:{number}: timeout {row[2]!r} is not a number") from None
            out.append(Instance(row[0], row[1], timeout))
    return out


def read_groundtruth(path: Path) -> dict[tuple[str, str], str]:
    """``{(onnx, vnnlib): "sat" | "unsat"}`` from a groundtruth.csv (other answers left out)."""
    out = {}
    with path.open(newline="") as fh:
        for row in csv.DictReader(fh):
            expected = (row.get("expected") or "").strip().lower()
            if expected in ("sat", "unsat") and row.get("onnx") and row.get("vnnlib"):
                out[_key(row["onnx"], row["vnnlib"])] = expected
    return out


def read_results(path: Path) -> dict[tuple[str, str], tuple[str, float]]:
    """Finished instances of an existing results file: ``{key: (result, time_s)}``."""
    out: dict[tuple[str, str], tuple[str, float]] = {}
    for row in read_result_rows(path, RESULT_HEADER, "results"):
        try:
            out[_key(row[0], row[1])] = (row[2].strip(), float(row[3]))
        except (ValueError, IndexError):
            continue  # a row cut short by an interrupted run: redo it
    return out


class _Progress:
    """tqdm when installed, else a one-line text bar on stderr."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.done, self.enabled = total, 0, enabled
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit="inst", file=sys.stderr, dynamic_ncols=True)
            except ImportError:
                self.bar = None

    def update(self, note: str) -> None:
        self.done += 1
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix_str(note)
            self.bar.update(1)
            return
        width = 30
        filled = int(width * self.done / max(1, self.total))
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} {note:<40}")
        if self.done == self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def summarise(results: Iterable[tuple[Instance, str, float]], truth: dict[tuple[str, str], str] | None) -> list[
        tuple[str, str]]:
    """``[(label, value), ...]`` for the summary table."""
    results = list(results)
    counts = {"unsat": 0, "sat": 0, "timeout": 0}
    other = wrong = 0
    times = []
    for inst, result, seconds in results:
        times.append(seconds)
        if result in counts:
            counts[result] += 1
        else:
            other += 1
        expected = truth.get(inst.key) if truth else None
        if expected and result in ("sat", "unsat") and result != expected:
            wrong += 1
    rows = [("instances", str(len(results))), ("verified (unsat)", str(counts["unsat"])),
            ("falsified (sat)", str(counts["sat"])), ("timeout", str(counts["timeout"])),
            ("unknown/error", str(other))]
    if truth is not None:
        scored = sum(1 for inst, _, _ in results if inst.key in truth)
        rows.append(("wrong (vs groundtruth)", f"{wrong} of {scored} scored"))
    rows.append(("total time", f"{sum(times):.1f} s"))
    rows.append(("median time", f"{statistics.median(times):.2f} s" if times else "-"))
    return rows


def run(args: argparse.Namespace) -> int:

    from ..bab.verifier import Network, verify

    if args.timeout_scale <= 0:
        raise CliError(f"--timeout-scale must be > 0, got {args.timeout_scale}")
    if args.limit is not None and args.limit < 0:
        raise CliError(f"--limit must be >= 0, got {args.limit}")
    apply_threads(args.threads)
    ray_config = ray_config_from_args(args)
    device = device_from_args(args.device, ray_config)
    path = Path(args.instances)
    instances = read_instances(path)
    if args.limit is not None:
        instances = instances[:args.limit]
    root = path.resolve().parent
    truth_path = root / "groundtruth.csv"
    truth = read_groundtruth(truth_path) if truth_path.is_file() else None
    output = Path(args.output) if args.output else None
    done: dict[tuple[str, str], tuple[str, float]] = {}
    if output is not None:
        if output.is_file() and output.stat().st_size > 0:
            done = read_results(output)
        else:
            if not output.resolve().parent.is_dir():
                raise CliError(f"--output: folder {output.resolve().parent} does not exist")
            with output.open("w", newline="") as fh:
                csv.writer(fh).writerow(RESULT_HEADER)
    results: list[tuple[Instance, str, float]] = []
    todo = []
    for inst in instances:
        if inst.key in done:
            results.append((inst, *done[inst.key]))
        else:
            todo.append(inst)
    if done:
        print(f"resuming {output}: {len(results)} of {len(instances)} instances already done", flush=True)
    networks: dict[Path, Network] = {}
    progress = _Progress(len(todo), not args.quiet)

    def record(inst: Instance, result: str, seconds: float) -> None:
        """One finished instance: the summary, the results file (at once) and the progress bar."""
        results.append((inst, result, seconds))
        if output is not None:
            with output.open("a", newline="") as fh:
                csv.writer(fh).writerow([inst.onnx, inst.vnnlib, result, f"{seconds:.3f}"])
        expected = truth.get(inst.key) if truth else None
        mark = "" if expected is None or result not in ("sat", "unsat") else (
            " ok" if result == expected else " WRONG")
        progress.update(f"{Path(inst.vnnlib).stem}: {result} {seconds:.1f}s{mark}")

    try:
        if ray_config is not None:  # the same instances as Ray tasks, results through record()
            from ..distributed.ray_bench import run_instances

            try:
                run_instances(todo, root, args.timeout_scale, ray_config, record, args.threads)
            except ValueError as err:  # e.g. a cluster without the resources of one task
                raise CliError(str(err)) from None
            todo = []
        for inst in todo:
            t0 = time.perf_counter()
            timeout = inst.timeout * args.timeout_scale
            try:
                onnx_path = (root / inst.onnx).resolve()
                if onnx_path not in networks:
                    networks[onnx_path] = Network.from_onnx(onnx_path, device=device)
                remaining = max(0.0, timeout - (time.perf_counter() - t0))
                result = verify(networks[onnx_path], root / inst.vnnlib, timeout=remaining).verdict
            except KeyboardInterrupt:
                raise
            except Exception as err:  # one broken instance must not stop the benchmark
                result = "error"
                print(f"\nerror on {inst.onnx} {inst.vnnlib}: {type(err).__name__}: {err}", file=sys.stderr)
            record(inst, result, time.perf_counter() - t0)
    finally:
        progress.close()
    print()
    print(f"benchmark: {path}" + (f"  (ground truth: {truth_path.name})" if truth is not None else ""))
    rows = summarise(results, truth)
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"  {label.ljust(width)}  {value}")
    return 0

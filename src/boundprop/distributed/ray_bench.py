"""``boundprop bench --ray``: the instances of a benchmark as Ray tasks.

The driver (the ``boundprop bench`` process) reads every ONNX file once and puts its bytes in Ray's
object store, then keeps as many tasks in flight as the cluster has room for (its CPUs, or GPUs,
over the per-task resources; at most ``--workers``). A task imports the network (once per worker
process: a small cache keyed by the file's path), parses the property and calls
:func:`boundprop.verify` with the instance's timeout, exactly as the single-process run does, so
verdicts are the same. Results come back in completion order and go through the same ``record``
callback as the local loop (results file row by row, progress bar, summary).

Faults:

* a task whose worker process dies (crash, killed by Ray's memory monitor, lost node) is retried
  once, with Ray's ``SPREAD`` strategy (another node where there is one); a second death is
  reported as ``error`` for that instance only;
* a task still running ``timeout * 1.25 + 60`` s after it was submitted (a bound step that never
  returns to the clock check) is cancelled (its worker killed) and reported as ``timeout``;
* an exception inside the verifier is ``error`` (with the message on stderr), as in the local run.

Nothing here needs files to be shared between machines: networks and properties travel by value.
"""

from __future__ import annotations

import gzip
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import RayConfig, start_ray, stop_ray
from .tasks import Job, run_jobs

#: Test hook: ``{substring of "onnx vnnlib": attempts}``: that many attempts of a matching instance
#: kill their worker process (``os._exit``) before doing anything. Read on the driver, sent with the task.
CRASH_FOR_TESTS: dict[str, int] = {}
#: Test hook: ``{substring of "onnx vnnlib": seconds}``: a matching task sleeps that long first (a hang).
HANG_FOR_TESTS: dict[str, float] = {}

#: networks imported by this worker process, by path (the most recent few)
_NETWORKS: dict[str, Any] = {}
_CACHE_SIZE = 4


def hard_limit(timeout: float) -> float:
    """Seconds after submission at which a task is cancelled and reported ``timeout``."""
    return 1.25 * timeout + 60.0


def network_from_bytes(key: str, raw: bytes, device: str | None = None) -> Any:
    """A :class:`~boundprop.bab.verifier.Network` (on ``device``) from the bytes of an ``.onnx`` (or
    ``.onnx.gz``) file, as :meth:`Network.from_onnx <boundprop.bab.verifier.Network.from_onnx>` builds
    it from the file."""
    import onnx

    from .. import load_onnx
    from ..bab.verifier import Network

    if key.endswith(".gz"):
        raw = gzip.decompress(raw)
    graph = load_onnx(onnx.load_model_from_string(raw))
    return Network(graph, tuple(graph.input_shapes[0]), raw, True, device)


def _cached_network(key: str, holder: list) -> Any:
    net = _NETWORKS.get(key)
    if net is None:
        import ray

        net = network_from_bytes(key, ray.get(holder[0]))
        while len(_NETWORKS) >= _CACHE_SIZE:
            _NETWORKS.pop(next(iter(_NETWORKS)))
        _NETWORKS[key] = net
    return net


def verify_instance(onnx_key: str, onnx_holder: list, vnnlib_name: str, vnnlib_text: str, timeout: float,
                    threads: int | None, crash: bool, hang: float = 0.0) -> tuple[str, float, str | None]:
    """The body of one task: ``(verdict or "error", seconds, error message or None)``; as in the local
    run, the seconds count the import of the network when this worker had not imported it yet, but
    not the import of torch and boundprop into a fresh worker (seconds on a loaded machine)."""
    import torch

    from ..bab.verifier import verify
    from ..spec.vnnlib import parse_vnnlib

    t0 = time.perf_counter()
    if crash:
        os._exit(3)  # the test hook: the worker dies under the task
    if hang:
        time.sleep(hang)  # the test hook: a task that does not come back
    try:
        if threads:
            torch.set_num_threads(threads)
        net = _cached_network(onnx_key, onnx_holder)
        prop = parse_vnnlib(vnnlib_text, vnnlib_name)
        remaining = max(0.0, timeout - (time.perf_counter() - t0))
        return verify(net, prop, timeout=remaining).verdict, time.perf_counter() - t0, None
    except Exception as err:  # noqa: BLE001  (one broken instance must not stop the benchmark)
        return "error", time.perf_counter() - t0, f"{type(err).__name__}: {err}"


def _read_text(path: Path) -> str:
    if path.suffix == ".gz":
        with gzip.open(path, "rt") as fh:
            return fh.read()
    return path.read_text()


def _crash_attempts(inst: Any) -> int:
    name = f"{inst.onnx} {inst.vnnlib}"
    return max([n for key, n in CRASH_FOR_TESTS.items() if key in name], default=0)


def _hang(inst: Any) -> float:
    name = f"{inst.onnx} {inst.vnnlib}"
    return max([s for key, s in HANG_FOR_TESTS.items() if key in name], default=0.0)


def _warn(message: str) -> None:
    print(f"\n{message}", file=sys.stderr, flush=True)


def run_instances(todo: Sequence[Any], root: Path, timeout_scale: float, config: RayConfig,
                  record: Callable[[Any, str, float], None], threads: int | None = None) -> None:
    """Verify the instances ``todo`` (:class:`boundprop.cli.bench.Instance`) as Ray tasks and call
    ``record(instance, result, seconds)`` for each as it finishes (in completion order)."""
    ray, started = start_ray(config)
    try:
        task_threads = threads or max(1, int(config.cpus_per_task))
        networks: dict[Path, list] = {}

        def make_args(inst: Any) -> Callable[[int], tuple]:
            def args(attempt: int) -> tuple:
                onnx_path = (root / inst.onnx).resolve()
                if onnx_path not in networks:  # read and shipped once per network
                    networks[onnx_path] = [ray.put(onnx_path.read_bytes())]
                vnnlib_path = root / inst.vnnlib
                return (str(onnx_path), networks[onnx_path], str(vnnlib_path), _read_text(vnnlib_path),
                        inst.timeout * timeout_scale, task_threads, attempt < _crash_attempts(inst), _hang(inst))
            return args

        def done(job: Job, value: tuple[str, float, str | None]) -> None:
            result, seconds, message = value
            if message:
                _warn(f"error on {job.label}: {message}")
            record(job.payload, result, seconds)

        def failed(job: Job, kind: str, message: str, seconds: float) -> None:
            _warn(f"{kind} on {job.label}: {message}")
            record(job.payload, kind, seconds)

        limit = hard_limit  # looked up here so that tests can shorten it
        jobs = [Job(f"{inst.onnx} {inst.vnnlib}", make_args(inst), limit(inst.timeout * timeout_scale), inst)
                for inst in todo]
        run_jobs(ray, verify_instance, jobs, config, done, failed, _warn)
    finally:
        stop_ray(ray, started)

"""A small scheduler of Ray tasks with results streamed back, one retry on lost workers, and a watchdog.

:func:`run_jobs` keeps at most ``slots`` tasks in flight (so that a task starts about when it is
submitted and the watchdog can time it), hands every result to ``on_done`` as soon as it arrives,
retries a job once (``SPREAD`` strategy: another node where there is one) when its worker process
died, and reports a job that died twice, raised, or outlived its ``limit`` to ``on_error``.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from . import RayConfig, is_system_failure


@dataclass
class Job:
    """One task: ``make_args(attempt)`` gives the arguments of the remote function (it may raise
    ``OSError``: the job then fails without being submitted); ``limit``: seconds after submission at
    which the task is cancelled; ``payload``: whatever the caller wants back in the callbacks."""

    label: str
    make_args: Callable[[int], tuple]
    limit: float
    payload: Any = None


def run_jobs(ray: Any, fn: Callable, jobs: Sequence[Job], config: RayConfig, on_done: Callable[[Job, Any], None],
             on_error: Callable[[Job, str, str, float], None], warn: Callable[[str], None] | None = None) -> None:
    """Run ``fn(*job.make_args(attempt))`` for every job as Ray tasks.

    ``on_done(job, value)`` for each result (completion order); ``on_error(job, kind, message,
    seconds)`` with ``kind`` ``"error"`` (the worker died twice, or the task raised) or ``"timeout"``
    (cancelled by the watchdog), ``seconds`` since the last submission."""
    task = ray.remote(fn)
    slots = config.slots(ray)
    queue: deque[tuple[Job, int]] = deque((job, 0) for job in jobs)
    inflight: dict[Any, tuple[Job, int, float]] = {}
    warn = warn or (lambda message: None)
    try:
        while queue or inflight:
            while queue and len(inflight) < slots:
                job, attempt = queue.popleft()
                try:
                    args = job.make_args(attempt)
                except (OSError, UnicodeDecodeError, EOFError) as err:
                    on_error(job, "error", f"{type(err).__name__}: {err}", 0.0)
                    continue
                options = config.task_options()
                if attempt:
                    options["scheduling_strategy"] = "SPREAD"
                inflight[task.options(**options).remote(*args)] = (job, attempt, time.perf_counter())
            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=0.5)
            for ref in ready:
                job, attempt, submitted = inflight.pop(ref)
                try:
                    value = ray.get(ref)
                except Exception as err:  # noqa: BLE001
                    if is_system_failure(err) and attempt == 0:
                        warn(f"worker lost on {job.label} ({type(err).__name__}); retrying once")
                        queue.appendleft((job, 1))
                        continue
                    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
                    on_error(job, "error", f"{type(err).__name__}: {first}", time.perf_counter() - submitted)
                    continue
                on_done(job, value)
            now = time.perf_counter()
            for ref, (job, _, submitted) in list(inflight.items()):
                if now - submitted > job.limit:
                    ray.cancel(ref, force=True)
                    del inflight[ref]
                    on_error(job, "timeout", f"no answer {job.limit:.0f} s after submission; cancelled",
                             now - submitted)
    finally:
        for ref in inflight:  # interrupted: stop what still runs (finished results were handed over)
            try:
                ray.cancel(ref, force=True)
            except Exception:  # noqa: BLE001
                pass

"""``boundprop certify --ray``: batches of samples as Ray tasks.

The model (:class:`~boundprop.certify.ModelSource`: an ``nn.Module`` pickled by Ray, or the bytes of
an ONNX file) is put in the object store once; each task runs :func:`boundprop.certify.certify_batch`
on one batch, the same batches as the single-process run, and its records go to ``record`` as the
task finishes. A worker that dies is retried once; a batch that fails twice, raises, or runs past
its limit (``timeout`` per sample and radius of ``complete``, plus slack) gets ``error``/``timeout``
records for its samples, and the others are unaffected.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from typing import Any

from . import RayConfig, start_ray, stop_ray
from .tasks import Job, run_jobs


def _batch_task(holder: list, indices: list[int], x: Any, labels: Any, opts: Any, threads: int | None) -> list:
    import ray

    from ..certify import certify_batch

    return certify_batch(ray.get(holder[0]), indices, x, labels, opts, threads)


def batch_limit(n_samples: int, opts: Any) -> float:
    """Seconds after submission at which a batch is cancelled: generous, the verifier keeps its own clock."""
    complete = opts.timeout * n_samples * len(opts.eps) if "complete" in opts.methods else 0.0
    return 1.25 * complete + 60.0 + 30.0 * n_samples * len(opts.eps) * len(opts.methods)


def run_batches(source: Any, batches: Sequence[list[int]], x: Any, labels: Any, opts: Any, config: RayConfig,
                record: Callable[[list[int], list], None], threads: int | None = None) -> None:
    """Certify every batch (lists of sample indices into ``x``/``labels``) as a Ray task."""
    from ..certify import Record

    ray, started = start_ray(config)
    try:
        holder = [ray.put(source)]
        task_threads = threads or max(1, int(config.cpus_per_task))

        def warn(message: str) -> None:
            print(f"\n{message}", file=sys.stderr, flush=True)

        def job(batch: list[int]) -> Job:
            args = (holder, batch, x[batch], labels[batch], opts, task_threads)
            return Job(f"samples {batch[0]}-{batch[-1]}", lambda attempt: args, batch_limit(len(batch), opts), batch)

        def failed(j: Job, kind: str, message: str, seconds: float) -> None:
            warn(f"{kind} on {j.label}: {message}")
            share = seconds / max(1, len(j.payload))
            record(j.payload, [Record(i, e, m, kind, math.nan, share) for i in j.payload for e in opts.eps
                               for m in opts.methods])

        run_jobs(ray, _batch_task, [job(b) for b in batches], config, lambda j, rows: record(j.payload, rows), failed,
                 warn)
    finally:
        stop_ray(ray, started)

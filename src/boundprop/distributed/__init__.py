"""Optional Ray back end: benchmarks, certification and branch and bound spread over many processes.

Ray is an optional dependency (``pip install 'boundprop[ray]'``); nothing here imports it until a
command asks for it, and :func:`require_ray` turns a missing install into one clear message.

* :mod:`boundprop.distributed.ray_bench`: the instances of ``boundprop bench --ray`` as Ray tasks;
* :mod:`boundprop.distributed.ray_certify`: the batches of ``boundprop certify --ray``
  (:func:`boundprop.certify.certify_batch` as Ray tasks);
* :mod:`boundprop.distributed.ray_bab`: one property's input region split over Ray actors
  (``boundprop verify --ray``, ``verify_distributed``, ``BabPool``);
* :mod:`boundprop.distributed.tasks`: the scheduler they share (results streamed back as they
  come, one retry when a worker dies, a watchdog per task).

:class:`RayConfig` holds what the command line says about the cluster and the per-task resources;
:func:`start_ray` connects (or starts a local instance) and :func:`stop_ray` disconnects only
when this process started the session.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Any

INSTALL_HINT = "pip install 'boundprop[ray]'  (or: pip install ray)"

#: object store of a local instance started by boundprop (MiB); networks and samples are small
LOCAL_OBJECT_STORE_MB = int(os.environ.get("BOUNDPROP_RAY_OBJECT_STORE_MB", "256"))

#: exceptions of a worker that died (crash, out of memory, lost node): the task is retried once
SYSTEM_FAILURES = ("WorkerCrashedError", "OutOfMemoryError", "NodeDiedError", "ObjectLostError",
                   "OwnerDiedError", "RayActorError", "ActorDiedError", "ActorUnavailableError",
                   "TaskUnschedulableError", "LocalRayletDiedError", "ReferenceCountingAssertionError")


class RayUnavailable(ImportError):
    """``--ray`` was asked for but Ray is not installed."""


def require_ray() -> Any:
    """The ``ray`` module, or :class:`RayUnavailable` with the install command."""
    try:
        import ray
    except ImportError as err:
        raise RayUnavailable(f"--ray needs Ray, which is not installed: {INSTALL_HINT}") from err
    return ray


def ray_available() -> bool:
    try:
        require_ray()
    except RayUnavailable:
        return False
    return True


@dataclass
class RayConfig:
    """Where to run and what each task asks for.

    ``address``: None or ``"local"`` starts a local instance (``workers`` CPUs, default all cores);
    anything else (``auto``, ``ray://host:10001``, ``host:6379``) joins that cluster, and ``workers``
    then caps the tasks in flight. ``cpus_per_task``/``gpus_per_task``/``memory_gib_per_task`` are
    the Ray resources of every task (Ray schedules a task only where they are free)."""

    address: str | None = None
    workers: int | None = None
    cpus_per_task: float = 1.0
    gpus_per_task: float = 0.0
    memory_gib_per_task: float | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> RayConfig:
        address = getattr(args, "ray", None)
        return cls(None if address in (None, "local") else address, getattr(args, "workers", None),
                   getattr(args, "cpus_per_task", 1.0), getattr(args, "gpus_per_task", 0.0),
                   getattr(args, "memory_per_task", None))

    def validate(self) -> None:
        """Raise ``ValueError`` for impossible values."""
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {self.workers}")
        if self.cpus_per_task <= 0:
            raise ValueError(f"--cpus-per-task must be > 0, got {self.cpus_per_task}")
        if self.gpus_per_task < 0:
            raise ValueError(f"--gpus-per-task must be >= 0, got {self.gpus_per_task}")
        if self.memory_gib_per_task is not None and self.memory_gib_per_task <= 0:
            raise ValueError(f"--memory-per-task must be > 0, got {self.memory_gib_per_task}")

    def task_options(self) -> dict[str, Any]:
        """``.options(...)`` of every task; retries are done by the caller (once, see ``SYSTEM_FAILURES``)."""
        opts: dict[str, Any] = {"num_cpus": self.cpus_per_task, "num_gpus": self.gpus_per_task, "max_retries": 0}
        if self.memory_gib_per_task is not None:
            opts["memory"] = int(self.memory_gib_per_task * 2**30)
        return opts

    def slots(self, ray: Any) -> int:
        """How many tasks can run at once: the cluster's CPUs (GPUs) over the per-task need, at most
        ``workers``."""
        resources = ray.cluster_resources()
        n = int(resources.get("CPU", 1) // self.cpus_per_task) if self.cpus_per_task else 1 << 30
        if self.gpus_per_task > 0:
            n = min(n, int(resources.get("GPU", 0) // self.gpus_per_task))
        if n < 1:
            raise ValueError(f"the Ray cluster has {resources.get('CPU', 0)} CPUs and {resources.get('GPU', 0)} GPUs: "
                             f"not enough for one task ({self.cpus_per_task} CPUs, {self.gpus_per_task} GPUs)")
        return max(1, min(n, self.workers or n))


def start_ray(config: RayConfig) -> tuple[Any, bool]:
    """``(ray, started)``: connect to ``config.address`` or start a local instance; ``started`` says
    whether this call started the session (then :func:`stop_ray` ends it). An existing session of
    this process (``ray.init`` called before, as in tests and notebooks) is reused as is."""
    ray = require_ray()
    if ray.is_initialized():
        return ray, False
    common = {"log_to_driver": False, "logging_level": "ERROR", "configure_logging": True}
    if config.address is None:
        ray.init(num_cpus=config.workers or os.cpu_count() or 1, include_dashboard=False,
                 object_store_memory=LOCAL_OBJECT_STORE_MB * 2**20, **common)
    else:
        ray.init(address=config.address, **common)
    return ray, True


def stop_ray(ray: Any, started: bool) -> None:
    if started and ray.is_initialized():
        ray.shutdown()


def is_system_failure(err: BaseException) -> bool:
    """A worker or node died under the task (not an exception of the task's own code)."""
    return any(cls.__name__ in SYSTEM_FAILURES for cls in type(err).__mro__)


def add_ray_arguments(parser: argparse.ArgumentParser) -> None:
    """``--ray [ADDRESS]``, ``--workers``, ``--cpus-per-task``, ``--gpus-per-task``, ``--memory-per-task``."""
    group = parser.add_argument_group("Ray (optional; pip install 'boundprop[ray]')")
    group.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                       help="run as Ray tasks: alone, start a local Ray instance; with an ADDRESS (auto, "
                            "ray://host:10001, host:6379), join that cluster")
    group.add_argument("--workers", type=int, default=None, metavar="N",
                       help="local Ray: CPUs to start it with (default: all cores); a cluster: at most N tasks at once")
    group.add_argument("--cpus-per-task", type=float, default=1.0, metavar="C", help="Ray CPUs per task (default: 1)")
    group.add_argument("--gpus-per-task", type=float, default=0.0, metavar="G", help="Ray GPUs per task (default: 0)")
    group.add_argument("--memory-per-task", type=float, default=None, metavar="GiB",
                       help="Ray memory reserved per task (default: none)")


__all__ = ["INSTALL_HINT", "RayConfig", "RayUnavailable", "add_ray_arguments", "is_system_failure", "ray_available",
           "require_ray", "start_ray", "stop_ray"]

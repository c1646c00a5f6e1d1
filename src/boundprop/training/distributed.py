"""Multi-process training on CPU: torch DistributedDataParallel over the gloo backend.

Two ways to start it:

* ``torchrun --nproc_per_node 2 -m boundprop.cli.main train ...``: every process calls
  :func:`init_from_env` (torchrun sets ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``);
* ``boundprop train --ddp 2 ...`` or :func:`train_distributed`: this process spawns the workers
  (:func:`spawn`, a free port on 127.0.0.1).

Each process builds the same model (same seed; DistributedDataParallel also broadcasts rank 0's
parameters), takes its slice of every global batch, and the per-sample losses are scaled by
``world / global batch`` so that DDP's averaged gradient equals the gradient of the global batch
mean: a run with ``P`` processes and global batch ``B`` matches the single-process run with
batch ``B`` (up to summation order). Only rank 0 evaluates and writes files. Each worker uses
one torch thread.
"""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Dataset


def env_world() -> tuple[int, int]:
    """``(rank, world_size)`` from torchrun's environment, ``(0, 1)`` outside it."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def init_from_env() -> tuple[int, int]:
    """Join torchrun's process group (gloo) when ``WORLD_SIZE > 1``; returns ``(rank, world_size)``."""
    rank, world = env_world()
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo", rank=rank, world_size=world)
    return rank, world


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world: int, port: int, fn: Callable[..., Any], args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def spawn(fn: Callable[..., Any], nprocs: int, *args: Any) -> None:
    """Run ``fn(rank, world, *args)`` in ``nprocs`` new processes joined in a gloo group (``fn`` and
    ``args`` must be picklable: a module-level function)."""
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(nprocs, free_port(), fn, args), nprocs=nprocs, join=True)


def _train_worker(rank: int, world: int, model_fn: Callable[[], torch.nn.Module], train_data: Dataset,
                  test_data: Dataset | None, config: dict[str, Any], result_path: str, resume: bool) -> None:
    from .trainer import TrainConfig, Trainer

    cfg = TrainConfig.from_dict(config)
    trainer = Trainer(model_fn(), train_data, test_data, cfg, rank=rank, world_size=world)
    result = trainer.fit(resume=resume)
    if rank == 0:
        torch.save({"model": trainer.model.state_dict(), "history": result.history}, result_path)


def train_distributed(model_fn: Callable[[], torch.nn.Module], train_data: Dataset, test_data: Dataset | None,
                      config: Any, nprocs: int = 2, resume: bool = False) -> tuple[dict[str, torch.Tensor], list]:
    """Train ``model_fn()`` on ``nprocs`` processes; returns rank 0's final ``(state_dict, history)``.

    ``model_fn``: a picklable builder (e.g. ``functools.partial(build_digit_model, "mlp", seed=0)``);
    ``config``: a :class:`~boundprop.training.TrainConfig` (``batch_size`` is the global batch).
    """
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "result.pt")
        spawn(_train_worker, nprocs, model_fn, train_data, test_data, config.to_dict(), path, resume)
        out = torch.load(path, map_location="cpu", weights_only=True)
    return out["model"], out["history"]


__all__ = ["env_world", "free_port", "init_from_env", "spawn", "train_distributed"]

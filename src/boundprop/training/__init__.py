"""Certified training: loss fusion, eps schedules, IBP / CROWN-IBP / CROWN / PGD / natural training.

* :mod:`.wrappers`: ``CrossEntropyWrapper`` (loss fusion, auto_LiRPA-compatible);
* :mod:`.fusion`: the fused, numerically stable robust-CE bound;
* :mod:`.schedulers`: eps schedules (fixed, linear, smoothed);
* :mod:`.losses`, :mod:`.evaluation`: robust losses, PGD, clean / PGD / verified errors;
* :mod:`.trainer`: :class:`TrainConfig`, :class:`Trainer`, :func:`train`;
* :mod:`.distributed`: multi-process (DistributedDataParallel, gloo) runs;
* :mod:`.data`, :mod:`.models`: the whole digits data set and models for it.

Only the wrappers are imported eagerly (``import boundprop`` exports them); everything else is
imported on first use of its name.
"""

from __future__ import annotations

import importlib
from typing import Any

from .wrappers import CrossEntropyWrapper, CrossEntropyWrapperMultiInput

_LAZY = {
    "evaluate": "evaluation",
    "FusedBound": "fusion", "fused_bounds": "fusion", "fused_robust_ce": "fusion", "match_loss_fusion": "fusion",
    "capture_graphs": "losses", "margin_robust_ce": "losses", "pgd_attack": "losses", "robust_ce": "losses",
    "EpsScheduler": "schedulers", "FixedScheduler": "schedulers", "LinearScheduler": "schedulers",
    "SmoothedScheduler": "schedulers", "make_scheduler": "schedulers",
    "FUSION_MIN_CLASSES": "trainer", "TrainConfig": "trainer", "Trainer": "trainer", "TrainResult": "trainer",
    "train": "trainer",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = ["CrossEntropyWrapper", "CrossEntropyWrapperMultiInput", *_LAZY]

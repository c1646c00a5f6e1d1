"""Certified training: loss fusion, eps schedules, IBP / CROWN-IBP / CROWN / PGD / natural training.

* :mod:`.wrappers`: ``CrossEntropyWrapper`` (loss fusion, auto_LiRPA-compatible);
* :mod:`.fusion`: the fused, numerically stable robust-CE bound;
* :mod:`.schedulers`: eps schedules (fixed, linear, smoothed);
* :mod:`.losses`, :mod:`.evaluate`: robust losses, PGD, clean / PGD / verified errors;
* :mod:`.trainer`: :class:`TrainConfig`, :class:`Trainer`, :func:`train`;
* :mod:`.distributed`: multi-process (DistributedDataParallel, gloo) runs;
* :mod:`.data`, :mod:`.models`: the whole digits data set and models for it.
"""

from .evaluate import evaluate
from .fusion import FusedBound, fused_bounds, fused_robust_ce, match_loss_fusion
from .losses import capture_graphs, margin_robust_ce, pgd_attack, robust_ce
from .schedulers import EpsScheduler, FixedScheduler, LinearScheduler, SmoothedScheduler, make_scheduler
from .trainer import FUSION_MIN_CLASSES, TrainConfig, Trainer, TrainResult, train
from .wrappers import CrossEntropyWrapper, CrossEntropyWrapperMultiInput

__all__ = [
    "FUSION_MIN_CLASSES", "CrossEntropyWrapper", "CrossEntropyWrapperMultiInput", "EpsScheduler", "FixedScheduler",
    "FusedBound", "LinearScheduler", "SmoothedScheduler", "TrainConfig", "TrainResult", "Trainer", "capture_graphs",
    "evaluate", "fused_bounds", "fused_robust_ce", "make_scheduler", "margin_robust_ce", "match_loss_fusion",
    "pgd_attack", "robust_ce", "train",
]

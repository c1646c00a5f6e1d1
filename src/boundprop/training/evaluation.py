"""Evaluation of a classifier: clean error, PGD error and verified error (IBP, CROWN, ...).

* clean error: the fraction of misclassified samples;
* PGD error: misclassified at the clean point or at the point PGD finds (an empirical lower
  bound of the robust error);
* verified error (per bound method): the fraction of samples NOT proved robust, i.e. with some
  lower bound of the margins ``y_label - y_j`` (margin specification) not positive. It is an
  upper bound of the robust error, and ``clean <= PGD <= verified`` up to PGD's randomness.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from ..algorithms import compute_bounds
from ..devices import module_device
from ..graph import Graph
from ..spec import margin_matrix
from .losses import perturbation, pgd_attack
from .models import set_train_mode


def _batches(dataset: Dataset, batch_size: int, limit: int | None):
    n = len(dataset) if limit is None else min(limit, len(dataset))
    for start in range(0, n, batch_size):
        idx = list(range(start, min(n, start + batch_size)))
        xs, ys = zip(*(dataset[i] for i in idx))
        yield torch.stack(xs), torch.stack([torch.as_tensor(v, device="cpu") for v in ys]).long()


@torch.no_grad()
def _verified(graph: Graph, x: torch.Tensor, y: torch.Tensor, eps: float, method: str, num_classes: int,
              norm: float, clip_min, clip_max) -> torch.Tensor:
    C = margin_matrix(y, num_classes, dtype=x.dtype, device=x.device)
    ptb = perturbation(x, eps, norm, clip_min, clip_max)
    lb = compute_bounds(graph, (x,), {graph.inputs[0]: ptb}, method, C, upper=False).lower
    return (lb > 0).all(dim=1)


def evaluate(model: nn.Module, dataset: Dataset, eps: float, methods: Sequence[str] = ("ibp", "crown"),
             graph: Graph | None = None, pgd_steps: int = 20, batch_size: int = 256, limit: int | None = None,
             norm: float = math.inf, clip_min: float | None = 0.0, clip_max: float | None = 1.0,
             seed: int = 0, num_classes: int | None = None) -> dict[str, float]:
    """Errors (fractions in [0, 1]) of ``model`` on (the first ``limit`` samples of) ``dataset``.

    Returns ``{"clean_err", "pgd_err" (when pgd_steps > 0), "verified_err_<method>" per method,
    "n"}``. ``graph``: the model's captured graph (captured here when None and methods are given).
    """
    was_training = model.training
    model.eval()
    device = module_device(model) or torch.device("cpu")
    try:
        x0 = next(_batches(dataset, 2, None))[0].to(device)
        if graph is None and methods:
            from .. import capture

            graph = capture(model, x0)
        counts: dict[str, float] = {"clean_err": 0.0}
        if pgd_steps > 0 and eps > 0:
            counts["pgd_err"] = 0.0
        for method in methods:
            counts[f"verified_err_{method.lower()}"] = 0.0
        gen = torch.Generator().manual_seed(seed)  # CPU draws: the same noise on any device
        n = 0
        for x, y in _batches(dataset, batch_size, limit):
            x, y = x.to(device), y.to(device)
            with torch.no_grad():
                logits = model(x)
            k = num_classes or logits.shape[-1]
            correct = logits.argmax(-1) == y
            counts["clean_err"] += float((~correct).sum())
            if "pgd_err" in counts:
                noise = torch.rand(x.shape, generator=gen, device="cpu").to(device) * 2 - 1
                adv = pgd_attack(model, x, y, eps, pgd_steps, clip_min=clip_min, clip_max=clip_max, noise=noise)
                with torch.no_grad():
                    robust = correct & (model(adv).argmax(-1) == y)
                counts["pgd_err"] += float((~robust).sum())
            for method in methods:
                if eps > 0:
                    ok = _verified(graph, x, y, eps, method, k, norm, clip_min, clip_max) & correct
                else:
                    ok = correct
                counts[f"verified_err_{method.lower()}"] += float((~ok).sum())
            n += len(y)
        out = {key: value / max(n, 1) for key, value in counts.items()}
        out["n"] = n
        return out
    finally:
        if was_training:
            set_train_mode(model)


__all__ = ["evaluate"]

"""Per-sample training losses: natural, PGD-adversarial and robust (IBP / CROWN-IBP / CROWN).

Robust cross-entropy (an upper bound of ``max CE`` over the perturbation set), per sample:

* unfused: with the margin specification ``C`` (rows ``e_label - e_j``) and lower bounds ``lb`` of
  ``C y``, ``CE([0, -lb], 0) = log(1 + sum_j exp(-lb_j))``;
* fused (:mod:`.fusion`): ``log`` of the upper bound of ``sum_j exp(y_j - y_label)``.

The CROWN-IBP recipe mixes bounds: ``lb = beta * lb_CROWN-IBP + (1 - beta) * lb_IBP`` (fused:
the same mixture of the two ``log`` upper bounds; either mixture of sound bounds is sound), with
``beta`` annealed from ``beta_start`` to ``beta_end`` as eps grows to its maximum; ``beta = 0``
skips the backward walk. The training loss is ``kappa * natural CE + (1 - kappa) * robust CE``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..algorithms import compute_bounds
from ..graph import Graph
from ..perturbation import PerturbationLpNorm
from ..spec import margin_matrix
from .fusion import FusionPattern, fused_bounds, match_loss_fusion

ROBUST_METHODS = ("ibp", "crown-ibp", "crown")
METHODS = ("natural", "pgd", *ROBUST_METHODS)


def perturbation(x: torch.Tensor, eps: float, norm: float = math.inf, clip_min: float | None = 0.0,
                 clip_max: float | None = 1.0) -> PerturbationLpNorm:
    """The Lp ball of radius ``eps`` around ``x``, intersected with the input domain ``[clip_min, clip_max]``."""
    x_L = None if clip_min is None else torch.full_like(x, clip_min)
    x_U = None if clip_max is None else torch.full_like(x, clip_max)
    if (x_L is None) != (x_U is None):
        x_L = torch.full_like(x, -math.inf) if x_L is None else x_L
        x_U = torch.full_like(x, math.inf) if x_U is None else x_U
    return PerturbationLpNorm(eps=eps, norm=norm, x_L=x_L, x_U=x_U)


def margin_robust_ce(lb: torch.Tensor) -> torch.Tensor:
    """``CE([0, -lb], 0)`` per sample from margin lower bounds ``lb`` (batch, K - 1)."""
    padded = torch.cat([torch.zeros_like(lb[:, :1]), -lb], dim=1)
    return torch.logsumexp(padded, dim=1)


@dataclass
class BoundGraphs:
    """The captured graphs a robust loss needs: the model's and (for loss fusion) the wrapper's."""

    plain: Graph
    fused: Graph | None = None
    pattern: FusionPattern | None = None

    @property
    def input_name(self) -> str:
        return self.plain.inputs[0]


def capture_graphs(model: nn.Module, example: torch.Tensor, fusion: bool) -> BoundGraphs:
    """Capture ``model`` (and ``CrossEntropyWrapper(model)`` when ``fusion``) on an example batch."""
    from .. import capture
    from .wrappers import CrossEntropyWrapper

    example = example[:2] if example.shape[0] >= 2 else example
    plain = capture(model, example)
    if not fusion:
        return BoundGraphs(plain)
    labels = torch.zeros(example.shape[0], dtype=torch.long, device=example.device)
    fused = capture(CrossEntropyWrapper(model), (example, labels))
    pattern = match_loss_fusion(fused)
    if pattern is None:  # pragma: no cover - the wrapper always ends with the pattern
        raise RuntimeError("loss fusion pattern not found in the captured wrapper")
    return BoundGraphs(plain, fused, pattern)


def robust_ce(graphs: BoundGraphs, x: torch.Tensor, y: torch.Tensor, eps: float, method: str, num_classes: int,
              beta: float = 1.0, fusion: bool = False, norm: float = math.inf, clip_min: float | None = 0.0,
              clip_max: float | None = 1.0) -> torch.Tensor:
    """Per-sample robust CE upper bound ``(batch,)`` by ``method`` (module docstring)."""
    ptb = perturbation(x, eps, norm, clip_min, clip_max)
    use_crown = method == "crown" or (method == "crown-ibp" and beta > 1e-5)
    if fusion:
        if graphs.fused is None:
            raise ValueError("loss fusion needs the wrapper's graph (capture_graphs(..., fusion=True))")
        name = graphs.fused.inputs[0]
        fused = fused_bounds(graphs.fused, (x, y), {name: ptb}, method if use_crown else "ibp", pattern=graphs.pattern)
        if method == "crown-ibp" and use_crown and beta < 1.0:
            return (beta * fused.log_ub + (1.0 - beta) * fused.log_ub_ibp).reshape(-1)
        return fused.log_ub.reshape(-1)
    C = margin_matrix(y, num_classes, dtype=x.dtype, device=x.device)
    ptbs = {graphs.input_name: ptb}
    if method == "crown":
        lb = compute_bounds(graphs.plain, (x,), ptbs, "crown", C, upper=False).lower
        return margin_robust_ce(lb)
    ilb = compute_bounds(graphs.plain, (x,), ptbs, "ibp", C, upper=False).lower
    if not use_crown:
        return margin_robust_ce(ilb)
    clb = compute_bounds(graphs.plain, (x,), ptbs, "crown-ibp", C, upper=False).lower
    return margin_robust_ce(beta * clb + (1.0 - beta) * ilb)


def pgd_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int = 10,
               step_size: float | None = None, clip_min: float | None = 0.0, clip_max: float | None = 1.0,
               noise: torch.Tensor | None = None) -> torch.Tensor:
    """L-inf PGD maximising the cross-entropy (Madry et al.): a random start (``noise`` in [-1, 1]
    scaled by eps, drawn from torch's generator when None), ``steps`` signed-gradient steps of
    ``step_size`` (default ``2.5 eps / steps``), projection onto the ball and the input domain.
    Returns detached adversarial inputs; the model's parameters get no gradient."""
    if eps <= 0 or steps <= 0:
        return x.detach()
    step_size = 2.5 * eps / steps if step_size is None else step_size
    lo, hi = x - eps, x + eps
    if clip_min is not None:
        lo = lo.clamp_min(clip_min)
    if clip_max is not None:
        hi = hi.clamp_max(clip_max)
    if noise is None:
        noise = torch.rand_like(x) * 2 - 1
    adv = torch.minimum(torch.maximum(x + eps * noise, lo), hi).detach()
    for _ in range(steps):
        adv.requires_grad_(True)
        with torch.enable_grad():
            loss = F.cross_entropy(model(adv), y)
            (grad,) = torch.autograd.grad(loss, adv)
        adv = torch.minimum(torch.maximum(adv.detach() + step_size * grad.sign(), lo), hi).detach()
    return adv


__all__ = ["BoundGraphs", "METHODS", "ROBUST_METHODS", "capture_graphs", "margin_robust_ce", "perturbation",
           "pgd_attack", "robust_ce"]

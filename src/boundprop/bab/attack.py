"""Falsification: random sampling and projected gradient descent inside input boxes.

The violation objective of one region is ``v(x) = min_d max_i (A_d f(x) - b_d)_i``: ``x`` is a
counterexample exactly when ``v(x) <= 0`` (some disjunct ``d`` has all its rows satisfied).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def violation(y: torch.Tensor, A: torch.Tensor, b: torch.Tensor, groups: torch.Tensor, n_groups: int) -> torch.Tensor:
    """``v`` for outputs ``y`` (batch, n_out): rows ``A`` (R, n_out), ``b`` (R,), ``groups`` (R,) disjunct ids."""
    margins = y @ A.T - b  # (batch, R)
    per_group = torch.full((y.shape[0], n_groups), -torch.inf, dtype=margins.dtype, device=margins.device)
    per_group = per_group.scatter_reduce(1, groups.expand(y.shape[0], -1), margins, reduce="amax")
    return per_group.amin(1)


def pgd_attack(fn: Callable[[torch.Tensor], torch.Tensor], lower: torch.Tensor, upper: torch.Tensor,
               objective: Callable[[torch.Tensor], torch.Tensor], steps: int = 50, restarts: int = 8,
               generator: torch.Generator | None = None, deadline: float | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimise ``objective(fn(x))`` over boxes ``[lower, upper]`` (batch, *shape).

    Returns the best point per box and its objective value. Starts: the centre, the corners nearest
    the gradient sign, and uniform random points; steps are signed gradients with a decaying size.
    Past ``deadline`` (a ``time.perf_counter()`` value) no further step is taken.
    """
    batch = lower.shape[0]
    width = upper - lower
    # drawn on the CPU (where ``generator`` lives), then moved to the boxes' device
    starts = [lower + width / 2] + [lower + width * torch.rand(lower.shape, generator=generator, dtype=lower.dtype,
                                                               device="cpu").to(lower.device)
                                    for _ in range(max(0, restarts - 1))]
    x = torch.cat(starts)  # (restarts * batch, *shape)
    lo = lower.repeat(len(starts), *[1] * (lower.dim() - 1))
    hi = upper.repeat(len(starts), *[1] * (lower.dim() - 1))
    step = (hi - lo) / 4
    best_x, best_v = x.clone(), torch.full((x.shape[0],), torch.inf, dtype=lower.dtype, device=lower.device)
    per_point = (-1, *[1] * (x.dim() - 1))  # a (points,) mask against (points, *shape)
    for _ in range(steps):
        if deadline is not None and time.perf_counter() > deadline:
            break
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            v = objective(fn(x))
            (grad,) = torch.autograd.grad(v.sum(), x)
        with torch.no_grad():
            better = v < best_v
            best_v = torch.where(better, v.detach(), best_v)
            best_x = torch.where(better.reshape(per_point), x.detach(), best_x)  # no bool-mask read per step
            x = torch.minimum(torch.maximum(x - step * grad.sign(), lo), hi)
            step = step * 0.9
    with torch.no_grad():
        v = objective(fn(x))
        better = v < best_v
        best_v = torch.where(better, v, best_v)
        best_x = torch.where(better.reshape(per_point), x, best_x)
    best_v = best_v.reshape(len(starts), batch)
    idx = best_v.argmin(0)
    best_x = best_x.reshape(len(starts), batch, *lower.shape[1:])[idx, torch.arange(batch, device=idx.device)]
    return best_x, best_v.min(0).values

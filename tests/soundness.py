"""Shared soundness oracle for tests: sample points of the input set and check the bounds hold.

Points checked: the box corners (when few), uniform random points, and points pushed outward by
projected gradient ascent/descent on every output (PGD), so that a bound that is too tight is
caught even where random samples would miss the extremes.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch

import boundprop
from boundprop import PerturbationLpNorm, compute_bounds

TOL = 1e-4


def box_points(lower: torch.Tensor, upper: torch.Tensor, n_random: int = 256, generator=None) -> torch.Tensor:
    """Corners (if at most 2**10 of them), the centre and uniform samples of one box (no batch dim)."""
    points = [(lower + upper) / 2, lower, upper]
    n = lower.numel()
    if n <= 10:
        for bits in itertools.product((0, 1), repeat=n):
            mask = torch.tensor(bits, dtype=torch.bool).reshape(lower.shape)
            points.append(torch.where(mask, upper, lower))
    u = torch.rand((n_random, *lower.shape), generator=generator, dtype=lower.dtype)
    points.extend(lower + u * (upper - lower))
    return torch.stack(points)


def pgd_extremes(fn, lower: torch.Tensor, upper: torch.Tensor, n_out: int, steps: int = 30,
                 restarts: int = 2) -> torch.Tensor:
    """For every output index and both directions, PGD inside the box; returns the points found."""
    found = []
    for sign in (1.0, -1.0):
        for _ in range(restarts):
            x = (lower + torch.rand_like(lower) * (upper - lower)).unsqueeze(0).repeat(n_out, *[1] * lower.dim())
            step = (upper - lower) / 8
            for _ in range(steps):
                x = x.detach().requires_grad_(True)
                out = fn(x).reshape(n_out, -1)
                obj = (out[torch.arange(n_out), torch.arange(n_out)] * sign).sum()
                (grad,) = torch.autograd.grad(obj, x)
                x = torch.minimum(torch.maximum(x + step * grad.sign(), lower), upper)
                step = step * 0.9
            found.append(x.detach())
    return torch.cat(found)


def assert_sound(model: torch.nn.Module, x: torch.Tensor, eps: float = 0.1,
                 methods: Sequence[str] = ("IBP", "CROWN-IBP", "CROWN"), norm: float = math.inf,
                 x_L: torch.Tensor | None = None, x_U: torch.Tensor | None = None, n_random: int = 256,
                 pgd: bool = True, tol: float = TOL, graph=None, opts: dict | None = None) -> dict:
    """Bounds by every method must contain the model's value at sampled and PGD-pushed points.

    ``x`` is one batch (``(batch, *shape)``); for L-inf the set is the ``eps``-box (intersected
    with ``[x_L, x_U]``); for other norms points are sampled on and inside the ball. Returns the
    results by method. ``opts`` go to ``compute_bounds`` (e.g. fewer alpha-CROWN iterations).
    """
    model = model.eval()
    graph = graph or boundprop.capture(model, x)
    ptb = PerturbationLpNorm(eps, norm, x_L, x_U)
    results = {m: compute_bounds(graph, (x,), {graph.inputs[0]: ptb}, method=m, opts=opts) for m in methods}
    box = ptb.interval(x)
    with torch.no_grad():
        for b in range(x.shape[0]):
            lo, hi = box.lower[b], box.upper[b]
            if norm == math.inf:
                pts = box_points(lo, hi, n_random)
            else:
                d = torch.randn(n_random, *x.shape[1:])
                flat = d.flatten(1)
                d = (flat / flat.norm(p=norm, dim=1, keepdim=True)).reshape(d.shape)
                r = torch.rand(n_random).reshape(-1, *[1] * (x.dim() - 1)) ** (1 / x[b].numel())
                pts = torch.cat([x[b:b + 1], x[b] + eps * d, x[b] + eps * r * d])
            out = model(pts)
            _check(results, out, b, tol, "sampled")
    if pgd and norm == math.inf:
        for b in range(x.shape[0]):
            n_out = results[methods[0]].lower[b].numel()
            pts = pgd_extremes(model, box.lower[b], box.upper[b], n_out)
            with torch.no_grad():
                _check(results, model(pts), b, tol, "PGD")
    return results


def _check(results: dict, out: torch.Tensor, b: int, tol: float, what: str) -> None:
    for method, res in results.items():
        lo = res.lower[b].reshape(1, -1)
        hi = res.upper[b].reshape(1, -1)
        flat = out.reshape(out.shape[0], -1)
        scale = tol * (1 + flat.abs())
        below = (flat < lo - scale).any()
        above = (flat > hi + scale).any()
        assert not below, f"{method}: {what} output below the lower bound by {float((lo - flat).max())}"
        assert not above, f"{method}: {what} output above the upper bound by {float((flat - hi).max())}"
        assert bool((res.lower[b] <= res.upper[b] + tol).all()), f"{method}: lower > upper"

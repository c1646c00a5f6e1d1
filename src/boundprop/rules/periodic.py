"""Periodic functions: sin and cos.

* IBP: ``[-1, 1]`` clipped to the ends' values where the interval holds no peak (``sin``: maxima at
  ``pi/2 + 2 k pi``, minima at ``-pi/2 + 2 k pi``; ``cos``: shifted by ``pi/2``), i.e. exact.
* Relaxation (:mod:`.curves`): ``sin'' = -sin``, so ``sin`` is convex where it is negative and
  concave where it is positive, with inflection points at ``k pi`` (``cos``: ``pi/2 + k pi``). On
  intervals holding at most two inflection points the lines are built region by region (chord /
  tangent / tangent through an endpoint, exactly as for S-shaped functions); on wider intervals
  (more than about one period) the constant lines given by IBP.

Curvature labels use inflection points computed in float64; their error (a few ulps of ``|x|``) moves
a bound by about the square of it, far below the outward rounding of the lines.
"""

from __future__ import annotations

import math

import torch

from ..domains import Interval, Relaxation
from .curves import Curve, checked, curve_alpha, curve_relaxation
from .registry import RelaxCall, interval_rule, relaxation_rule

aten = torch.ops.aten

PI = math.pi


def _next_at_or_after(low: torch.Tensor, phase: float, period: float) -> torch.Tensor:
    """The first point ``phase + n period`` (integer n) that is ``>= l`` (float64)."""
    return phase + period * torch.ceil((low - phase) / period)


def periodic_bounds(fn, low: torch.Tensor, high: torch.Tensor, peak: float) -> Interval:
    """IBP of ``sin`` (``peak = pi/2``) or ``cos`` (``peak = 0``): maxima at ``peak + 2 k pi``."""
    fl, fu = fn(low), fn(high)
    l64, u64 = low.to(torch.float64), high.to(torch.float64)
    finite = torch.isfinite(l64) & torch.isfinite(u64)
    l64, u64 = torch.where(finite, l64, 0.0), torch.where(finite, u64, 0.0)
    margin = 1e-12 * (1 + u64.abs())
    has_max = (_next_at_or_after(l64, peak, 2 * PI) <= u64 + margin) | ~finite
    has_min = (_next_at_or_after(l64, peak + PI, 2 * PI) <= u64 + margin) | ~finite
    one = torch.ones_like(fl)
    return Interval(torch.where(has_min, -one, torch.minimum(fl, fu)), torch.where(has_max, one, torch.maximum(fl, fu)))


def _regions(first_inflection: float, convex_when_even: bool):
    """Inflection points ``first_inflection + k pi``: the two at or after ``l``, and the curvature left of them."""

    def regions(low, high):
        k = torch.ceil((low - first_inflection) / PI)
        c1 = first_inflection + PI * k
        even = torch.remainder(k, 2) == 0
        return [c1, c1 + PI], even if convex_when_even else ~even

    return regions


def _too_wide(first_inflection: float):
    def constant(low, high):
        l64, u64 = low.to(torch.float64), high.to(torch.float64)
        return _next_at_or_after(l64, first_inflection, PI) + 2 * PI < u64

    return constant


# sin: inflections at k pi; left of k pi (on ((k-1) pi, k pi)) sin has sign (-1)^(k-1): convex iff k even.
SIN = Curve(torch.sin, torch.cos, _regions(0.0, True))
# cos: inflections at pi/2 + k pi; left of it cos has sign (-1)^k: convex iff k odd.
COS = Curve(torch.cos, lambda x: -torch.sin(x), _regions(PI / 2, False))

_PERIODIC = {
    aten.sin.default: (SIN, torch.sin, PI / 2, 0.0),
    aten.cos.default: (COS, torch.cos, 0.0, PI / 2),
}


def _register(op, curve, fn, peak, first_inflection) -> None:
    bounds = lambda low, high: periodic_bounds(fn, low, high, peak)  # noqa: E731
    too_wide = _too_wide(first_inflection)

    @interval_rule(op)
    def periodic_interval(args, kwargs) -> Interval:
        """IBP: the ends' values, or +-1 where the interval holds a maximum / minimum."""
        x = args[0]
        return bounds(x.lower, x.upper)

    @relaxation_rule(op, alpha=curve_alpha(lambda call: curve))
    @checked(str(op))
    def periodic_relaxation(low, high, call: RelaxCall) -> Relaxation:
        """Curvature-region lines on intervals with at most two inflection points, else constants."""
        return curve_relaxation(curve, low, high, call, bounds, constant=too_wide)


for _op, _spec in _PERIODIC.items():
    _register(_op, *_spec)

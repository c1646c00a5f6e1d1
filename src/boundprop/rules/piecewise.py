"""Piecewise-linear element-wise ops: abs, sign, hardtanh and clamp with constant limits, and the
rounding steps floor, ceil, round and trunc.

On ``[l, u]`` (lines ``lw x + lb <= f(x) <= uw x + ub``):

* ``abs``: exact on sign-definite intervals; on ``l < 0 < u`` the chord above
  (slope ``(u + l)/(u - l)``, through ``(l, -l)``) and a line ``a x`` through the origin below,
  ``a`` in ``[-1, 1]`` (default ``sign(u + l)``, the least area; alpha-CROWN optimises it).
* ``sign``: constant on ``l > 0``, ``u < 0`` and ``l = u = 0``; with one end at 0, ``x/u`` below
  (``[0, u]``) or ``x/(-l)`` above (``[l, 0]``); on ``l < 0 < u`` the constants ``-1``, ``1``. With the
  bound option ``sign_bound_option="sloped"``, where cheaper in area, the lines ``-1 + 2x/u`` below
  (when ``u >= -l``) and ``1 - 2x/l`` above (when ``-l >= u``) instead: each is valid because it is
  at most ``-1`` left of ``0`` and at most ``1`` right of it (resp. at least). They have less area
  but, propagated back through a layer, usually give looser bounds than the constants.
* ``clamp(x, lo, hi)`` (``hardtanh``, ``clamp``, ``clamp_min``, ``clamp_max``; a missing limit is
  infinite; ``lo > hi`` behaves as torch, constant ``hi``): exact where no limit is inside
  ``(l, u)``. Otherwise the lower line passes ``(lo, lo)`` with a slope in ``[0, (f(u) - lo)/(u - lo)]``
  when ``lo`` is inside (any such line is under the convex hull of the graph), else it is the chord;
  the upper line passes ``(hi, hi)`` with a slope in ``[0, (hi - f(l))/(hi - l)]`` when ``hi`` is
  inside, else the chord. Default slopes: the larger end of the range when it has the smaller area
  (``u - lo > lo - l`` below, ``hi - l > u - hi`` above), else 0, as auto_LiRPA's hardtanh. With
  one limit inside, alpha-CROWN optimises the free slope (as a fraction of its range, in [0, 1]).

* rounding ``r`` (floor, ceil, round half to even, trunc): non-decreasing steps, so IBP is
  ``[r(l), r(u)]``, and exact (a constant) where ``r(l) = r(u)`` (up to the guard below). Every step stays within a band
  ``x + a <= r(x) <= x + b`` around the identity: ``(a, b)`` = ``(-1, 0)`` for floor, ``(0, 1)`` for
  ceil, ``(-1/2, 1/2)`` for round, and for trunc floor's band on ``l >= 0``, ceil's on ``u <= 0``,
  ``(-1, 1)`` across 0. Each side takes its band line or its constant (``r(l)`` below, ``r(u)``
  above), the line when the interval is wider than the band (``u - l > b - a``), where it encloses
  less area. A step turns an error of one ulp in ``[l, u]`` into an error of 1, so the steps are
  taken at ``l - m`` and ``u + m``, with ``m = eps^(3/4) (1 + |x|)`` (``eps`` of the dtype: about
  6.5e-6 in float32, 1.9e-12 in float64), wider than the rounding error of the intervals that
  reach them; an end within ``m`` of a step is treated as possibly past it.

Slopes and offsets of inexact lines are computed in float64 and their offsets moved outwards by a few
ulps of the output dtype; exact lines are exact. Intervals with an infinite end crossing a
breakpoint get the IBP constants; where one is infinite (no finite line exists) the rules raise
NotImplementedError (:func:`~boundprop.rules.curves.require_bounded`).
"""

from __future__ import annotations

import torch

from ..domains import Interval, Relaxation
from .curves import checked, finite_grad, lift, slack_factor
from .registry import AlphaSpec, RelaxCall, constant_tensor, interval_rule, is_perturbed, relaxation_rule

aten = torch.ops.aten
INF = float("inf")


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return num / torch.where(den == 0, torch.ones_like(den), den)


def _finite(t: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(t), t, torch.zeros_like(t))


def _outward(lw, lb, uw, ub, low, high, inexact: torch.Tensor, dtype: torch.dtype) -> Relaxation:
    """Round float64 lines outwards where ``inexact`` and cast to ``dtype``."""
    reach = torch.maximum(low.abs(), high.abs())
    reach = torch.where(torch.isfinite(reach), reach, torch.zeros_like(reach))
    eps = slack_factor(dtype)
    zero = torch.zeros_like(lb)
    lb = lb - torch.where(inexact, eps * (lw.abs() * reach + lb.abs()), zero)
    ub = ub + torch.where(inexact, eps * (uw.abs() * reach + ub.abs()), zero)
    return Relaxation(*(t.to(dtype) for t in (lw, lb, uw, ub)))


# ------------------------------------------------------------------------------------------------
# abs


def _abs_default(low, high):
    return torch.where(high + low >= 0, torch.ones_like(low), -torch.ones_like(low))


def abs_unstable(low, high):
    return (low < 0) & (high > 0)


@interval_rule(aten.abs.default)
def abs_interval(args, kwargs) -> Interval:
    """IBP of ``|x|``: ``[0 or min(|l|, |u|), max(|l|, |u|)]``."""
    x = args[0]
    mixed = abs_unstable(x.lower, x.upper)
    lo = torch.minimum(x.lower.abs(), x.upper.abs())
    return Interval(torch.where(mixed, torch.zeros_like(lo), lo), torch.maximum(x.lower.abs(), x.upper.abs()))


@relaxation_rule(aten.abs.default, unstable=abs_unstable,
                 alpha=AlphaSpec(init=lambda low, high, call=None: _abs_default(low, high),
                                 project=lambda alpha, low, high, call=None: alpha.clamp(-1.0, 1.0)))
@checked("aten.abs.default")
def abs_relaxation(low, high, call: RelaxCall) -> Relaxation:
    """Exact on sign-definite intervals; chord above and ``a x`` below on mixed ones."""
    dtype = low.dtype
    low, high, alpha = finite_grad(low, high, call.alpha)
    low, high = lift(low, high, alpha)
    l64, u64 = low.to(torch.float64), high.to(torch.float64)
    mixed = abs_unstable(l64, u64)
    finite = torch.isfinite(l64) & torch.isfinite(u64)
    sign = torch.where(l64 >= 0, 1.0, -1.0).to(torch.float64)  # exact slope off the mixed case
    chord = _safe_div(u64 + l64, u64 - l64)
    chord_b = -l64 - chord * l64
    a = _abs_default(l64, u64) if alpha is None else alpha.to(torch.float64).clamp(-1.0, 1.0)
    uw = torch.where(mixed & finite, chord, torch.where(mixed, 0.0, sign))
    ub = torch.where(mixed & finite, chord_b, torch.where(mixed, torch.maximum(-l64, u64), 0.0))
    lw = torch.where(mixed, a, sign)
    return _outward(lw, torch.zeros_like(ub), uw, ub, l64, u64, mixed & finite, dtype)


# ------------------------------------------------------------------------------------------------
# sign


@interval_rule(aten.sign.default)
def sign_interval(args, kwargs) -> Interval:
    """IBP of ``sign`` (non-decreasing): ``[sign(l), sign(u)]``."""
    return args[0].map(torch.sign)


@relaxation_rule(aten.sign.default, unstable=lambda low, high: (low <= 0) & (high >= 0) & (high > low))
@checked("aten.sign.default")
def sign_relaxation(low, high, call: RelaxCall) -> Relaxation:
    """Constants, or the lines through ``(0, -1)``/``(u, 1)`` and ``(l, -1)``/``(0, 1)`` (module doc)."""
    dtype = low.dtype
    low, high = finite_grad(low, high)
    l64, u64 = low.to(torch.float64), high.to(torch.float64)
    sloped = call.opts.get("sign_bound_option", "constant") == "sloped"
    one, zero = torch.ones_like(l64), torch.zeros_like(l64)
    lo_const = torch.sign(l64)  # valid constant lower bound
    hi_const = torch.sign(u64)
    finite = torch.isfinite(l64) & torch.isfinite(u64)
    # lower: x/u on [0, u] (u > 0); -1 + 2x/u on l < 0 < u when u >= -l
    low_zero = (l64 == 0) & (u64 > 0) & finite
    low_mixed = (l64 < 0) & (u64 > 0) & (u64 >= -l64) & finite & sloped
    inv_u = _safe_div(one, u64)
    lw = torch.where(low_zero, inv_u, torch.where(low_mixed, 2 * inv_u, zero))
    lb = torch.where(low_zero, zero, torch.where(low_mixed, -one, lo_const))
    # upper: -x/l on [l, 0] (l < 0); 1 - 2x/l on l < 0 < u when -l >= u
    up_zero = (u64 == 0) & (l64 < 0) & finite
    up_mixed = (l64 < 0) & (u64 > 0) & (-l64 >= u64) & finite & sloped
    inv_l = _safe_div(one, l64)
    uw = torch.where(up_zero, -inv_l, torch.where(up_mixed, -2 * inv_l, zero))
    ub = torch.where(up_zero, zero, torch.where(up_mixed, one, hi_const))
    return _outward(lw, lb, uw, ub, l64, u64, low_zero | low_mixed | up_zero | up_mixed, dtype)


# ------------------------------------------------------------------------------------------------
# floor / ceil / round / trunc

#: ``(a, b)`` with ``x + a <= r(x) <= x + b`` for every ``x`` (trunc: refined by sign in the rule)
ROUNDING_BANDS = {aten.floor.default: (-1.0, 0.0), aten.ceil.default: (0.0, 1.0),
                  aten.round.default: (-0.5, 0.5), aten.trunc.default: (-1.0, 1.0)}


def step_guard(low: torch.Tensor, high: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[l - m, u + m]``, ``m = eps^(3/4) (1 + |x|)``: where a step is taken (module doc)."""
    g = torch.finfo(low.dtype).eps ** 0.75
    return low - g * (1 + low.abs()), high + g * (1 + high.abs())


def _rounding_interval(op):
    def rule(args, kwargs) -> Interval:
        low, high = step_guard(args[0].lower, args[0].upper)
        return Interval(op(low), op(high))

    rule.__doc__ = f"IBP of {op} (non-decreasing): ``[r(l), r(u)]``."
    return rule


def _rounding_relaxation(op):
    band_a, band_b = ROUNDING_BANDS[op]

    @checked(str(op))
    def relaxation(low, high, call: RelaxCall) -> Relaxation:
        dtype = low.dtype
        l64, u64 = low.to(torch.float64), high.to(torch.float64)
        r_l, r_u = (op(t).to(torch.float64) for t in step_guard(low, high))
        a = torch.full_like(l64, band_a)
        b = torch.full_like(l64, band_b)
        if op == aten.trunc.default:  # floor's band on l >= 0, ceil's on u <= 0
            a = torch.where(u64 <= 0, 0.0, a)
            b = torch.where(l64 >= 0, 0.0, b)
        step = r_l != r_u
        line = step & (u64 - l64 > b - a)  # also where an end is infinite
        zero, one = torch.zeros_like(l64), torch.ones_like(l64)
        lw = torch.where(line, one, zero)
        uw = lw
        lb = torch.where(line, a, r_l)
        ub = torch.where(line, b, torch.where(step, r_u, r_l))
        return Relaxation(*(t.to(dtype) for t in (lw, lb, uw, ub)))

    relaxation.__doc__ = f"Lines of {op} on ``[l, u]``: its band around the identity or its constants (module doc)."
    return relaxation


def _rounding_unstable(op):
    def unstable(low, high):
        low, high = step_guard(low, high)
        return op(low) != op(high)

    return unstable


for _op in ROUNDING_BANDS:
    interval_rule(_op)(_rounding_interval(_op))
    relaxation_rule(_op, unstable=_rounding_unstable(_op))(_rounding_relaxation(_op))


# ------------------------------------------------------------------------------------------------
# clamp / hardtanh


def _limit(value, sign: float):
    """A clamp limit as a float64 tensor (``None`` -> ``sign * inf``)."""
    if value is None:
        return torch.tensor(sign * INF, dtype=torch.float64, device="cpu")  # a scalar: any device takes it
    if is_perturbed(value):
        raise NotImplementedError("clamp with a perturbed limit has no linear relaxation here")
    return constant_tensor(value).to(torch.float64)


def _limits_of(op, args: tuple, kwargs: dict) -> tuple:
    """(lo, hi) of a clamp-like node, from its arguments after the input."""
    if op == aten.hardtanh.default:
        lo = args[0] if len(args) > 0 else kwargs.get("min_val", -1.0)
        hi = args[1] if len(args) > 1 else kwargs.get("max_val", 1.0)
        return lo, hi
    if op in (aten.clamp_min.default, aten.clamp_min.Tensor):
        return (args[0] if args else kwargs["min"]), None
    if op in (aten.clamp_max.default, aten.clamp_max.Tensor):
        return None, (args[0] if args else kwargs["max"])
    lo = args[0] if len(args) > 0 else kwargs.get("min")
    hi = args[1] if len(args) > 1 else kwargs.get("max")
    return lo, hi


def _lifted(t: torch.Tensor, low: torch.Tensor, alpha) -> torch.Tensor:
    """A constant with a batch dimension follows ``l`` when the interval was lifted for alpha."""
    if alpha is not None and alpha.dim() == low.dim() and t.dim() == low.dim() - 1:
        return t.unsqueeze(1)
    return t


def _ends(value, x):
    if isinstance(value, Interval):
        return value.lower, value.upper
    return value, value


def clamp_bounds(low, high, lo, hi) -> Interval:
    """IBP of ``clamp``: non-decreasing in the input and in both limits."""
    lo_l, lo_u = _ends(lo, low)
    hi_l, hi_u = _ends(hi, low)
    lower = torch.clamp(low, min=lo_l, max=hi_l) if (lo_l is not None or hi_l is not None) else low
    upper = torch.clamp(high, min=lo_u, max=hi_u) if (lo_u is not None or hi_u is not None) else high
    return Interval(lower, upper)


def _crossings(low, high, lo, hi):
    lo = torch.minimum(lo, hi)
    return lo, (low < lo) & (high > lo), (low < hi) & (high > hi)


def clamp_relaxation(low: torch.Tensor, high: torch.Tensor, lo, hi, call: RelaxCall) -> Relaxation:
    """Lines of ``clamp(x, lo, hi)`` on ``[l, u]`` (module doc); ``lo``/``hi`` constants or None."""
    dtype = low.dtype
    low, high, alpha = finite_grad(low, high, call.alpha)
    low, high = lift(low, high, alpha)
    lo = _lifted(_limit(lo, -1.0).to(low.device), low, alpha)
    hi = _lifted(_limit(hi, 1.0).to(low.device), low, alpha)
    l64, u64 = low.to(torch.float64), high.to(torch.float64)
    lo, cross_lo, cross_hi = _crossings(l64, u64, lo, hi)
    lo, hi = torch.broadcast_tensors(lo, hi)
    f_l = torch.minimum(torch.maximum(l64, lo), hi)
    f_u = torch.minimum(torch.maximum(u64, lo), hi)
    finite = torch.isfinite(l64) & torch.isfinite(u64)
    crossing = (cross_lo | cross_hi) & finite
    zero, one = torch.zeros_like(f_l), torch.ones_like(f_l)
    # exact pieces: constant below lo / above hi, identity in between
    flat = (u64 <= lo) | (l64 >= hi)
    exact_w = torch.where(flat, zero, one)
    exact_b = torch.where(flat, f_l, zero)
    chord = _finite(_safe_div(f_u - f_l, u64 - l64))
    chord_b = f_l - chord * l64
    only_lo, only_hi = cross_lo & ~cross_hi, cross_hi & ~cross_lo
    a = None if alpha is None else torch.nan_to_num(alpha.to(torch.float64), nan=0.0).clamp(0.0, 1.0)
    # lower line
    range_l = _finite(_safe_div(f_u - lo, u64 - lo))
    slope_l = torch.where(u64 - lo > lo - l64, range_l, zero)
    if a is not None:
        slope_l = torch.where(only_lo, a * range_l, slope_l)
    lw = torch.where(cross_lo, slope_l, chord)
    lb = torch.where(cross_lo, lo - slope_l * torch.where(cross_lo, lo, zero), chord_b)
    # upper line
    range_u = _finite(_safe_div(hi - f_l, hi - l64))
    slope_u = torch.where(hi - l64 > u64 - hi, range_u, zero)
    if a is not None:
        slope_u = torch.where(only_hi, a * range_u, slope_u)
    uw = torch.where(cross_hi, slope_u, chord)
    ub = torch.where(cross_hi, hi - slope_u * torch.where(cross_hi, hi, zero), chord_b)
    # assemble: exact, crossing, or constants (infinite end across a breakpoint)
    const = (cross_lo | cross_hi) & ~finite
    lw = torch.where(crossing, lw, torch.where(const, zero, exact_w))
    lb = torch.where(crossing, lb, torch.where(const, torch.where(torch.isfinite(f_l), f_l, -INF), exact_b))
    uw = torch.where(crossing, uw, torch.where(const, zero, exact_w))
    ub = torch.where(crossing, ub, torch.where(const, torch.where(torch.isfinite(f_u), f_u, INF), exact_b))
    return _outward(lw, lb, uw, ub, torch.where(finite, l64, 0.0), torch.where(finite, u64, 0.0), crossing, dtype)


def _clamp_alpha_init(op):
    def init(low, high, call: RelaxCall | None = None):
        call = call or RelaxCall()
        lo, hi = _limits_of(op, call.args, call.kwargs)
        l64, u64 = low.to(torch.float64), high.to(torch.float64)
        lo_t, cross_lo, cross_hi = _crossings(l64, u64, _limit(lo, -1.0), _limit(hi, 1.0))
        hi_t = _limit(hi, 1.0)
        lower_default = (u64 - lo_t > lo_t - l64).to(torch.float64)
        upper_default = (hi_t - l64 > u64 - hi_t).to(torch.float64)
        init = torch.where(cross_lo & ~cross_hi, lower_default, torch.where(cross_hi & ~cross_lo, upper_default, 0.0))
        return init.to(low.dtype)

    return init


def _clamp_unstable(op):
    def unstable(low, high):
        return torch.ones_like(low, dtype=torch.bool)  # limits are per node; see the relaxation

    return unstable


def _register_clamp(op) -> None:
    @interval_rule(op)
    def clamp_interval(args, kwargs) -> Interval:
        """IBP of clamp: the clamped ends (monotone in the input and the limits)."""
        x = args[0]
        lo, hi = _limits_of(op, args[1:], kwargs)
        return clamp_bounds(x.lower, x.upper, lo, hi)

    @relaxation_rule(op, alpha=AlphaSpec(init=_clamp_alpha_init(op),
                                         project=lambda alpha, low, high, call=None: alpha.clamp(0.0, 1.0)))
    @checked(str(op))
    def clamp_relax(low, high, call: RelaxCall) -> Relaxation:
        """Exact off the limits; lines through the crossed limit points (module doc)."""
        lo, hi = _limits_of(op, call.args, call.kwargs)
        return clamp_relaxation(low, high, lo, hi, call)


CLAMP_OPS = (aten.hardtanh.default, aten.clamp.default, aten.clamp.Tensor, aten.clamp_min.default,
             aten.clamp_min.Tensor, aten.clamp_max.default, aten.clamp_max.Tensor)

for _op in CLAMP_OPS:
    _register_clamp(_op)

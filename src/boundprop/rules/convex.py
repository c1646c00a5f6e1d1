"""Functions convex or concave on (each sign-definite part of) their domain.

``exp``, ``expm1`` (convex, increasing); ``log``, ``log1p``, ``sqrt`` (concave, increasing);
``rsqrt`` (convex, decreasing on ``x > 0``); ``reciprocal`` (convex on ``x > 0``, concave on
``x < 0``); ``pow(x, p)`` (``aten.pow.Tensor_Scalar``) and ``square``:

* integer ``p >= 2`` even: convex; odd: concave on ``x < 0``, convex on ``x > 0`` (inflection 0);
* integer ``p < 0``: ``x > 0`` convex; ``x < 0`` convex (``p`` even) or concave (``p`` odd);
* real non-integer ``p``: on ``x >= 0`` only, convex for ``p > 1`` or ``p < 0``, concave for
  ``0 < p < 1``; ``p = 0`` and ``p = 1`` are exact.

IBP: the function at the ends, ordered by monotonicity; ``[0, max]`` for even powers of a
mixed-sign interval. Relaxation (:mod:`.curves`): chord on the convex side's upper / concave side's
lower bound, tangent (midpoint by default, alpha-CROWN's ``alpha`` moves it) on the other.

Domains: ``log``, ``sqrt``, ``rsqrt`` and real powers are bounded on the part of the interval in
their domain (points outside it give NaN, which no bound covers); where the function is unbounded on
the interval (a pole or ``log 0``), the bound on that side is infinite: IBP returns ``-inf``/``inf``
and the relaxation functions the constant line ``0 x -+ inf``, which the registered rules refuse with
NotImplementedError (:func:`~boundprop.rules.curves.require_bounded`). ``reciprocal`` (and negative
integer powers) on an interval containing 0 (as an end included) get ``[-inf, inf]`` (even powers:
``[min, inf]``).
"""

from __future__ import annotations

import torch

from ..domains import Interval, Relaxation
from .curves import Curve, checked, concave_curve, convex_curve, curve_alpha, curve_relaxation, fixed_regions
from .registry import RelaxCall, interval_rule, relaxation_rule

aten = torch.ops.aten

INF = float("inf")


def _inf_like(t: torch.Tensor, sign: float = 1.0) -> torch.Tensor:
    return torch.full_like(t, sign * INF)


def _nonneg(low, high):
    return low.clamp_min(0.0), high.clamp_min(0.0)


# ------------------------------------------------------------------------------------------------
# exp, expm1, log, log1p, sqrt, rsqrt

EXP = convex_curve(torch.exp, torch.exp)
EXPM1 = convex_curve(torch.expm1, torch.exp)
LOG = concave_curve(torch.log, lambda x: 1 / x)
LOG1P = concave_curve(torch.log1p, lambda x: 1 / (1 + x))
SQRT = concave_curve(torch.sqrt, lambda x: 0.5 / torch.sqrt(x))
RSQRT = convex_curve(torch.rsqrt, lambda x: -0.5 * torch.rsqrt(x) / x)


def exp_bounds(low, high) -> Interval:
    return Interval(torch.exp(low), torch.exp(high))


def expm1_bounds(low, high) -> Interval:
    return Interval(torch.expm1(low), torch.expm1(high))


def log_bounds(low, high) -> Interval:
    """``log`` on ``[l, u] & (0, inf)``: ``-inf`` below when ``l <= 0``; nothing known when ``u < 0``."""
    return Interval(torch.where(low > 0, torch.log(low), _inf_like(low, -1)),
                    torch.where(high < 0, _inf_like(high), torch.log(high)))


def log1p_bounds(low, high) -> Interval:
    return Interval(torch.where(low > -1, torch.log1p(low), _inf_like(low, -1)),
                    torch.where(high < -1, _inf_like(high), torch.log1p(high)))


def sqrt_bounds(low, high) -> Interval:
    return Interval(torch.sqrt(low.clamp_min(0)), torch.sqrt(high.clamp_min(0)))


def rsqrt_bounds(low, high) -> Interval:
    """Decreasing on ``x > 0``; ``inf`` above when ``l <= 0``."""
    return Interval(torch.where(high > 0, torch.rsqrt(high), _inf_like(high, -1)),
                    torch.where(low > 0, torch.rsqrt(low), _inf_like(low)))


def reciprocal_bounds(low, high) -> Interval:
    """``[1/u, 1/l]`` on sign-definite intervals, ``[-inf, inf]`` when ``l <= 0 <= u``."""
    definite = (low > 0) | (high < 0)
    return Interval(torch.where(definite, torch.reciprocal(high), _inf_like(high, -1)),
                    torch.where(definite, torch.reciprocal(low), _inf_like(low)))


_SIMPLE = {
    # op: (curve, bounds, domain, constant, safe)
    aten.exp.default: (EXP, exp_bounds, None, None, 0.0),
    aten.expm1.default: (EXPM1, expm1_bounds, None, None, 0.0),
    aten.log.default: (LOG, log_bounds, _nonneg, lambda low, high: high <= 0, 1.0),
    aten.log1p.default: (LOG1P, log1p_bounds, lambda low, high: (low.clamp_min(-1.0), high.clamp_min(-1.0)),
                         lambda low, high: high <= -1, 0.0),
    aten.sqrt.default: (SQRT, sqrt_bounds, _nonneg, lambda low, high: high <= 0, 1.0),
    aten.rsqrt.default: (RSQRT, rsqrt_bounds, _nonneg, lambda low, high: high <= 0, 1.0),
}


def _register_simple(op, curve, bounds, domain, constant, safe) -> None:
    @interval_rule(op)
    def simple_interval(args, kwargs) -> Interval:
        x = args[0]
        return bounds(x.lower, x.upper)

    @relaxation_rule(op, alpha=curve_alpha(lambda call: curve, domain))
    @checked(str(op))
    def simple_relaxation(low, high, call: RelaxCall) -> Relaxation:
        return curve_relaxation(curve, low, high, call, bounds, domain, constant, safe=safe)

    simple_interval.__doc__ = f"IBP of {op}: {bounds.__doc__ or 'the function at the ends (monotone)'}"
    simple_relaxation.__doc__ = f"Chord and tangent lines of {op} (module doc)."


for _op, _spec in _SIMPLE.items():
    _register_simple(_op, *_spec)


# ------------------------------------------------------------------------------------------------
# reciprocal (shared with the division rule)

RECIPROCAL = Curve(torch.reciprocal, lambda x: -1 / (x * x),
                   lambda low, high: ([], low > 0))  # convex on x > 0, concave on x < 0


def _contains_zero(low, high):
    return (low <= 0) & (high >= 0)


@interval_rule(aten.reciprocal.default)
def reciprocal_interval(args, kwargs) -> Interval:
    """IBP of ``1/x``: ``[1/u, 1/l]`` if ``0`` is not in ``[l, u]``, else ``[-inf, inf]``."""
    x = args[0]
    return reciprocal_bounds(x.lower, x.upper)


def reciprocal_relaxation(low: torch.Tensor, high: torch.Tensor, call: RelaxCall) -> Relaxation:
    """``1/x`` on ``[l, u]``: on ``l > 0`` tangent below, chord above; on ``u < 0`` chord below,
    tangent above; when ``l <= 0 <= u`` the constant lines ``-inf <= 1/x <= inf`` (no finite bound
    exists; the registered rule refuses those, this function, used by the division rule, does not)."""
    return curve_relaxation(RECIPROCAL, low, high, call, reciprocal_bounds, constant=_contains_zero, safe=1.0)


relaxation_rule(aten.reciprocal.default, alpha=curve_alpha(lambda call: RECIPROCAL))(
    checked("aten.reciprocal.default")(reciprocal_relaxation))


# ------------------------------------------------------------------------------------------------
# pow(x, p) with a constant exponent


def _exponent(call_args: tuple, kwargs: dict) -> float:
    p = call_args[0] if call_args else kwargs["exponent"]
    return float(p)


def _is_int(p: float) -> bool:
    return float(p).is_integer()


def pow_bounds(low: torch.Tensor, high: torch.Tensor, p: float) -> Interval:
    """IBP of ``x ** p`` (see the module doc for the cases)."""
    if p == 0:
        return Interval(torch.ones_like(low), torch.ones_like(high))
    fl, fu = torch.pow(low, p), torch.pow(high, p)
    if _is_int(p) and p > 0:
        if int(p) % 2 == 1:
            return Interval(fl, fu)
        mixed = (low <= 0) & (high >= 0)
        return Interval(torch.where(mixed, torch.zeros_like(fl), torch.minimum(fl, fu)), torch.maximum(fl, fu))
    if _is_int(p):  # negative integer
        pos, neg = low > 0, high < 0
        if int(p) % 2 == 0:  # x^p = |x|^p: decreasing in |x|
            lower = torch.where(pos, fu, torch.where(neg, fl, torch.minimum(fl, fu)))
            upper = torch.where(pos, fl, torch.where(neg, fu, _inf_like(high)))
            return Interval(lower, upper)
        definite = pos | neg
        return Interval(torch.where(definite, fu, _inf_like(high, -1)), torch.where(definite, fl, _inf_like(low)))
    if p > 0:  # real exponent, domain x >= 0
        return Interval(torch.pow(low.clamp_min(0), p), torch.pow(high.clamp_min(0), p))
    return Interval(torch.where(high > 0, fu, _inf_like(high, -1)), torch.where(low > 0, fl, _inf_like(low)))


def pow_curve(p: float) -> Curve:
    f = lambda x: torch.pow(x, p)  # noqa: E731
    df = lambda x: p * torch.pow(x, p - 1)  # noqa: E731
    if _is_int(p) and p > 0:
        return Curve(f, df, fixed_regions((0.0,), False) if int(p) % 2 == 1 else fixed_regions((), True))
    if _is_int(p):
        even = int(p) % 2 == 0
        return Curve(f, df, lambda low, high: ([], (low > 0) | ((high < 0) & even)))
    return Curve(f, df, fixed_regions((), not 0 < p < 1))


def _pow_setup(p: float) -> tuple:
    """(domain, constant, safe) of the relaxation of ``x ** p``."""
    if _is_int(p) and p > 0:
        return None, None, 0.0
    if _is_int(p):
        return None, _contains_zero, 1.0
    return _nonneg, lambda low, high: high <= 0, 1.0


def _exact(low, high, w: float, b: float) -> Relaxation:
    lw, lb = torch.full_like(low, w), torch.full_like(low, b)
    return Relaxation(lw, lb, lw, lb)


def pow_relaxation_p(low: torch.Tensor, high: torch.Tensor, p: float, call: RelaxCall) -> Relaxation:
    if p == 0:
        return _exact(low, high, 0.0, 1.0)
    if p == 1:
        return _exact(low, high, 1.0, 0.0)
    domain, constant, safe = _pow_setup(p)
    return curve_relaxation(pow_curve(p), low, high, call, lambda lo, hi: pow_bounds(lo, hi, p), domain, constant,
                            safe=safe)


def _pow_alpha_curve(call: RelaxCall) -> Curve:
    p = _exponent(call.args, call.kwargs) if (call.args or "exponent" in call.kwargs) else 2.0
    return pow_curve(p)


@interval_rule(aten.pow.Tensor_Scalar)
def pow_interval(args, kwargs) -> Interval:
    """IBP of ``x ** p`` for a constant exponent ``p``."""
    x = args[0]
    return pow_bounds(x.lower, x.upper, _exponent(args[1:], kwargs))


@relaxation_rule(aten.pow.Tensor_Scalar, alpha=curve_alpha(_pow_alpha_curve))
@checked("aten.pow.Tensor_Scalar")
def pow_relaxation(low, high, call: RelaxCall) -> Relaxation:
    """Chord/tangent lines of ``x ** p`` by the curvature of each case (module doc)."""
    return pow_relaxation_p(low, high, _exponent(call.args, call.kwargs), call)


@interval_rule(aten.square.default)
def square_interval(args, kwargs) -> Interval:
    """IBP of ``x * x``: ``[0 or min(l^2, u^2), max(l^2, u^2)]``."""
    x = args[0]
    return pow_bounds(x.lower, x.upper, 2.0)


@relaxation_rule(aten.square.default, alpha=curve_alpha(lambda call: pow_curve(2.0)))
@checked("aten.square.default")
def square_relaxation(low, high, call: RelaxCall) -> Relaxation:
    """``x * x``: tangent below, chord above."""
    return pow_relaxation_p(low, high, 2.0, call)

"""Smooth activations: GELU (exact and tanh approximation), SiLU, softplus, ELU.

Curvature (all relaxations from :mod:`.curves`):

* GELU ``x Phi(x)``: ``f'' = phi(x) (2 - x^2)``: concave, convex on ``[-sqrt 2, sqrt 2]``,
  concave (tanh approximation: inflections at ``+-1.41850...``);
* SiLU ``x sigmoid(x)``: concave, convex on ``[-2.39936..., 2.39936...]``, concave;
* softplus ``log(1 + exp(beta x)) / beta``: convex. torch switches to ``x`` where
  ``beta x > threshold``, up to ``log1p(exp(-threshold)) / beta`` below the smooth function: the
  lower line is then also kept below ``x`` on that piece (checked at its two ends), and IBP accounts
  for the drop at the switch;
* ELU ``scale * (x if x > 0 else alpha (exp(input_scale x) - 1))``: convex when
  ``alpha input_scale <= 1`` (ELU), else convex on ``x < 0`` and linear after a concave kink at 0
  (SELU), handled as an S-shape with the kink as its inflection point (``f'`` at 0 is the left
  derivative, a valid super-gradient of the concave part).

IBP: GELU and SiLU are decreasing then increasing, with the minimum value (computed offline, moved
down by a few ulps) where the interval holds the minimiser; softplus and ELU are increasing.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..domains import Interval, Relaxation
from .curves import Curve, checked, convex_curve, curve_alpha, curve_relaxation, fixed_regions
from .registry import RelaxCall, interval_rule, relaxation_rule

aten = torch.ops.aten

SQRT_2_OVER_PI = math.sqrt(2 / math.pi)
GELU_TANH_COEF = 0.044715

#: (argmin, min value) and inflection points, to 20 digits (mpmath).
GELU_MIN = (-0.75179152469356445746, -0.16997120747990366169)
GELU_TANH_MIN = (-0.75246142207101625849, -0.17004075057125405064)
SILU_MIN = (-1.2784645427610737951, -0.27846454276107379511)
GELU_INFLECTION = math.sqrt(2)
GELU_TANH_INFLECTION = 1.4185040087908283555
SILU_INFLECTION = 2.3993572805154676678


def _lowered(value: float, dtype: torch.dtype) -> float:
    return value - 4 * torch.finfo(dtype).eps * abs(value) - torch.finfo(dtype).tiny


def valley_bounds(f, low: torch.Tensor, high: torch.Tensor, minimum: tuple[float, float]) -> Interval:
    """IBP of a function decreasing up to ``minimum[0]`` and increasing after it, tending to 0 at -inf and
    to +inf at +inf. The limits are set here: PyTorch's float32 CPU ``gelu`` gives NaN at +inf on a CPU
    with AVX-512 (inf on an AVX2-only one)."""
    fl, fu = (torch.where(t == -math.inf, torch.zeros_like(t), torch.where(t == math.inf, t, f(t)))
              for t in (low, high))
    holds = (low <= minimum[0]) & (high >= minimum[0])
    floor_value = torch.full_like(fl, _lowered(minimum[1], fl.dtype))
    return Interval(torch.where(holds, floor_value, torch.minimum(fl, fu)), torch.maximum(fl, fu))


# ------------------------------------------------------------------------------------------------
# GELU


def _gelu_erf(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def _dgelu_erf(x):
    return 0.5 * (1 + torch.erf(x / math.sqrt(2))) + x * torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


def _gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(SQRT_2_OVER_PI * (x + GELU_TANH_COEF * x ** 3)))


def _dgelu_tanh(x):
    t = torch.tanh(SQRT_2_OVER_PI * (x + GELU_TANH_COEF * x ** 3))
    return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * SQRT_2_OVER_PI * (1 + 3 * GELU_TANH_COEF * x * x)


GELU = Curve(_gelu_erf, _dgelu_erf, fixed_regions((-GELU_INFLECTION, GELU_INFLECTION), False))
GELU_TANH = Curve(_gelu_tanh, _dgelu_tanh, fixed_regions((-GELU_TANH_INFLECTION, GELU_TANH_INFLECTION), False))


def _approximate(kwargs: dict, args: tuple = ()) -> str:
    return kwargs.get("approximate", args[0] if args else "none")


def _gelu_parts(approximate: str) -> tuple:
    if approximate == "tanh":
        return GELU_TANH, GELU_TANH_MIN
    if approximate == "none":
        return GELU, GELU_MIN
    raise NotImplementedError(f"gelu with approximate={approximate!r}")


def gelu_bounds(low, high, approximate: str = "none") -> Interval:
    _, minimum = _gelu_parts(approximate)
    return valley_bounds(lambda t: torch.nn.functional.gelu(t, approximate=approximate), low, high, minimum)


@interval_rule(aten.gelu.default)
def gelu_interval(args, kwargs) -> Interval:
    """IBP of GELU: ends' values, or the minimum where the interval holds the minimiser."""
    x = args[0]
    return gelu_bounds(x.lower, x.upper, _approximate(kwargs, args[1:]))


def _gelu_curve_of(call: RelaxCall) -> Curve:
    return _gelu_parts(_approximate(call.kwargs, call.args))[0]


@relaxation_rule(aten.gelu.default, alpha=curve_alpha(_gelu_curve_of))
@checked("aten.gelu.default")
def gelu_relaxation(low, high, call: RelaxCall) -> Relaxation:
    """Curvature-region lines of GELU (module doc)."""
    approximate = _approximate(call.kwargs, call.args)
    curve, _ = _gelu_parts(approximate)
    return curve_relaxation(curve, low, high, call, lambda lo, hi: gelu_bounds(lo, hi, approximate))


# ------------------------------------------------------------------------------------------------
# SiLU


def _dsilu(x):
    s = torch.sigmoid(x)
    return s * (1 + x * (1 - s))


SILU = Curve(lambda x: x * torch.sigmoid(x), _dsilu, fixed_regions((-SILU_INFLECTION, SILU_INFLECTION), False))


def silu_bounds(low, high) -> Interval:
    return valley_bounds(torch.nn.functional.silu, low, high, SILU_MIN)


@interval_rule(aten.silu.default)
def silu_interval(args, kwargs) -> Interval:
    """IBP of SiLU: ends' values, or the minimum where the interval holds the minimiser."""
    x = args[0]
    return silu_bounds(x.lower, x.upper)


@relaxation_rule(aten.silu.default, alpha=curve_alpha(lambda call: SILU))
@checked("aten.silu.default")
def silu_relaxation(low, high, call: RelaxCall) -> Relaxation:
    """Curvature-region lines of SiLU (module doc)."""
    return curve_relaxation(SILU, low, high, call, silu_bounds)


# ------------------------------------------------------------------------------------------------
# softplus


def _softplus_params(args: tuple, kwargs: dict) -> tuple[float, float]:
    beta = float(args[0]) if len(args) > 0 else float(kwargs.get("beta", 1.0))
    threshold = float(args[1]) if len(args) > 1 else float(kwargs.get("threshold", 20.0))
    if beta <= 0:
        raise NotImplementedError(f"softplus with beta={beta} <= 0")
    return beta, threshold


def softplus_curve(beta: float) -> Curve:
    zero = 0.0
    return convex_curve(lambda x: torch.logaddexp(torch.zeros_like(x) + zero, beta * x) / beta,
                        lambda x: torch.sigmoid(beta * x))


def softplus_bounds(low, high, beta: float, threshold: float) -> Interval:
    """torch's softplus is increasing on each side of ``x = threshold / beta``, where it drops to ``x``."""
    fl, fu = (torch.nn.functional.softplus(t, beta, threshold) for t in (low, high))
    switch = threshold / beta
    crosses = (low * beta <= threshold) & (high * beta > threshold)
    smooth_at_switch = math.log1p(math.exp(threshold)) / beta if threshold < 700 else switch
    peak = -_lowered(-smooth_at_switch, fu.dtype)
    lower = torch.where(crosses, torch.minimum(fl, torch.full_like(fl, switch)), fl)
    upper = torch.where(crosses, torch.maximum(fu, torch.full_like(fu, peak)), fu)
    return Interval(lower, upper)


@interval_rule(aten.softplus.default)
def softplus_interval(args, kwargs) -> Interval:
    """IBP of softplus (increasing except for torch's drop to ``x`` at the threshold)."""
    x = args[0]
    return softplus_bounds(x.lower, x.upper, *_softplus_params(args[1:], kwargs))


def _below_torch_linear_piece(beta: float, threshold: float) -> Callable:
    """Keep the lower line below torch's softplus where it is ``x`` (``beta x > threshold``).

    The line is below the smooth softplus already; on ``(threshold / beta, u]`` torch returns ``x``
    (smaller), and a line is below ``x`` there iff it is at both ends of that piece. Intervals
    entirely on that piece get the exact lines ``x``.
    """
    switch = threshold / beta

    def adjust(lw, lb, uw, ub, low, high):
        crosses = high * beta > threshold
        start = torch.maximum(low, torch.full_like(low, switch))
        excess = torch.maximum(lw * start + lb - start, lw * high + lb - high).clamp_min(0)
        lb = lb - torch.where(crosses, excess, torch.zeros_like(excess))
        linear = low * beta > threshold  # torch's softplus is x on all of [l, u]
        one, zero = torch.ones_like(lw), torch.zeros_like(lw)
        return (torch.where(linear, one, lw), torch.where(linear, zero, lb),
                torch.where(linear, one, uw), torch.where(linear, zero, ub))

    return adjust


@relaxation_rule(aten.softplus.default,
                 alpha=curve_alpha(lambda call: softplus_curve(_softplus_params(call.args, call.kwargs)[0])))
@checked("aten.softplus.default")
def softplus_relaxation(low, high, call: RelaxCall) -> Relaxation:
    """Tangent below, chord above (convex), the lower line kept below torch's linear piece."""
    beta, threshold = _softplus_params(call.args, call.kwargs)
    bounds = lambda lo, hi: softplus_bounds(lo, hi, beta, threshold)  # noqa: E731
    return curve_relaxation(softplus_curve(beta), low, high, call, bounds,
                            adjust=_below_torch_linear_piece(beta, threshold))


# ------------------------------------------------------------------------------------------------
# ELU / SELU


def _elu_params(args: tuple, kwargs: dict) -> tuple[float, float, float]:
    names = ("alpha", "scale", "input_scale")
    values = [float(args[i]) if len(args) > i else float(kwargs.get(n, 1.0)) for i, n in enumerate(names)]
    alpha, scale, input_scale = values
    if alpha < 0 or scale <= 0 or input_scale <= 0:
        raise NotImplementedError(f"elu with alpha={alpha}, scale={scale}, input_scale={input_scale}")
    return alpha, scale, input_scale


def elu_curve(alpha: float, scale: float, input_scale: float) -> Curve:
    def f(x):
        return torch.where(x > 0, scale * x, scale * alpha * torch.expm1(input_scale * x.clamp_max(0)))

    def df(x):
        return torch.where(x > 0, torch.full_like(x, scale),
                           scale * alpha * input_scale * torch.exp(input_scale * x.clamp_max(0)))

    kinked = alpha * input_scale > 1
    return Curve(f, df, fixed_regions((0.0,), True) if kinked else fixed_regions((), True))


def elu_bounds(low, high, alpha, scale, input_scale) -> Interval:
    return Interval(*(torch.ops.aten.elu.default(t, alpha, scale, input_scale) for t in (low, high)))


@interval_rule(aten.elu.default)
def elu_interval(args, kwargs) -> Interval:
    """IBP of ELU (increasing for ``alpha >= 0``)."""
    x = args[0]
    return elu_bounds(x.lower, x.upper, *_elu_params(args[1:], kwargs))


@relaxation_rule(aten.elu.default, alpha=curve_alpha(lambda call: elu_curve(*_elu_params(call.args, call.kwargs))))
@checked("aten.elu.default")
def elu_relaxation(low, high, call: RelaxCall) -> Relaxation:
    """Convex (ELU) or convex-then-linear (SELU) lines (module doc)."""
    params = _elu_params(call.args, call.kwargs)
    return curve_relaxation(elu_curve(*params), low, high, call, lambda lo, hi: elu_bounds(lo, hi, *params))

"""ReLU, leaky ReLU and PReLU: piecewise-linear activations with one kink at 0.

For ``f(x) = max(x, s x)`` (``s = 0`` for ReLU, ``0 <= s < 1``) on ``[l, u]``:

* stable neurons (``l >= 0`` or ``u <= 0``): ``f`` is linear there and the relaxation is exact;
* unstable neurons (``l < 0 < u``): upper bound the chord
  ``f(x) <= (u - s l)/(u - l) * (x - l) + s l``; lower bound any line through the origin with
  slope ``a`` in ``[s, 1]``: ``f(x) >= a x``.

The lower slope follows ``activation_bound_option`` (``adaptive``: 1 when ``u > -l`` else ``s``;
``same-slope``: the chord's slope; ``zero-lb``: ``s``; ``one-lb``: 1) or, under alpha-CROWN, a
free ``alpha`` projected into ``[s, 1]``.
"""

from __future__ import annotations

import torch

from ..domains import Interval, Relaxation
from ..syncs import may_read, sums_finite
from .registry import AlphaSpec, RelaxCall, interval_rule, is_zero, relaxation_rule

aten = torch.ops.aten


def _slope_of(call: RelaxCall) -> float:
    if call.args:
        return float(call.args[0])
    return float(call.kwargs.get("negative_slope", 0.01))


def _default_lower_slope(l, u, s: float, option: str):
    if option == "zero-lb":
        return torch.full_like(l, s)
    if option == "one-lb":
        return torch.ones_like(l)
    if option == "same-slope":
        return _chord(l, u, s)[0]
    if s == 0.0:
        return (u > -l).to(l.dtype)
    return torch.where(u > -l, torch.ones_like(l), torch.full_like(l, s))


def _chord(l, u, s: float):
    """Upper line of ``max(x, s x)`` on ``[l, u]``, ``l < 0 < u``: the chord, or on unbounded intervals
    the sound limits ``x + (s - 1) l`` (u = inf) and ``max(u, s u)`` (l = -inf; u = inf too: +inf)."""
    width = (u - l).clamp_min(1e-12)
    if s == 0.0:  # ReLU: fewer ops (this runs once per layer and call, often on small maps)
        slope = u / width
        bias = -slope * l
    else:
        slope = (u - s * l) / width
        bias = s * l - slope * l
    # an infinite end (l + u is then +-inf or nan); without a host read, the fix is always applied
    if not may_read(l) or not bool(torch.isfinite(l + u).all()):
        up_inf, low_inf = torch.isinf(u), torch.isinf(l)
        only_up = up_inf & ~low_inf
        slope = torch.where(only_up, torch.ones_like(slope), torch.where(low_inf, torch.zeros_like(slope), slope))
        flat = torch.where(up_inf, torch.full_like(u, torch.inf), u.clamp_min(0.0))
        bias = torch.where(only_up, (s - 1.0) * l, torch.where(low_inf, flat, bias))
    return slope, bias


def piecewise_relaxation(l, u, s: float, call: RelaxCall) -> Relaxation:
    option = call.opts.get("activation_bound_option", "adaptive")
    unstable = (l < 0) & (u > 0)
    active = l >= 0
    stable_slope = active.to(l.dtype) if s == 0.0 else torch.where(active, torch.ones_like(l), torch.full_like(l, s))
    chord_slope, chord_bias = _chord(l, u, s)
    uw = torch.where(unstable, chord_slope, stable_slope)
    ub = torch.where(unstable, chord_bias, torch.zeros_like(l))
    if call.alpha is not None:
        lower_slope = call.alpha.clamp(s, 1.0)
    else:
        lower_slope = _default_lower_slope(l, u, s, option)
    lw = torch.where(unstable, lower_slope, stable_slope)
    return Relaxation(lw, torch.zeros_like(l), uw, ub)  # lb: no spec dimension even when alpha has one


def unstable_mask(l, u):
    return (l < 0) & (u > 0)


def _alpha_init(l, u, call: RelaxCall):
    s = 0.0 if not call.args and "negative_slope" not in call.kwargs else _slope_of(call)
    return _default_lower_slope(l, u, s, call.opts.get("activation_bound_option", "adaptive"))


RELU_ALPHA = AlphaSpec(init=_alpha_init, project=lambda alpha, l, u, call=None: alpha.clamp(0.0, 1.0))


def relu_prepared(l, u, call: RelaxCall):
    """ReLU's default (adaptive) relaxation as ``(lw, uw - lw, None, ub)``, in 13 tensor operations
    instead of about 30 (they dominate the cost of a backward walk at batch 1)::

        u+ = max(u, 0),  l- = max(-l, 0),  uw = u+ / max(u+ + l-, 1e-12),  ub = uw l-,  lw = max(sign(u + l), 0)

    ``uw, ub`` is the chord on unstable neurons and ``(1, 0)``/``(0, 0)`` on active/inactive ones;
    ``lw`` is 1 where ``u > -l`` (so on active neurons) and 0 elsewhere. The one difference from
    :func:`piecewise_relaxation` is a neuron with ``l = u = 0``, where both slopes are 0 here and 1
    there: both exact, since the neuron is 0. Intervals with an infinite end (``ub`` then not
    finite) and other options defer to the general rule (None); where the finiteness of ``ub``
    cannot be read without waiting for a device (:func:`~boundprop.syncs.may_read`), the general
    rule's limits at infinite ends are applied instead, always (:func:`_infinite_ends`).

    Why these operations: on CPU, a comparison into a bool tensor and ``count_nonzero`` cost 4-10
    times an arithmetic pass (``(u + l > 0).to(dtype)``: 194 us on 65k neurons, ``sign`` and
    ``clamp``: 26 us), so ``lw`` is built from ``sign`` and whether ``d`` is zero is read from its
    minimum and maximum. The fields equal the comparison form's (``u + l`` rounds to 0 only when it
    is 0; a zero may carry the other sign).
    """
    if call.alpha is not None or call.opts.get("activation_bound_option", "adaptive") != "adaptive":
        return None
    up, low_neg = u.clamp(min=0), l.neg().clamp_(min=0)
    uw = up / (up + low_neg).clamp_(min=1e-12)
    ub = uw * low_neg
    lw = (u + l).sign_().clamp_(min=0)
    if not may_read(ub):
        uw, ub, lw = _infinite_ends(l, u, up, low_neg, uw, ub, lw)
    elif not sums_finite(ub):
        return None
    d = uw - lw
    if is_zero(d):
        return lw, None, None, None
    return lw, d, None, ub


def _infinite_ends(l, u, up, low_neg, uw, ub, lw):
    """:func:`relu_prepared`'s fields with :func:`piecewise_relaxation`'s values where an end is
    infinite (elsewhere unchanged): ``u = +inf``: ``uw = 1, ub = l-`` (the line ``x - l`` when
    ``l < 0``, ``x`` when active); ``l = -inf``: ``uw = 0, ub = u+`` (``+inf`` when ``u`` is too);
    ``lw = 0`` where ``u + l`` is NaN (both ends infinite)."""
    low_inf, up_inf = torch.isinf(l), torch.isinf(u)
    uw = torch.where(low_inf, 0.0, torch.where(up_inf, 1.0, uw))
    ub = torch.where(low_inf, up, torch.where(up_inf, low_neg, ub))
    return uw, ub, lw.nan_to_num_(0.0)


@relaxation_rule(aten.relu.default, unstable=unstable_mask, alpha=RELU_ALPHA, prepared=relu_prepared)
def relu_relaxation(l, u, call: RelaxCall) -> Relaxation:
    return piecewise_relaxation(l, u, 0.0, call)


@relaxation_rule(aten.leaky_relu.default, unstable=unstable_mask,
                 alpha=AlphaSpec(init=_alpha_init, project=lambda alpha, l, u, call=None: alpha.clamp(
                     _slope_of(call) if call is not None else 0.0, 1.0)))
def leaky_relu_relaxation(l, u, call: RelaxCall) -> Relaxation:
    s = _slope_of(call)
    if not 0.0 <= s <= 1.0:
        raise NotImplementedError(f"leaky_relu with negative_slope={s} outside [0, 1] is not supported")
    return piecewise_relaxation(l, u, s, call)


@interval_rule(aten.relu.default)
def relu_interval(args, kwargs):
    return args[0].map(torch.relu)


@interval_rule(aten.leaky_relu.default)
def leaky_relu_interval(args, kwargs):
    slope = args[1] if len(args) > 1 else kwargs.get("negative_slope", 0.01)
    return args[0].map(lambda t: torch.nn.functional.leaky_relu(t, slope))


# --- PReLU ---------------------------------------------------------------------------------------
#
# ``_prelu_kernel(x, w) = x`` for ``x >= 0`` and ``w x`` below, with slopes ``w`` that broadcast to ``x``
# from the right (capture turns ``prelu``'s one slope per channel into ``(C, 1, ..., 1)``, as make_fx
# does; the ONNX importer keeps ``PRelu``'s slopes so when they vary along one axis at most). So the
# slopes align with the intervals the rule sees whatever comes before the channels: ``(batch, C, ...)``,
# ``(batch, 1, C, ...)`` under spec-dependent alpha, ``(batch, rows, C, kh, kw)`` windows of patches.
#
# The kink is at 0 for every ``w``: convex (``max(x, w x)``) where ``w <= 1``, concave (``min(x, w x)``)
# where ``w > 1``. On an unstable neuron (``l < 0 < u``) one side is the chord through ``(l, w l)`` and
# ``(u, u)`` and the other a line ``t x`` through the kink with ``t`` between ``w`` and 1 (a supporting
# line there): chord above and ``t x`` below when convex, the reverse when concave. ``t`` is 1 where
# ``u > -l``, else ``w`` (the adaptive choice), or alpha-CROWN's parameter projected into
# ``[min(w, 1), max(w, 1)]``.


def _prelu_slopes(call_args: tuple, like: torch.Tensor) -> torch.Tensor:
    """The slope of every element of ``like``."""
    w = call_args[0]
    if not torch.is_tensor(w):
        raise NotImplementedError("prelu with a perturbed slope is not supported")
    return torch.broadcast_to(w.to(like.dtype), like.shape)


def _prelu_value(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= 0, x, w * x)


def _prelu_origin_slope(l, u, w):
    return torch.where(u > -l, torch.ones_like(w), w)


@interval_rule(aten._prelu_kernel.default)
def prelu_interval(args, kwargs):
    """``[min, max]`` of ``prelu`` over ``[l, u]``: at an end or at the kink ``clamp(0, l, u)``."""
    x = args[0]
    w = _prelu_slopes(tuple(args[1:]), x.lower)
    kink = torch.maximum(torch.minimum(torch.zeros_like(x.lower), x.upper), x.lower)
    values = torch.stack([_prelu_value(t, w) for t in (x.lower, x.upper, kink)])
    return Interval(values.amin(0), values.amax(0))


def _prelu_alpha_init(l, u, call: RelaxCall):
    return _prelu_origin_slope(l, u, _prelu_slopes(call.args, l))


def _between_slopes(alpha: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``alpha`` clamped into ``[min(w, 1), max(w, 1)]``: the lines through the kink that bound prelu."""
    one = torch.ones_like(w)
    return torch.minimum(torch.maximum(alpha, torch.minimum(w, one)), torch.maximum(w, one))


def _prelu_alpha_project(alpha, l, u, call=None):
    return _between_slopes(alpha, _prelu_slopes(call.args, l))


@relaxation_rule(aten._prelu_kernel.default,
                 alpha=AlphaSpec(init=_prelu_alpha_init, project=_prelu_alpha_project))
def prelu_relaxation(l, u, call: RelaxCall) -> Relaxation:
    w = _prelu_slopes(call.args, l)
    unstable = (l < 0) & (u > 0)
    stable = torch.where(l >= 0, torch.ones_like(w), w)
    chord_slope = (u - w * l) / (u - l).clamp_min(1e-12)
    chord_bias = w * l - chord_slope * l
    if not may_read(l) or not bool(torch.isfinite(l + u).all()):  # the chord's limits at infinite ends
        up_inf, low_inf = torch.isinf(u), torch.isinf(l)
        chord_slope = torch.where(low_inf, torch.zeros_like(w), torch.where(up_inf, torch.ones_like(w), chord_slope))
        # u = inf: the line x + (w - 1) l; l = -inf: the constant sup (convex: u, or +inf if w < 0) or inf
        # (concave: -inf) of prelu over (-inf, u]
        unbounded = torch.where(w > 1, -torch.inf, torch.where(w < 0, torch.inf, u.clamp_min(0.0)))
        chord_bias = torch.where(low_inf, torch.where(up_inf & (w <= 1), torch.inf, unbounded),
                                 torch.where(up_inf, (w - 1) * l, chord_bias))
    origin = _between_slopes(call.alpha, w) if call.alpha is not None else _prelu_origin_slope(l, u, w)
    convex = w <= 1
    zero = torch.zeros_like(l)
    lw = torch.where(unstable, torch.where(convex, origin, chord_slope), stable)
    lb = torch.where(unstable & ~convex, chord_bias, zero)
    uw = torch.where(unstable, torch.where(convex, chord_slope, origin), stable)
    ub = torch.where(unstable & convex, chord_bias, zero)
    return Relaxation(lw, lb, uw, ub)

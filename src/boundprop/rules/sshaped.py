"""S-shaped activations: sigmoid, tanh, atan, erf.

Each is increasing, convex on ``x < 0`` and concave on ``x > 0`` (one inflection point, at 0).

* IBP: ``[f(l), f(u)]`` (monotone).
* Relaxation (:mod:`.curves`): on ``u <= 0`` the chord above and a tangent below; on ``l >= 0`` the
  chord below and a tangent above (tangent point the midpoint by default); on ``l < 0 < u`` each
  line is the chord where the chord is sound (``f'(l) >= k`` for the lower one, ``f'(u) >= k`` for
  the upper one, ``k`` the chord slope), otherwise the tangent through the far endpoint (the
  tangent point found by a bracketing search). alpha-CROWN moves the tangent points (``alpha`` in [0, 1]:
  the position between the near endpoint and the default tangent point on mixed intervals, between
  ``l`` and ``u`` otherwise).

Shapes: element-wise; lines as in :func:`~boundprop.rules.curves.curve_relaxation`.
"""

from __future__ import annotations

import math

import torch

from ..domains import Interval, Relaxation
from .curves import Curve, checked, curve_alpha, curve_relaxation, fixed_regions
from .registry import RelaxCall, interval_rule, relaxation_rule

aten = torch.ops.aten

_S_REGIONS = fixed_regions((0.0,), convex_first=True)


def _dsigmoid(x: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(x)
    return s * (1 - s)


def _derf(x: torch.Tensor) -> torch.Tensor:
    return 2 / math.sqrt(math.pi) * torch.exp(-x * x)


#: op -> (f, f') on float64 tensors
S_SHAPED = {
    aten.sigmoid.default: (torch.sigmoid, _dsigmoid),
    aten.tanh.default: (torch.tanh, lambda x: 1 - torch.tanh(x) ** 2),
    aten.atan.default: (torch.atan, lambda x: 1 / (1 + x * x)),
    aten.erf.default: (torch.erf, _derf),
}


def _register(op, f, df) -> None:
    curve = Curve(f, df, _S_REGIONS)

    def bounds(low: torch.Tensor, high: torch.Tensor) -> Interval:
        return Interval(f(low), f(high))

    @interval_rule(op)
    def s_interval(args, kwargs) -> Interval:
        """IBP: f is increasing, ``[f(l), f(u)]``."""
        return args[0].map(f)

    @relaxation_rule(op, alpha=curve_alpha(lambda call: curve))
    @checked(str(op))
    def s_relaxation(low, high, call: RelaxCall) -> Relaxation:
        """Chord / tangent / tangent-through-endpoint lines of an S-shaped function (module doc)."""
        return curve_relaxation(curve, low, high, call, bounds)


for _op, (_f, _df) in S_SHAPED.items():
    _register(_op, _f, _df)

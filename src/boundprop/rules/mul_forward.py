"""Forward-mode rule for the element-wise product of two perturbed tensors.

The planes are those of the backward rule (:mod:`.bilinear`), so both modes relax a product alike:
for ``x in [lx, ux]``, ``y in [ly, uy]`` (the arguments' intervals), McCormick::

    x y >= ax_l x + ay_l y + c_l        x y <= ax_u x + ay_u y + c_u

with the plane weights of ``opts["mul_relaxation"]`` (``box`` by default, ``fixed`` as auto_LiRPA);
for a square ``x * x``: tangent ``2 z x - z^2`` below (``z = clamp(0, l, u)``), chord above.

Each ``a * x`` term takes the lower or the upper form of ``x`` by the sign of ``a``
(:func:`~boundprop.domains.linear_forms.compose`). Shapes: the forms of ``x`` and ``y`` are
``(batch, D + 1, *shape_x)`` / ``(*shape_y)`` and broadcast to the output's ``(batch, D + 1, *out)``;
both arguments must have the output's rank. Terms with an infinite bound end get a vacuous
(``-inf``/``+inf``) constant, cleaned up by the algorithm.
"""

from __future__ import annotations

import torch

from ..domains.linear_forms import LinearForms, compose
from .bilinear import mccormick_planes, mccormick_weights
from .registry import ForwardCall, Var, forward_rule

aten = torch.ops.aten


def _mode(opts: dict) -> str:
    if isinstance(opts.get("mul"), dict) and opts["mul"].get("middle"):
        return "middle"
    return opts.get("mul_relaxation", "box")


def _vacuous(c: torch.Tensor, bad: torch.Tensor, sign: float) -> torch.Tensor:
    return torch.where(bad, sign * torch.inf, c)


@forward_rule(aten.mul.Tensor)
def mul_forward(call: ForwardCall) -> LinearForms:
    """Forms of ``x * y`` from the McCormick planes (tangent/chord for ``x * x``)."""
    x, y = call.args[0], call.args[1]
    if not (isinstance(x, Var) and isinstance(y, Var)):
        raise NotImplementedError("mul forward rule: expected two perturbed factors")
    out_shape = call.value.shape
    if x.value.dim() != len(out_shape) or y.value.dim() != len(out_shape):
        raise NotImplementedError("forward mode: a product of perturbed tensors of different ranks; use CROWN")
    fx, fy = call.forms[x.name], call.forms[y.name]
    lx, ux, ly, uy = (t.expand(out_shape) for t in (x.bounds.lower, x.bounds.upper, y.bounds.lower, y.bounds.upper))
    if x.name == y.name:
        bad = ~(torch.isfinite(lx) & torch.isfinite(ux))
        lo, hi = torch.where(bad, 0.0, lx), torch.where(bad, 0.0, ux)
        z = torch.minimum(torch.maximum(torch.zeros_like(lo), lo), hi)
        lower = compose(2 * z, fx, "lower")
        upper = compose(lo + hi, fx, "upper")
        return LinearForms(lower, upper).add_constant(_vacuous(-z * z, bad, -1), _vacuous(-lo * hi, bad, 1),
                                                      fresh=True)
    t, s = mccormick_weights(lx, ux, ly, uy, _mode(call.opts))
    low, up, bad = mccormick_planes(lx, ux, ly, uy, t, s)
    lower = compose(low.ax, fx, "lower") + compose(low.ay, fy, "lower")
    upper = compose(up.ax, fx, "upper") + compose(up.ay, fy, "upper")
    return LinearForms(lower, upper).add_constant(_vacuous(low.c, bad, -1), _vacuous(up.c, bad, 1), fresh=True)

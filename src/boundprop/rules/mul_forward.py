"""Forward-mode rule for the element-wise product of two perturbed tensors (McCormick).

For ``a in [a_l, a_u]`` and ``b in [b_l, b_u]`` (element-wise, the arguments' intervals)::

    (a - a_l)(b - b_l) >= 0   =>   a b >= b_l a + a_l b - a_l b_l
    (a - a_l)(b - b_u) <= 0   =>   a b <= b_u a + a_l b - a_l b_u

(the planes auto_LiRPA uses too). Each plane is a sum of ``coef * a`` and ``coef * b`` terms; each
is bounded with the lower or upper form of ``a`` (``b``) according to the coefficient's sign
(:func:`~boundprop.domains.linear_forms.compose`). Shapes: the forms of ``a`` and ``b`` are
``(batch, D + 1, *shape_a)`` / ``(*shape_b)``, broadcast to the output's ``(batch, D + 1, *out)``;
both arguments must have the output's rank.
"""

from __future__ import annotations

import torch

from ..domains.linear_forms import LinearForms, compose
from .registry import ForwardCall, Var, forward_rule

aten = torch.ops.aten


@forward_rule(aten.mul.Tensor)
def mul_forward_mccormick(call: ForwardCall) -> LinearForms:
    a, b = call.args[0], call.args[1]
    if not (isinstance(a, Var) and isinstance(b, Var)):
        raise NotImplementedError("mul forward rule: expected two perturbed factors")
    rank = call.value.dim()
    if a.value.dim() != rank or b.value.dim() != rank:
        raise NotImplementedError("forward mode: a product of perturbed tensors of different ranks; use CROWN")
    fa, fb = call.forms[a.name], call.forms[b.name]
    out_shape = call.value.shape
    al, bl, bu = (t.expand(out_shape) for t in (a.bounds.lower, b.bounds.lower, b.bounds.upper))
    lower = compose(bl, fa, "lower") + compose(al, fb, "lower")
    upper = compose(bu, fa, "upper") + compose(al, fb, "upper")
    return LinearForms(lower, upper).add_constant(-al * bl, -al * bu)

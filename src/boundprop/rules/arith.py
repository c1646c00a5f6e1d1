"""Element-wise arithmetic: add, sub, neg, and mul/div by constants.

``add``/``sub``/``neg`` are affine in all their perturbed arguments. ``mul``/``div`` are affine when
at most one factor (and no divisor) is perturbed; the product of two perturbed tensors has its own
rule (:mod:`.bilinear`). IBP::

    a + alpha b  in [a_l + alpha b_l, a_u + alpha b_u]      (alpha >= 0; swapped ends if alpha < 0)
    c * x        in [c x_c - |c| x_r, c x_c + |c| x_r]       (constant c)
    a * b        in [min P, max P],  P = {a_l b_l, a_l b_u, a_u b_l, a_u b_u}   (both perturbed)
"""

from __future__ import annotations

import torch

from ..domains import Interval
from .registry import Var, affine_backward_rule, affine_ops, constant_tensor, interval_rule, is_perturbed
from .shape import sum_to_shape

aten = torch.ops.aten


def _as_interval(x) -> Interval:
    return x if isinstance(x, Interval) else Interval.point(constant_tensor(x))


def _scaled(x: Interval, alpha) -> Interval:
    if alpha == 1:
        return x
    if alpha >= 0:
        return Interval(x.lower * alpha, x.upper * alpha)
    return Interval(x.upper * alpha, x.lower * alpha)


@interval_rule(aten.add.Tensor, aten.add.Scalar)
def add_interval(args, kwargs) -> Interval:
    a, b = _as_interval(args[0]), _scaled(_as_interval(args[1]), kwargs.get("alpha", 1))
    return Interval(a.lower + b.lower, a.upper + b.upper)


@interval_rule(aten.sub.Tensor, aten.sub.Scalar)
def sub_interval(args, kwargs) -> Interval:
    a, b = _as_interval(args[0]), _scaled(_as_interval(args[1]), kwargs.get("alpha", 1))
    return Interval(a.lower - b.upper, a.upper - b.lower)


@interval_rule(aten.rsub.Scalar, aten.rsub.Tensor)
def rsub_interval(args, kwargs) -> Interval:
    return sub_interval((args[1], args[0]), kwargs)


@interval_rule(aten.neg.default)
def neg_interval(args, kwargs) -> Interval:
    x = args[0]
    return Interval(-x.upper, -x.lower)


def mul_interval_exact(a: Interval, b: Interval) -> Interval:
    """Exact interval of the element-wise product of two independent intervals."""
    products = torch.stack(torch.broadcast_tensors(a.lower * b.lower, a.lower * b.upper,
                                                   a.upper * b.lower, a.upper * b.upper))
    return Interval(products.amin(0), products.amax(0))


@interval_rule(aten.mul.Tensor, aten.mul.Scalar)
def mul_interval(args, kwargs) -> Interval:
    a, b = args[0], args[1]
    if is_perturbed(a) and is_perturbed(b):
        return mul_interval_exact(a, b)
    x, c = (a, b) if is_perturbed(a) else (b, a)
    center = x.center * c
    radius = x.radius * (c.abs() if torch.is_tensor(c) else abs(c))
    return Interval(center - radius, center + radius)


@interval_rule(aten.div.Tensor, aten.div.Scalar)
def div_interval(args, kwargs) -> Interval:
    a, b = args[0], args[1]
    if is_perturbed(b):
        from .convex import reciprocal_interval  # noqa: PLC0415 - the nonlinear family owns 1/x

        return mul_interval((a, reciprocal_interval((b,), {})), {})
    return mul_interval((a, 1.0 / b if not torch.is_tensor(b) else torch.reciprocal(b)), {})


affine_ops(aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar, aten.rsub.Scalar, aten.rsub.Tensor)
affine_ops(aten.neg.default, homogeneous=True)
affine_ops(aten.mul.Tensor, aten.mul.Scalar, homogeneous=True,
           when=lambda args: not (is_perturbed(args[0]) and is_perturbed(args[1])))
affine_ops(aten.div.Tensor, aten.div.Scalar, homogeneous=True, when=lambda args: not is_perturbed(args[1]))


# --- fast backward paths: coefficients A (batch, spec, *out) ------------------------------------


def _batched_shape(value) -> tuple[int, ...]:
    return tuple(value.shape[1:])


def _align(c, A):
    """A constant broadcastable to the output ``(batch, *out)`` -> broadcastable to ``A`` (batch, spec, *out)."""
    if torch.is_tensor(c) and c.dim() == A.dim() - 1:
        return c.unsqueeze(1)
    return c


def _const_term(A, c) -> torch.Tensor | float:
    if not torch.is_tensor(c):
        return A.flatten(2).sum(-1) * c if c != 0 else 0.0
    return (A * _align(c, A)).flatten(2).sum(-1)


def _add_sub_back(sign: float):
    def rule(A, args, kwargs):
        a, b = args[0], args[1]
        alpha = kwargs.get("alpha", 1)
        coeffs, bias = [], 0.0
        for operand, scale in ((a, 1.0), (b, sign * alpha)):
            if isinstance(operand, Var):
                if len(operand.shape) == 0:
                    return None
                part = sum_to_shape(A, _batched_shape(operand))
                coeffs.append(part if scale == 1.0 else part * scale)
            else:
                bias = bias + _const_term(A, operand) * scale if torch.is_tensor(operand) or operand != 0 else bias
        return coeffs, bias

    rule.__doc__ = "``A . (a + s b) = A . a + s A . b`` (summed over broadcast dimensions)."
    return rule


def _scale_back(divide: bool):
    def rule(A, args, kwargs):
        x, c = (args[0], args[1]) if isinstance(args[0], Var) else (args[1], args[0])
        if divide and not isinstance(args[0], Var):
            return None
        if len(x.shape) == 0:
            return None
        factor = (1.0 / c if not torch.is_tensor(c) else torch.reciprocal(c)) if divide else c
        return [sum_to_shape(A * _align(factor, A), _batched_shape(x))], 0.0

    rule.__doc__ = "``A . (c x) = (c A) . x`` element-wise (summed over broadcast dimensions)."
    return rule


affine_backward_rule(aten.add.Tensor, aten.add.Scalar)(_add_sub_back(1.0))
affine_backward_rule(aten.sub.Tensor, aten.sub.Scalar)(_add_sub_back(-1.0))
affine_backward_rule(aten.mul.Tensor, aten.mul.Scalar)(_scale_back(False))
affine_backward_rule(aten.div.Tensor, aten.div.Scalar)(_scale_back(True))


@affine_backward_rule(aten.neg.default)
def _neg_back(A, args, kwargs):
    return [-A], 0.0

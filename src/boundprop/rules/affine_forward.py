"""Fast forward-mode paths for affine ops: ``T -> J T`` and ``T -> |J| T`` without a dense Jacobian.

Forward mode pushes the linear forms of a node's perturbed inputs, ``T_i`` of shape
``(batch, R, *in_i)`` (``R`` = input entries + 1 constant row), through ``y = sum_i J_i x_i + c``.
When the forms are inexact (lower != upper), the lower/upper forms of ``y`` need the entry-wise
absolute Jacobian as well::

    lower_y = J mid - |J| rad + c,   upper_y = J mid + |J| rad + c,   mid = (l + u)/2, rad = (u - l)/2

which is ``J+ l + J- u`` (resp. ``J+ u + J- l``) written with two products instead of four. The
generic path (:class:`~boundprop.rules.generic.AffinePushforward`) gets ``J T`` from the op's own
Jacobian-vector product but ``|J| T`` only from a dense Jacobian; the rules here compute both
directly:

* linear / convolutions: the op applied to ``T`` (rows folded into the batch) with ``W`` or ``|W|``
  and no bias;
* matrix products with one constant operand: ``T @ B`` (``|B|``), ``A @ T`` (``|A|``);
* eval batch norm: ``s T`` (``|s|``) per channel;
* mul/div by a constant: ``c T`` / ``T / c`` (``|c|``);
* add/sub/rsub/neg: signed sums of the tangents (absolute: the signs dropped);
* pure data movement and sums/averages (:mod:`.shape`): ``J >= 0``, so ``|J| T = J T`` (generic).
"""

from __future__ import annotations

import torch

from ..graph import ops
from .registry import Var, affine_forward_rule, constant_tensor
from .shape import MOVEMENT_OPS, SUMMING_OPS

aten = torch.ops.aten

#: Affine ops whose Jacobian is entry-wise non-negative: ``|J| T = J T``.
NONNEGATIVE_AFFINE = frozenset(MOVEMENT_OPS + SUMMING_OPS)

#: Ops that only reshape (row-major order and batch dimension kept): ``J T`` is a reshape of ``T``.
RESHAPE_OPS = (
    aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.flatten.using_ints,
    aten.unflatten.int, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.unsqueeze.default,
    aten.clone.default, aten.alias.default, aten.contiguous.default, aten.detach.default,
    aten.lift_fresh_copy.default,
)


def is_nonnegative(target, args: tuple, kwargs: dict) -> bool:
    """Whether the affine op's Jacobian is entry-wise non-negative (so lower maps to lower)."""
    if target in NONNEGATIVE_AFFINE:
        return True
    if target in (aten.add.Tensor, aten.add.Scalar):
        return not isinstance(args[1], Var) or kwargs.get("alpha", 1) >= 0
    if target in (aten.sub.Tensor, aten.sub.Scalar):
        return not isinstance(args[1], Var) or kwargs.get("alpha", 1) <= 0
    if target in (aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar):
        const = args[1] if isinstance(args[0], Var) else args[0]
        return not isinstance(const, Var) and bool((constant_tensor(const) >= 0).all())
    return False


def _reshape_forward(op):
    def rule(tangents, args, kwargs, absolute):
        (t,) = tangents
        var = next(a for a in args if isinstance(a, Var))
        values = tuple(a.value if isinstance(a, Var) else a for a in args)
        out = op(*values, **kwargs).shape
        if len(out) == 0 or out[0] != var.value.shape[0] or out.numel() != var.value.numel():
            return None
        return t.reshape(t.shape[0], t.shape[1], *out[1:])

    rule.__doc__ = f"{op}: ``J T`` is ``T`` reshaped to the output's per-example shape (shared rows too)."
    return rule


for _op in RESHAPE_OPS:
    affine_forward_rule(_op)(_reshape_forward(_op))


def _abs(c, absolute: bool):
    if not absolute:
        return c
    return c.abs() if torch.is_tensor(c) else abs(c)


def _rank_ok(args: tuple) -> int | None:
    """The common rank of the perturbed arguments when no constant tensor has a higher rank."""
    ranks = {a.value.dim() for a in args if isinstance(a, Var)}
    if len(ranks) != 1:
        return None
    rank = ranks.pop()
    if any(torch.is_tensor(a) and a.dim() > rank for a in args):
        return None
    return rank


def _align(c, rank: int):
    """A constant broadcastable against ``(batch, *shape)`` -> against ``(batch, R, *shape)``."""
    if torch.is_tensor(c) and c.dim() == rank:
        return c.unsqueeze(1)
    return c


# --- linear, convolutions, products -------------------------------------------------------------


@affine_forward_rule(aten.linear.default)
def linear_forward(tangents, args, kwargs, absolute):
    """``J T = T W^T`` (the rows ride along as extra leading dimensions)."""
    (t,) = tangents
    return torch.nn.functional.linear(t, _abs(args[1], absolute))


def _conv_forward(op):
    def rule(tangents, args, kwargs, absolute):
        (t,) = tangents
        if kwargs:
            return None
        folded = t.reshape(t.shape[0] * t.shape[1], *t.shape[2:])
        out = op(folded, _abs(args[1], absolute), None, *args[3:])
        return out.reshape(t.shape[0], t.shape[1], *out.shape[1:])

    rule.__doc__ = f"{op}: ``J T = conv(T, W)`` with the rows folded into the batch, no bias."
    return rule


for _op in (aten.conv1d.default, aten.conv2d.default, aten.conv_transpose1d.default,
            aten.conv_transpose2d.input, aten.convolution.default):
    affine_forward_rule(_op)(_conv_forward(_op))


@affine_forward_rule(aten.mm.default, aten.bmm.default, aten.matmul.default)
def matmul_forward(tangents, args, kwargs, absolute):
    """``x @ B -> T @ B``, ``A @ x -> A @ T``: the constant broadcast over the rows (``|B|``, ``|A|``)."""
    (t,) = tangents
    left = not isinstance(args[0], Var)  # the constant is the left operand
    const = args[0] if left else args[1]
    rank = t.dim() - 1
    if not torch.is_tensor(const) or const.dim() > rank:
        return None
    if const.dim() == rank:
        if rank > 2:
            const = const.unsqueeze(1)  # batched constant: (batch, 1, ...)
        elif left:
            return None  # A (n, batch) @ x (batch, m) mixes the batch: the generic path
    const = _abs(const, absolute)
    return const @ t if left else t @ const


@affine_forward_rule(aten.addmm.default)
def addmm_forward(tangents, args, kwargs, absolute):
    """``bias + a @ b`` with a constant bias: the product's rule."""
    if isinstance(args[0], Var) or kwargs.get("beta", 1) != 1 or kwargs.get("alpha", 1) != 1:
        return None
    return matmul_forward(tangents, args[1:3], {}, absolute)


@affine_forward_rule(ops.batch_norm_eval)
def batch_norm_forward(tangents, args, kwargs, absolute):
    """``J T = s T`` per channel (channel dimension 1 of the node, 2 of the rows)."""
    (t,) = tangents
    _x, weight, bias, mean, var, _momentum, eps = args
    scale, _shift = ops.batch_norm_scale_shift(weight, bias, mean, var, eps)
    return t * _abs(scale, absolute).reshape([1, 1, -1] + [1] * (t.dim() - 3))


# --- element-wise arithmetic ----------------------------------------------------------------------


@affine_forward_rule(aten.mul.Tensor, aten.mul.Scalar)
def mul_forward(tangents, args, kwargs, absolute):
    """``c x``: ``J T = c T`` (one perturbed factor)."""
    (t,) = tangents
    rank = _rank_ok(args)
    if rank is None:
        return None
    c = args[1] if isinstance(args[0], Var) else args[0]
    return t * _align(_abs(c, absolute), rank)


@affine_forward_rule(aten.div.Tensor, aten.div.Scalar)
def div_forward(tangents, args, kwargs, absolute):
    """``x / c``: ``J T = T / c`` (constant divisor, no rounding mode)."""
    (t,) = tangents
    rank = _rank_ok(args)
    if rank is None or kwargs.get("rounding_mode") is not None:
        return None
    return t / _align(_abs(args[1], absolute), rank)


def _signed_sum(args, tangents, signs, absolute):
    rank = _rank_ok(args)
    if rank is None:
        return None
    it = iter(tangents)
    total = None
    for arg, sign in zip(args, signs):
        if not isinstance(arg, Var):
            continue
        part = next(it)
        if part is None:
            continue
        sign = abs(sign) if absolute else sign
        part = part if sign == 1 else part * sign
        total = part if total is None else total + part
    return total


@affine_forward_rule(aten.add.Tensor, aten.add.Scalar)
def add_forward(tangents, args, kwargs, absolute):
    """``a + alpha b``: ``J T = T_a + alpha T_b``."""
    return _signed_sum(args[:2], tangents, (1, kwargs.get("alpha", 1)), absolute)


@affine_forward_rule(aten.sub.Tensor, aten.sub.Scalar)
def sub_forward(tangents, args, kwargs, absolute):
    """``a - alpha b``: ``J T = T_a - alpha T_b``."""
    return _signed_sum(args[:2], tangents, (1, -kwargs.get("alpha", 1)), absolute)


@affine_forward_rule(aten.rsub.Scalar, aten.rsub.Tensor)
def rsub_forward(tangents, args, kwargs, absolute):
    """``b - alpha a`` (``rsub(a, b)``): ``J T = T_b - alpha T_a``."""
    return _signed_sum(args[:2], tangents, (-kwargs.get("alpha", 1), 1), absolute)


@affine_forward_rule(aten.neg.default)
def neg_forward(tangents, args, kwargs, absolute):
    """``-x``: ``J T = -T``, ``|J| T = T``."""
    (t,) = tangents
    return t if absolute else -t

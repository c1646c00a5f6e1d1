"""Linear layers, convolutions, matrix products and eval-mode batch norm.

With constant weights these ops are affine in their (single) perturbed input ``x``; IBP uses the
centre/radius form, exact for one layer::

    y_c = f(x_c; W, b),     y_r = f(x_r; |W|, 0),     y in [y_c - y_r, y_c + y_r]

and backward/forward propagation use the op's own vector-Jacobian product (conv -> transposed
conv, linear -> ``A @ W``), so no dense matrix is ever built for a convolution. When both operands
of a product are perturbed (perturbed weights, attention ``Q K^T``) the IBP rule is centre/radius
interval arithmetic (sound for any bilinear map ``m``)::

    m(a, b) in m(a_c, b_c) +- ( m(|a_c|, b_r) + m(a_r, |b_c|) + m(a_r, b_r) )

and linear propagation is left to a product rule (``backward_rule``) elsewhere.
"""

from __future__ import annotations

import torch

from ..domains import Interval
from ..graph import ops
from ..kernels import conv2d, conv_transpose2d
from .registry import affine_backward_rule, affine_ops, interval_rule, is_perturbed

aten = torch.ops.aten


def _abs(t):
    return t.abs() if torch.is_tensor(t) else t


def bilinear_interval(m, a, b) -> Interval:
    """Interval of ``m(a, b)`` for a map ``m`` linear in each argument; ``a``/``b`` Interval or Tensor."""
    if not isinstance(a, Interval):
        a = Interval.point(a)
    if not isinstance(b, Interval):
        b = Interval.point(b)
    ac, ar, bc, br = a.center, a.radius, b.center, b.radius
    center = m(ac, bc)
    radius = m(ac.abs(), br) + m(ar, bc.abs()) + m(ar, br)
    return Interval(center - radius, center + radius)


def _weight_only_x(args) -> bool:
    """Affine when only the first argument (the input) is perturbed."""
    return not any(is_perturbed(a) for a in args[1:])


# --- linear -------------------------------------------------------------------------------


@interval_rule(aten.linear.default)
def linear_interval(args, kwargs) -> Interval:
    """``y = x W^T + b``; centre/radius for constant ``W``, interval arithmetic otherwise."""
    x, weight, *rest = args
    bias = rest[0] if rest else kwargs.get("bias")
    if not is_perturbed(x) and not is_perturbed(weight):  # only the bias is perturbed
        c = torch.nn.functional.linear(x, weight, None if is_perturbed(bias) else bias)
        out = Interval(c, c)
    elif not is_perturbed(weight):
        xc, xr = x.center_radius()
        c = torch.nn.functional.linear(xc, weight, None if is_perturbed(bias) else bias)
        r = torch.nn.functional.linear(xr, weight.abs())
        out = Interval(c - r, c + r)
    else:
        out = bilinear_interval(lambda a, w: torch.nn.functional.linear(a, w), x, weight)
        if bias is not None and not is_perturbed(bias):
            out = Interval(out.lower + bias, out.upper + bias)
    if is_perturbed(bias):
        out = Interval(out.lower + bias.lower, out.upper + bias.upper)
    return out


# --- convolutions -------------------------------------------------------------------------


def _conv_interval(fn):
    def rule(args, kwargs) -> Interval:
        x, weight, bias, *rest = (list(args) + [None] * 3)[: max(len(args), 3)]
        if is_perturbed(weight) or is_perturbed(bias):
            out = bilinear_interval(lambda a, w: fn(a, w, None, *rest), x, weight)
            if bias is not None:
                b = bias if isinstance(bias, Interval) else Interval.point(bias)
                shape = [1, -1] + [1] * (out.lower.dim() - 2)
                out = Interval(out.lower + b.lower.reshape(shape), out.upper + b.upper.reshape(shape))
            return out
        xc, xr = x.center_radius()
        c = fn(xc, weight, bias, *rest)
        r = fn(xr, weight.abs(), None, *rest)
        return Interval(c - r, c + r)

    rule.__doc__ = f"IBP of {fn}: centre/radius with |W|."
    return rule


def _conv_fn(op):
    if op is aten.conv2d.default:  # the fastest CPU kernel for the shape (boundprop.kernels)
        return lambda x, w, b, *rest: conv2d(x, w, b, *rest)
    return lambda x, w, b, *rest: op(x, w, b, *rest)


for _op in (aten.conv1d.default, aten.conv2d.default, aten.conv_transpose1d.default,
            aten.conv_transpose2d.input, aten.convolution.default):
    interval_rule(_op)(_conv_interval(_conv_fn(_op)))


# --- matrix products with one constant operand -----------------------------------------------


def _product_interval(op):
    def rule(args, kwargs) -> Interval:
        a, b = args[0], args[1]
        if is_perturbed(a) and is_perturbed(b):
            return bilinear_interval(op, a, b)
        if is_perturbed(a):
            c, r = op(a.center, b), op(a.radius, b.abs())
        else:
            c, r = op(a, b.center), op(a.abs(), b.radius)
        return Interval(c - r, c + r)

    rule.__doc__ = f"IBP of {op}: centre/radius with the constant operand in absolute value."
    return rule


def _one_operand_perturbed(args) -> bool:
    return not (is_perturbed(args[0]) and is_perturbed(args[1]))


for _op in (aten.mm.default, aten.bmm.default, aten.matmul.default):
    interval_rule(_op)(_product_interval(_op))


@interval_rule(aten.addmm.default)
def addmm_interval(args, kwargs) -> Interval:
    """``y = bias + a @ b``."""
    bias, a, b = args[:3]
    out = _product_interval(aten.mm.default)((a, b), {})
    if isinstance(bias, Interval):
        return Interval(out.lower + bias.lower, out.upper + bias.upper)
    return Interval(out.lower + bias, out.upper + bias)


affine_ops(aten.linear.default, aten.conv1d.default, aten.conv2d.default, aten.conv_transpose1d.default,
           aten.conv_transpose2d.input, aten.convolution.default, when=_weight_only_x)
affine_ops(aten.mm.default, aten.bmm.default, aten.matmul.default, homogeneous=True, when=_one_operand_perturbed)
affine_ops(aten.addmm.default, when=lambda args: not (is_perturbed(args[1]) and is_perturbed(args[2])))


# --- batch norm (eval) ----------------------------------------------------------------------


@interval_rule(ops.batch_norm_eval)
def batch_norm_interval(args, kwargs) -> Interval:
    """Per-channel affine ``y = s x + t``: ``y_c = s x_c + t``, ``y_r = |s| x_r``."""
    x, weight, bias, mean, var, _momentum, eps = args
    if any(is_perturbed(a) for a in (weight, bias, mean, var)):  # weight perturbation
        from .perturbed_weights import batch_norm_perturbed_interval  # noqa: PLC0415

        return batch_norm_perturbed_interval(args)
    scale, shift = ops.batch_norm_scale_shift(weight, bias, mean, var, eps)
    shape = [1, -1] + [1] * (x.lower.dim() - 2)
    c = x.center * scale.reshape(shape) + shift.reshape(shape)
    r = x.radius * scale.abs().reshape(shape)
    return Interval(c - r, c + r)


affine_ops(ops.batch_norm_eval, when=_weight_only_x)


# --- fast backward paths (A: (batch, spec, *out)) -------------------------------------------


def _fold(A: torch.Tensor) -> torch.Tensor:
    return A.reshape(A.shape[0] * A.shape[1], *A.shape[2:])


def _unfold(t: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    return t.reshape(A.shape[0], A.shape[1], *t.shape[1:])


@affine_backward_rule(aten.linear.default)
def linear_backward(A, args, kwargs):
    """``A . (x W^T + b) = (A W) . x + A . b`` (``A`` may have a batch dimension of 1)."""
    weight = args[1]
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    bias_term = 0.0
    if bias is not None:
        per_row = A @ bias  # (batch, spec, *leading dims of x)
        bias_term = per_row.reshape(per_row.shape[0], per_row.shape[1], -1).sum(-1)
    return [A @ weight], bias_term


def _conv_backward(dims: int):
    transpose = {1: torch.nn.functional.conv_transpose1d, 2: torch.nn.functional.conv_transpose2d}[dims]

    def rule(A, args, kwargs):
        x, weight, bias = args[0], args[1], args[2] if len(args) > 2 else None
        stride, padding, dilation, groups = (list(args[3:]) + [1, 0, 1, 1][len(args[3:]):])[:4]
        if isinstance(padding, str):
            return None
        stride, padding, dilation = (_tuple(v, dims) for v in (stride, padding, dilation))
        in_size = x.shape[2:]
        out_size = A.shape[3:]
        k = weight.shape[2:]
        output_padding = tuple(in_size[i] - ((out_size[i] - 1) * stride[i] - 2 * padding[i]
                                             + dilation[i] * (k[i] - 1) + 1) for i in range(dims))
        if dims == 2:
            folded = conv_transpose2d(_fold(A), weight, stride, padding, output_padding, groups, dilation)
        else:
            folded = transpose(_fold(A), weight, None, stride, padding, output_padding, groups, dilation)
        bias_term = 0.0
        if bias is not None:
            bias_term = A.sum(tuple(range(3, A.dim()))) @ bias
        return [_unfold(folded, A)], bias_term

    rule.__doc__ = (f"conv{dims}d: ``A . conv(x) = conv_transpose(A) . x + A . b``; the spec dimension is "
                    "folded into the batch, so one transposed convolution serves all rows. 2-D: computed in "
                    "(and left in) channels-last layout, where oneDNN's transposed convolution is several "
                    "times faster on CPU.")
    return rule


def _tuple(v, dims):
    return tuple(v) if isinstance(v, (list, tuple)) else (v,) * dims


affine_backward_rule(aten.conv1d.default)(_conv_backward(1))
affine_backward_rule(aten.conv2d.default)(_conv_backward(2))


@affine_backward_rule(ops.batch_norm_eval)
def batch_norm_backward(A, args, kwargs):
    """``A . (s x + t) = (A s) . x + A . t`` per channel."""
    x, weight, bias, mean, var, _momentum, eps = args
    scale, shift = ops.batch_norm_scale_shift(weight, bias, mean, var, eps)
    shape = [1, 1, -1] + [1] * (A.dim() - 3)
    per_channel = A.sum(tuple(range(3, A.dim()))) if A.dim() > 3 else A  # sum(()) would sum everything
    return [A * scale.reshape(shape)], per_channel @ shift

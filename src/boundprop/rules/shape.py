"""Structural ops: views, permutations, slicing, concatenation, padding, reductions by sum/mean.

Every op here is linear with non-negative coefficients in each perturbed argument (it moves,
copies, sums or averages entries). Hence, for ``y = f(x_1, ..., x_k)``::

    f(l_1, ..., l_k)  <=  y  <=  f(u_1, ..., u_k)          (IBP, exact for a single argument)

and backward/forward propagation is the generic vector-Jacobian product (:mod:`.generic`).
Shapes are whatever the ATen op takes; the batch dimension passes through.
"""

from __future__ import annotations

import sys

import torch

from ..domains import Interval
from .registry import Var, affine_backward_rule, affine_ops, interval_rule

aten = torch.ops.aten


def _ends(obj, side: str):
    if isinstance(obj, Interval):
        return obj.lower if side == "lower" else obj.upper
    if isinstance(obj, list):
        return [_ends(item, side) for item in obj]
    if isinstance(obj, tuple):
        return tuple(_ends(item, side) for item in obj)
    return obj


def monotone_interval(target):
    """IBP of an op that is non-decreasing in each perturbed argument: apply it to both ends."""

    def rule(args: tuple, kwargs: dict) -> Interval:
        lower = target(*_ends(args, "lower"), **_ends(kwargs, "lower"))
        upper = target(*_ends(args, "upper"), **_ends(kwargs, "upper"))
        return Interval(lower, upper)

    rule.__doc__ = f"IBP of {target}: the op applied to the lower and to the upper ends."
    return rule


#: Pure data movement (no arithmetic): linear, homogeneous, non-negative.
MOVEMENT_OPS = (
    aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.permute.default,
    aten.transpose.int, aten.t.default, aten.expand.default, aten.slice.Tensor, aten.select.int,
    aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.unsqueeze.default,
    aten.cat.default, aten.stack.default, aten.clone.default, aten.alias.default,
    aten.flatten.using_ints, aten.unflatten.int, aten.repeat.default, aten.index_select.default,
    aten.gather.default, aten.index.Tensor, aten.constant_pad_nd.default, aten._to_copy.default,
    aten.contiguous.default, aten.detach.default, aten.lift_fresh_copy.default,
    aten.unfold.default, aten.diagonal.default, aten.tile.default, aten.roll.default, aten.flip.default,
    # nearest-neighbour upsampling copies entries
    aten.upsample_nearest1d.vec, aten.upsample_nearest1d.default, aten.upsample_nearest2d.vec,
    aten.upsample_nearest2d.default, aten.upsample_nearest3d.vec, aten.upsample_nearest3d.default,
    aten._upsample_nearest_exact1d.vec, aten._upsample_nearest_exact1d.default,
    aten._upsample_nearest_exact2d.vec, aten._upsample_nearest_exact2d.default,
    aten._upsample_nearest_exact3d.vec, aten._upsample_nearest_exact3d.default,
)

#: Non-negative linear combinations of entries.
SUMMING_OPS = (
    aten.sum.dim_IntList, aten.sum.default, aten.mean.dim, aten.mean.default,
    aten.avg_pool1d.default, aten.avg_pool2d.default, aten.adaptive_avg_pool2d.default,
    aten._adaptive_avg_pool2d.default, aten.cumsum.default,
    # (bi/tri)linear upsampling: convex combinations of neighbouring entries (bicubic's weights can be negative)
    aten.upsample_linear1d.vec, aten.upsample_linear1d.default, aten.upsample_bilinear2d.vec,
    aten.upsample_bilinear2d.default, aten.upsample_trilinear3d.vec, aten.upsample_trilinear3d.default,
)

for _op in MOVEMENT_OPS + SUMMING_OPS:
    interval_rule(_op)(monotone_interval(_op))
#: Ops with a constant term: the pad value; the constant tensors that ``cat``/``stack`` join to perturbed ones.
_WITH_CONSTANT = (aten.constant_pad_nd.default, aten.cat.default, aten.stack.default)
affine_ops(*(op for op in MOVEMENT_OPS + SUMMING_OPS if op not in _WITH_CONSTANT), homogeneous=True)
affine_ops(*_WITH_CONSTANT)


# --- fast backward paths: coefficients A (batch, spec, *out) -> (batch, spec, *in) ---------------


def _in_shape(var) -> tuple[int, ...]:
    return tuple(var.shape[1:])


def _reshape_back(A, args, kwargs):
    """Views and reshapes only re-index entries: reshape the coefficients back."""
    return [A.reshape(A.shape[0], A.shape[1], *_in_shape(args[0]))], 0.0


def _permute_back(A, args, kwargs):
    """``y = permute(x, p)`` with the batch kept first: ``A_x = permute(A, inverse(p))``."""
    perm = list(args[1])
    rank = len(perm)
    perm = [p % rank for p in perm]
    if perm[0] != 0:
        return None
    inverse = [0] * rank
    for i, p in enumerate(perm):
        inverse[p] = i
    return [A.permute(0, 1, *[i + 1 for i in inverse[1:]])], 0.0


def _transpose_back(A, args, kwargs):
    x, d0, d1 = args[0], args[1], args[2]
    rank = len(x.shape)
    d0, d1 = d0 % rank, d1 % rank
    if 0 in (d0, d1):
        return None
    return [A.transpose(d0 + 1, d1 + 1)], 0.0


def _slice_back(A, args, kwargs):
    """``y = x[..., start:end:step, ...]`` along a non-batch dimension: ``A_x`` is ``A`` written into
    those positions of zeros (``aten.slice_backward``; the generic vector-Jacobian product under
    ``vmap`` costs about 30 times as much on the small slices of an unrolled LSTM's gates). All of
    the batch (``x[:, i]`` captures as such a slice, then a select): ``A`` itself."""
    if kwargs:
        return None
    x, dim, start, end, step = (list(args) + [0, None, None, 1][len(args) - 1:])[:5]
    dim = dim % len(x.shape)
    start = 0 if start is None else start
    end = sys.maxsize if end is None else end
    if dim == 0 and start == 0 and end >= x.shape[0] and step == 1:  # all of the batch (``x[:, i]``)
        return [A], 0.0
    if dim == 0 or not torch.is_tensor(A):
        return None
    sizes = [A.shape[0], A.shape[1], *_in_shape(x)]
    return [aten.slice_backward(A, sizes, dim + 1, start, end, step)], 0.0


def _select_back(A, args, kwargs):
    """``y = x.select(dim, i)`` along a non-batch dimension: ``A_x`` is zeros with ``A`` at index ``i``."""
    if kwargs:
        return None
    x, dim, index = args[0], args[1], args[2]
    dim = dim % len(x.shape)
    if dim == 0 or not torch.is_tensor(A):
        return None
    return [aten.select_backward(A, [A.shape[0], A.shape[1], *_in_shape(x)], dim + 1, index)], 0.0


def _cat_back(A, args, kwargs):
    """``y = cat([x_1, ..., x_k], dim)`` along a non-batch dimension: ``A_{x_i}`` is the part of ``A``
    over ``x_i``'s positions (a view), one per perturbed part in order; constant parts ``c`` add
    ``A . c`` to the bias. (A DenseNet's joins: the generic product under ``vmap`` otherwise.)"""
    if kwargs or not torch.is_tensor(A):
        return None
    parts, dim = args[0], (args[1] if len(args) > 1 else 0)
    dim = dim % (A.dim() - 1)
    if dim == 0:
        return None
    coefficients, bias, offset = [], 0.0, 0
    for part in parts:
        if not isinstance(part, (Var, torch.Tensor)):
            return None
        if not isinstance(part, Var) and part.dim() == 1 and part.numel() == 0:
            continue  # cat skips legacy empty tensors
        size = part.shape[dim]
        piece = A.narrow(dim + 1, offset, size)
        offset += size
        if isinstance(part, Var):
            coefficients.append(piece)
        else:
            term = (piece * part.unsqueeze(1)).flatten(2).sum(-1)
            bias = term if not torch.is_tensor(bias) else bias + term
    return coefficients, bias


def sum_to_shape(A: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Sum coefficients ``(batch, spec, *out)`` over the dimensions an operand of ``shape`` (no batch)
    was broadcast along, giving ``(batch, spec, *shape)``."""
    out = A.shape[2:]
    lead = len(out) - len(shape)
    if lead > 0:
        A = A.sum(dim=tuple(range(2, 2 + lead)))
    dims = tuple(i + 2 for i, (s, o) in enumerate(zip(shape, A.shape[2:])) if s == 1 and o != 1)
    if dims:
        A = A.sum(dim=dims, keepdim=True)
    return A


def _expand_back(A, args, kwargs):
    return [sum_to_shape(A, _in_shape(args[0]))], 0.0


for _op in (aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.flatten.using_ints,
            aten.unflatten.int, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.unsqueeze.default,
            aten.clone.default, aten.alias.default, aten.contiguous.default, aten.detach.default,
            aten.lift_fresh_copy.default, aten._to_copy.default):
    affine_backward_rule(_op)(_reshape_back)
affine_backward_rule(aten.permute.default)(_permute_back)
affine_backward_rule(aten.transpose.int)(_transpose_back)
affine_backward_rule(aten.expand.default)(_expand_back)
affine_backward_rule(aten.slice.Tensor)(_slice_back)
affine_backward_rule(aten.select.int)(_select_back)
affine_backward_rule(aten.cat.default)(_cat_back)

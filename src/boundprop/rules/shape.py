"""Structural ops: views, permutations, slicing, concatenation, padding, reductions by sum/mean.

Every op here is linear with non-negative coefficients in each perturbed argument (it moves,
copies, sums or averages entries). Hence, for ``y = f(x_1, ..., x_k)``::

    f(l_1, ..., l_k)  <=  y  <=  f(u_1, ..., u_k)          (IBP, exact for a single argument)

and backward/forward propagation is the generic vector-Jacobian product (:mod:`.generic`).
Shapes are whatever the ATen op takes; the batch dimension passes through.
"""

from __future__ import annotations

import torch

from ..domains import Interval
from .registry import affine_ops, interval_rule

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
)

#: Non-negative linear combinations of entries.
SUMMING_OPS = (
    aten.sum.dim_IntList, aten.sum.default, aten.mean.dim, aten.mean.default,
    aten.avg_pool1d.default, aten.avg_pool2d.default, aten.adaptive_avg_pool2d.default,
    aten._adaptive_avg_pool2d.default, aten.cumsum.default,
)

for _op in MOVEMENT_OPS + SUMMING_OPS:
    interval_rule(_op)(monotone_interval(_op))
affine_ops(*(op for op in MOVEMENT_OPS + SUMMING_OPS if op != aten.constant_pad_nd.default), homogeneous=True)
affine_ops(aten.constant_pad_nd.default)  # the pad value is a constant term

"""Interval bound propagation: one walk forward, applying each op's interval rule.

Cost: about two forward passes (centre and radius) for affine layers.

An affine layer fed directly by an input perturbed in an L2/L1 (any non-box) ball is bounded
exactly by its dual norm, ``x0 W^T + b -/+ eps ||W_row||_q``, through a one-layer backward walk:
going through the ball's bounding box first would be looser by up to a factor ``sqrt(n)``.
"""

from __future__ import annotations

import math

import torch

from ..domains import Interval
from ..syncs import may_read, sums_finite
from .state import PropagationState


def leaf_intervals(state: PropagationState) -> None:
    for name, ptb in state.perturbations.items():
        if name not in state.intervals:
            state.intervals[name] = ptb.interval(state.values[name])
        state.refined.add(name)


def interval_of(state: PropagationState, name: str) -> Interval:
    """Recompute one node's interval from its inputs' current intervals (its IBP rule)."""
    node = state.graph.node(name)
    rule = state.rules(node).interval
    if rule is None:
        raise NotImplementedError(f"no interval rule for {node.op_name} <- {node.source or node.name}")
    args, kwargs = state.resolve_for_interval(node)
    out = rule(args, kwargs)
    return out if node.target in _NAN_FREE else _guard_nan(out)


#: ops whose interval rule maps NaN-free intervals to NaN-free ones (monotone maps of both ends,
#: re-indexing): their outputs skip the guard below (two passes over the node per call)
_NAN_FREE = {torch.ops.aten.relu.default, torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default,
             torch.ops.aten.reshape.default, torch.ops.aten.flatten.using_ints}


def _guard_nan(out: Interval) -> Interval:
    """A NaN end (e.g. inf - inf) is replaced by the infinite end it stands for: never unsound.

    On CPU one sum per end comes first: when both are finite, no end is NaN or infinite and the
    interval is returned as it is (two read passes instead of two read-write passes and two new
    tensors). Not on other devices, where reading the sum would wait for the device
    (:func:`~boundprop.syncs.may_read`).
    """
    if may_read(out.lower) and sums_finite(out.lower, out.upper):
        return out
    lower = torch.nan_to_num(out.lower, nan=-torch.inf, posinf=torch.inf, neginf=-torch.inf)
    upper = torch.nan_to_num(out.upper, nan=torch.inf, posinf=torch.inf, neginf=-torch.inf)
    return Interval(lower, upper)


def ibp(state: PropagationState, until: str | None = None, overwrite: bool = False) -> None:
    """Interval bounds of every perturbed node (up to ``until``), in topological order.

    Intervals already in the state (e.g. given by the user, or refined by CROWN) are kept and
    intersected with the new ones, unless ``overwrite``.
    """
    leaf_intervals(state)
    needed = state.ancestors(until) if until is not None else None
    for node in state.graph.nodes:
        if node.name not in state.perturbed or (needed is not None and node.name not in needed):
            continue
        fresh = interval_of(state, node.name)
        old = state.intervals.get(node.name)
        state.intervals[node.name] = fresh if old is None or overwrite else fresh.intersect(old)
        if _fed_by_ball(state, node):
            from .crown import crown_interval  # noqa: PLC0415 - crown builds on this module

            state.intervals[node.name] = crown_interval(state, node.name)


def _fed_by_ball(state: PropagationState, node) -> bool:
    """An affine node whose perturbed inputs are all leaves perturbed in a non-box set."""
    perturbed = [p for p in node.inputs if p in state.perturbed]
    if not perturbed:
        return False
    for p in perturbed:
        ptb = state.perturbations.get(p)
        if ptb is None or getattr(ptb, "norm", math.inf) == math.inf or ptb._box_only():
            return False
    return state.is_affine_here(node)

"""CROWN with automatic intermediate bounds.

Before the final backward walk, every node whose relaxation needs its input's interval gets that
interval as tight as CROWN can make it, in topological order (so each walk sees final bounds of
everything before it):

* IBP runs first (cheap) and decides which neurons are already stable: only the neurons a
  consumer reports as unstable (``unstable(l, u)``, e.g. ``l < 0 < u`` for ReLU) get a backward
  walk, with a one-hot specification per unstable neuron, in chunks of bounded memory;
* nodes that are element-wise functions or pure data movement of already refined nodes take
  their interval from their IBP rule instead (as tight, and free);
* the new bounds are intersected with the IBP ones (never looser).

Cost: one backward walk per layer that feeds a nonlinearity, with as many spec rows as it has
unstable neurons: O(L^2) walks' worth of layer products for an L-layer network in the worst case.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..domains import Interval
from ..rules.shape import MOVEMENT_OPS
from .backward import AlphaLookup, backward
from .ibp import interval_of
from .state import PropagationState

#: ``alpha_for_start(start_name) -> AlphaLookup | None`` (alpha-CROWN's parameters per walk).
AlphaForStart = Callable[[str], AlphaLookup | None]

_MOVEMENT = set(MOVEMENT_OPS)


def _cheap(state: PropagationState, name: str) -> bool:
    node = state.graph.node(name)
    entry = state.rules(node)
    return entry.relaxation is not None or node.target in _MOVEMENT


def unstable_mask(state: PropagationState, name: str) -> torch.Tensor:
    """Neurons of ``name`` whose interval matters to some consumer that relaxes it."""
    bounds = state.intervals[name]
    mask = torch.zeros_like(bounds.lower, dtype=torch.bool)
    contributed = False
    for user in state.graph.users(name):
        node = state.graph.node(user)
        if user not in state.perturbed or not state.needs_input_bounds(node):
            continue
        entry = state.rules(node)
        if entry.unstable is None or node.inputs[0] != name:
            return torch.ones_like(mask)
        mask |= entry.unstable(bounds.lower, bounds.upper)
        contributed = True
    # refined only for a cheap successor's sake (e.g. a view feeding a ReLU): bound every neuron
    return mask if contributed else torch.ones_like(mask)


def spec_chunk_size(state: PropagationState, start: str) -> int:
    """How many one-hot specs to walk back at once so that one coefficient tensor stays small."""
    budget = int(state.opts.get("max_coefficient_elements", 2**25))
    widest = 1
    for name in state.graph.ancestors(start):
        value = state.values.get(name)
        if name in state.perturbed and torch.is_tensor(value):
            widest = max(widest, value[0].numel() if name in state.batched else value.numel())
    return max(1, budget // (state.batch_size * widest))


def _spec_rows(alpha_for: AlphaLookup, begin: int, count: int) -> AlphaLookup:
    """The rows ``begin:begin+count`` of spec-dependent alphas (for one chunk of specs)."""
    def lookup(node: str, direction: str) -> torch.Tensor | None:
        alpha = alpha_for(node, direction)
        return alpha if alpha is None or alpha.shape[1] == 1 else alpha[:, begin:begin + count]

    return lookup


def crown_interval(state: PropagationState, name: str, mask: torch.Tensor | None = None,
                   alpha_for: AlphaLookup | None = None) -> Interval:
    """CROWN bounds of the neurons of ``name`` selected by ``mask`` (others keep their interval)."""
    old = state.intervals[name]
    batch = state.batch_size
    flat_l, flat_u = old.lower.reshape(batch, -1), old.upper.reshape(batch, -1)
    n = flat_l.shape[1]
    if mask is None:
        index = torch.arange(n, device=flat_l.device)
    else:
        index = mask.reshape(batch, -1).any(0).nonzero().flatten()
    if index.numel() == 0:
        return old
    new_l, new_u = flat_l.clone(), flat_u.clone()
    chunk = spec_chunk_size(state, name)
    shape = old.lower.shape[1:]
    for start in range(0, index.numel(), chunk):
        part = index[start:start + chunk]
        C = torch.zeros(1, part.numel(), n, dtype=flat_l.dtype, device=flat_l.device)
        C[0, torch.arange(part.numel(), device=part.device), part] = 1.0
        lookup = alpha_for
        if alpha_for is not None and chunk < index.numel():
            lookup = _spec_rows(alpha_for, start, part.numel())
        res = backward(state, name, C.reshape(1, part.numel(), *shape), alpha_for=lookup)
        lo, hi = torch.maximum(flat_l[:, part], res.lower), torch.minimum(flat_u[:, part], res.upper)
        if alpha_for is not None:
            # alpha-CROWN: the gradient reaches the new bounds even where the old ones are tighter
            # (as auto_LiRPA's reference bounds), so that optimisation can start from a tie
            lo = res.lower + (lo - res.lower).detach()
            hi = res.upper + (hi - res.upper).detach()
        new_l[:, part], new_u[:, part] = lo, hi
    return Interval(new_l.reshape(old.lower.shape), new_u.reshape(old.upper.shape))


def refine(state: PropagationState, name: str, alpha_for_start: AlphaForStart | None = None) -> None:
    """Make the interval of ``name`` final for this call."""
    stack = [name]
    while stack:
        current = stack[-1]
        if current in state.refined or current not in state.perturbed:
            stack.pop()
            continue
        if _cheap(state, current):
            pending = [p for p in state.graph.node(current).inputs
                       if p in state.perturbed and p not in state.refined]
            if pending:
                stack.extend(pending)
                continue
            state.intervals[current] = interval_of(state, current).intersect(state.intervals[current])
        else:
            alpha_for = alpha_for_start(current) if alpha_for_start else None
            state.intervals[current] = crown_interval(state, current, unstable_mask(state, current), alpha_for)
        state.refined.add(current)
        stack.pop()


def refine_intermediate(state: PropagationState, target: str, alpha_for_start: AlphaForStart | None = None) -> None:
    """Refine, in topological order, every interval the final walk from ``target`` will read."""
    needed = state.graph.ancestors(target)
    for node in state.graph.nodes:
        if node.name not in needed or node.name not in state.perturbed:
            continue
        if state.needs_input_bounds(node):
            for parent in node.inputs:
                if parent in state.perturbed:
                    refine(state, parent, alpha_for_start)

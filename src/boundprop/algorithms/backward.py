"""Backward linear bound propagation (CROWN) from one node to the perturbed leaves.

Given a start node ``y`` and a specification ``C`` (shape ``(batch, spec, *y.shape[1:])``), the
walk carries two sets of linear coefficients, ``lA`` for the lower bound of ``C y`` and ``uA`` for
its upper bound, from ``y`` back through the graph in reverse topological order::

    C y  >=  sum_leaves lA_leaf . leaf + lbias        C y  <=  sum_leaves uA_leaf . leaf + ubias

Affine ops pass coefficients on through their vector-Jacobian product; element-wise
nonlinearities through their relaxation (the lower relaxation where a coefficient is positive and
the upper one where it is negative, for ``lA``; the other way round for ``uA``); other ops through
their own backward rule. At the leaves the perturbation concretises the linear functions.

Every node's coefficients are complete when it is visited, because all its users come later in
the graph and are visited first.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..domains import Relaxation
from ..graph.ir import Node
from ..rules import RelaxCall, Var
from ..rules.generic import AffinePullback, collect_vars
from .state import PropagationState

#: ``alpha_for(node_name, direction) -> Tensor | None``: free relaxation parameters for a node.
AlphaLookup = Callable[[str, str], torch.Tensor | None]


@dataclass
class BackwardCall:
    """What a hand-written backward rule receives.

    ``lA``/``uA``: coefficients of the node's output, ``(batch, spec, *out)``, or None for a side
    that is not needed. ``args``/``kwargs``: the node's arguments, perturbed ones as ``Var``.
    ``alpha_for(direction)``: the node's alpha-CROWN parameters, or None.
    """

    node: Node
    args: tuple
    kwargs: dict
    lA: torch.Tensor | None
    uA: torch.Tensor | None
    opts: dict
    alpha_for: Callable[[str], torch.Tensor | None] = lambda direction: None


@dataclass
class BackwardOut:
    """A backward rule's answer: coefficients per perturbed argument name, and bias terms."""

    A: list[tuple[str, torch.Tensor | None, torch.Tensor | None]]
    lbias: Any = 0.0
    ubias: Any = 0.0


@dataclass
class BackwardResult:
    lower: torch.Tensor | None
    upper: torch.Tensor | None
    A: dict[str, tuple[torch.Tensor | None, torch.Tensor | None, Any, Any]] = field(default_factory=dict)


def _expand_relax(t: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    return t.unsqueeze(1) if t.dim() == A.dim() - 1 else t


def apply_relaxation(relax_l: Relaxation | None, relax_u: Relaxation | None, lA, uA) -> BackwardOut:
    """Pass coefficients through ``lw x + lb <= f(x) <= uw x + ub``; returns (lA_x, uA_x) and biases."""
    new_l = new_u = None
    lbias = ubias = 0.0
    if lA is not None:
        r = relax_l
        pos, neg = lA.clamp(min=0), lA.clamp(max=0)
        lw, uw = _expand_relax(r.lw, lA), _expand_relax(r.uw, lA)
        lb, ub = _expand_relax(r.lb, lA), _expand_relax(r.ub, lA)
        new_l = pos * lw + neg * uw
        lbias = (pos * lb + neg * ub).flatten(2).sum(-1)
    if uA is not None:
        r = relax_u
        pos, neg = uA.clamp(min=0), uA.clamp(max=0)
        lw, uw = _expand_relax(r.lw, uA), _expand_relax(r.uw, uA)
        lb, ub = _expand_relax(r.lb, uA), _expand_relax(r.ub, uA)
        new_u = pos * uw + neg * lw
        ubias = (pos * ub + neg * lb).flatten(2).sum(-1)
    return new_l, new_u, lbias, ubias


def relaxation_of(state: PropagationState, node: Node, direction: str, alpha: torch.Tensor | None) -> Relaxation:
    """The relaxation of an element-wise node on its input's interval (cached when alpha is None)."""
    key = ("relax", node.name)
    if alpha is None and key in state.cache:
        return state.cache[key]
    entry = state.rules(node)
    x_name = node.inputs[0]
    bounds = state.intervals[x_name]
    args, kwargs = state.resolve_for_linear(node)
    if any(isinstance(a, Var) for a in args[1:]):
        raise NotImplementedError(f"{node.op_name}: only the first argument may be perturbed")
    call = RelaxCall(tuple(args[1:]), kwargs, state.opts, alpha, direction)
    lower, upper = bounds.lower, bounds.upper
    if alpha is not None and alpha.dim() == lower.dim() + 1:
        # spec-dependent alpha (batch, spec, *shape): the interval as (batch, 1, *shape) so that the
        # rule's elementwise formulas broadcast to (batch, spec, *shape)
        lower, upper = lower.unsqueeze(1), upper.unsqueeze(1)
    relax = entry.relaxation(lower, upper, call)
    if alpha is None:
        state.cache[key] = relax
    return relax


def _pullback(state: PropagationState, node: Node) -> AffinePullback:
    key = ("pullback", node.name)
    if key not in state.cache:
        args, kwargs = state.resolve_for_linear(node)
        for var in collect_vars((args, kwargs)):
            if var.name not in state.batched:
                raise NotImplementedError(
                    f"{node.op_name} <- {node.source or node.name}: a perturbed argument without a batch "
                    f"dimension ({state.graph.qualname(var.name)}) needs a dedicated rule")
        state.cache[key] = AffinePullback(node.target, args, kwargs, state.rules(node).homogeneous)
    return state.cache[key]


def _fast_affine(state: PropagationState, node: Node, rule, lA, uA) -> BackwardOut | None:
    args, kwargs = state.resolve_for_linear(node)
    names = [v.name for v in collect_vars((args, kwargs))]
    if any(name not in state.batched for name in names):
        return None
    low = rule(lA, args, kwargs) if lA is not None else ([None] * len(names), 0.0)
    up = rule(uA, args, kwargs) if uA is not None else ([None] * len(names), 0.0)
    if low is None or up is None:
        return None
    return BackwardOut(list(zip(names, low[0], up[0])), low[1], up[1])


def propagate_node(state: PropagationState, node: Node, lA, uA, alpha_for: AlphaLookup | None) -> BackwardOut:
    """Coefficients of a node's output -> coefficients of its perturbed inputs."""
    entry = state.rules(node)
    if state.is_affine_here(node):
        if entry.affine_backward is not None:
            out = _fast_affine(state, node, entry.affine_backward, lA, uA)
            if out is not None:
                return out
        pb = _pullback(state, node)
        names = [v.name for v in pb.vars]
        lAs = pb.backward(lA) if lA is not None else [None] * len(names)
        uAs = pb.backward(uA) if uA is not None else [None] * len(names)
        lbias = pb.bias(lA) if lA is not None else 0.0
        ubias = pb.bias(uA) if uA is not None else 0.0
        return BackwardOut(list(zip(names, lAs, uAs)), lbias, ubias)
    if entry.relaxation is not None:
        alpha_l = alpha_for(node.name, "lower") if (alpha_for and lA is not None) else None
        alpha_u = alpha_for(node.name, "upper") if (alpha_for and uA is not None) else None
        relax_l = relaxation_of(state, node, "lower", alpha_l) if lA is not None else None
        relax_u = relaxation_of(state, node, "upper", alpha_u) if uA is not None else None
        new_l, new_u, lbias, ubias = apply_relaxation(relax_l, relax_u, lA, uA)
        return BackwardOut([(node.inputs[0], new_l, new_u)], lbias, ubias)
    if entry.backward is not None:
        args, kwargs = state.resolve_for_linear(node)
        lookup = (lambda d: alpha_for(node.name, d)) if alpha_for else (lambda d: None)
        return entry.backward(BackwardCall(node, args, kwargs, lA, uA, state.opts, lookup))
    raise NotImplementedError(f"no linear bound rule for {node.op_name} <- {node.source or node.name}")


def _add(a, b):
    if a is None:
        return b
    if b is None:
        return a
    return a + b


def backward(state: PropagationState, start: str, C: torch.Tensor, lower: bool = True, upper: bool = True,
             alpha_for: AlphaLookup | None = None, keep_A: set[str] | None = None) -> BackwardResult:
    """Bounds of ``C y`` (``y`` = node ``start``) by one backward walk.

    Arguments:
        C: ``(batch, spec, *y.shape[1:])`` (a batch dimension of 1 broadcasts).
        alpha_for: alpha-CROWN parameters per (node, direction), or None for CROWN's defaults.
        keep_A: names of perturbed leaves/nodes whose coefficients are returned in ``A``
            (as ``(lA, uA, lbias, ubias)`` with the bias accumulated up to that point).

    Returns lower/upper of shape ``(batch, spec)`` (None for a side not asked for).
    """
    graph = state.graph
    needed = graph.ancestors(start)
    batch = state.batch_size
    if C.shape[0] != batch:
        C = C.expand(batch, *C.shape[1:])
    coeffs: dict[str, list] = {start: [C if lower else None, C if upper else None]}
    lbias: Any = 0.0
    ubias: Any = 0.0
    A_out: dict[str, tuple] = {}
    leaves_seen: dict[str, list] = {}
    for node in reversed(graph.nodes):
        if node.name not in needed or node.name not in coeffs:
            continue
        lA, uA = coeffs.pop(node.name)
        if keep_A and node.name in keep_A:
            A_out[node.name] = (lA, uA, lbias, ubias)
        out = propagate_node(state, node, lA, uA, alpha_for)
        lbias = lbias + out.lbias
        ubias = ubias + out.ubias
        for name, new_l, new_u in out.A:
            if name not in state.perturbed:
                continue
            slot = coeffs.setdefault(name, [None, None])
            slot[0] = _add(slot[0], new_l)
            slot[1] = _add(slot[1], new_u)
    for name, (lA, uA) in coeffs.items():
        if name not in state.perturbations:
            raise RuntimeError(f"backward walk left coefficients at non-leaf {name}")
        leaves_seen[name] = [lA, uA]
    low = lbias if lower else None
    up = ubias if upper else None
    for name, (lA, uA) in leaves_seen.items():
        ptb, x = state.perturbations[name], state.values[name]
        if keep_A and name in keep_A:
            A_out[name] = (lA, uA, lbias, ubias)
        if lower and lA is not None:
            low = low + ptb.concretize(x, lA, -1)
        if upper and uA is not None:
            up = up + ptb.concretize(x, uA, +1)
    shape = (batch, C.shape[1])
    if lower and not torch.is_tensor(low):
        low = torch.full(shape, float(low), dtype=C.dtype, device=C.device)
    if upper and not torch.is_tensor(up):
        up = torch.full(shape, float(up), dtype=C.dtype, device=C.device)
    return BackwardResult(low, up, A_out)

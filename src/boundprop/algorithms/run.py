"""One call shape for every method: :func:`compute_bounds`.

Methods (case-insensitive, auto_LiRPA's aliases accepted):

=====================  ==========================  ======================
method                 intermediate bounds         final bound
=====================  ==========================  ======================
IBP                    IBP                         IBP (C folded in)
CROWN-IBP              IBP                         CROWN (backward)
CROWN                  CROWN (IBP-screened)        CROWN
forward                forward mode                forward mode
forward+backward       forward mode                CROWN
alpha-CROWN            alpha-CROWN                 alpha-CROWN
=====================  ==========================  ======================
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..domains import Interval
from ..graph.ir import Graph
from ..perturbation import Perturbation
from ..syncs import deferred_checks, immediate_checks
from .backward import backward
from .crown import refine_intermediate
from .ibp import ibp
from .state import PropagationState, make_state

METHOD_ALIASES = {
    "ibp": "ibp",
    "crown-ibp": "crown-ibp", "ibp+backward": "crown-ibp", "ibp+crown": "crown-ibp",
    "crown": "crown", "backward": "crown",
    "forward": "forward",
    "forward+backward": "forward+backward", "forward+crown": "forward+backward",
    "alpha-crown": "alpha-crown", "crown-optimized": "alpha-crown", "alpha_crown": "alpha-crown",
    "optimized": "alpha-crown", "alpha-crown-optimized": "alpha-crown",
}


def canonical_method(method: str) -> str:
    key = method.strip().lower()
    if key not in METHOD_ALIASES:
        raise ValueError(f"unknown bound method {method!r}; choose one of "
                         f"{sorted(set(METHOD_ALIASES.values()))} (or an auto_LiRPA alias)")
    return METHOD_ALIASES[key]


@dataclass(frozen=True)
class BoundResult:
    """The answer of one :func:`compute_bounds` call (immutable).

    Attributes:
        lower, upper: bounds of ``C y`` with shape ``(batch, spec)``, or of ``y`` itself with
            ``y``'s shape when no ``C`` was given; None for a side not asked for.
        intervals: every interval the call computed, by node name (leaves included).
        A: linear coefficients asked for: ``A[node] = {"lA", "uA", "lbias", "ubias"}`` meaning
            ``lA . node + lbias <= C y <= uA . node + ubias`` (shapes ``(batch, spec, *node)``).
        method: the canonical method name.
    """

    lower: torch.Tensor | None
    upper: torch.Tensor | None
    intervals: Mapping[str, Interval] = field(default_factory=dict)
    A: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    method: str = ""

    def __getitem__(self, name: str) -> Interval:
        return self.intervals[name]


def identity_spec(value: torch.Tensor) -> torch.Tensor:
    """``C = I``, shape ``(1, n, *shape)``, for bounding every entry of a ``(batch, *shape)`` node."""
    shape = value.shape[1:]
    n = int(torch.Size(shape).numel())
    return torch.eye(n, dtype=value.dtype, device=value.device).reshape(1, n, *shape)


def _ibp_with_spec(state: PropagationState, target: str, C: torch.Tensor) -> Interval:
    """IBP of ``C y``; a final linear layer with constant weights is merged with ``C`` first."""
    graph = state.graph
    node = graph.node(target) if graph.has_node(target) else None
    flat_C = C.reshape(C.shape[0], C.shape[1], -1)
    if node is not None and node.target == torch.ops.aten.linear.default and state.is_affine_here(node):
        x_name = node.args[0].name
        weight = state.values[node.args[1].name] if hasattr(node.args[1], "name") else node.args[1]
        bias_ref = node.args[2] if len(node.args) > 2 else None
        bias = state.values[bias_ref.name] if bias_ref is not None else None
        x = state.intervals[x_name]
        if x.lower.dim() == 2:
            merged = flat_C @ weight  # (batch, spec, in)
            center = (merged @ x.center.unsqueeze(-1)).squeeze(-1)
            radius = (merged.abs() @ x.radius.unsqueeze(-1)).squeeze(-1)
            if bias is not None:
                center = center + (flat_C @ bias.unsqueeze(-1)).squeeze(-1)
            return Interval(center - radius, center + radius)
    y = state.intervals[target]
    center = (flat_C @ y.center.reshape(y.lower.shape[0], -1, 1)).squeeze(-1)
    radius = (flat_C.abs() @ y.radius.reshape(y.lower.shape[0], -1, 1)).squeeze(-1)
    return Interval(center - radius, center + radius)


def _intersect_with_ibp(state: PropagationState, target: str, C, spec, lower, upper):
    """Final bounds (CROWN, alpha-CROWN, forward mode) never looser than the IBP bounds already
    computed in the same call (on the intermediate intervals the method found). Not when the
    coefficients are returned: the bounds are then the ones those coefficients imply."""
    box = state.intervals[target]
    if C is None:
        box = Interval(box.lower.reshape(lower.shape if lower is not None else upper.shape),
                       box.upper.reshape(lower.shape if lower is not None else upper.shape))
    else:
        box = _ibp_with_spec(state, target, spec)
    lower = torch.maximum(lower, box.lower) if lower is not None else None
    upper = torch.minimum(upper, box.upper) if upper is not None else None
    return lower, upper


def run_method(state: PropagationState, method: str, target: str, C: torch.Tensor | None, lower: bool,
               upper: bool, keep_A: set[str] | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None, dict]:
    """Bounds of ``C y`` (y = ``target``) by ``method`` on a prepared state."""
    if method in ("ibp", "crown", "crown-ibp"):
        ibp(state, until=target)  # first: then y's shape comes from its interval, not from a forward pass
        spec = identity_spec(state.intervals[target].lower) if C is None else C
    else:
        spec = identity_spec(state.values[target]) if C is None else C
    if method == "ibp":
        if C is None:
            out = state.intervals[target]
            return (out.lower if lower else None), (out.upper if upper else None), {}
        out = _ibp_with_spec(state, target, spec)
        return (out.lower if lower else None), (out.upper if upper else None), {}
    lo, hi, A = _linear_bounds(state, method, target, spec, lower, upper, keep_A)
    forward_alone = method.startswith("forward") and not state.opts.get("forward_intersect_ibp", True)
    if keep_A or forward_alone:
        return lo, hi, A  # with coefficients: the bounds they imply
    return (*_intersect_with_ibp(state, target, C, spec, lo, hi), A)


def _linear_bounds(state: PropagationState, method: str, target: str, spec: torch.Tensor, lower: bool, upper: bool,
                   keep_A: set[str] | None) -> tuple[torch.Tensor | None, torch.Tensor | None, dict]:
    """Bounds of ``spec y`` by a method with linear relaxations (CROWN, CROWN-IBP, forward, alpha-CROWN)."""
    if method in ("crown", "crown-ibp"):
        if method == "crown":
            refine_intermediate(state, target)
        res = backward(state, target, spec, lower, upper, keep_A=keep_A)
        return res.lower, res.upper, res.A
    if method in ("forward", "forward+backward"):
        from .forward import forward_bounds

        return forward_bounds(state, target, spec, lower, upper, method, keep_A)
    if method == "alpha-crown":
        from .alpha import alpha_crown

        return alpha_crown(state, target, spec, lower, upper, keep_A)
    raise ValueError(method)


def compute_bounds(graph: Graph, inputs: Sequence[torch.Tensor], perturbations: Mapping[str, Perturbation],
                   method: str = "crown", C: torch.Tensor | None = None, *, lower: bool = True,
                   upper: bool = True, opts: Mapping[str, Any] | None = None, final_node: str | None = None,
                   interm_bounds: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
                   need_A: Sequence[str] | None = None,
                   params: Mapping[str, torch.Tensor] | None = None) -> BoundResult:
    """Sound bounds on ``C y`` where ``y`` is the output (or ``final_node``) of ``graph``.

    Arguments:
        graph: a captured graph (:func:`boundprop.capture`).
        inputs: the nominal values of the graph's inputs (batch first).
        perturbations: leaf name (input or parameter node) -> its perturbation set.
        method: see the module docstring.
        C: specification ``(batch, spec, *y.shape[1:])``; None bounds every entry of ``y``.
        lower, upper: which sides to compute.
        opts: bound options (``activation_bound_option``, ``optimize_bound_args``, ...).
        final_node: bound this node instead of the output.
        interm_bounds: known intervals ``{name: (lower, upper)}``, intersected with computed ones.
        need_A: names of leaves whose linear coefficients to return in ``result.A``.
        params: override values of parameter leaves.
    """
    method = canonical_method(method)
    state = make_state(graph, tuple(inputs), perturbations, params, dict(opts or {}))
    target = final_node or graph.output
    if target not in state.perturbed:
        value = state.values[target]
        out = value if C is None else (C.reshape(C.shape[0], C.shape[1], -1) @ value.reshape(
            value.shape[0], -1, 1)).squeeze(-1)
        return BoundResult(out if lower else None, out if upper else None, {}, {}, method)
    for name, (lo, hi) in (interm_bounds or {}).items():
        state.intervals[name] = Interval(lo, hi)
        state.refined.add(name)
    with deferred_checks() as checks:
        lo, hi, A = run_method(state, method, target, C, lower, upper, set(need_A or ()))
    if checks.failed():  # something could not be bounded: again, reading each check, for the error
        with immediate_checks():
            compute_bounds(graph, inputs, perturbations, method, C, lower=lower, upper=upper, opts=opts,
                           final_node=final_node, interm_bounds=interm_bounds, need_A=need_A, params=params)
        raise RuntimeError("a deferred check failed, then passed when read at once (nondeterministic bounds?)")
    if C is None:
        shape = state.intervals[target].shape if target in state.intervals else state.values[target].shape
        lo = lo.reshape(shape) if lo is not None else None
        hi = hi.reshape(shape) if hi is not None else None
    A_dict = {name: {"lA": a[0], "uA": a[1], "lbias": a[2], "ubias": a[3]} for name, a in A.items()}
    return BoundResult(lo, hi, dict(state.intervals), A_dict, method)

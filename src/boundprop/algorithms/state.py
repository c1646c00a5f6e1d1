"""The state of one bound computation: nominal values, perturbed set, and intervals found so far.

A :class:`PropagationState` lives for one ``compute_bounds`` call. The graph is never mutated;
everything a call learns is kept here and handed back to the user in a frozen
:class:`~boundprop.algorithms.result.BoundResult`.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..domains import Interval
from ..graph.capture import SHAPE_OPS
from ..graph.ir import Graph, Node, Ref, map_refs, run_node
from ..perturbation import Perturbation
from ..rules import OpRules, Var, rules_for


@dataclass
class PropagationState:
    """Everything one call knows about the graph's values and bounds.

    Attributes:
        graph: the captured graph.
        values: the value of every leaf and node at the unperturbed inputs (nodes computed on first
            use, see :class:`NominalValues`).
        perturbations: the perturbation of each perturbed leaf.
        perturbed: names of leaves and nodes whose value depends on a perturbed leaf.
        batched: names of perturbed nodes that carry a batch dimension.
        intervals: best interval known so far for perturbed leaves and nodes.
        refined: nodes whose interval is final for this call (no further tightening planned).
        opts: bound options (relaxation choices etc.).
        cache: per-call caches (pullbacks of affine ops, relaxations) keyed by node name.
        static: facts that depend only on the graph and on which leaves are perturbed (shared by
            every call with the same graph and perturbed leaves; see :func:`static_facts`).
    """

    graph: Graph
    values: dict[str, Any]
    perturbations: dict[str, Perturbation]
    perturbed: set[str]
    batched: set[str]
    intervals: dict[str, Interval] = field(default_factory=dict)
    refined: set[str] = field(default_factory=set)
    opts: dict = field(default_factory=dict)
    cache: dict = field(default_factory=dict)
    static: dict = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return self.values[self.graph.inputs[0]].shape[0] if self.graph.inputs else 1

    def example(self, name: str) -> torch.Tensor:
        """A tensor of the node's shape, dtype and device: its interval's lower end when there is one,
        so that no forward pass is needed for it (see :class:`NominalValues`), else its value."""
        box = self.intervals.get(name)
        return box.lower if box is not None else self.values[name]

    def rules(self, node: Node) -> OpRules:
        entry = rules_for(node.target)
        if entry is None:
            raise NotImplementedError(f"no bound rules for {node.op_name} <- {node.source or node.name}")
        return entry

    def resolve_for_interval(self, node: Node) -> tuple[tuple, dict]:
        """Node arguments with perturbed ones as Intervals and the rest as values."""
        def resolve(ref: Ref):
            if ref.name in self.perturbed:
                return self.intervals[ref.name]
            return self.values[ref.name]

        return map_refs(node.args, resolve), map_refs(dict(node.kwargs), resolve)

    def resolve_for_linear(self, node: Node) -> tuple[tuple, dict]:
        """Node arguments with perturbed ones as :class:`Var` and the rest as values."""
        def resolve(ref: Ref):
            name = ref.name
            if name in self.perturbed:
                return Var(name, lambda: self.values[name], self.intervals.get(name), name in self.batched)
            return self.values[name]

        return map_refs(node.args, resolve), map_refs(dict(node.kwargs), resolve)

    def is_affine_here(self, node: Node) -> bool:
        """Whether the node is affine in its perturbed arguments in this call (cached: it depends only on
        which arguments are perturbed and batched, and on the rules)."""
        known = self.static.setdefault("affine", {})
        answer = known.get(node.name)
        if answer is None:
            answer = known[node.name] = self._is_affine(node)
        return answer

    def ancestors(self, name: str) -> frozenset[str]:
        """``graph.ancestors(name)``, cached with the graph's static facts."""
        known = self.static.setdefault("ancestors", {})
        answer = known.get(name)
        if answer is None:
            answer = known[name] = frozenset(self.graph.ancestors(name))
        return answer

    def _is_affine(self, node: Node) -> bool:
        entry = self.rules(node)
        if not entry.affine:
            return False
        if entry.affine_when is None and entry.backward is None:
            return True
        args, kwargs = self.resolve_for_linear(node)
        if entry.backward is not None and any(
                isinstance(a, Var) and not a.batched for a in _flat_args((args, kwargs))):
            return False  # a perturbed parameter (no batch dimension): the op's own rule handles it
        return entry.affine_when is None or bool(entry.affine_when(args))

    def needs_input_bounds(self, node: Node) -> bool:
        entry = self.rules(node)
        return entry.needs_bounds and not self.is_affine_here(node)


def _flat_args(obj) -> list:
    if isinstance(obj, (list, tuple)):
        return [item for sub in obj for item in _flat_args(sub)]
    if isinstance(obj, dict):
        return [item for sub in obj.values() for item in _flat_args(sub)]
    return [obj]


#: ``id(graph) -> (weak reference to the graph, {frozenset of perturbed leaves: static facts})``
_STATIC: dict[int, tuple[weakref.ref, dict]] = {}


def static_facts(graph: Graph, perturbed_leaves) -> dict:
    """A dict shared by every call on ``graph`` with the same perturbed leaves, for facts that depend on
    nothing else (the perturbed and batched node sets, which nodes are affine, ancestors). The graph is
    immutable; the entry goes away with it."""
    key = id(graph)
    entry = _STATIC.get(key)
    if entry is None or entry[0]() is not graph:
        entry = (weakref.ref(graph, lambda _ref, key=key: _STATIC.pop(key, None)), {})
        _STATIC[key] = entry
    return entry[1].setdefault(frozenset(perturbed_leaves), {})


class NominalValues(dict):
    """The value of every leaf and node at the unperturbed inputs, each node computed on first use.

    Leaves are given; a node's value is computed (from its arguments' values, recursively) when it
    is first read. Bounds never need most of them: IBP and CROWN read the values of unperturbed
    nodes (constants, shapes) and the shapes of perturbed ones, which their intervals give, so the
    forward pass that computing every value up front costs (1-3 forward passes of the model in
    time, through the graph's interpreter) is skipped. ``get`` and ``in`` see every node.
    """

    def __init__(self, graph: Graph, leaves: Mapping[str, Any]) -> None:
        super().__init__(leaves)
        self._graph = graph

    def __missing__(self, name: str) -> Any:
        if not self._graph.has_node(name):
            raise KeyError(name)
        node = self._graph.node(name)
        if not all(dict.__contains__(self, parent) for parent in node.inputs):
            # the missing ancestors first, in the graph's (topological) order: no recursion, graphs can be deep
            needed = self._graph.ancestors(name)
            for other in self._graph.nodes:
                if other.name != name and other.name in needed and not dict.__contains__(self, other.name):
                    self[other.name] = run_node(other, self)
        value = self[name] = run_node(node, self)
        return value

    def get(self, name: str, default: Any = None) -> Any:
        return self[name] if name in self else default

    def __contains__(self, name: object) -> bool:
        return dict.__contains__(self, name) or (isinstance(name, str) and self._graph.has_node(name))


def make_state(graph: Graph, inputs: tuple[torch.Tensor, ...], perturbations: Mapping[str, Perturbation],
               params: Mapping[str, torch.Tensor] | None = None, opts: dict | None = None) -> PropagationState:
    """The state of a call at the nominal inputs (node values computed on demand) with the perturbed nodes found."""
    if len(inputs) != len(graph.inputs):
        raise ValueError(f"the model takes {len(graph.inputs)} input(s), got {len(inputs)}")
    leaves = dict(zip(graph.inputs, inputs))
    leaves.update(graph.param_values() if params is None else params)
    values = NominalValues(graph, leaves)
    static = static_facts(graph, perturbations)
    if "perturbed" not in static:
        perturbed = set(perturbations)
        from_inputs = set(graph.inputs)
        for node in graph.nodes:
            if any(p in from_inputs for p in node.inputs):
                from_inputs.add(node.name)
            if node.target not in SHAPE_OPS and any(p in perturbed for p in node.inputs):
                perturbed.add(node.name)
        static["perturbed"], static["batched"] = frozenset(perturbed), frozenset(perturbed & from_inputs)
    return PropagationState(graph, values, dict(perturbations), set(static["perturbed"]), set(static["batched"]),
                            opts=dict(opts or {}), static=static)

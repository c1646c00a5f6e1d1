"""The one intermediate representation every front end (torch.export, ONNX) produces.

A :class:`Graph` is an immutable, topologically ordered list of :class:`Node`. Each node applies a
callable ``target`` (an ATen ``OpOverload`` or one of boundprop's own op functions in
:mod:`boundprop.graph.ops`) to ``args``/``kwargs`` in which references to other nodes are
:class:`Ref` objects and everything else is a plain Python literal. Running a node is therefore
``target(*resolve(args), **resolve(kwargs))``: the graph needs no interpreter of its own, and a
rule for an op sees exactly the arguments of the ATen op it bounds.

Leaves are of two kinds:

* ``inputs``: the user's positional inputs (tensors with a leading batch dimension);
* ``params``: parameters, buffers and lifted constants. The graph stores where each one comes from
  (``param_sources``), so that bounds are always computed with the live values of the user's
  module (training updates them in place) and stay differentiable with respect to them.

The graph knows nothing about bounds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch


@dataclass(frozen=True)
class Ref:
    """A reference to the value of the node called ``name``."""

    name: str


def iter_refs(obj: Any) -> Iterator[Ref]:
    """Yield every :class:`Ref` inside ``obj`` (nested lists, tuples and dicts)."""
    if isinstance(obj, Ref):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from iter_refs(item)
    elif isinstance(obj, Mapping):
        for item in obj.values():
            yield from iter_refs(item)


def map_refs(obj: Any, fn: Callable[[Ref], Any]) -> Any:
    """Return ``obj`` with every :class:`Ref` replaced by ``fn(ref)`` (structure preserved)."""
    kind = type(obj)  # exact types first: this runs for every argument of every node in every walk
    if kind is Ref:
        return fn(obj)
    if kind is tuple:
        return tuple([map_refs(item, fn) for item in obj])
    if kind is list:
        return [map_refs(item, fn) for item in obj]
    if kind in _LITERALS:
        return obj
    if isinstance(obj, Ref):
        return fn(obj)
    if isinstance(obj, list):
        return [map_refs(item, fn) for item in obj]
    if isinstance(obj, tuple):
        return tuple(map_refs(item, fn) for item in obj)
    if isinstance(obj, Mapping):
        return {key: map_refs(item, fn) for key, item in obj.items()}
    return obj


_LITERALS = frozenset({int, float, bool, str, type(None), torch.dtype, torch.device, torch.memory_format,
                       torch.layout})


@dataclass(frozen=True)
class Node:
    """One operation: ``name = target(*args, **kwargs)``.

    ``source`` tells the user where the node came from (module path and source line) and is only
    used in messages.
    """

    name: str
    target: Callable[..., Any]
    args: tuple
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    source: str = ""

    @cached_property
    def inputs(self) -> tuple[str, ...]:
        """Names of the nodes this node reads, in argument order, without repeats (computed once)."""
        seen: dict[str, None] = {}
        for ref in iter_refs((self.args, self.kwargs)):
            seen.setdefault(ref.name, None)
        return tuple(seen)

    @property
    def op_name(self) -> str:
        return op_display_name(self.target)


def op_display_name(target: Callable[..., Any]) -> str:
    """A short readable name for an op target (``aten.relu.default`` -> ``relu``)."""
    if isinstance(target, torch._ops.OpOverload):
        return str(target).removeprefix("aten.").removesuffix(".default")
    return getattr(target, "__name__", str(target))


@dataclass(frozen=True)
class ParamSource:
    """Where a parameter/buffer leaf comes from: ``module.get_parameter(qualname)`` or a constant."""

    qualname: str
    kind: str  # "parameter", "buffer" or "constant"
    constant: torch.Tensor | None = None


@dataclass(frozen=True)
class Graph:
    """An immutable computation graph.

    Attributes:
        nodes: operations in topological order (leaves are not nodes).
        inputs: names of the user inputs, in the order the model takes them.
        params: names of the parameter/buffer/constant leaves, mapped to their source.
        output: name of the node whose value the model returns.
        module: the user's module the parameters are read from (``None`` for ONNX models, whose
            parameters are all constants).
        input_shapes: shapes (batch dimension included) of the example inputs used at capture.
    """

    nodes: tuple[Node, ...]
    inputs: tuple[str, ...]
    params: Mapping[str, ParamSource]
    output: str
    module: torch.nn.Module | None = None
    input_shapes: tuple[tuple[int, ...], ...] = ()

    def __post_init__(self) -> None:
        index = {node.name: node for node in self.nodes}
        object.__setattr__(self, "_index", index)
        users: dict[str, list[str]] = {}
        for node in self.nodes:
            for name in node.inputs:
                users.setdefault(name, []).append(node.name)
        object.__setattr__(self, "_users", {k: tuple(v) for k, v in users.items()})

    def node(self, name: str) -> Node:
        return self._index[name]  # type: ignore[attr-defined]

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Graph:
        """A copy whose constant leaves are on ``device`` and, floating ones, of ``dtype`` (None: as
        they are). A module's parameters are read live from the module: move the module itself."""
        def convert(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None:
                return None
            return t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else t.dtype)

        params = {name: ParamSource(src.qualname, src.kind, convert(src.constant)) for name, src in self.params.items()}
        return Graph(self.nodes, self.inputs, params, self.output, self.module, self.input_shapes)

    def has_node(self, name: str) -> bool:
        return name in self._index  # type: ignore[attr-defined]

    def users(self, name: str) -> tuple[str, ...]:
        return self._users.get(name, ())  # type: ignore[attr-defined]

    @property
    def leaves(self) -> tuple[str, ...]:
        return self.inputs + tuple(self.params)

    def all_names(self) -> list[str]:
        return list(self.leaves) + [node.name for node in self.nodes]

    def param_values(self) -> dict[str, torch.Tensor]:
        """The current values of all parameter leaves, read live from the user's module."""
        values: dict[str, torch.Tensor] = {}
        for name, src in self.params.items():
            if src.kind == "constant":
                values[name] = src.constant  # type: ignore[assignment]
            else:
                values[name] = _live(self.module, src.qualname, src.kind)  # type: ignore[arg-type]
        return values

    def qualname(self, name: str) -> str:
        """The user-facing name of a leaf (``fc1.weight`` for a parameter), else ``name``."""
        src = self.params.get(name)
        return src.qualname if src is not None else name

    def param_by_qualname(self, qualname: str) -> str:
        for name, src in self.params.items():
            if src.qualname == qualname:
                return name
        raise KeyError(f"no parameter or buffer called {qualname!r} in the captured graph")

    def ancestors(self, name: str) -> set[str]:
        """All names (nodes and leaves) that ``name`` depends on, ``name`` included."""
        seen = {name}
        stack = [name]
        while stack:
            current = stack.pop()
            if self.has_node(current):
                for parent in self.node(current).inputs:
                    if parent not in seen:
                        seen.add(parent)
                        stack.append(parent)
        return seen

    def __repr__(self) -> str:
        lines = [f"Graph(inputs={list(self.inputs)}, output={self.output!r})"]
        for node in self.nodes:
            args = ", ".join(node.inputs)
            lines.append(f"  {node.name} = {node.op_name}({args})")
        return "\n".join(lines)


def _live(module: torch.nn.Module, qualname: str, kind: str) -> torch.Tensor:
    """``module.get_parameter(qualname)`` (or ``get_buffer``), read through the modules' own dicts on
    every call (about 20 times faster than those methods' checks, which cost a good part of a small
    model's forward pass); anything unusual goes the documented way."""
    *path, attr = qualname.split(".")
    owner = module
    try:
        for part in path:
            owner = owner._modules[part]
        return (owner._parameters if kind == "parameter" else owner._buffers)[attr]
    except (KeyError, AttributeError):
        return module.get_parameter(qualname) if kind == "parameter" else module.get_buffer(qualname)


def evaluate(graph: Graph, inputs: tuple[torch.Tensor, ...], params: Mapping[str, torch.Tensor] | None = None,
             stop_at: str | None = None) -> dict[str, Any]:
    """Run the graph on concrete inputs; return the value of every leaf and node.

    ``stop_at`` ends the walk once that node is computed.
    """
    if len(inputs) != len(graph.inputs):
        raise ValueError(f"the model takes {len(graph.inputs)} input(s), got {len(inputs)}")
    env: dict[str, Any] = dict(zip(graph.inputs, inputs))
    env.update(graph.param_values() if params is None else params)
    for node in graph.nodes:
        env[node.name] = run_node(node, env)
        if node.name == stop_at:
            break
    return env


def run_node(node: Node, env: Mapping[str, Any]) -> Any:
    """Apply one node to the values in ``env``."""
    resolve = lambda ref: env[ref.name]
    return node.target(*map_refs(node.args, resolve), **map_refs(dict(node.kwargs), resolve))

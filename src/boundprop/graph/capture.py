"""Capture a PyTorch model into the boundprop IR.

Primary path: ``torch.export.export`` (non-strict) with a batch of 2 and a dynamic batch
dimension, then ``run_decompositions`` with a table that keeps the high-level ops for which
boundprop has tight rules (linear, conv, batch norm, layer norm, softmax, GELU, pooling, ...).
Fallback: ``make_fx`` tracing with the same table (specialised to the example's shapes) for models
that export rejects. Both produce ATen graphs, translated here into :class:`~boundprop.graph.ir.Graph`.

Unsupported ops are collected over the whole graph and reported in one error that names every op
with the module path and source line it came from.
"""

from __future__ import annotations

import operator
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import fx

from . import ops
from .ir import Graph, Node, ParamSource, Ref
from .recurrent import unrolled_recurrences

aten = torch.ops.aten

#: High-level ops kept intact by the decomposition table, because boundprop bounds them tightly.
KEPT_OPS = (
    aten.linear.default,
    aten.conv1d.default,
    aten.conv2d.default,
    aten.conv_transpose1d.default,
    aten.conv_transpose2d.input,
    aten.batch_norm.default,
    aten.layer_norm.default,
    aten.softmax.int,
    aten.log_softmax.int,
    aten.gelu.default,
    aten.max_pool2d.default,
    aten.avg_pool2d.default,
    aten.adaptive_avg_pool2d.default,
    aten.hardtanh.default,
    aten.leaky_relu.default,
    aten.clamp.default,
    aten.matmul.default,
    aten.silu.default,
    aten.softplus.default,
    aten.elu.default,
    aten.celu.default,  # as elu (see _rewrite_call)
    aten.prelu.default,
    aten._prelu_kernel.default,  # what make_fx traces prelu into
    aten.stack.default,  # so that select(stack(xs, d), d, i) folds to xs[i] (see _fold_stack_reads)
)

#: Ops whose value depends only on shapes, never on values: they are never perturbed.
SHAPE_OPS: set[Any] = {
    aten.sym_size.int, aten.sym_numel.default, aten.sym_stride.int,
    operator.mul, operator.add, operator.sub, operator.floordiv, operator.truediv, operator.neg,
    operator.mod, operator.pow,
}


class UnsupportedOperatorError(NotImplementedError):
    """Raised at capture when some ops of the model have no bound rules; lists all of them."""

    def __init__(self, entries: Sequence[tuple[str, str]]) -> None:
        self.entries = list(entries)
        lines = [f"boundprop cannot bound {len(self.entries)} operation(s) of this model:"]
        lines += [f"  - {op}  <- {where}" for op, where in self.entries]
        lines.append("No bound was computed (boundprop never approximates an op it does not support).")
        super().__init__("\n".join(lines))


def decomposition_table() -> dict:
    """The default core-ATen table minus the ops in :data:`KEPT_OPS`."""
    table = dict(torch.export.default_decompositions())
    for op in KEPT_OPS:
        table.pop(op, None)
    return table


def _source_of(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    module = ""
    for path, kind in stack.values():
        if isinstance(kind, type):
            kind = kind.__name__
        module = f"{path} ({str(kind).rsplit('.', 1)[-1]})" if path else module
    trace = (node.meta.get("stack_trace") or "").strip().splitlines()
    where = ""
    for i in range(len(trace) - 1, -1, -1):
        line = trace[i].strip()
        if line.startswith("File ") and "site-packages/torch" not in line and "/torch/" not in line:
            code = trace[i + 1].strip() if i + 1 < len(trace) else ""
            where = f"{line.removeprefix('File ')}: {code}"
            break
    parts = [p for p in (module, where) if p]
    return "; ".join(parts) or "(no source information)"


def _batch2(x: torch.Tensor) -> torch.Tensor:
    if x.dim() == 0:
        return x
    if x.shape[0] == 2:
        return x
    if x.shape[0] == 1:
        return torch.cat([x, x], 0)
    return x[:2] if x.shape[0] > 2 else x


def _export(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> torch.export.ExportedProgram:
    batched = tuple(_batch2(x) for x in inputs)
    dims = tuple({0: torch.export.Dim("batch")} if x.dim() > 0 and x.shape[0] == 2 else None
                 for x in batched)
    # one batch symbol shared by all batched inputs
    batch = torch.export.Dim("batch")
    dims = tuple({0: batch} if d is not None else None for d in dims)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ep = torch.export.export(model, batched, dynamic_shapes=dims, strict=False)
        except Exception:  # noqa: BLE001 - dynamic batch failed: specialise to the given shapes
            ep = torch.export.export(model, tuple(inputs), strict=False)
        return ep.run_decompositions(decomposition_table())


def capture(model: torch.nn.Module, example_inputs: Sequence[torch.Tensor],
            is_supported: Callable[[Any], bool] | None = None) -> Graph:
    """Capture ``model`` (put in eval mode for the capture) into a :class:`Graph`.

    Arguments:
        model: any ``nn.Module`` returning a single tensor.
        example_inputs: example inputs with a batch dimension (their values do not matter).
        is_supported: predicate on op targets; ops downstream of an input for which it is false
            are reported together in :class:`UnsupportedOperatorError`.
    """
    inputs = tuple(x if isinstance(x, torch.Tensor) else torch.as_tensor(x) for x in example_inputs)
    was_training = model.training
    model.eval()
    try:
        with unrolled_recurrences(model):
            try:
                ep = _export(model, inputs)
                graph = _from_exported(ep, model, inputs)
            except UnsupportedOperatorError:
                raise
            except Exception as export_error:  # noqa: BLE001
                try:
                    graph = _from_make_fx(model, inputs)
                except Exception:  # noqa: BLE001
                    raise RuntimeError(f"boundprop could not capture the model: {export_error}") from export_error
                warnings.warn(f"torch.export failed ({type(export_error).__name__}: {export_error}); captured "
                              "with make_fx instead, specialised to the example input shapes", stacklevel=2)
    finally:
        model.train(was_training)
    if is_supported is not None:
        check_supported(graph, is_supported)
    return graph


def check_supported(graph: Graph, is_supported: Callable[[Any], bool]) -> None:
    """Raise one :class:`UnsupportedOperatorError` for every unsupported op that reads an input."""
    tainted = set(graph.inputs)
    missing: list[tuple[str, str]] = []
    for node in graph.nodes:
        if node.target in SHAPE_OPS or not any(n in tainted for n in node.inputs):
            continue
        tainted.add(node.name)
        if not is_supported(node.target):
            missing.append((node.op_name, node.source or node.name))
    if missing:
        raise UnsupportedOperatorError(missing)


# --------------------------------------------------------------------------------------------
# translation of ATen fx graphs


def _slice_for_split(getitem: fx.Node, split: fx.Node) -> tuple[Any, tuple]:
    """``getitem(split(x, ...), i)`` -> ``slice(x, dim, start, end)``."""
    x, sizes, *rest = split.args
    dim = rest[0] if rest else split.kwargs.get("dim", 0)
    index = getitem.args[1]
    if split.target in (aten.split.Tensor, aten.split.default):
        length = x.meta["val"].shape[dim]
        starts = list(range(0, int(length), int(sizes)))
        bounds = [(s, min(s + int(sizes), int(length))) for s in starts]
    else:
        bounds, start = [], 0
        for size in sizes:
            bounds.append((start, start + int(size)))
            start += int(size)
    start, end = bounds[index]
    return aten.slice.Tensor, (x, dim, start, end)


def _rewrite_getitem(node: fx.Node) -> tuple[Any, tuple, dict] | None:
    """Turn ``getitem`` of a multi-output op into a single-output op, where one exists."""
    parent, index = node.args
    if not isinstance(parent, fx.Node):
        return None
    target = parent.target
    if target == aten._native_batch_norm_legit_no_training.default and index == 0:
        return ops.batch_norm_eval, parent.args, {}
    if target in (aten.split.Tensor, aten.split_with_sizes.default, aten.split.default):
        new_target, args = _slice_for_split(node, parent)
        return new_target, args, {}
    if target == aten.unbind.int:
        dim = parent.args[1] if len(parent.args) > 1 else 0
        return aten.select.int, (parent.args[0], dim, index), {}
    if target in (aten.max.dim, aten.min.dim) and index == 0:
        x, dim, *rest = parent.args
        keepdim = rest[0] if rest else False
        return (aten.amax.default if target == aten.max.dim else aten.amin.default), (x, [dim], keepdim), {}
    if target == aten.max_pool2d_with_indices.default and index == 0:
        return aten.max_pool2d.default, parent.args, {}
    return None


def _rewrite_call(fx_node: fx.Node, target: Any, args: tuple, kwargs: dict,
                  from_input: bool) -> tuple[Any, tuple, dict, list[Node]]:
    """Ops with a rule under another name, and the nodes they need first:

    * casts of floating values computed from an input (``from_input``; casts of constants, such as
      index arithmetic, stay): to an integer type, ``trunc`` (the same values, kept floating); to bool
      or a float type narrower than float32, :func:`~boundprop.graph.ops.lossy_cast` (no rule);
    * ``celu(x, a) = elu(x, alpha=a, scale=1, input_scale=1/a)``;
    * ``prelu(x, w)`` (one slope per channel, dimension 1) is ``_prelu_kernel(x, w')`` with ``w'`` the
      slopes shaped ``(C, 1, ..., 1)`` to broadcast from the right, as ``make_fx`` traces it. The rule
      then needs no layout: the intervals it sees may carry a specification or window dimension
      before the channels.
    """
    if target == aten.celu.default:
        alpha = float(args[1]) if len(args) > 1 else float(kwargs.get("alpha", 1.0))
        return aten.elu.default, (args[0], alpha, 1.0, 1.0 / alpha), {}, []
    if target == aten._to_copy.default and from_input and kwargs.get("dtype") is not None \
            and isinstance(args[0], fx.Node):
        source = args[0].meta["val"].dtype if "val" in args[0].meta else None
        if source is not None and source.is_floating_point:
            if ops.is_lossy_float_cast(source, kwargs["dtype"]):
                return ops.lossy_cast, (args[0], kwargs["dtype"]), {}, []
            if not kwargs["dtype"].is_floating_point and not kwargs["dtype"].is_complex:
                return aten.trunc.default, (args[0],), {}, []  # float -> int truncates toward 0
    if target == aten.prelu.default:
        x, w = args[0], args[1]
        rank = len(x.meta["val"].shape) if isinstance(x, fx.Node) and "val" in x.meta else 2
        slopes = Node(f"{fx_node.name}_slopes", aten.reshape.default, (_to_refs(w), [-1] + [1] * max(rank - 2, 0)), {},
                      _source_of(fx_node))
        return aten._prelu_kernel.default, (x, Ref(slopes.name)), {}, [slopes]
    return target, args, kwargs, []


def _translate(fx_graph: fx.Graph, leaf_kinds: dict[str, ParamSource | None], model: torch.nn.Module | None,
               input_shapes: tuple) -> Graph:
    """Translate an ATen fx graph; ``leaf_kinds`` maps placeholder name -> source (None = user input)."""
    nodes: list[Node] = []
    inputs: list[str] = []
    params: dict[str, ParamSource] = {}
    output = None
    multi_output_parents: set[str] = set()
    tainted = _input_dependent(fx_graph, {n for n, kind in leaf_kinds.items() if kind is None})
    for fx_node in fx_graph.nodes:
        if fx_node.op == "call_function" and fx_node.target is operator.getitem:
            parent = fx_node.args[0]
            if isinstance(parent, fx.Node):
                multi_output_parents.add(parent.name)
    for fx_node in fx_graph.nodes:
        if fx_node.op == "placeholder":
            src = leaf_kinds[fx_node.name]
            if src is None:
                inputs.append(fx_node.name)
            else:
                params[fx_node.name] = src
        elif fx_node.op == "call_function":
            target, args, kwargs = fx_node.target, fx_node.args, dict(fx_node.kwargs)
            if target is operator.getitem:
                rewritten = _rewrite_getitem(fx_node)
                if rewritten is not None:
                    target, args, kwargs = rewritten
            elif fx_node.name in multi_output_parents and _all_users_rewritable(fx_node):
                continue  # every use is rewritten into a single-output op
            else:
                target, args, kwargs, before = _rewrite_call(fx_node, target, args, kwargs, fx_node.name in tainted)
                nodes.extend(before)
            args, kwargs = _to_refs(tuple(args)), _to_refs(kwargs)
            nodes.append(Node(fx_node.name, target, tuple(args), kwargs, _source_of(fx_node)))
        elif fx_node.op == "output":
            outs = fx_node.args[0]
            outs = outs if isinstance(outs, (list, tuple)) else (outs,)
            if len(outs) != 1 or not isinstance(outs[0], fx.Node):
                raise TypeError("boundprop needs a model that returns a single tensor; this one returns "
                                f"{len(outs)} values (wrap it to return the tensor to bound)")
            output = outs[0].name
        elif fx_node.op == "get_attr":
            value = getattr(fx_graph.owning_module, fx_node.target)
            params[fx_node.name] = ParamSource(str(fx_node.target), "constant", value)
        else:
            raise RuntimeError(f"unexpected fx node {fx_node.format_node()}")
    assert output is not None
    if output in inputs or output in params:
        # an identity model: give the output a node of its own
        nodes.append(Node("identity_output", aten.alias.default, (Ref(output),), {}, "model output"))
        output = "identity_output"
    return _prune(Graph(tuple(nodes), tuple(inputs), params, output, model, input_shapes))


def _to_refs(obj: Any) -> Any:
    """fx arguments -> IR arguments (``fx.Node`` -> :class:`Ref`, fx lists -> plain lists)."""
    if isinstance(obj, fx.Node):
        return Ref(obj.name)
    if isinstance(obj, tuple):
        return tuple(_to_refs(x) for x in obj)
    if isinstance(obj, list):
        return [_to_refs(x) for x in obj]
    if isinstance(obj, dict):
        return {k: _to_refs(v) for k, v in obj.items()}
    return obj


def _all_users_rewritable(fx_node: fx.Node) -> bool:
    return all(u.target is operator.getitem and _rewrite_getitem(u) is not None for u in fx_node.users)


def _prune(graph: Graph) -> Graph:
    """Drop nodes and parameters the output does not depend on."""
    needed = graph.ancestors(graph.output)
    nodes = tuple(n for n in graph.nodes if n.name in needed)
    params = {k: v for k, v in graph.params.items() if k in needed}
    return Graph(nodes, graph.inputs, params, graph.output, graph.module, graph.input_shapes)


def _from_exported(ep: torch.export.ExportedProgram, model: torch.nn.Module, inputs: tuple) -> Graph:
    from torch.export.graph_signature import InputKind

    kinds: dict[str, ParamSource | None] = {}
    for spec in ep.graph_signature.input_specs:
        name = spec.arg.name
        if spec.kind == InputKind.USER_INPUT:
            kinds[name] = None
        elif spec.kind == InputKind.PARAMETER:
            kinds[name] = ParamSource(spec.target, "parameter")
        elif spec.kind == InputKind.BUFFER:
            if spec.persistent is False:
                kinds[name] = ParamSource(spec.target, "constant", ep.constants[spec.target])
            else:
                kinds[name] = ParamSource(spec.target, "buffer")
        elif spec.kind == InputKind.CONSTANT_TENSOR:
            kinds[name] = ParamSource(spec.target, "constant", ep.constants[spec.target])
        else:
            raise TypeError(f"unsupported graph input kind {spec.kind} ({name})")
    _fold_stack_reads(ep.graph_module.graph)
    _check_batch_first(ep.graph_module.graph, {name for name, kind in kinds.items() if kind is None})
    return _translate(ep.graph_module.graph, kinds, model, tuple(tuple(x.shape) for x in inputs))


def _fold_stack_reads(fx_graph: fx.Graph) -> None:
    """``select(stack(xs, d), d, i) -> xs[i]`` and ``squeeze(stack([x], d), d) -> x``, then drop what no
    longer has users: reading one step of a stacked sequence (an unrolled recurrent layer's output,
    ``h_n[-1]``) needs no tensor with the steps' axis before the batch."""
    def stacked(node: Any) -> tuple[list, int] | None:
        if not isinstance(node, fx.Node) or node.target != aten.stack.default:
            return None
        items = list(node.args[0])
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        rank = len(items[0].meta["val"].shape) + 1 if isinstance(items[0], fx.Node) and "val" in items[0].meta \
            else None
        return (items, dim % rank) if rank else None

    for node in list(fx_graph.nodes):
        if node.op != "call_function":
            continue
        found = stacked(node.args[0]) if node.args else None
        if found is None:
            continue
        items, dim = found
        if node.target == aten.select.int and node.args[1] % (len(node.args[0].meta["val"].shape)) == dim:
            node.replace_all_uses_with(items[node.args[2]])
        elif node.target == aten.squeeze.dims and len(items) == 1 and \
                [d % len(node.args[0].meta["val"].shape) for d in node.args[1]] == [dim]:
            node.replace_all_uses_with(items[0])
    fx_graph.eliminate_dead_code()


def _check_batch_first(fx_graph: fx.Graph, user_inputs: set[str]) -> None:
    """Every tensor computed from an input must keep the batch as its first dimension, alone.

    Bounds are per example: coefficients, intervals and relaxations all carry the batch first, and
    the input set is a product of per-example sets. An op that moves the batch (``x.permute(1, 0, 2)``,
    as ``nn.LSTM`` does inside), reduces over it (``x.mean(0)``) or folds it into another dimension
    (``x.reshape(-1, d)``) breaks that: CROWN then failed or, on ``x - x.mean(0)``, returned wrong
    bounds. With a dynamic batch (exported with a batch symbol ``B``), every such op is reported, at
    the first node where ``B`` leaves dimension 0; specialised captures have no symbol to check.
    """
    batch = None
    for node in fx_graph.nodes:
        if node.op == "placeholder" and node.name in user_inputs:
            val = node.meta.get("val")
            if isinstance(val, torch.Tensor) and val.dim() > 0 and isinstance(val.shape[0], torch.SymInt):
                batch = val.shape[0].node.expr
                break
    if batch is None:
        return

    def batch_first(val: Any) -> bool:
        if not isinstance(val, torch.Tensor):
            return True
        dims = list(val.shape)
        if not dims or not isinstance(dims[0], torch.SymInt) or dims[0].node.expr != batch:
            return False
        return not any(isinstance(d, torch.SymInt) and batch in d.node.expr.free_symbols for d in dims[1:])

    tainted, conforming, wrong = _input_dependent(fx_graph, user_inputs), set(user_inputs), []
    for node in fx_graph.nodes:
        if node.op != "call_function" or node.name not in tainted:
            continue
        inputs = [a.name for a in node.all_input_nodes]
        val = node.meta.get("val")
        if isinstance(val, (tuple, list)) or batch_first(val):  # several outputs: their getitems are checked
            conforming.add(node.name)
        elif all(n in conforming or n not in tainted for n in inputs):
            wrong.append((f"{_op_label(node)} (moves, reduces or folds the batch dimension)", _source_of(node)))
    if wrong:
        raise UnsupportedOperatorError(wrong)


def _input_dependent(fx_graph: fx.Graph, user_inputs: set[str]) -> set[str]:
    """Names of the user inputs and of the nodes computed from their values (shape reads excluded)."""
    found = set(user_inputs)
    for node in fx_graph.nodes:
        if node.op == "call_function" and node.target not in SHAPE_OPS and \
                any(n.name in found for n in node.all_input_nodes):
            found.add(node.name)
    return found


def _op_label(node: fx.Node) -> str:
    name = getattr(node.target, "__name__", str(node.target))
    return name.split(".")[0] if name.endswith(".default") else name


def _from_make_fx(model: torch.nn.Module, inputs: tuple) -> Graph:
    from torch.fx.experimental.proxy_tensor import make_fx

    named = dict(model.named_parameters())
    named.update(dict(model.named_buffers()))
    names = list(named)

    def fn(*flat):
        values = dict(zip(names, flat[: len(names)]))
        return torch.func.functional_call(model, values, flat[len(names):])

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = make_fx(fn, decomposition_table=decomposition_table(), tracing_mode="real")(
            *[named[n].detach() for n in names], *inputs)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    kinds: dict[str, ParamSource | None] = {}
    param_names = set(dict(model.named_parameters()))
    for node, name in zip(placeholders, names):
        kinds[node.name] = ParamSource(name, "parameter" if name in param_names else "buffer")
    for node in placeholders[len(names):]:
        kinds[node.name] = None
    return _translate(gm.graph, kinds, model, tuple(tuple(x.shape) for x in inputs))

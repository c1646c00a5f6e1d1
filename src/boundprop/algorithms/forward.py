"""Forward-mode LiRPA: linear forms over the perturbed inputs, pushed through the graph in order.

Every perturbed node ``y`` carries two affine functions of the stacked entries ``x`` of all
perturbed inputs (``D`` entries per example; :class:`~boundprop.domains.linear_forms.LinearForms`,
rows ``(batch, D + 1, *y.shape[1:])`` with the constant as the last row)::

    lw . x + lb  <=  y  <=  uw . x + ub

* leaves start exact, with the identity on their slice of ``x``;
* affine ops: ``lower_y = J mid - |J| rad + c`` and ``upper_y = J mid + |J| rad + c`` with
  ``mid``/``rad`` the half sum/difference of the input forms (one product ``J T`` while the forms
  are exact); ``J T`` comes from a fast rule (:mod:`boundprop.rules.affine_forward`) or the op's
  Jacobian-vector product vmapped over the rows (:class:`~boundprop.rules.generic.AffinePushforward`);
* element-wise nonlinearities: the node's input forms are concretised to an interval (intersected
  with IBP's), the op's relaxation ``a x + b <= f(x) <= a' x + b'`` is taken on it, and composed:
  ``lower_f = a+ lower_x + a- upper_x + b``, ``upper_f = a'+ upper_x + a'- lower_x + b'``;
* other ops: their ``@forward_rule`` (e.g. McCormick for products), or else their backward rule run on
  the identity over the node's entries (:func:`backward_rule_forms`).

Only nodes whose interval some consumer needs are concretised. The bound of ``C y`` comes from the
output's forms, with ``C`` merged into a final affine node first (``C J`` before the sign split,
never looser than splitting after). ``forward+backward`` keeps the intervals and runs one CROWN
walk from the output instead.

Cost: every affine layer costs ``D + 1`` (twice that once forms are inexact) evaluations of the
layer; memory ``O(batch * D * width)``. Forward mode suits inputs with few perturbed entries.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..domains import Interval
from ..domains.linear_forms import LinearForms, add_to_last_row, compose, vacuous_rows, vacuous_where_infinite
from ..graph.ir import Node
from ..rules import Var
from ..rules.affine_forward import is_nonnegative
from ..rules.generic import AffinePushforward, collect_vars
from ..rules.registry import ForwardCall
from ..syncs import may_read, to_device
from .backward import backward, propagate_node, relaxation_of
from .crown import unstable_rows
from .ibp import interval_of, leaf_intervals
from .state import PropagationState


@dataclass(frozen=True)
class LeafSlot:
    """Where a perturbed leaf's entries sit among the ``D`` rows of every form."""

    name: str
    offset: int
    size: int


def leaf_layout(state: PropagationState, names: set[str]) -> list[LeafSlot]:
    """Stack the entries of the perturbed leaves among ``names`` (in perturbation order)."""
    slots, offset = [], 0
    for name in state.perturbations:
        if name not in names:
            continue
        if name not in state.batched:
            raise NotImplementedError(
                f"forward mode bounds perturbed inputs only, not the perturbed parameter "
                f"{state.graph.qualname(name)}; use method='CROWN'")
        size = state.values[name][0].numel()
        slots.append(LeafSlot(name, offset, size))
        offset += size
    return slots


def leaf_forms(state: PropagationState, slot: LeafSlot, dim: int) -> LinearForms:
    """Exact forms ``x_leaf = I . x``, shared by the batch: rows ``(1, D + 1, *leaf_shape)``."""
    value = state.values[slot.name]
    rows = value.new_zeros(1, dim + 1, slot.size)
    rows[0, slot.offset:slot.offset + slot.size] = torch.eye(slot.size, dtype=value.dtype, device=value.device)
    return LinearForms.exact(rows.reshape(1, dim + 1, *value.shape[1:]))


def concretize_rows(state: PropagationState, layout: list[LeafSlot], rows: torch.Tensor, sign: int) -> torch.Tensor:
    """Min (``sign=-1``) or max (``+1``) of ``rows . [x; 1]`` over the perturbation set.

    ``rows``: ``(batch or 1, D + 1, m)`` -> ``(batch, m)``.
    """
    out = rows[:, -1]
    shared, m = rows.shape[0], rows.shape[2]
    for slot in layout:
        x = state.values[slot.name]
        A = rows[:, slot.offset:slot.offset + slot.size].transpose(1, 2).reshape(shared, m, *x.shape[1:])
        out = out + state.perturbations[slot.name].concretize(x, A, sign)
    return out


def interval_of_forms(state: PropagationState, layout: list[LeafSlot], forms: LinearForms,
                      columns: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Lower and upper ends the forms imply, ``(batch, m)`` over the node's flattened entries (only
    the entries in ``columns`` when given: ``(batch, len(columns))``)."""
    def flat(t: torch.Tensor) -> torch.Tensor:
        t = t.reshape(t.shape[0], t.shape[1], -1)
        return t if columns is None else t[:, :, columns]

    lower = concretize_rows(state, layout, flat(forms.lower), -1)
    upper = concretize_rows(state, layout, flat(forms.upper), +1)
    return lower, upper


def _refine_interval(state: PropagationState, name: str, layout: list[LeafSlot], forms: LinearForms,
                     ibp_box: Interval, old: Interval | None) -> Interval:
    """The node's interval from its forms, intersected with IBP's (default) or only with ``old``.

    With IBP intersected, entries whose relaxation IBP already makes exact (``unstable`` of every
    consumer false, e.g. ReLU inputs of one sign) are not concretised.
    """
    batch = ibp_box.lower.shape[0]
    flat_l, flat_u = ibp_box.lower.reshape(batch, -1), ibp_box.upper.reshape(batch, -1)
    if state.opts.get("forward_intersect_ibp", True):
        columns = to_device(unstable_rows(state, name), flat_l.device)
        if columns.numel() == 0:
            return ibp_box
        if columns.numel() == flat_l.shape[1]:
            lower, upper = interval_of_forms(state, layout, forms)
            new_l, new_u = torch.maximum(lower, flat_l), torch.minimum(upper, flat_u)
        else:
            lower, upper = interval_of_forms(state, layout, forms, columns)
            new_l, new_u = flat_l.clone(), flat_u.clone()
            new_l[:, columns] = torch.maximum(lower, flat_l[:, columns])
            new_u[:, columns] = torch.minimum(upper, flat_u[:, columns])
    else:
        new_l, new_u = interval_of_forms(state, layout, forms)
        if old is not None:
            new_l = torch.maximum(new_l, old.lower.reshape(batch, -1))
            new_u = torch.minimum(new_u, old.upper.reshape(batch, -1))
    new_u = torch.maximum(new_u, new_l)  # rounding: keep lower <= upper
    return Interval(new_l.reshape(ibp_box.lower.shape), new_u.reshape(ibp_box.upper.shape))


# --- one node ------------------------------------------------------------------------------------


def _pushforward(state: PropagationState, node: Node) -> AffinePushforward:
    key = ("pushforward", node.name)
    if key not in state.cache:
        args, kwargs = state.resolve_for_linear(node)
        state.cache[key] = AffinePushforward(node.target, args, kwargs, state.rules(node).homogeneous)
    return state.cache[key]


def _apply_affine(state: PropagationState, node: Node, args, kwargs, tangents, absolute: bool) -> torch.Tensor:
    """``sum_i J_i T_i`` (or with ``|J_i|``) for an affine node: fast rule, else the generic path."""
    fast = state.rules(node).affine_forward
    if fast is not None:
        out = fast(tangents, args, kwargs, absolute)
        if out is not None:
            return out
    push = _pushforward(state, node)
    batch = state.values[node.name].shape[0]
    tangents = [t if t is None or t.shape[0] == batch else t.expand(batch, *t.shape[1:]) for t in tangents]
    if absolute and not is_nonnegative(node.target, args, kwargs):
        return push.absolute(tangents)
    return push.forward(tangents)


def affine_forms(state: PropagationState, node: Node, forms: dict[str, LinearForms]) -> LinearForms:
    """Forms of an affine node: ``J mid +- |J| rad + c`` (``J T + c`` while exact)."""
    args, kwargs = state.resolve_for_linear(node)
    ins = [forms[v.name] for v in collect_vars((args, kwargs))]
    out_shape = state.values[node.name].shape[1:]
    fit = lambda t: t if t.shape[2:] == out_shape else t.expand(*t.shape[:2], *out_shape)
    apply = lambda ts, absolute=False: fit(_apply_affine(state, node, args, kwargs, ts, absolute))
    if all(f.is_exact for f in ins):
        tangents = [f.lower for f in ins]
        rows = apply(tangents)
        out, fresh = LinearForms.exact(rows), _is_fresh(rows, tangents)
    elif is_nonnegative(node.target, args, kwargs):  # J >= 0: lower to lower, upper to upper
        lower, upper = apply([f.lower for f in ins]), apply([f.upper for f in ins])
        out, fresh = LinearForms(lower, upper), _is_fresh(lower, [f.lower for f in ins]) and _is_fresh(
            upper, [f.upper for f in ins])
    else:
        mids = [f.lower if f.is_exact else torch.add(f.lower, f.upper).mul_(0.5) for f in ins]
        rads = [None if f.is_exact else torch.sub(f.upper, f.lower).mul_(0.5) for f in ins]
        mid, rad = apply(mids), apply(rads, True)
        lower = mid - rad
        upper = mid.add_(rad) if _is_fresh(mid, mids) else mid + rad
        out, fresh = LinearForms(lower, upper), True
    if state.rules(node).homogeneous:
        return out
    constant = _pushforward(state, node).constant
    # e.g. the sum of two perturbed tensors (adding a zero constant is harmless where it cannot be read)
    if constant is None or (may_read(constant) and not bool((constant != 0).any())):
        return out
    return out.add_constant(constant, fresh=fresh)


def _is_fresh(out: torch.Tensor, inputs: list[torch.Tensor]) -> bool:
    """``out`` owns its memory (not a view, not an input): safe to update in place."""
    if out._base is not None:
        return False
    ptr = out.untyped_storage().data_ptr()
    return all(t.untyped_storage().data_ptr() != ptr for t in inputs)


def relaxed_forms(state: PropagationState, node: Node, forms: dict[str, LinearForms]) -> LinearForms:
    """Forms of ``f(x)`` from ``x``'s forms and ``f``'s relaxation on ``x``'s interval."""
    relax = relaxation_of(state, node, "lower", None)
    shape = state.values[node.name].shape
    lw, lb, uw, ub = (torch.broadcast_to(t, shape) for t in (relax.lw, relax.lb, relax.uw, relax.ub))
    x = forms[node.inputs[0]]
    if x.is_exact and may_read(lw) and torch.equal(lw, uw) and torch.equal(lb, ub):  # f is affine on this box
        return LinearForms.exact(compose(lw, x, "lower")).add_constant(lb, fresh=True)
    return LinearForms(compose(lw, x, "lower"), compose(uw, x, "upper")).add_constant(lb, ub, fresh=True)


#: Entries (batch x rows x node entries) of one identity chunk in :func:`backward_rule_forms`.
IDENTITY_CHUNK_ELEMENTS = 2**22


def backward_rule_forms(state: PropagationState, node: Node, forms: dict[str, LinearForms]) -> LinearForms:
    """Forms of a node that has a backward rule only (max-pooling, softmax, layer norm, element-wise
    max/min, products and quotients of perturbed tensors...): the rule run on the identity.

    The rule, given coefficients ``A`` on the node's output ``y``, returns for each perturbed input
    ``x_k`` coefficients ``A_k^l`` (``A_k^u``) and a bias ``b^l`` (``b^u``) with, for every ``x``
    in the inputs' intervals::

        A y >= sum_k A_k^l x_k + b^l        (and <= with the upper side)

    With ``A = e_i`` (row ``i`` of the identity over ``y``'s entries) that is a linear lower and upper
    bound of ``y_i`` in the inputs, sound on the same intervals the rule relaxes on. Composed with the
    inputs' forms (``A+ lower + A- upper``, :func:`spec_rows`), it gives ``y``'s forms. The identity is
    ``(rows, *y)`` per example, ``n^2`` entries for ``n`` outputs: it goes in chunks of rows.
    """
    value = state.values[node.name]
    batch, shape = value.shape[0], value.shape[1:]
    n = shape.numel()
    chunk = max(1, IDENTITY_CHUNK_ELEMENTS // max(1, batch * n))
    lowers, uppers = [], []
    for start in range(0, n, chunk):
        rows = min(chunk, n - start)
        eye = torch.zeros(rows, n, dtype=value.dtype, device=value.device)
        eye[:, start:start + rows] = torch.eye(rows, dtype=value.dtype, device=value.device)
        A = eye.reshape(1, rows, *shape)
        out = propagate_node(state, node, A, A, None)
        inputs = [(name, lA, uA) for name, lA, uA in out.A if name in state.perturbed]
        low = sum(spec_rows(lA, forms[name], "lower") for name, lA, _ in inputs)
        up = sum(spec_rows(uA, forms[name], "upper") for name, _, uA in inputs)
        lowers.append(add_to_last_row(low, out.lbias))
        uppers.append(add_to_last_row(up, out.ubias))
    cat = lambda parts: (parts[0] if len(parts) == 1 else torch.cat(parts, 2)).reshape(batch, -1, *shape)
    return LinearForms(cat(lowers), cat(uppers))


def node_forms(state: PropagationState, node: Node, forms: dict[str, LinearForms]) -> LinearForms:
    entry = state.rules(node)
    if state.is_affine_here(node):
        return affine_forms(state, node, forms)
    if entry.relaxation is not None:
        args, _ = state.resolve_for_linear(node)
        if any(isinstance(a, Var) for a in args[1:]):
            raise NotImplementedError(f"{node.op_name}: only the first argument may be perturbed")
        return relaxed_forms(state, node, forms)
    if entry.forward is not None:
        args, kwargs = state.resolve_for_linear(node)
        own = {v.name: forms[v.name] for v in collect_vars((args, kwargs))}
        return entry.forward(ForwardCall(args, kwargs, own, state.values[node.name], state.opts))
    if entry.backward is not None:
        return backward_rule_forms(state, node, forms)
    raise NotImplementedError(
        f"forward mode has no rule for {node.op_name} <- {node.source or node.name}; "
        f"use method='CROWN' (or 'CROWN-IBP')")


# --- the walk ------------------------------------------------------------------------------------


def bound_nodes(state: PropagationState, target: str) -> set[str]:
    """Perturbed nodes whose interval a consumer (up to ``target``) relaxes."""
    needed = state.graph.ancestors(target)
    found: set[str] = set()
    for node in state.graph.nodes:
        if node.name in needed and node.name in state.perturbed and state.needs_input_bounds(node):
            found.update(p for p in node.inputs if p in state.perturbed)
    return found


def forward_walk(state: PropagationState, target: str, keep: set[str],
                 layout: list[LeafSlot]) -> dict[str, LinearForms]:
    """Forms of the nodes in ``keep``; on the way, intervals of every node up to ``target``.

    Each node's interval is its IBP rule on the current intervals (intersected with any known
    one); nodes some consumer relaxes get the forward-mode interval intersected in (with option
    ``forward_intersect_ibp=False``: the forward-mode interval alone, as auto_LiRPA).
    """
    graph = state.graph
    leaf_intervals(state)
    wanted = bound_nodes(state, target)
    with_forms: set[str] = set()
    for name in wanted | keep:
        with_forms |= graph.ancestors(name)
    with_forms &= state.perturbed
    remaining = {name: sum(1 for u in graph.users(name) if u in with_forms) for name in with_forms}
    dim = sum(slot.size for slot in layout)
    forms: dict[str, LinearForms] = {}
    for slot in layout:
        if slot.name in with_forms:
            forms[slot.name] = leaf_forms(state, slot, dim)
    needed = graph.ancestors(target)
    for node in graph.nodes:
        name = node.name
        if name not in state.perturbed or name not in needed:
            continue
        old = state.intervals.get(name)
        fresh = interval_of(state, name)
        ibp_box = fresh if old is None else fresh.intersect(old)
        state.intervals[name] = ibp_box
        if name not in with_forms:
            continue
        forms[name] = vacuous_where_infinite(node_forms(state, node, forms))
        if name in wanted:
            state.intervals[name] = _refine_interval(state, name, layout, forms[name], ibp_box, old)
            state.refined.add(name)
            for user in graph.users(name):
                state.cache.pop(("relax", user), None)
        for parent in node.inputs:
            if parent in remaining:
                remaining[parent] -= 1
                if remaining[parent] == 0 and parent not in keep:
                    forms.pop(parent, None)
    return forms


# --- final bounds --------------------------------------------------------------------------------


def spec_rows(A: torch.Tensor, forms: LinearForms, side: str) -> torch.Tensor:
    """Rows bounding ``A . y`` from ``side``: ``A+ lower + A- upper`` (lower side); ``(batch, D + 1, spec)``.

    ``A``: ``(batch or 1, spec, *y)``; ``forms``: ``(batch, D + 1, *y)``.
    """
    A = A.reshape(A.shape[0], A.shape[1], -1).transpose(1, 2)
    flat = lambda t: t.reshape(t.shape[0], t.shape[1], -1)
    if forms.is_exact:
        return flat(forms.lower) @ A
    first, second = (forms.lower, forms.upper) if side == "lower" else (forms.upper, forms.lower)
    return flat(first) @ A.clamp(min=0) + flat(second) @ A.clamp(max=0)


def _merge_target(state: PropagationState, target: str) -> bool:
    """Whether ``C`` is pulled back through the (affine) target before the sign split."""
    return state.graph.has_node(target) and state.is_affine_here(state.graph.node(target))


def forward_bounds(state: PropagationState, target: str, C: torch.Tensor, lower: bool, upper: bool,
                   method: str = "forward", keep_A: set[str] | None = None):
    """Bounds of ``C y`` (``y`` = node ``target``) by forward mode (``method`` "forward") or by forward-mode
    intermediate bounds and one CROWN walk (``"forward+backward"``).

    Arguments:
        C: ``(batch or 1, spec, *y.shape[1:])``.
        keep_A: leaves whose coefficients to return (forward: the final linear forms over each
            leaf, ``(lA, uA, lbias, ubias)`` with ``lA``: ``(batch, spec, *leaf)``).

    Returns ``(lower, upper, A)`` with lower/upper ``(batch, spec)`` (None for a side not asked for).
    """
    layout = leaf_layout(state, state.graph.ancestors(target))
    if method == "forward+backward":
        forward_walk(state, target, set(), layout)
        res = backward(state, target, C, lower, upper, keep_A=keep_A)
        return res.lower, res.upper, res.A
    if method != "forward":
        raise ValueError(method)
    merge = _merge_target(state, target)
    if merge:
        keep = {p for p in state.graph.node(target).inputs if p in state.perturbed}
    else:
        keep = {target}
    forms = forward_walk(state, target, keep, layout)
    batch = state.batch_size
    if merge:
        node = state.graph.node(target)
        out = propagate_node(state, node, C if lower else None, C if upper else None, None)
        terms = [(forms[name], lA, uA) for name, lA, uA in out.A if name in state.perturbed]
        lbias, ubias = out.lbias, out.ubias
    else:
        if target not in forms:  # a perturbed leaf
            slot = next(s for s in layout if s.name == target)
            forms[target] = leaf_forms(state, slot, sum(s.size for s in layout))
        terms = [(forms[target], C if lower else None, C if upper else None)]
        lbias = ubias = 0.0
    results, A_out = [], {}
    for side, bias, sign, pick in (("lower", lbias, -1, 1), ("upper", ubias, +1, 2)):
        if not (lower if side == "lower" else upper):
            results.append(None)
            continue
        rows = sum(spec_rows(term[pick], term[0], side) for term in terms)
        rows = vacuous_rows(add_to_last_row(rows, bias), float(sign))
        results.append(concretize_rows(state, layout, rows, sign))
        for slot in layout:
            if keep_A and slot.name in keep_A:
                x = state.values[slot.name]
                coeffs = rows[:, slot.offset:slot.offset + slot.size].transpose(1, 2)
                entry = A_out.setdefault(slot.name, [None, None, 0.0, 0.0])
                entry[pick - 1] = coeffs.reshape(coeffs.shape[0], coeffs.shape[1], *x.shape[1:]).expand(
                    batch, *coeffs.shape[1:2], *x.shape[1:])
                entry[pick + 1] = rows[:, -1].expand(batch, rows.shape[2])
    return results[0], results[1], {name: tuple(v) for name, v in A_out.items()}

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

Representations of the coefficients (chosen for cost; every bound is the same):

* a dense tensor ``(batch, spec, *shape)``, whose batch dimension stays 1 for as long as the
  coefficients do not depend on the example (a spec ``C`` shared by the batch, through affine
  ops), so that e.g. ``C W`` is computed once and not once per example; after a 2-D convolution
  it is laid out channels-last (see :func:`is_channels_last`), and relaxations follow that layout;
* :class:`~boundprop.domains.patches.Patches` for walks that start from a 2-D feature map
  (intermediate bounds of convolutional layers): one small window per spec row, propagated by
  the rules of :mod:`.patches` and turned into a dense tensor at the first op without one.

Relaxations are applied as ``A lw + S (uw - lw)`` with ``S`` the negative part of ``A`` for the
lower bound and the positive part for the upper bound (``= pos(A) lw + neg(A) uw`` and
``pos(A) uw + neg(A) lw``), bias terms likewise: three passes over the coefficients per side.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..domains import Relaxation
from ..domains.patches import Patches, add_coefficients
from ..graph.ir import Node
from ..perturbation import PerturbationLpNorm
from ..rules import RelaxCall, Var, is_zero
from ..rules.generic import AffinePullback, collect_vars
from .patches import patch_rule_for
from .state import PropagationState

#: ``alpha_for(node_name, direction) -> Tensor | None``: free relaxation parameters for a node,
#: ``(batch, spec, *node.shape)``. A lookup may also offer ``alpha_for.windows(node_name, direction, P)``:
#: parameters in the window layout of Patches ``P`` (``(batch, P.spec, C, kh, kw)``, one per row and
#: window entry, which is all a row of a patch-form walk can use), or None (see :func:`_window_relaxation`).
AlphaLookup = Callable[[str, str], torch.Tensor | None]


@dataclass
class BackwardCall:
    """What a hand-written backward rule receives.

    ``lA``/``uA``: coefficients of the node's output, ``(batch, spec, *out)``, or None for a side
    that is not needed. ``args``/``kwargs``: the node's arguments, perturbed ones as ``Var``.
    ``alpha_for(direction)``: the node's alpha-CROWN parameters, or None. ``memo``: a dict for what
    depends on the input intervals (and the node's constants) only, shared by every walk through the
    node while those intervals stay the same (:func:`node_memo`); None: keep nothing.
    """

    node: Node
    args: tuple
    kwargs: dict
    lA: torch.Tensor | None
    uA: torch.Tensor | None
    opts: dict
    alpha_for: Callable[[str], torch.Tensor | None] = lambda direction: None
    memo: dict | None = None


@dataclass
class BackwardOut:
    """A backward rule's answer: coefficients per perturbed argument name, and bias terms."""

    A: list[tuple[str, torch.Tensor | None, torch.Tensor | None]]
    lbias: Any = 0.0
    ubias: Any = 0.0


@dataclass
class BackwardResult:
    """Bounds ``(batch, spec)``, kept coefficients, and the walk's largest coefficient tensor per spec
    row (``row_elements``, for sizing chunks of specs)."""

    lower: torch.Tensor | None
    upper: torch.Tensor | None
    A: dict[str, tuple[torch.Tensor | None, torch.Tensor | None, Any, Any]] = field(default_factory=dict)
    row_elements: int = 0


@dataclass
class PreparedRelaxation:
    """A relaxation in the form the walk applies it: ``lw``, ``d = uw - lw``, ``lb``, ``db = ub - lb``.

    ``d``/``lb``/``db`` are None where identically zero (e.g. ``lb`` of ReLU, ``d`` of a layer
    with no unstable neuron). Fields are ``(batch, *shape)``, or ``(batch, spec, *shape)`` when
    ``per_spec`` (alpha-CROWN's spec-dependent parameters).
    """

    lw: torch.Tensor
    d: torch.Tensor | None
    lb: torch.Tensor | None
    db: torch.Tensor | None
    per_spec: bool
    _channels_last: tuple | None = None

    @staticmethod
    def of(relax: Relaxation, shape: torch.Size) -> PreparedRelaxation:
        fields = [relax.lw, relax.uw - relax.lw, relax.lb, relax.ub - relax.lb]
        per_spec = any(torch.is_tensor(f) and f.dim() > len(shape) for f in fields)
        full = []
        for f in fields:
            f = torch.as_tensor(f, dtype=relax.lw.dtype, device=relax.lw.device)
            if not per_spec:
                f = torch.broadcast_to(f, shape)
            elif f.dim() <= len(shape):
                f = torch.broadcast_to(f, shape).unsqueeze(1)
            else:
                f = torch.broadcast_to(f, (shape[0], f.shape[1], *shape[1:]))
            full.append(f)
        lw, d, lb, db = full
        if per_spec:  # d = uw - lw follows the parameters: nonzero in practice, and large to scan
            return PreparedRelaxation(lw, d, *(None if is_zero(f) else f for f in (lb, db)), per_spec)
        return PreparedRelaxation(lw, *(None if is_zero(f) else f for f in (d, lb, db)), per_spec)

    def laid_out_like(self, A: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """``(lw, d, lb, db)`` in the memory layout of dense coefficients ``A`` (channels-last or not)."""
        fields = (self.lw, self.d, self.lb, self.db)
        if self.per_spec or not is_channels_last(A):
            return fields
        if self._channels_last is None:
            self._channels_last = tuple(f.contiguous(memory_format=torch.channels_last) if f is not None else None
                                        for f in fields)
        return self._channels_last

    def split_spec(self, rows: int) -> tuple[PreparedRelaxation, PreparedRelaxation]:
        """A per-spec relaxation of stacked rows as that of the first ``rows`` and that of the rest
        (views; a field shared by all rows is shared by both, as is a relaxation without spec rows)."""
        if not self.per_spec:
            return self, self
        fields = (self.lw, self.d, self.lb, self.db)

        def part(f, first: bool):
            if f is None or f.shape[1] == 1:
                return f
            return f[:, :rows] if first else f[:, rows:]

        return (PreparedRelaxation(*(part(f, True) for f in fields), self.per_spec),
                PreparedRelaxation(*(part(f, False) for f in fields), self.per_spec))

    def windows(self, P: Patches) -> tuple[torch.Tensor | None, ...]:
        """``(lw, d, lb, db)`` gathered over the windows of ``P`` (None where zero)."""
        fields = [self.lw, self.d, self.lb, self.db]
        present = [f for f in fields if f is not None]
        if self.per_spec:
            present = [f.expand(f.shape[0], P.spec, *f.shape[2:]) for f in present]
        parts = iter(P.gather(*present))
        return tuple(next(parts) if f is not None else None for f in fields)


def is_channels_last(A: torch.Tensor) -> bool:
    """Dense ``(batch, spec, C, H, W)`` coefficients stored channels-last (as the 2-D conv rule leaves them)."""
    return A.dim() == 5 and not A.is_contiguous() and A.permute(0, 1, 3, 4, 2).is_contiguous()


#: Elements of one example's coefficients from which :func:`_sum_product` goes example by example (on
#: CPU): a matrix-vector product per example is about twice as fast as one batched product with a
#: single column, and the absolute value of one example's coefficients stays in cache.
PER_EXAMPLE_ELEMENTS = 2**15


def _sum_product(A: torch.Tensor, t: torch.Tensor, per_spec: bool, absolute: bool = False) -> torch.Tensor:
    """``sum over the node of A * t`` (``|A| * t`` if ``absolute``): ``(batch, spec)``; ``t`` is
    ``(batch, *shape)`` unless ``per_spec``."""
    if is_channels_last(A):  # sum in memory order: (b, R, H, W, C) views, no copy of A
        A = A.permute(0, 1, 3, 4, 2)
        t = t.permute(0, 1, 3, 4, 2) if per_spec else t.permute(0, 2, 3, 1)
    if per_spec:
        return torch.einsum("brn,brn->br", A.abs().flatten(2) if absolute else A.flatten(2), t.flatten(2))
    flat_A, flat_t = A.flatten(2), t.reshape(t.shape[0], -1)
    if flat_A.shape[0] == 1 and flat_t.shape[0] > 1:  # coefficients shared by the batch: one matrix product
        rows = flat_A[0].abs() if absolute else flat_A[0]
        return (rows @ flat_t.T).T
    if flat_A.shape[0] > 1 and flat_A[0].numel() >= PER_EXAMPLE_ELEMENTS and flat_A.device.type == "cpu":
        tb = flat_t.shape[0] > 1
        return torch.stack([(a.abs() if absolute else a) @ flat_t[i if tb else 0] for i, a in enumerate(flat_A)])
    if absolute:
        flat_A = flat_A.abs()
    return (flat_A @ flat_t.unsqueeze(-1)).squeeze(-1)


def _relax_side(A, prep: PreparedRelaxation, upper: bool, windows=None):
    """``(A', bias)`` for one side: ``A lw + S d`` and ``sum(A lb + S db)``, ``S = pos(A)`` or ``neg(A)``.

    ``A`` is a dense tensor, or Patches with ``windows`` the relaxation gathered over them (the
    result is then clean: the windows are zero outside the node).
    """
    patches = isinstance(A, Patches)
    data = A.data if patches else A
    if patches:
        lw, d, lb, db = windows
        per_spec = True
    else:
        lw, d, lb, db = prep.laid_out_like(data)
        per_spec = prep.per_spec
        if not per_spec:
            lw, d = lw.unsqueeze(1), (d.unsqueeze(1) if d is not None else None)
    fields = (lw, d, lb, db)
    if not patches and _in_slices(data, fields):
        new = torch.empty_like(data)
        rows = max(1, SLICE_BYTES // (data[0].numel() * data.element_size()))
        biases = []
        for i in range(0, data.shape[0], rows):
            part = slice(i, i + rows)
            sliced = [f[part] if f is not None else None for f in fields]
            biases.append(_relax_dense(data[part], *sliced, per_spec, upper, out=new[part])[1])
        return new, torch.cat(biases) if torch.is_tensor(biases[0]) else 0.0
    new, bias = _relax_dense(data, lw, d, lb, db, per_spec, upper)
    return (A.with_data(new, dirty=False) if patches else new), bias


#: Dense coefficients larger than this (bytes) are relaxed a slice of the batch at a time, on CPU
SLICED_BYTES = 2**23
#: Bytes per slice (at least one example)
SLICE_BYTES = 2**20


def _in_slices(data: torch.Tensor, fields: tuple) -> bool:
    """Whether :func:`_relax_side` goes through the batch in slices of about :data:`SLICE_BYTES`.

    Why: the relaxation makes four passes over the coefficients (sign split, product, update, bias
    term). On a tensor larger than the cache each pass streams it from memory; slice by slice, the
    three after the first find it in cache. CROWN-IBP on the peer ResNet at batch 32 (40 MiB of
    coefficients per ReLU layer): 30 -> 22 ms per layer; 20 MiB: 11.8 -> 9.2 ms; one thread.
    Not under autograd (the slices are written in place), not when the fields broadcast over the
    batch, not off the CPU (a GPU has no such cache to fit).
    """
    if data.device.type != "cpu" or data.shape[0] < 2 or data.numel() * data.element_size() <= SLICED_BYTES:
        return False
    present = [f for f in fields if f is not None]
    if any(f.shape[0] != data.shape[0] for f in present):
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in (data, *present)))


def _relax_dense(data, lw, d, lb, db, per_spec: bool, upper: bool, out: torch.Tensor | None = None):
    """``(data lw + S d, sum(data lb + S db))`` with ``S = pos(data)`` (upper) or ``neg(data)``; the
    first written into ``out`` if given."""
    S = None
    if d is not None or db is not None:
        S = data.clamp(min=0) if upper else data.clamp(max=0)
    new = torch.mul(data, lw, out=out) if out is not None else data * lw
    if d is not None:
        new.addcmul_(S, d)
    bias: Any = 0.0
    if per_spec and data.numel() <= SMALL_PER_SPEC and lb is not None:
        # one product and one sum (two einsums are about ten operations, and their backward as many)
        terms = data * lb if db is None else torch.addcmul(data * lb, S, db)
        return new, terms.flatten(2).sum(-1)
    if lb is not None:
        bias = _sum_product(data, lb, per_spec)
    if db is not None:
        bias = add_bias(bias, _sum_product(S, db, per_spec))
    return new, bias


#: Coefficients (elements) up to which a per-spec bias term is summed from one product tensor
#: instead of contractions that need no such tensor (:func:`_relax_dense`)
SMALL_PER_SPEC = 2**16


def add_bias(a, b):
    """``a + b`` for bias terms that may be the number 0 (no operation then: adding a Python number to
    a tensor makes PyTorch wrap it in a tensor first, a few microseconds each, ~25 per walk)."""
    if not torch.is_tensor(a) and a == 0:
        return b
    if not torch.is_tensor(b) and b == 0:
        return a
    return a + b


def apply_relaxation(relax_l: PreparedRelaxation | None, relax_u: PreparedRelaxation | None, lA, uA):
    """Pass coefficients through ``lw x + lb <= f(x) <= uw x + ub``; returns ``(lA_x, uA_x, lbias, ubias)``.

    ``lA`` uses the lower relaxation where it is positive and the upper one where it is negative;
    ``uA`` the other way round. Coefficients may be dense tensors or Patches.
    """
    new_l = new_u = None
    lbias = ubias = 0.0
    windows_l = windows_u = None
    if isinstance(lA, Patches):
        windows_l = relax_l.windows(lA)
    if isinstance(uA, Patches):
        same = isinstance(lA, Patches) and relax_u is relax_l and uA.data.shape[1:] == lA.data.shape[1:] \
            and uA.padding == lA.padding and uA.stride == lA.stride
        windows_u = windows_l if same else relax_u.windows(uA)
    if lA is not None:
        new_l, lbias = _relax_side(lA, relax_l, False, windows_l)
    if uA is not None:
        new_u, ubias = _relax_side(uA, relax_u, True, windows_u)
    return new_l, new_u, lbias, ubias


def relaxation_of(state: PropagationState, node: Node, direction: str, alpha: torch.Tensor | None) -> Relaxation:
    """The relaxation of an element-wise node on its input's interval (cached when alpha is None).

    With alpha, the rule gets the node's memo (:func:`node_memo`): the walks from every later start
    share what does not depend on alpha.
    """
    key = ("relax", node.name)
    if alpha is None and key in state.cache:
        return state.cache[key]
    bounds = state.intervals[node.inputs[0]]
    call = _relax_call(state, node, direction, alpha, node_memo(state, node) if alpha is not None else None)
    lower, upper = bounds.lower, bounds.upper
    if alpha is not None and alpha.dim() == lower.dim() + 1:
        # spec-dependent alpha (batch, spec, *shape): the interval as (batch, 1, *shape) so that the
        # rule's elementwise formulas broadcast to (batch, spec, *shape)
        lower, upper = lower.unsqueeze(1), upper.unsqueeze(1)
    relax = state.rules(node).relaxation(lower, upper, call)
    if alpha is None:
        state.cache[key] = relax
    return relax


def node_memo(state: PropagationState, node: Node) -> dict:
    """The memo of ``node`` for this call: a dict that rules fill with results depending on the node's
    input intervals only (a layer norm's or softmax's relaxation, a curve's tangent searches), so that
    the walks from every start after the node compute them once.

    It is kept in the call's cache together with the input intervals it was made for, and replaced
    when any of them is a different object (a refined interval; a new alpha-CROWN evaluation starts
    from a fresh cache). The entry holds the intervals, so an identity test cannot meet a reused id.
    """
    inputs = tuple(state.intervals.get(name) for name in node.inputs)
    held = state.cache.get(("memo", node.name))
    if held is None or any(a is not b for a, b in zip(held[0], inputs)):
        held = state.cache[("memo", node.name)] = (inputs, {})
    return held[1]


def _relax_call(state: PropagationState, node: Node, direction: str, alpha: torch.Tensor | None,
                memo: dict | None = None) -> RelaxCall:
    args, kwargs = state.resolve_for_linear(node)
    if any(isinstance(a, Var) for a in args[1:]):
        raise NotImplementedError(f"{node.op_name}: only the first argument may be perturbed")
    return RelaxCall(tuple(args[1:]), kwargs, state.opts, alpha, direction, memo)


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


def _affine_args(state: PropagationState, node: Node) -> tuple[tuple, dict, list[str]]:
    """``resolve_for_linear`` of an affine node and its perturbed argument names (cached for the call:
    an affine op's propagation reads values only, never intervals)."""
    key = ("affine_args", node.name)
    if key not in state.cache:
        args, kwargs = state.resolve_for_linear(node)
        state.cache[key] = (args, kwargs, [v.name for v in collect_vars((args, kwargs))])
    return state.cache[key]


#: Ops whose fast backward rule maps every example of ``A`` on its own (so both sides can go in one call).
_JOINT_OPS = {torch.ops.aten.linear.default, torch.ops.aten.conv2d.default}
#: Largest coefficient tensors (elements per side) that :func:`_joint` stacks: for small ones one call
#: with twice the rows costs little more than one call (per-op overhead, small-batch kernels).
JOINT_ELEMENTS = 2**18


def _joint(rule, lA: torch.Tensor, uA: torch.Tensor, args, kwargs):
    """Both sides through ``rule`` in one call, stacked along the batch dimension; None if not applicable."""
    if lA.shape != uA.shape or lA.numel() > JOINT_ELEMENTS:
        return None
    if lA.dim() == 5 and is_channels_last(lA) and is_channels_last(uA):  # stack in memory order, keep the layout
        both = torch.cat([lA.permute(0, 1, 3, 4, 2), uA.permute(0, 1, 3, 4, 2)]).permute(0, 1, 4, 2, 3)
    elif lA.is_contiguous() and uA.is_contiguous():
        both = torch.cat([lA, uA])
    else:
        return None
    out = rule(both, args, kwargs)
    if out is None:
        return None
    b = lA.shape[0]

    def split(t, first: bool):
        return t if not torch.is_tensor(t) else (t[:b] if first else t[b:])

    return ([split(t, True) for t in out[0]], split(out[1], True)), ([split(t, False) for t in out[0]],
                                                                       split(out[1], False))


#: :func:`_shared_columns` is tried from this many elements per side, and used while the columns in
#: which the two sides differ are at most this fraction of all (per example).
SHARED_ELEMENTS, SHARED_FRACTION = 2**16, 0.5


def _shared_columns(lA: torch.Tensor, uA: torch.Tensor, args, kwargs):
    """``linear`` for two sides that differ in few input columns: ``uA W = lA W + (uA - lA) W``, the second
    product over each example's differing columns only (after the first relaxation of a walk, the sides
    differ only where that layer has unstable neurons). None if not applicable or not worth it."""
    weight = args[1]
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    if (lA.shape != uA.shape or lA.dim() != 3 or lA.numel() < SHARED_ELEMENTS or weight.dim() != 2
            or not lA.is_contiguous() or not uA.is_contiguous()):
        return None
    delta = uA - lA
    differs = delta.ne(0).any(1)  # (batch, n): columns where the sides differ
    width = int(differs.sum(1).max())
    if width > SHARED_FRACTION * lA.shape[-1]:
        return None
    low = lA @ weight
    if width > 0:
        # each example's differing columns first (padding columns have delta == 0 and add nothing)
        index = differs.to(torch.int8).argsort(dim=1, descending=True, stable=True)[:, :width]
        picked = delta.gather(2, index.unsqueeze(1).expand(-1, lA.shape[1], -1))
        up = torch.baddbmm(low, picked, weight[index])
    else:
        up = low.clone()
    lbias = ubias = 0.0
    if bias is not None:
        lbias, ubias = lA @ bias, uA @ bias
    return ([low], lbias), ([up], ubias)


def _fast_affine(state: PropagationState, node: Node, rule, lA, uA) -> BackwardOut | None:
    args, kwargs, names = _affine_args(state, node)
    if any(name not in state.batched for name in names):
        return None
    if (node.target == torch.ops.aten.linear.default and torch.is_tensor(lA) and torch.is_tensor(uA)
            and lA is not uA and len(names) == 1 and lA.dim() == 3):
        sides = _shared_columns(lA, uA, args, kwargs)
        if sides is not None:
            return BackwardOut(list(zip(names, sides[0][0], sides[1][0])), sides[0][1], sides[1][1])
    if (node.target in _JOINT_OPS and torch.is_tensor(lA) and torch.is_tensor(uA) and lA is not uA
            and len(names) == 1):
        sides = _joint(rule, lA, uA, args, kwargs)
        if sides is not None:
            return BackwardOut(list(zip(names, sides[0][0], sides[1][0])), sides[0][1], sides[1][1])
    low = rule(lA, args, kwargs) if lA is not None else ([None] * len(names), 0.0)
    if uA is lA and uA is not None:  # same coefficients on both sides (before the first relaxation)
        up = low
    else:
        up = rule(uA, args, kwargs) if uA is not None else ([None] * len(names), 0.0)
    if low is None or up is None:
        return None
    return BackwardOut(list(zip(names, low[0], up[0])), low[1], up[1])


def ancestors(state: PropagationState, name: str) -> frozenset[str]:
    """``graph.ancestors(name)``, cached (see :meth:`PropagationState.ancestors`)."""
    return state.ancestors(name)


def prepared_relaxation(state: PropagationState, node: Node, direction: str,
                        alpha: torch.Tensor | None) -> PreparedRelaxation:
    """:func:`relaxation_of` in the form the walk applies it (cached when alpha is None)."""
    key = ("relax_prep", node.name)
    if alpha is None and key in state.cache:
        return state.cache[key]
    bounds = state.intervals[node.inputs[0]]
    fast = state.rules(node).prepared
    fields = fast(bounds.lower, bounds.upper, _relax_call(state, node, direction, None)) if (
        fast is not None and alpha is None) else None
    if fields is not None:
        prep = PreparedRelaxation(*fields, per_spec=False)
    else:
        prep = PreparedRelaxation.of(relaxation_of(state, node, direction, alpha), bounds.lower.shape)
    if alpha is None:
        state.cache[key] = prep
    return prep


def _full_batch(state: PropagationState, A):
    """Dense, contiguous coefficients with the batch dimension spelled out (for rules that expect it)."""
    if isinstance(A, Patches):
        A = A.to_dense()
    if A is not None and A.shape[0] != state.batch_size:
        A = A.expand(state.batch_size, *A.shape[1:])
    return A.contiguous() if A is not None else None


def _window_relaxation(state: PropagationState, node: Node, lA: Patches | None, uA: Patches | None,
                       windows_for) -> BackwardOut | None:
    """A parametrised relaxation applied to Patches in window layout (alpha-CROWN, patch-form walks).

    Row ``r`` of Patches ``P`` only multiplies the node's neurons inside its window, so its
    parameters are ``alpha[b, r, c, i, j]`` (``(batch, R, C, kh, kw)``) and the relaxation is
    evaluated on the interval gathered over the same windows::

        l_w, u_w = P.gather(l, u);   relaxation(l_w, u_w; alpha)  ->  lw, uw, lb, ub  (batch, R, C, kh, kw)

    The dense alternative, ``alpha`` of shape ``(batch, R, C, H, W)`` with the relaxation evaluated
    over the whole map for every row and then gathered, holds the same free values (entries outside
    a row's window have no effect) at ``H W / (kh kw)`` times the memory and work. Window entries
    outside the node meet ``l = u = 0`` and coefficients cleaned to zero. None if the lookup has
    no window parameters for this node.
    """
    x_name = node.inputs[0]
    args, kwargs = state.resolve_for_linear(node)
    if any(isinstance(a, Var) for a in args[1:]):
        return None
    iv = state.intervals[x_name]
    relaxation = state.rules(node).relaxation
    sides: list[tuple[Any, Any]] = []
    for direction, A in (("lower", lA), ("upper", uA)):
        if A is None:
            sides.append((None, 0.0))
            continue
        alpha = windows_for(node.name, direction, A)
        if alpha is None:
            return None
        A = A.clean()
        lo, hi = A.gather(iv.lower, iv.upper)
        relax = relaxation(lo, hi, RelaxCall(tuple(args[1:]), kwargs, state.opts, alpha, direction))
        prep = PreparedRelaxation.of(relax, lo.shape)
        sides.append(_relax_side(A, prep, direction == "upper", (prep.lw, prep.d, prep.lb, prep.db)))
    return BackwardOut([(x_name, sides[0][0], sides[1][0])], sides[0][1], sides[1][1])


def _patches_out(state: PropagationState, node: Node, lA, uA, alpha_for: AlphaLookup | None) -> BackwardOut | None:
    """Propagation of Patches coefficients (both sides in patch form, or None); None if no patch rule."""
    entry = state.rules(node)
    if entry.relaxation is not None and not state.is_affine_here(node):
        windows_for = getattr(alpha_for, "windows", None)
        if windows_for is not None and entry.alpha is not None:
            out = _window_relaxation(state, node, lA, uA, windows_for)
            if out is not None:
                return out
        return _relax_node(state, node, lA, uA, alpha_for)
    rule = patch_rule_for(node)
    if rule is None or not state.is_affine_here(node):
        return None
    args, kwargs, _ = _affine_args(state, node)
    low = rule(state, node, args, kwargs, lA) if lA is not None else ([], 0.0)
    up = low if uA is lA else rule(state, node, args, kwargs, uA) if uA is not None else ([], 0.0)
    if low is None or up is None:
        return None
    names = list(dict.fromkeys([n for n, _ in low[0]] + [n for n, _ in up[0]]))
    lows, ups = dict(low[0]), dict(up[0])
    return BackwardOut([(n, lows.get(n), ups.get(n)) for n in names], low[1], up[1])


def propagate_node(state: PropagationState, node: Node, lA, uA, alpha_for: AlphaLookup | None) -> BackwardOut:
    """Coefficients of a node's output -> coefficients of its perturbed inputs.

    ``lA``/``uA``: dense ``(batch or 1, spec, *out)`` tensors, Patches, or None.
    """
    if isinstance(lA, Patches) or isinstance(uA, Patches):
        if (lA is None or isinstance(lA, Patches)) and (uA is None or isinstance(uA, Patches)):
            out = _patches_out(state, node, lA, uA, alpha_for)
            if out is not None:
                return out
        same = uA is lA
        lA = lA.to_dense() if isinstance(lA, Patches) else lA
        uA = lA if same else uA.to_dense() if isinstance(uA, Patches) else uA
    entry = state.rules(node)
    if state.is_affine_here(node):
        if entry.affine_backward is not None:
            out = _fast_affine(state, node, entry.affine_backward, lA, uA)
            if out is not None:
                return out
        same = uA is lA
        lA = _full_batch(state, lA)
        uA = lA if same else _full_batch(state, uA)
        pb = _pullback(state, node)
        names = [v.name for v in pb.vars]
        lAs = pb.backward(lA) if lA is not None else [None] * len(names)
        lbias = pb.bias(lA) if lA is not None else 0.0
        if uA is lA and uA is not None:
            uAs, ubias = lAs, lbias
        else:
            uAs = pb.backward(uA) if uA is not None else [None] * len(names)
            ubias = pb.bias(uA) if uA is not None else 0.0
        return BackwardOut(list(zip(names, lAs, uAs)), lbias, ubias)
    if entry.relaxation is not None:
        return _relax_node(state, node, lA, uA, alpha_for)
    if entry.backward is not None:
        lA, uA = _full_batch(state, lA), _full_batch(state, uA)
        args, kwargs = state.resolve_for_linear(node)
        lookup = (lambda d: alpha_for(node.name, d)) if alpha_for else (lambda d: None)
        return entry.backward(BackwardCall(node, args, kwargs, lA, uA, state.opts, lookup, node_memo(state, node)))
    raise NotImplementedError(f"no linear bound rule for {node.op_name} <- {node.source or node.name}")


def _relax_node(state: PropagationState, node: Node, lA, uA, alpha_for) -> BackwardOut:
    """Pass both sides' coefficients through the relaxation of an element-wise ``node``."""
    alpha_l = alpha_for(node.name, "lower") if (alpha_for and lA is not None) else None
    alpha_u = alpha_for(node.name, "upper") if (alpha_for and uA is not None) else None
    if _joinable(state, node, lA, uA, alpha_l, alpha_u):
        joint = prepared_relaxation(state, node, "lower", torch.cat([alpha_l, alpha_u], 1))
        relax_l, relax_u = joint.split_spec(alpha_l.shape[1])
    else:
        relax_l = prepared_relaxation(state, node, "lower", alpha_l) if lA is not None else None
        relax_u = prepared_relaxation(state, node, "upper", alpha_u) if uA is not None else None
    new_l, new_u, lbias, ubias = apply_relaxation(relax_l, relax_u, lA, uA)
    return BackwardOut([(node.inputs[0], new_l, new_u)], lbias, ubias)


def _joinable(state: PropagationState, node: Node, lA, uA, alpha_l, alpha_u) -> bool:
    """Whether both sides' relaxations of ``node`` come from one call, their alpha-CROWN parameters
    stacked along the spec dimension: dense coefficients on both sides, each with spec-dependent
    parameters ``(batch, spec, *shape)``. Relaxations are element-wise, so each side gets the lines
    its own call would give, for half the calls (each is tens of small operations and as many
    autograd nodes; alpha-CROWN makes one per side, node and walk at every evaluation)."""
    if alpha_l is None or alpha_u is None or isinstance(lA, Patches) or isinstance(uA, Patches):
        return False
    dim = state.intervals[node.inputs[0]].lower.dim() + 1
    return (alpha_l.dim() == alpha_u.dim() == dim and alpha_l.shape[0] == alpha_u.shape[0]
            and alpha_l.shape[2:] == alpha_u.shape[2:])


def _row_elements(A) -> int:
    if A is None:
        return 0
    data = A.data if isinstance(A, Patches) else A
    return data.numel() // max(1, data.shape[1])


def _box(state: PropagationState, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Centre and radius of a leaf's L-inf/box perturbation set (cached), or None for other sets."""
    ptb = state.perturbations[name]
    if not (isinstance(ptb, PerturbationLpNorm) and (ptb.norm == float("inf") or ptb._box_only())):
        return None
    key = ("box", name)
    if key not in state.cache:
        box = ptb.interval(state.values[name])
        state.cache[key] = box.center_radius()
    return state.cache[key]


def _concretize(state: PropagationState, name: str, A, sign: int) -> torch.Tensor:
    """``min`` (sign -1) / ``max`` (+1) of ``A . leaf`` over the leaf's perturbation set: ``(batch, spec)``."""
    ptb, x = state.perturbations[name], state.values[name]
    box = _box(state, name) if name in state.batched else None
    if isinstance(A, Patches):
        if box is not None and x.dim() == 4:
            return A.concretize_box(*box, sign)
        A = A.to_dense()
    if box is not None:  # A . c +- |A| . r, summed in A's memory order
        center, radius = box
        return _sum_product(A, center, False) + sign * _sum_product(A, radius, False, absolute=True)
    if not isinstance(ptb, PerturbationLpNorm):
        A = _full_batch(state, A)
    return ptb.concretize(x, A.contiguous(), sign)


#: Dense specifications of at most this many rows are walked as one side (see :func:`backward`).
STACK_ROWS = 64


def backward(state: PropagationState, start: str, C, lower: bool = True, upper: bool = True,
             alpha_for: AlphaLookup | None = None, keep_A: set[str] | None = None) -> BackwardResult:
    """Bounds of ``C y`` (``y`` = node ``start``) by one backward walk.

    Arguments:
        C: ``(batch, spec, *y.shape[1:])`` (a batch dimension of 1 broadcasts), or
            :class:`~boundprop.domains.patches.Patches` on ``y``.
        alpha_for: alpha-CROWN parameters per (node, direction), or None for CROWN's defaults.
        keep_A: names of perturbed leaves/nodes whose coefficients are returned in ``A``
            (as ``(lA, uA, lbias, ubias)`` with the bias accumulated up to that point; dense,
            ``(batch, spec, *shape)``).

    Returns lower/upper of shape ``(batch, spec)`` (None for a side not asked for).

    **Stacked sides.** ``max C y = -min (-C) y``, and without alpha both sides use the same
    relaxation of every node, so the upper bound of ``C y`` is minus the lower bound of ``-C y``
    found by the same walk: a small dense ``C`` (at most :data:`STACK_ROWS` rows) is walked as the
    lower side of ``[C; -C]`` alone, when every node on the way is affine or an element-wise
    relaxation. The bounds are the same; the walk makes half as many (twice as large) tensor
    operations and no longer stacks and splits the sides at each affine op, which is what the
    cost is made of at small batches (CROWN-IBP's final walk: 20 rows where the sides are 10 each).
    """
    if (lower and upper and alpha_for is None and not keep_A and torch.is_tensor(C) and C.dim() >= 2
            and C.shape[1] <= STACK_ROWS and _plain_walk(state, start)):
        spec = C.shape[1]
        res = _walk(state, start, torch.cat([C, -C], 1), True, False, None, None)
        return BackwardResult(res.lower[:, :spec], -res.lower[:, spec:], {}, res.row_elements)
    return _walk(state, start, C, lower, upper, alpha_for, keep_A)


def _plain_walk(state: PropagationState, start: str) -> bool:
    """Whether every perturbed node the walk from ``start`` visits is affine here or has an element-wise
    relaxation (so that neither side has rules of its own; cached with the graph's static facts)."""
    known = state.static.setdefault("plain_walk", {})
    answer = known.get(start)
    if answer is None:
        answer = known[start] = all(
            state.is_affine_here(node) or state.rules(node).relaxation is not None
            for node in state.graph.nodes
            if node.name in state.perturbed and node.name not in state.perturbations
            and node.name in ancestors(state, start))
    return answer


def _walk(state: PropagationState, start: str, C, lower: bool, upper: bool, alpha_for: AlphaLookup | None,
          keep_A: set[str] | None) -> BackwardResult:
    """:func:`backward` with the sides as asked."""
    graph = state.graph
    needed = ancestors(state, start)
    batch = state.batch_size
    spec = C.spec if isinstance(C, Patches) else C.shape[1]
    ref = C.data if isinstance(C, Patches) else C
    coeffs: dict[str, list] = {start: [C if lower else None, C if upper else None]}
    lbias: Any = 0.0
    ubias: Any = 0.0
    A_out: dict[str, tuple] = {}
    leaves_seen: dict[str, list] = {}
    peak = 0
    for node in reversed(graph.nodes):
        if node.name not in needed or node.name not in coeffs:
            continue
        lA, uA = coeffs.pop(node.name)
        peak = max(peak, _row_elements(lA), _row_elements(uA))
        if keep_A and node.name in keep_A:
            A_out[node.name] = (_full_batch(state, lA), _full_batch(state, uA), lbias, ubias)
        out = propagate_node(state, node, lA, uA, alpha_for)
        lbias = add_bias(lbias, out.lbias)
        ubias = add_bias(ubias, out.ubias)
        for name, new_l, new_u in out.A:
            if name not in state.perturbed:
                continue
            slot = coeffs.setdefault(name, [None, None])
            slot[0] = add_coefficients(slot[0], new_l)
            slot[1] = add_coefficients(slot[1], new_u)
    for name, (lA, uA) in coeffs.items():
        if name not in state.perturbations:
            raise RuntimeError(f"backward walk left coefficients at non-leaf {name}")
        leaves_seen[name] = [lA, uA]
    low = lbias if lower else None
    up = ubias if upper else None
    for name, (lA, uA) in leaves_seen.items():
        peak = max(peak, _row_elements(lA), _row_elements(uA))
        if keep_A and name in keep_A:
            A_out[name] = (_full_batch(state, lA), _full_batch(state, uA), lbias, ubias)
        if lower and lA is not None:
            low = low + _concretize(state, name, lA, -1)
        if upper and uA is not None:
            up = up + _concretize(state, name, uA, +1)
    shape = (batch, spec)
    return BackwardResult(_as_bound(low, shape, ref), _as_bound(up, shape, ref), A_out, peak)


def _as_bound(value, shape: tuple[int, int], ref: torch.Tensor) -> torch.Tensor | None:
    """A ``(batch, spec)`` tensor from a bias sum that may be a number or broadcast over the batch."""
    if value is None:
        return None
    if not torch.is_tensor(value):
        return torch.full(shape, float(value), dtype=ref.dtype, device=ref.device)
    return value if value.shape == shape else value.expand(shape).clone()

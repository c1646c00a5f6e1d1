"""Loss fusion: a sound, numerically stable upper bound of the robust cross-entropy.

The graph of :class:`~boundprop.training.wrappers.CrossEntropyWrapper` ends with

    z = y - gather(y, -1, labels[:, None])       (z_label = 0 exactly)
    g = sum_j exp(z_j)                           (batch, 1), g = exp(CE(y, label))

and ``log(upper bound of g)`` bounds ``max CE`` over the perturbation. :func:`fused_bounds`
computes it in three steps, with one backward walk (one specification row) for any number of
classes ``K``:

1. **Interval of z** (IBP, the way CROWN-IBP takes its intermediate bounds). When ``y`` is a
   linear layer ``y = h W^T + b`` with constant weights, ``z = h (W - W_label)^T + (b - b_label)``
   is bounded directly from the interval of ``h`` (centre/radius through the per-sample weight
   difference): the "elided" IBP of auto_LiRPA's ``_IBP_loss_fusion``, as tight as IBP with the
   margin specification folded into the last layer. Cost: ``batch * K * in`` operations like the
   head's own product, but computed per distinct label (:func:`elided_radius`) so that no
   ``(batch, K, in)`` tensor is stored: memory ``O(K in + batch K)``. Otherwise
   ``z`` is bounded from ``y``'s interval (``[l_j - u_label, u_j - l_label]``, ``z_label = 0``).
   With ``method="crown"`` these intervals are also intersected with CROWN bounds of ``z``
   (``K`` specification rows, as unfused CROWN would cost).
2. **Shift.** ``m = max_j u_j`` per sample (``u_j`` the upper ends of z; ``m >= 0`` since
   ``z_label = 0``; detached). Every exponential is evaluated as ``exp(z_j - m) <= 1``, so nothing
   overflows whatever the width of the bounds, and ``g = exp(m) * sum_j exp(z_j - m)``.
3. **Bound of the shifted sum** ``s = sum_j exp(z_j - m)``:

   * IBP: ``s <= sum_j exp(u_j - m)``;
   * CROWN-IBP / CROWN: the upper line of ``exp`` on ``[l_j - m, u_j - m]`` (the chord,
     :func:`exp_chord`: the registered ``exp`` rule's upper line in a few element-wise passes, with
     outward rounding),
     ``exp(z_j - m) <= a_j z_j + c_j``, makes ``s <= sum_j a_j (y_j - y_label) + sum_j c_j``
     ``= (a - (sum_j a_j) e_label) . y + sum_j c_j``: ONE linear specification row on the logits,
     bounded by one CROWN walk. The result is intersected with the IBP bound.

Cost of a fused CROWN-IBP bound: IBP through the body and the head, the elided interval (above),
``O(K)`` element-wise work per sample for the chords, and one backward walk with one row. No
``K``-row specification and no CROWN bound of an intermediate layer is built (those are only for
``method="crown"``), so the cost over a plain IBP pass grows with ``K`` only as the head does.

The loss is ``log_ub = log(s_ub) + m`` (then at least 0, since ``g >= exp(z_label) = 1``), never
``log(exp(...))`` of an overflowed number. :class:`FusedBound` keeps ``log_ub`` (what training
minimises), the shift ``m`` and the shifted bound ``s_ub``; its ``ub = exp(log_ub)`` is the plain
upper bound of ``g`` (what auto_LiRPA's ``compute_bounds`` returns on a fused module), which may
overflow to ``inf`` in float32 when the robust loss exceeds ~88, so training should use
``log_ub`` (or :func:`fused_robust_ce`). The decomposition ``log_ub = log(s_ub) + m`` is exact
for any ``m`` (the chord of ``exp(z - m)`` is ``exp(-m)`` times the chord of ``exp(z)``), so the
detached shift changes neither the value nor the gradient.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..algorithms.backward import backward
from ..algorithms.crown import refine_intermediate
from ..algorithms.ibp import ibp
from ..algorithms.run import canonical_method
from ..algorithms.state import PropagationState, make_state
from ..domains import Interval
from ..graph.ir import Graph, Ref
from ..perturbation import Perturbation

aten = torch.ops.aten

#: Methods with a fused path (others fall back to the generic engine on the wrapper's graph).
FUSED_METHODS = ("ibp", "crown-ibp", "crown")


@dataclass(frozen=True)
class FusionPattern:
    """Node names of ``g = sum(exp(y - gather(y, -1, index)), -1, keepdim=True)`` in a graph."""

    logits: str  # y, (batch, K)
    diff: str  # z = y - y_label
    index: str  # the (batch, 1) label index (not perturbed)
    output: str  # g


@dataclass(frozen=True)
class FusedBound:
    """Upper bounds of ``g = exp(CE)`` per sample (each ``(batch, 1)``).

    Attributes:
        log_ub: ``log`` of the upper bound of ``g``: an upper bound of the worst-case CE (>= 0).
        shift: the per-sample shift ``m`` (detached).
        ub_shifted: the bound of ``sum_j exp(z_j - m)``; ``log_ub = log(ub_shifted) + shift``.
        log_ub_ibp: the IBP part alone (equal to ``log_ub`` for method IBP).
        log_ub_crown: the CROWN(-IBP) part alone, before intersecting with IBP (None for IBP).
        z: the interval of the logit differences ``y_j - y_label`` used.
    """

    log_ub: torch.Tensor
    shift: torch.Tensor
    ub_shifted: torch.Tensor
    log_ub_ibp: torch.Tensor
    log_ub_crown: torch.Tensor | None
    z: Interval

    @property
    def ub(self) -> torch.Tensor:
        """The upper bound of ``g`` itself (may be ``inf`` when ``log_ub`` exceeds the dtype's range)."""
        return torch.exp(self.log_ub)


def _ref(arg: Any) -> str | None:
    return arg.name if isinstance(arg, Ref) else None


def _last_dim(dims: Any, ndim: int) -> bool:
    if isinstance(dims, (list, tuple)):
        if len(dims) != 1:
            return False
        dims = dims[0]
    return isinstance(dims, int) and dims in (-1, ndim - 1)


def match_loss_fusion(graph: Graph) -> FusionPattern | None:
    """Find the wrapper's ``sum(exp(y - gather(y, -1, idx)), -1, keepdim=True)`` ending, or None."""
    if not graph.has_node(graph.output):
        return None
    out = graph.node(graph.output)
    if out.target != aten.sum.dim_IntList or len(out.args) < 2 or not _last_dim(out.args[1], 2):
        return None
    if not (len(out.args) > 2 and out.args[2]) and not out.kwargs.get("keepdim", False):
        return None
    exp_name = _ref(out.args[0])
    if exp_name is None or not graph.has_node(exp_name) or graph.node(exp_name).target != aten.exp.default:
        return None
    diff_name = _ref(graph.node(exp_name).args[0])
    if diff_name is None or not graph.has_node(diff_name):
        return None
    diff = graph.node(diff_name)
    if diff.target != aten.sub.Tensor or diff.kwargs.get("alpha", 1) != 1 or len(diff.args) != 2:
        return None
    y_name, g_name = _ref(diff.args[0]), _ref(diff.args[1])
    if y_name is None or g_name is None or not graph.has_node(g_name):
        return None
    gather = graph.node(g_name)
    if gather.target != aten.gather.default or _ref(gather.args[0]) != y_name or not _last_dim(gather.args[1], 2):
        return None
    index = _ref(gather.args[2])
    if index is None:
        return None
    return FusionPattern(y_name, diff_name, index, out.name)


def _labels(state: PropagationState, pattern: FusionPattern) -> torch.Tensor:
    return state.values[pattern.index].reshape(-1).long()


def _label_groups(labels: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """``[(label, indices of the samples with that label), ...]`` for the distinct labels."""
    order = torch.argsort(labels, stable=True)
    values, counts = torch.unique_consecutive(labels[order], return_counts=True)
    return list(zip(values.tolist(), torch.split(order, counts.tolist())))


class _ElidedRadius(torch.autograd.Function):
    """``r[b, j] = sum_i |W[j, i] - W[label_b, i]| rad[b, i]``, ``(batch, K)``.

    Computed per distinct label ``c``: ``|W - W_c|`` (``(K, in)``, one at a time) times the radii of
    the samples labelled ``c`` (a matrix product). No ``(batch, K, in)`` tensor is built or kept for
    autograd (the backward pass recomputes ``W - W_c`` per label): memory ``O(K in + batch K)``,
    work ``O(labels K in)`` element-wise plus matrix products of the head's size.
    Gradients: ``dr/drad = |W_j - W_c|``; ``dr/dW_j = sign(W_j - W_c) rad`` and, for the label row,
    minus the sum of those over ``j``.
    """

    @staticmethod
    def forward(ctx, weight: torch.Tensor, rad: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        groups = _label_groups(labels)
        out = rad.new_empty(rad.shape[0], weight.shape[0])
        for label, idx in groups:
            out[idx] = rad[idx] @ (weight - weight[label]).abs_().T
        ctx.save_for_backward(weight, rad)
        ctx.groups = groups
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        weight, rad = ctx.saved_tensors
        need_w, need_rad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_w = torch.zeros_like(weight) if need_w else None
        grad_rad = torch.empty_like(rad) if need_rad else None
        for label, idx in ctx.groups:
            diff = weight - weight[label]  # (K, in)
            g = grad[idx]  # (n, K)
            if need_rad:
                grad_rad[idx] = g @ diff.abs()
            if need_w:
                part = (g.T @ rad[idx]).mul_(diff.sign_())  # (K, in)
                grad_w += part
                grad_w[label] -= part.sum(0)
        return grad_w, grad_rad, None


#: Up to this many elements ``batch * K * in``, :func:`elided_radius` builds the ``(batch, K, in)``
#: difference tensor directly (fewer, larger operations); above, it goes label by label.
ELIDED_DIRECT_ELEMENTS = 2**20


def elided_radius(weight: torch.Tensor, rad: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``sum_i |W[j, i] - W[labels_b, i]| rad[b, i]`` as ``(batch, K)`` (see :class:`_ElidedRadius`).

    Small problems (at most :data:`ELIDED_DIRECT_ELEMENTS` elements ``batch * K * in``) use the
    direct ``(batch, K, in)`` expression with plain autograd, which is faster there; larger ones
    the label-by-label :class:`_ElidedRadius`, whose memory does not grow with ``batch * K * in``.
    """
    if rad.shape[0] * weight.numel() <= ELIDED_DIRECT_ELEMENTS:
        diff = weight.unsqueeze(0) - weight[labels].unsqueeze(1)  # (batch, K, in)
        return torch.bmm(diff.abs(), rad.unsqueeze(-1)).squeeze(-1)
    return _ElidedRadius.apply(weight, rad, labels)


def _elided_diff_interval(state: PropagationState, pattern: FusionPattern, labels: torch.Tensor) -> Interval | None:
    """IBP of ``z = h (W - W_label)^T + (b - b_label)`` when ``y = linear(h, W, b)`` with constant W, b.

    Centre ``c_h (W_j - W_label)`` and radius ``|W_j - W_label| r_h`` (:func:`elided_radius`): the
    interval of ``z`` that IBP with the margin specification merged into the last layer gives.
    """
    graph = state.graph
    node = graph.node(pattern.logits) if graph.has_node(pattern.logits) else None
    if node is None or node.target != aten.linear.default:
        return None
    h_name = _ref(node.args[0])
    w_name = _ref(node.args[1])
    b_name = _ref(node.args[2]) if len(node.args) > 2 else None
    if h_name is None or w_name is None or w_name in state.perturbed or b_name in state.perturbed:
        return None
    h = state.intervals.get(h_name)
    if h is None or h.lower.dim() != 2:
        return None
    weight = state.values[w_name]  # (K, in)
    center = h.center @ weight.T
    center = center - center.gather(-1, labels.unsqueeze(-1))
    radius = elided_radius(weight, h.radius, labels)
    if b_name is not None:
        bias = state.values[b_name]
        center = center + (bias.unsqueeze(0) - bias[labels].unsqueeze(1))
    return Interval(center - radius, center + radius)


def exp_chord(low: torch.Tensor, high: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A sound upper line of ``exp`` on ``[low, high]``: ``exp(w) <= a w + c`` there.

    ``a`` is the chord slope (``(e^h - e^l) / (h - l)``, or its Taylor series
    ``e^l (1 + d/2 + d^2/6 + d^3/24)`` for widths ``d < 1e-2``, which keeps the value and its
    gradient accurate). Whatever the accuracy of ``a``, the line is sound because ``exp`` is
    convex: ``c = max(e^l - a l, e^h - a h)`` puts the line above both ends, hence above ``exp``
    between them; ``c`` is then raised by 16 units of rounding (of the dtype) relative to the
    magnitudes involved (``exp``'s and the products' rounding). Where ``low = -inf`` the line is the
    constant ``e^h``. Element-wise, a few passes over ``(batch, K)``: the same line as the registered
    ``exp`` rule's upper relaxation, without its general machinery (float64, both lines, alpha).
    Intended for the shifted differences (``high <= 0``, so nothing overflows).
    """
    finite = torch.isfinite(low)
    low = torch.where(finite, low, high)  # an unbounded end gets the constant e^h (slope 0) below
    width = (high - low).clamp_min(0.0)
    e_low, e_high = torch.exp(low), torch.exp(high)
    small = width < 1e-2
    w_small = torch.where(small, width, torch.zeros_like(width))
    taylor = e_low * (1.0 + w_small * (0.5 + w_small * (1.0 / 6.0 + w_small / 24.0)))
    chord = (e_high - e_low) / torch.where(small, torch.ones_like(width), width)
    slope = torch.where(small, taylor, chord)
    at_low, at_high = slope * low, slope * high
    offset = torch.maximum(e_low - at_low, e_high - at_high)
    slack = 16 * torch.finfo(low.dtype).eps * (e_low + e_high + at_low.abs() + at_high.abs())
    offset = offset + slack + torch.finfo(low.dtype).tiny
    return torch.where(finite, slope, torch.zeros_like(slope)), torch.where(finite, offset, e_high + slack)


def _diff_spec(labels: torch.Tensor, num_classes: int, dtype: torch.dtype) -> torch.Tensor:
    """``C`` with ``(C y)_j = y_j - y_label``: ``(batch, K, K)`` (row ``label`` is zero)."""
    eye = torch.eye(num_classes, dtype=dtype, device=labels.device)
    return eye.unsqueeze(0) - eye[labels].unsqueeze(1)


def _zero_label(interval: Interval, labels: torch.Tensor) -> Interval:
    """``z_label = y_label - y_label = 0`` exactly."""
    keep = torch.ones_like(interval.lower, dtype=torch.bool)
    keep[torch.arange(labels.shape[0], device=labels.device), labels] = False
    zero = torch.zeros((), dtype=interval.lower.dtype, device=interval.lower.device)
    return Interval(torch.where(keep, interval.lower, zero), torch.where(keep, interval.upper, zero))


def diff_interval(state: PropagationState, pattern: FusionPattern, labels: torch.Tensor, method: str,
                  elide: bool = True) -> Interval:
    """The interval of ``z = y - y_label`` (step 1 of the module docstring)."""
    y = state.intervals[pattern.logits]
    lab_l = y.lower.gather(-1, labels.unsqueeze(-1))
    lab_u = y.upper.gather(-1, labels.unsqueeze(-1))
    z = Interval(y.lower - lab_u, y.upper - lab_l)
    if elide:
        tight = _elided_diff_interval(state, pattern, labels)
        if tight is not None:
            z = z.intersect(tight)
    if method == "crown":
        C = _diff_spec(labels, y.lower.shape[-1], y.lower.dtype)
        res = backward(state, pattern.logits, C, lower=True, upper=True)
        z = z.intersect(Interval(res.lower, res.upper))
    return _zero_label(z, labels)


def fused_bounds(graph: Graph, inputs: Sequence[torch.Tensor], perturbations: Mapping[str, Perturbation],
                 method: str = "crown-ibp", opts: Mapping[str, Any] | None = None,
                 pattern: FusionPattern | None = None) -> FusedBound:
    """Upper bound of ``g = sum_j exp(y_j - y_label)`` on a loss-fusion graph (module docstring).

    Arguments:
        graph: the captured :class:`~boundprop.training.wrappers.CrossEntropyWrapper` (or any graph
            ending in the same ops).
        inputs: its nominal inputs (``(x, labels)``, or ``(labels, *x)`` for the multi-input wrapper).
        perturbations: leaf name -> perturbation (inputs only).
        method: ``"IBP"``, ``"CROWN-IBP"`` or ``"CROWN"`` (auto_LiRPA aliases accepted).
        opts: bound options; ``no_ibp_loss_fusion=True`` turns the elided IBP of step 1 off.
    Raises:
        ValueError: the graph does not end with the fused cross-entropy, or an unsupported method.
    """
    method = canonical_method(method)
    if method not in FUSED_METHODS:
        raise ValueError(f"loss fusion supports {FUSED_METHODS}, got {method!r}")
    pattern = pattern or match_loss_fusion(graph)
    if pattern is None:
        raise ValueError("the graph does not end with sum(exp(y - gather(y, -1, labels))): wrap the model "
                         "in boundprop.CrossEntropyWrapper")
    opts = dict(opts or {})
    state = make_state(graph, tuple(inputs), perturbations, None, opts)
    if pattern.logits not in state.perturbed:
        raise ValueError("the logits do not depend on a perturbed input")
    ibp(state, until=pattern.logits)
    if method == "crown":
        refine_intermediate(state, pattern.logits)
    labels = _labels(state, pattern)
    z = diff_interval(state, pattern, labels, method, elide=not opts.get("no_ibp_loss_fusion", False))
    shift = z.upper.amax(-1, keepdim=True).detach()  # (batch, 1), >= 0
    low, high = z.lower - shift, z.upper - shift
    ibp_shifted = torch.exp(high).sum(-1, keepdim=True)
    log_ibp = _log_ub(ibp_shifted, shift)
    if method == "ibp":
        return FusedBound(log_ibp, shift, ibp_shifted, log_ibp, None, z)
    slope, intercept = exp_chord(low, high)
    # exp(z - m) <= a (z - m) + c = a z + (c - a m)
    offset = (intercept - slope * shift).sum(-1, keepdim=True)
    # the labels' one-hot rows by comparison (``one_hot`` reads their range on the host: a sync per step)
    is_label = (torch.arange(low.shape[-1], device=labels.device) == labels.unsqueeze(-1)).to(slope.dtype)
    row = slope - slope.sum(-1, keepdim=True) * is_label
    res = backward(state, pattern.logits, row.unsqueeze(1), lower=False, upper=True)
    crown_shifted = res.upper + offset
    log_crown = _log_ub(crown_shifted, shift)
    shifted = torch.minimum(crown_shifted, ibp_shifted)
    return FusedBound(_log_ub(shifted, shift), shift, shifted, log_ibp, log_crown, z)


def _log_ub(shifted: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``max(log(s) + m, 0)``: ``g >= 1`` always (its label term is ``exp(0)``), so 0 is a sound floor
    that also covers a bound rounded to 0 or below."""
    tiny = torch.finfo(shifted.dtype).tiny
    return (torch.log(shifted.clamp_min(tiny)) + shift).clamp_min(0.0)


def fused_robust_ce(module: Any, x: Any = None, method: str = "CROWN-IBP", reduction: str = "mean") -> torch.Tensor:
    """The robust CE upper bound from a fused :class:`~boundprop.BoundedModule` (``loss_fusion=True``).

    ``x``: ``(BoundedTensor(x, ptb), labels)`` as for ``compute_bounds`` (None: the last inputs).
    Returns ``log_ub`` averaged (``reduction="mean"``), summed, or per sample (``"none"``, (batch,)).
    """
    module.compute_bounds(x=x, method=method, bound_lower=False, bound_upper=True)
    fused = getattr(module, "fused_bound", None)
    if fused is None:
        raise ValueError("the module did not take the fused path: build it with bound_opts={'loss_fusion': True} "
                         "around boundprop.CrossEntropyWrapper(model)")
    per_sample = fused.log_ub.reshape(-1)
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    return per_sample


__all__ = ["FUSED_METHODS", "FusedBound", "FusionPattern", "diff_interval", "fused_bounds", "fused_robust_ce",
           "match_loss_fusion"]

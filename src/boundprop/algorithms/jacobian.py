"""Bounds on the Jacobian ``d y_i / d x_j`` over an input set, and local Lipschitz constants.

For a network ``y = f_L(... f_1(x))`` the chain rule gives ``J(x) = J_L(z_{L-1}) ... J_1(x)``. Over
the input set every factor lies in a set we can bound:

* affine layers (linear, convolution, batch norm, reshapes, sums, ...) have a constant Jacobian;
* an element-wise nonlinearity ``sigma`` has ``J = diag(sigma'(z))`` with ``sigma'(z)`` in an
  interval ``[d_l, d_u]`` found from the interval ``[l, u]`` of its input ``z`` (computed by IBP or
  CROWN beforehand): for ReLU ``[1[l > 0], 1[u > 0]]`` (exactly 0 or 1 for stable neurons), for
  leaky ReLU the same with the slope for 0, for tanh/sigmoid (derivative unimodal with its peak at
  0) ``[min(s'(l), s'(u)), s'(clamp(0, l, u))]``.

The product is bounded by interval arithmetic, one factor at a time, in reverse mode: starting from
the identity on the output, a *cotangent interval* ``G`` (``(batch, m, *node)``, ``m`` = number of
outputs) is carried back through the graph::

    affine, constant J:      G J  = [G_c J - G_r |J|,  G_c J + G_r |J|]   (G_c, G_r: centre, radius)
    element-wise sigma:      G * [d_l, d_u]  (interval product, entry by entry)

and summed over the users of each node. Every ``J(x)`` for ``x`` in the set, with each ``sigma'``
chosen independently in its interval, lies in the resulting interval, so the bounds are sound (the
independence makes them conservative). The cost is one backward pass per output entry.

**Local Lipschitz constants.** With ``M = max(|J_lower|, |J_upper|)`` entry-wise, every ``J`` in the
box has ``|J| <= M``, so ``||J||_p <= ||M||_p`` for the induced norms ``p = inf`` (largest row sum),
``1`` (largest column sum) and ``2`` (spectral norm of ``M``), and
``||f(x) - f(x')||_p <= L ||x - x'||_p`` for ``x, x'`` in the (convex) input set.

Ops without a rule here (max pooling, softmax, products of two perturbed tensors, ...) raise
``NotImplementedError``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..domains import Interval
from ..graph import ops
from ..graph.ir import Graph
from ..perturbation import Perturbation
from ..rules import Var
from ..rules.generic import AffinePullback
from ..rules.linear import _conv_backward
from ..rules.shape import MOVEMENT_OPS, SUMMING_OPS
from .crown import refine_intermediate
from .ibp import ibp
from .state import PropagationState, make_state

aten = torch.ops.aten


@dataclass(frozen=True)
class JacobianBounds:
    """``lower <= d y / d x <= upper`` entry-wise for every ``x`` in the set.

    ``lower``/``upper``: ``(batch, *y.shape[1:], *x.shape[1:])`` (the layout of
    ``torch.func.jacrev`` per example).
    """

    lower: torch.Tensor
    upper: torch.Tensor
    out_shape: tuple[int, ...]
    in_shape: tuple[int, ...]

    def matrix(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The bounds as ``(batch, n_out, n_in)`` matrices."""
        b = self.lower.shape[0]
        n_out, n_in = math.prod(self.out_shape), math.prod(self.in_shape)
        return self.lower.reshape(b, n_out, n_in), self.upper.reshape(b, n_out, n_in)

    def abs_max(self) -> torch.Tensor:
        """``max(|lower|, |upper|)``: an entry-wise bound on ``|J|``, ``(batch, n_out, n_in)``."""
        lo, hi = self.matrix()
        return torch.maximum(lo.abs(), hi.abs())

    def lipschitz(self, norm: float = math.inf) -> torch.Tensor:
        """An upper bound of ``||J(x)||_{p -> p}`` over the set, per example ``(batch,)``.

        ``norm``: ``inf`` (largest row sum of ``|J|``), ``1`` (largest column sum) or ``2``.
        """
        M = self.abs_max()
        if norm == math.inf:
            return M.sum(-1).amax(-1)
        if norm == 1:
            return M.sum(-2).amax(-1)
        if norm == 2:
            return torch.linalg.matrix_norm(M, ord=2)
        raise ValueError(f"norm must be inf, 1 or 2, got {norm}")


# --- interval cotangents ------------------------------------------------------------------------


def _center_radius(G: Interval) -> tuple[torch.Tensor, torch.Tensor]:
    return G.center, G.radius


def _from_center_radius(c: torch.Tensor, r: torch.Tensor) -> Interval:
    return Interval(c - r, c + r)


def _scale(G: Interval, d: Interval) -> Interval:
    """Entry-wise interval product ``G * d`` (``d`` broadcast over the output dimension)."""
    dl, du = d.lower.unsqueeze(1), d.upper.unsqueeze(1)
    prods = torch.stack([G.lower * dl, G.lower * du, G.upper * dl, G.upper * du])
    return Interval(prods.amin(0), prods.amax(0))


def _derivative_relu(l, u, args):
    return Interval((l > 0).to(l.dtype), (u > 0).to(l.dtype))


def _derivative_leaky(l, u, args):
    slope = float(args[0]) if args else 0.01
    lo = torch.where(l > 0, 1.0, slope).to(l.dtype)
    hi = torch.where(u > 0, 1.0, slope).to(l.dtype)
    return Interval(torch.minimum(lo, hi), torch.maximum(lo, hi))


def _derivative_unimodal(deriv):
    """Derivative interval of a function whose derivative is positive, even and falls away from 0."""
    def rule(l, u, args):
        peak = deriv(torch.minimum(torch.maximum(torch.zeros_like(l), l), u))
        return Interval(torch.minimum(deriv(l), deriv(u)), peak)

    return rule


def _dtanh(z):
    return 1 - torch.tanh(z) ** 2


def _dsigmoid(z):
    s = torch.sigmoid(z)
    return s * (1 - s)


#: element-wise op -> ``fn(l, u, extra_args) -> Interval`` of its derivative on ``[l, u]``
DERIVATIVES = {
    aten.relu.default: _derivative_relu,
    aten.leaky_relu.default: _derivative_leaky,
    aten.tanh.default: _derivative_unimodal(_dtanh),
    aten.sigmoid.default: _derivative_unimodal(_dsigmoid),
}


def _linear_back(G: Interval, args) -> list[Interval]:
    W = args[1]
    c, r = _center_radius(G)
    return [_from_center_radius(c @ W, r @ W.abs())]


def _conv_back(dims: int):
    pull = _conv_backward(dims)

    def rule(G: Interval, args) -> list[Interval]:
        x, W = args[0], args[1]
        rest = tuple(args[3:])
        c, r = _center_radius(G)
        out_c = pull(c, (x, W, None, *rest), {})
        out_r = pull(r, (x, W.abs(), None, *rest), {})
        if out_c is None or out_r is None:
            raise NotImplementedError("jacobian_bounds: convolution with string padding")
        return [_from_center_radius(out_c[0][0], out_r[0][0])]

    return rule


def _batch_norm_back(G: Interval, args) -> list[Interval]:
    _x, weight, bias, mean, var, _momentum, eps = args
    scale, _ = ops.batch_norm_scale_shift(weight, bias, mean, var, eps)
    shape = [1, 1, -1] + [1] * (G.lower.dim() - 3)
    s = scale.reshape(shape)
    c, r = _center_radius(G)
    return [_from_center_radius(c * s, r * s.abs())]


def _sum_to(t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Sum ``t`` ``(batch, m, *out)`` down to ``(batch, m, *shape[1:])`` (undo broadcasting)."""
    target = (t.shape[0], t.shape[1], *shape[1:])
    extra = t.dim() - len(target)
    if extra > 0:
        t = t.sum(dim=tuple(range(2, 2 + extra)))
    dims = [i for i in range(2, t.dim()) if target[i] == 1 and t.shape[i] != 1]
    return t.sum(dim=dims, keepdim=True) if dims else t


def _add_sub_back(sub: bool):
    def rule(G: Interval, args, kwargs) -> list[tuple[Var, Interval]]:
        alpha = kwargs.get("alpha", 1)
        out = []
        for i, a in enumerate(args[:2]):
            if not isinstance(a, Var):
                continue
            k = alpha if i == 1 else 1
            k = -k if (sub and i == 1) else k
            lo, hi = (G.lower * k, G.upper * k) if k >= 0 else (G.upper * k, G.lower * k)
            shape = tuple(a.value.shape)
            out.append((a, Interval(_sum_to(lo, shape), _sum_to(hi, shape))))
        return out

    return rule


def _mul_div_back(div: bool):
    def rule(G: Interval, args, kwargs) -> list[tuple[Var, Interval]]:
        a, b = args[0], args[1]
        if isinstance(a, Var) and isinstance(b, Var):
            raise NotImplementedError("jacobian_bounds: a product of two perturbed tensors")
        if div and isinstance(b, Var):
            raise NotImplementedError("jacobian_bounds: division by a perturbed tensor")
        var, const = (a, b) if isinstance(a, Var) else (b, a)
        const = torch.as_tensor(const, dtype=G.lower.dtype)
        if div:
            const = 1.0 / const
        c, r = _center_radius(G)
        k = const.unsqueeze(1) if const.dim() > 0 else const
        shape = tuple(var.value.shape)
        return [(var, _from_center_radius(_sum_to(c * k, shape), _sum_to(r * k.abs(), shape)))]

    return rule


def _neg_back(G: Interval, args, kwargs) -> list[tuple[Var, Interval]]:
    return [(args[0], Interval(-G.upper, -G.lower))]


#: ops whose Jacobian has a closed form here: ``fn(G, args) -> [Interval per perturbed first arg]``
AFFINE_BACK = {
    aten.linear.default: _linear_back,
    aten.conv1d.default: _conv_back(1),
    aten.conv2d.default: _conv_back(2),
    ops.batch_norm_eval: _batch_norm_back,
}

#: ops handled argument by argument: ``fn(G, args, kwargs) -> [(Var, Interval)]``
ARITH_BACK = {
    aten.add.Tensor: _add_sub_back(False), aten.sub.Tensor: _add_sub_back(True),
    aten.mul.Tensor: _mul_div_back(False), aten.div.Tensor: _mul_div_back(True),
    aten.neg.default: _neg_back,
}

#: linear ops with a non-negative Jacobian (data movement, sums, averages): lower and upper
#: cotangents go through the op's own vector-Jacobian product separately
MONOTONE_BACK = set(MOVEMENT_OPS) | set(SUMMING_OPS)


def _node_back(state: PropagationState, node, G: Interval) -> list[tuple[str, Interval]]:
    args, kwargs = state.resolve_for_linear(node)
    target = node.target
    if target in DERIVATIVES:
        x = args[0]
        bounds = state.intervals[x.name]
        d = DERIVATIVES[target](bounds.lower, bounds.upper, tuple(args[1:]))
        return [(x.name, _scale(G, d))]
    if target in AFFINE_BACK:
        if any(isinstance(a, Var) for a in args[1:]) or any(isinstance(v, Var) for v in kwargs.values()):
            raise NotImplementedError(f"jacobian_bounds: {node.op_name} with perturbed parameters")
        (out,) = AFFINE_BACK[target](G, args)
        return [(args[0].name, out)]
    if target in ARITH_BACK:
        return [(v.name, g) for v, g in ARITH_BACK[target](G, args, kwargs)]
    if target in MONOTONE_BACK:
        pb = AffinePullback(target, args, kwargs, homogeneous=True)
        lows = pb.backward(G.lower)
        highs = pb.backward(G.upper)
        return [(v.name, Interval(lo, hi)) for v, lo, hi in zip(pb.vars, lows, highs)]
    raise NotImplementedError(f"jacobian_bounds: no Jacobian rule for {node.op_name} <- {node.source or node.name}")


def _add(a: Interval | None, b: Interval) -> Interval:
    return b if a is None else Interval(a.lower + b.lower, a.upper + b.upper)


def jacobian_bounds(model: torch.nn.Module | Graph, x: torch.Tensor, ptb: Perturbation, method: str = "CROWN",
                    opts: Mapping[str, Any] | None = None) -> JacobianBounds:
    """Bounds on ``d model(x')_i / d x'_j`` for every ``x'`` in the set ``ptb`` around ``x``.

    Arguments:
        model: a module (captured here) or a captured :class:`~boundprop.graph.Graph` with one input.
        x: the nominal input ``(batch, *shape)``.
        ptb: its perturbation (e.g. ``PerturbationLpNorm(eps)``).
        method: how the intervals of the nonlinearities' inputs are found: ``"IBP"`` or ``"CROWN"``
            (tighter: more neurons known stable).
        opts: bound options for the interval computation.

    Returns a :class:`JacobianBounds` (``.lipschitz(norm)`` gives local Lipschitz constants).
    """
    if isinstance(model, Graph):
        graph = model
    else:
        from .. import capture

        graph = capture(model, x[:2] if x.shape[0] > 1 else x)
    if len(graph.inputs) != 1:
        raise NotImplementedError("jacobian_bounds: models with one input only")
    name = graph.inputs[0]
    state = make_state(graph, (x,), {name: ptb}, opts=dict(opts or {}))
    target = graph.output
    out_value = state.values[target]
    batch, n_out = out_value.shape[0], out_value[0].numel()
    if target not in state.perturbed:
        zeros = torch.zeros(batch, *out_value.shape[1:], *x.shape[1:], dtype=x.dtype, device=x.device)
        return JacobianBounds(zeros, zeros, tuple(out_value.shape[1:]), tuple(x.shape[1:]))
    key = method.strip().lower()
    ibp(state, until=target)
    if key in ("crown", "backward"):
        refine_intermediate(state, target)
    elif key != "ibp":
        raise ValueError(f"method must be 'IBP' or 'CROWN', got {method!r}")
    eye = torch.eye(n_out, dtype=out_value.dtype, device=out_value.device)
    start = eye.reshape(1, n_out, *out_value.shape[1:]).expand(batch, n_out, *out_value.shape[1:])
    cot: dict[str, Interval | None] = {target: Interval(start, start)}
    needed = graph.ancestors(target)
    for node in reversed(graph.nodes):
        if node.name not in needed or node.name not in state.perturbed or cot.get(node.name) is None:
            continue
        G = cot.pop(node.name)
        for parent, g in _node_back(state, node, G):
            if parent in state.perturbed and parent in state.batched:
                cot[parent] = _add(cot.get(parent), g)
    G = cot.get(name)
    if G is None:
        zero = torch.zeros(batch, n_out, *x.shape[1:], dtype=x.dtype, device=x.device)
        G = Interval(zero, zero)
    shape = (batch, *out_value.shape[1:], *x.shape[1:])
    return JacobianBounds(G.lower.reshape(shape), G.upper.reshape(shape), tuple(out_value.shape[1:]),
                          tuple(x.shape[1:]))


def lipschitz_bound(model: torch.nn.Module | Graph, x: torch.Tensor, ptb: Perturbation, norm: float = math.inf,
                    method: str = "CROWN") -> torch.Tensor:
    """``jacobian_bounds(model, x, ptb, method).lipschitz(norm)``: a local Lipschitz constant per example."""
    return jacobian_bounds(model, x, ptb, method).lipschitz(norm)


__all__ = ["DERIVATIVES", "JacobianBounds", "jacobian_bounds", "lipschitz_bound"]

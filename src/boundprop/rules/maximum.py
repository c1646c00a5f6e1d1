"""Maxima and minima: reductions ``amax``/``amin`` and element-wise ``maximum``/``minimum``.

All are ``y = max_k x_k`` over a set of ``K`` candidates (``min`` is ``-max(-x)``). IBP is exact:
``y in [max_k l_k, max_k u_k]``. Linear bounds, on the box ``[l, u]`` of the candidates:

* lower: ``y >= x_{k*}`` with ``k* = argmax_k l_k`` (``max`` is at least any candidate);
* upper: for any weights ``w in [0, 1]^K``::

      y <= sum_k w_k (x_k - l_k) + max_j (u_j - w_j (u_j - l_j))

  Proof: if ``x_j`` is the maximum, ``x_j - u_j + w_j (u_j - l_j) <= w_j (x_j - l_j)``
  (``(1 - w_j)(x_j - u_j) <= 0``) and every other term ``w_k (x_k - l_k)`` is ``>= 0``.
  The weights used are ``w_k = clip((u_k - T) / (u_k - l_k), 0, 1)`` with the threshold ``T`` in
  ``[max l, max u]`` chosen by bisection so that ``sum_k w_k = 1`` (a convex combination, between
  the two extreme members of the family: ``T = max l``, weight 1 on ``k*``, and ``T = max u``, the
  constant ``max u``). When one candidate dominates (``l_{k*} >= u_j`` for all ``j != k*``),
  ``T = l_{k*}`` and the bound is ``y <= x_{k*}``: exact. With a constant candidate 0 it is ReLU's
  chord.

Candidates with an infinite end make the upper bound the constant ``max_k u_k``. Shapes: the
relaxation works on ``(..., K)`` with the candidates last.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..domains import Interval
from .registry import Var, backward_rule, constant_tensor, interval_rule, is_perturbed

aten = torch.ops.aten


@dataclass
class MaxLinear:
    """``sum_k wl_k x_k + bl <= y <= sum_k wu_k x_k + bu``; ``w*`` ``(..., K)``, ``b*`` ``(...)``."""

    wl: torch.Tensor
    bl: torch.Tensor
    wu: torch.Tensor
    bu: torch.Tensor

    def negated(self) -> MaxLinear:
        """The relaxation of ``-y`` as a function of ``-x``: ``min(x) = -max(-x)``."""
        return MaxLinear(self.wu, -self.bu, self.wl, -self.bl)


def _weights(lower, upper, width, T):
    ratio = (upper - T) / torch.where(width > 0, width, torch.ones_like(width))
    w = torch.where(width > 0, ratio, (upper > T).to(upper.dtype))
    return w.clamp(0.0, 1.0)


def max_relaxation(lower: torch.Tensor, upper: torch.Tensor, valid: torch.Tensor | None = None,
                   iters: int = 30) -> MaxLinear:
    """Linear bounds of ``max`` over the last dimension (see the module docstring).

    ``valid`` (bool, same shape) marks real candidates; others (e.g. padding) get weight 0.
    """
    if valid is None:
        valid = torch.ones_like(lower, dtype=torch.bool)
    ninf = torch.full_like(lower, -torch.inf)
    key = torch.where(valid, lower.clamp(min=torch.finfo(lower.dtype).min), ninf)
    star = key.argmax(-1, keepdim=True)
    wl = torch.zeros_like(lower).scatter(-1, star, 1.0)
    finite = (torch.isfinite(lower) & torch.isfinite(upper)) | ~valid
    finite = finite.all(-1, keepdim=True)
    lo = torch.where(valid & finite, lower, ninf)
    hi = torch.where(valid & finite, upper, ninf)
    width = torch.where(valid & finite, upper - lower, torch.zeros_like(lower))
    a = lo.amax(-1, keepdim=True)
    b = hi.amax(-1, keepdim=True)
    a = torch.where(finite, a, torch.zeros_like(a))
    b = torch.where(finite, b, torch.zeros_like(b))
    lo_f = torch.where(valid & finite, lower, torch.zeros_like(lower))
    hi_f = torch.where(valid & finite, upper, torch.full_like(upper, -torch.finfo(upper.dtype).max))
    done = _weights(lo_f, hi_f, width, a).sum(-1, keepdim=True) <= 1
    for _ in range(iters):
        mid = (a + b) / 2
        big = _weights(lo_f, hi_f, width, mid).sum(-1, keepdim=True) > 1
        a = torch.where(big & ~done, mid, a)
        b = torch.where(big | done, b, mid)
    T = torch.where(done, a, (a + b) / 2)
    wu = torch.where(valid & finite, _weights(lo_f, hi_f, width, T), torch.zeros_like(lower))
    bu = _upper_offset(lower, upper, wu, valid & finite)
    const = torch.where(valid, upper, ninf).amax(-1)
    fin = finite.squeeze(-1)
    bu = torch.where(fin, bu, const)
    wu = torch.where(finite, wu, torch.zeros_like(wu))
    return MaxLinear(wl, torch.zeros_like(bu), wu, bu)


def _upper_offset(lower: torch.Tensor, upper: torch.Tensor, wu: torch.Tensor, use: torch.Tensor) -> torch.Tensor:
    """``max_j (u_j - w_j (u_j - l_j)) - sum_i w_i l_i`` over the candidates ``use``, rounded upward.

    The terms cancel (a dominant candidate gives exactly 0), so in the inputs' precision rounding
    could leave the offset below its true value and the upper line below ``max`` (seen: -3e-5 for
    ``x`` in [-510, 520] in float32). Computed in float64 -- products and differences of float32
    values are exact there -- and rounded up to the inputs' dtype."""
    l64, u64, w64 = lower.double(), upper.double(), wu.double()
    ninf = torch.full_like(l64, -torch.inf)
    term = torch.where(use, u64 - w64 * (u64 - l64), ninf)
    exact = term.amax(-1) - torch.where(use, w64 * l64, torch.zeros_like(l64)).sum(-1)
    out = exact.to(lower.dtype)
    return torch.where(out.double() < exact, torch.nextafter(out, torch.full_like(out, torch.inf)), out)


def _safe_mul(lam: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    value = value.expand_as(lam) if value.dim() == lam.dim() else value.unsqueeze(1).expand_as(lam)
    return torch.where(lam == 0, torch.zeros_like(lam), lam * value)


def pull_candidates(lam: torch.Tensor, rel: MaxLinear, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Coefficients ``lam`` ``(batch, spec, *out)`` of ``y`` -> ``(batch, spec, *out, K)`` and bias.

    ``rel`` fields are ``(batch, *out, K)`` / ``(batch, *out)``; ``side`` "lower" or "upper".
    """
    pos, neg = lam.clamp(min=0), lam.clamp(max=0)
    first, second = ((rel.wl, rel.bl), (rel.wu, rel.bu)) if side == "lower" else ((rel.wu, rel.bu), (rel.wl, rel.bl))
    coef = pos.unsqueeze(-1) * first[0].unsqueeze(1) + neg.unsqueeze(-1) * second[0].unsqueeze(1)
    bias = _safe_mul(pos, first[1]) + _safe_mul(neg, second[1])
    return coef, bias.reshape(bias.shape[0], bias.shape[1], -1).sum(-1)  # (batch, spec); *out may be ()


def _var_check(x) -> Var:
    if not isinstance(x, Var):
        raise NotImplementedError("max/min reductions need the perturbed tensor as their input")
    return x


# --- amax / amin ------------------------------------------------------------------------------


def _reduce_dims(rank: int, dims) -> list[int]:
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        raise NotImplementedError("a max/min over every dimension (batch included) is not supported")
    dims = [dims] if isinstance(dims, int) else list(dims)
    dims = sorted({d % rank for d in dims})
    if 0 in dims:
        raise NotImplementedError("a max/min over the batch dimension is not supported")
    return dims


def _reduce_args(args, kwargs):
    x = args[0]
    dims = args[1] if len(args) > 1 else kwargs.get("dim", [])
    keepdim = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
    return x, dims, bool(keepdim)


@interval_rule(aten.amax.default)
def amax_interval(args, kwargs) -> Interval:
    """Exact: ``[amax(l), amax(u)]``."""
    x, dims, keepdim = _reduce_args(args, kwargs)
    dims = _reduce_dims(x.lower.dim(), dims)
    return Interval(torch.amax(x.lower, dims, keepdim), torch.amax(x.upper, dims, keepdim))


@interval_rule(aten.amin.default)
def amin_interval(args, kwargs) -> Interval:
    """Exact: ``[amin(l), amin(u)]``."""
    x, dims, keepdim = _reduce_args(args, kwargs)
    dims = _reduce_dims(x.lower.dim(), dims)
    return Interval(torch.amin(x.lower, dims, keepdim), torch.amin(x.upper, dims, keepdim))


def _reduce_backward(call, is_min: bool):
    from ..algorithms.backward import BackwardOut  # noqa: PLC0415 - algorithms import rules

    x, dims, _keepdim = _reduce_args(call.args, call.kwargs)
    x = _var_check(x)
    rank = len(x.shape)
    dims = _reduce_dims(rank, dims)
    kept = [d for d in range(1, rank) if d not in dims]
    perm = [0, *kept, *dims]
    shape = x.shape
    kept_shape = [shape[d] for d in kept]
    red_shape = [shape[d] for d in dims]

    def to_candidates(t):
        return t.permute(perm).reshape(shape[0], *kept_shape, -1)

    lo, hi = to_candidates(x.bounds.lower), to_candidates(x.bounds.upper)
    rel = max_relaxation(-hi, -lo).negated() if is_min else max_relaxation(lo, hi)
    inverse = [0, 1] + [perm.index(d) + 1 for d in range(1, rank)]

    def side(A, which):
        if A is None:
            return None, 0.0
        lam = A.reshape(A.shape[0], A.shape[1], *kept_shape)
        coef, bias = pull_candidates(lam, rel, which)
        coef = coef.reshape(A.shape[0], A.shape[1], *kept_shape, *red_shape).permute(inverse)
        return coef, bias

    new_l, lbias = side(call.lA, "lower")
    new_u, ubias = side(call.uA, "upper")
    return BackwardOut([(x.name, new_l, new_u)], lbias, ubias)


@backward_rule(aten.amax.default)
def amax_backward(call):
    """CROWN through ``amax``: the max relaxation over the reduced entries of each output."""
    return _reduce_backward(call, is_min=False)


@backward_rule(aten.amin.default)
def amin_backward(call):
    """CROWN through ``amin`` as ``-amax(-x)``."""
    return _reduce_backward(call, is_min=True)


# --- element-wise maximum / minimum -----------------------------------------------------------


def _ends(a):
    if isinstance(a, Interval):
        return a.lower, a.upper
    t = constant_tensor(a)
    return t, t


@interval_rule(aten.maximum.default)
def maximum_interval(args, kwargs) -> Interval:
    """Exact: ``[max(l_a, l_b), max(u_a, u_b)]`` (monotone in both arguments)."""
    (al, au), (bl, bu) = _ends(args[0]), _ends(args[1])
    return Interval(torch.maximum(al, bl), torch.maximum(au, bu))


@interval_rule(aten.minimum.default)
def minimum_interval(args, kwargs) -> Interval:
    """Exact: ``[min(l_a, l_b), min(u_a, u_b)]``."""
    (al, au), (bl, bu) = _ends(args[0]), _ends(args[1])
    return Interval(torch.minimum(al, bl), torch.minimum(au, bu))


def _binary_backward(call, is_min: bool):
    from ..algorithms.backward import BackwardOut  # noqa: PLC0415 - algorithms import rules

    a, b = call.args[0], call.args[1]
    A0 = call.lA if call.lA is not None else call.uA
    batch, out_shape = A0.shape[0], A0.shape[2:]
    full = (batch, *out_shape)
    ends = []
    for arg in (a, b):
        if isinstance(arg, Var):
            if len(arg.shape) != len(full):
                raise NotImplementedError("maximum/minimum of perturbed tensors of different ranks")
            lo, hi = arg.bounds.lower, arg.bounds.upper
        else:
            lo = hi = torch.as_tensor(arg, dtype=A0.dtype, device=A0.device)
        ends.append((lo.expand(full), hi.expand(full)))
    lo = torch.stack([ends[0][0], ends[1][0]], -1)
    hi = torch.stack([ends[0][1], ends[1][1]], -1)
    rel = max_relaxation(-hi, -lo).negated() if is_min else max_relaxation(lo, hi)
    outs = []
    biases = {}
    for which, A in (("lower", call.lA), ("upper", call.uA)):
        if A is None:
            outs.append([None, None])
            biases[which] = 0.0
            continue
        coef, bias = pull_candidates(A, rel, which)
        per_arg = []
        for i, arg in enumerate((a, b)):
            c = coef[..., i]
            if isinstance(arg, Var):
                per_arg.append(c.sum_to_size(A.shape[0], A.shape[1], *arg.shape[1:]))
            else:
                const = ends[i][0].unsqueeze(1)
                bias = bias + torch.where(c == 0, torch.zeros_like(c), c * const).flatten(2).sum(-1)
                per_arg.append(None)
        outs.append(per_arg)
        biases[which] = bias
    entries = [(arg.name, outs[0][i], outs[1][i]) for i, arg in enumerate((a, b)) if isinstance(arg, Var)]
    return BackwardOut(entries, biases["lower"], biases["upper"])


def _binary_check(call):
    if not (is_perturbed(call.args[0]) or is_perturbed(call.args[1])):
        raise NotImplementedError("maximum/minimum without a perturbed argument")


@backward_rule(aten.maximum.default)
def maximum_backward(call):
    """CROWN through ``maximum(a, b)`` (either or both perturbed): the two-candidate max relaxation."""
    _binary_check(call)
    return _binary_backward(call, is_min=False)


@backward_rule(aten.minimum.default)
def minimum_backward(call):
    """CROWN through ``minimum(a, b)`` as ``-maximum(-a, -b)``."""
    _binary_check(call)
    return _binary_backward(call, is_min=True)

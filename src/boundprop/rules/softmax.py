"""Softmax and log-softmax along one dimension (any rank; the batch dimension is never reduced).

Notation, for one slice ``x in R^n`` along ``dim`` with box ``[l, u]``::

    z = log_softmax(x) = x - LSE(x),        y = softmax(x) = exp(z),        LSE(x) = log sum_j exp(x_j)
    LOO_i(v) = log sum_{j != i} exp(v_j)    (leave-one-out, by prefix/suffix ``logcumsumexp``: stable)

IBP (exact for every single entry: ``z_i`` increases in ``x_i`` and decreases in every other entry)::

    z_i in [ -log(1 + exp(LOO_i(u) - l_i)),  -log(1 + exp(LOO_i(l) - u_i)) ],      y_i = exp(z_i)

Linear bounds (backward), each a function of the whole slice; ``x0`` is the centre of the box
(the unperturbed value where the box is unbounded), ``p = softmax(x0)``:

* upper (LSE form, Wei et al., AISTATS 2023): ``LSE`` is convex, so it lies above its tangent plane
  at ``x0`` and ``z_i <= x_i - p.x + (z0_i - x0_i + p.x0)``; for softmax, ``exp`` lies below its
  chord on ``[zL_i, zU_i]`` (increasing), so ``y_i <= exp(zU_i) + a_i (z_i - zU_i)`` with the
  tangent-plane bound substituted for ``z_i``.
* lower, "er" (exponential-reciprocal form, Wei et al.): ``y_i = 1 / (1 + sum_{k != i} exp(x_k - x_i))``.
  ``exp(d)`` lies below its chord on ``[l_k - u_i, u_k - l_i]``, giving an affine ``D_i(x) >=``
  the denominator (``D_i >= 1`` on the box), and ``1/D`` is convex, so
  ``y_i >= 1/D_i(x) >= 2/D_i(x0) - D_i(x)/D_i(x0)^2``; for log-softmax
  ``z_i >= -log D_i(x) >= -log D_i(x0) + 1 - D_i(x)/D_i(x0)``. Dense: ``n x n`` per slice.
* lower, "lse": ``sum_j exp(x_j)`` lies below the sum of per-entry chords ``S(x)`` and ``log`` below
  its tangent at ``s0 = S(x0)``, so ``LSE(x) <= log s0 + S(x)/s0 - 1`` and
  ``z_i >= x_i - log s0 + 1 - S(x)/s0``; softmax: ``y_i >= exp(t_i) (1 + z_i - t_i)`` (tangent of exp
  at ``t_i``, the bound's value at ``x0``). Diagonal plus rank one: ``O(n)`` per slice.
* ``opts["softmax_lower"]``: "lse" (default: cheapest, and the tighter of the two on average in
  our measurements), "er", or "best" (per entry, the candidate larger at ``x0``; dense).

Relaxation rows whose exponentials leave the floating-point range (spread ``> 40`` or an infinite
end) fall back to the constant IBP bound. Shapes: rules work on ``(batch, *lead, n)`` (``dim`` moved
last); a relaxation of ``y_i`` is ``sum_j W_ij x_j + b_i`` with
``W = diag(d) - c g^T + M`` (``M`` dense or None).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..domains import Interval
from .registry import Var, backward_rule, interval_rule

aten = torch.ops.aten

#: Largest exponent the relaxations evaluate; beyond it a row falls back to its constant bound.
EXP_CAP = 40.0


# --- numerics ---------------------------------------------------------------------------------


def loo_logsumexp(v: torch.Tensor) -> torch.Tensor:
    """``log sum_{j != i} exp(v_j)`` along the last dimension (``-inf`` when ``n == 1``)."""
    pre = torch.logcumsumexp(v, -1)
    suf = torch.logcumsumexp(v.flip(-1), -1).flip(-1)
    ninf = torch.full_like(v[..., :1], -torch.inf)
    return torch.logaddexp(torch.cat([ninf, pre[..., :-1]], -1), torch.cat([suf[..., 1:], ninf], -1))


def _log1pexp(a: torch.Tensor) -> torch.Tensor:
    return torch.logaddexp(torch.zeros_like(a), a)


def exp_chord_slope(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """A slope ``s`` with ``exp(t) <= exp(hi) + s (t - hi)`` on ``[lo, hi]`` (the chord's, or below it).

    Stable for any width: ``exp(lo) expm1(w) / w`` for moderate ``w``, the plain quotient for large
    ``w``, and ``exp(lo)`` (smaller than the chord's slope, hence still sound when anchored at
    ``hi``) when ``w`` is (nearly) zero.
    """
    w = hi - lo
    tiny = ~(w > 1e-6)
    ws = torch.where(tiny, torch.ones_like(w), w)
    moderate = torch.exp(lo) * torch.expm1(ws.clamp(max=30.0)) / ws
    large = (torch.exp(hi) - torch.exp(lo)) / ws
    slope = torch.where(ws <= 30.0, moderate, large)
    slope = torch.where(tiny, torch.exp(lo), slope)
    return torch.nan_to_num(slope, nan=0.0, posinf=0.0).clamp_min(0.0)


def log_softmax_bounds(lower: torch.Tensor, upper: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact bounds of ``log_softmax`` over the box, along the last dimension."""
    if lower.shape[-1] == 1:
        zero = torch.zeros_like(lower)
        return zero, zero
    zl = -_log1pexp(loo_logsumexp(upper) - lower)
    zu = -_log1pexp(loo_logsumexp(lower) - upper)
    zl = torch.nan_to_num(zl, nan=-torch.inf).clamp(max=0.0)
    zu = torch.nan_to_num(zu, nan=0.0).clamp(max=0.0)
    return torch.minimum(zl, zu), zu


def _dim_of(x, dim: int) -> int:
    rank = (x.lower if isinstance(x, Interval) else x.value).dim()
    d = dim % rank
    if d == 0:
        raise NotImplementedError("softmax over the batch dimension is not supported")
    return d


def _dtype_arg(args: tuple, kwargs: dict):
    if len(args) > 2 and isinstance(args[2], torch.dtype):
        return args[2]
    return kwargs.get("dtype")


def _interval(args: tuple, kwargs: dict, log: bool) -> Interval:
    x, dim = args[0], _dim_of(args[0], args[1])
    zl, zu = log_softmax_bounds(x.lower.movedim(dim, -1), x.upper.movedim(dim, -1))
    if not log:
        zl, zu = torch.exp(zl).clamp(0.0, 1.0), torch.exp(zu).clamp(0.0, 1.0)
    dtype = _dtype_arg(args, kwargs)
    out = Interval(zl.movedim(-1, dim), zu.movedim(-1, dim))
    return out if dtype is None else Interval(out.lower.to(dtype), out.upper.to(dtype))


@interval_rule(aten.softmax.int, aten._softmax.default)
def softmax_interval(args, kwargs) -> Interval:
    """``softmax_i in [exp(l_i) / (exp(l_i) + sum_{j!=i} exp(u_j)), exp(u_i) / (exp(u_i) + sum_{j!=i} exp(l_j))]``."""
    return _interval(args, kwargs, log=False)


@interval_rule(aten.log_softmax.int, aten._log_softmax.default)
def log_softmax_interval(args, kwargs) -> Interval:
    """The logarithm of the softmax interval, computed in log space."""
    return _interval(args, kwargs, log=True)


# --- linear relaxations -------------------------------------------------------------------------


@dataclass
class SliceLinear:
    """``f_i(x) (>= or <=) sum_j W_ij x_j + b_i`` with ``W = diag(d) - c g^T + M``, all on the last dim.

    ``d, c, g, b``: ``(batch, *lead, n)``; ``M``: ``(batch, *lead, n, n)`` or None.
    """

    d: torch.Tensor
    c: torch.Tensor
    g: torch.Tensor
    b: torch.Tensor
    M: torch.Tensor | None = None

    def dense(self) -> torch.Tensor:
        W = torch.diag_embed(self.d) - self.c.unsqueeze(-1) * self.g.unsqueeze(-2)
        return W if self.M is None else W + self.M

    def pull(self, lam: torch.Tensor) -> torch.Tensor:
        """``lam`` ``(batch, spec, *lead, n)`` (coefficients of ``f``) -> ``lam W`` (coefficients of x)."""
        d, c, g = self.d.unsqueeze(1), self.c.unsqueeze(1), self.g.unsqueeze(1)
        out = lam * d - g * (lam * c).sum(-1, keepdim=True)
        if self.M is not None:
            out = out + torch.einsum("bs...i,b...ij->bs...j", lam, self.M)
        return out

    def bias(self, lam: torch.Tensor) -> torch.Tensor:
        b = self.b.unsqueeze(1).expand_as(lam)
        return torch.where(lam == 0, torch.zeros_like(lam), lam * b).flatten(2).sum(-1)

    def at(self, x: torch.Tensor) -> torch.Tensor:
        """``W x + b`` for ``x`` ``(batch, *lead, n)``."""
        out = self.d * x - self.c * (self.g * x).sum(-1, keepdim=True) + self.b
        return out if self.M is None else out + (self.M * x.unsqueeze(-2)).sum(-1)


def _constant(b: torch.Tensor) -> SliceLinear:
    zero = torch.zeros_like(b)
    return SliceLinear(zero, zero, zero, b)


def _select(keep: torch.Tensor, rel: SliceLinear, fallback: torch.Tensor) -> SliceLinear:
    """Rows ``i`` where ``keep`` is False get the constant ``fallback_i``."""
    zero = torch.zeros_like(rel.d)
    M = None if rel.M is None else torch.where(keep.unsqueeze(-1), rel.M, torch.zeros_like(rel.M))
    g = torch.where(keep.all(-1, keepdim=True), rel.g, zero)  # g is shared by a slice's rows
    return SliceLinear(torch.where(keep, rel.d, zero), torch.where(keep, rel.c, zero), g,
                       torch.where(keep, rel.b, fallback), M)


def upper_relaxation(lower, upper, x0, zl, zu, log: bool) -> SliceLinear:
    """LSE-tangent upper bound (see the module docstring)."""
    p = torch.softmax(x0, -1)
    z0 = torch.log_softmax(x0, -1)
    k = z0 - x0 + (p * x0).sum(-1, keepdim=True)
    if log:
        one = torch.ones_like(k)
        rel = SliceLinear(one, one, p, k)
        fallback = zu
    else:
        a = exp_chord_slope(zl, zu)
        rel = SliceLinear(a, a, p, torch.exp(zu) + a * (k - zu))
        fallback = torch.exp(zu)
    finite = (torch.isfinite(lower) & torch.isfinite(upper)).all(-1, keepdim=True)
    return _select(finite.expand_as(k), rel, fallback)


def lse_lower_relaxation(lower, upper, x0, zl, zu, log: bool) -> SliceLinear:
    """Sum-of-chords + log-tangent lower bound (structured)."""
    m = upper.amax(-1, keepdim=True)
    spread = m - lower.amin(-1, keepdim=True)
    ok = (torch.isfinite(lower) & torch.isfinite(upper)).all(-1, keepdim=True) & (spread <= EXP_CAP)
    m = torch.where(ok, m, torch.zeros_like(m))
    lo = torch.where(ok, lower, x0) - m
    hi = torch.where(ok, upper, x0) - m
    xs = x0 - m
    beta = exp_chord_slope(lo, hi)  # sum_j exp(x_j - m) <= sum_j exp(hi_j) + beta_j (x_j - m - hi_j)
    s0 = (torch.exp(hi) + beta * (xs - hi)).sum(-1, keepdim=True).clamp_min(torch.finfo(x0.dtype).tiny)
    g = beta / s0
    # z_i >= x_i - m - log s0 + 1 - S(x)/s0,  S(x) = sum_j exp(hi_j) + beta_j (x_j - m - hi_j)
    kappa = -m - torch.log(s0) + 1 - ((torch.exp(hi) - beta * (hi + m)) / s0).sum(-1, keepdim=True)
    kappa = kappa.expand_as(x0)
    if log:
        one = torch.ones_like(x0)
        rel = SliceLinear(one, one, g, kappa)
        fallback = zl
    else:
        z_at_x0 = xs - torch.log(s0)  # the bound's value at x0
        t = torch.maximum(torch.minimum(z_at_x0, zu), zl)
        e = torch.exp(t)
        rel = SliceLinear(e, e, g, e * (1 - t + kappa))
        fallback = torch.exp(zl)
    return _select(ok.expand_as(x0), rel, fallback)


def er_lower_relaxation(lower, upper, x0, zl, zu, log: bool) -> SliceLinear:
    """Exponential-reciprocal lower bound (dense ``n x n``)."""
    n = x0.shape[-1]
    dl = lower.unsqueeze(-2) - upper.unsqueeze(-1)  # [i, k] = l_k - u_i
    du = upper.unsqueeze(-2) - lower.unsqueeze(-1)  # [i, k] = u_k - l_i
    off = ~torch.eye(n, dtype=torch.bool, device=x0.device)
    ok = (torch.where(off, du, torch.full_like(du, -torch.inf)).amax(-1) <= EXP_CAP)
    ok = ok & (torch.isfinite(lower) & torch.isfinite(upper)).all(-1, keepdim=True)
    okk = ok.unsqueeze(-1) & off
    dl = torch.where(okk, dl, torch.zeros_like(dl))
    du = torch.where(okk, du, torch.zeros_like(du))
    alpha = torch.where(okk, exp_chord_slope(dl, du), torch.zeros_like(du))
    top = torch.where(okk, torch.exp(du), torch.zeros_like(du))
    # D_i(x) = 1 + sum_{k != i} exp(du_ik) + alpha_ik (x_k - x_i - du_ik)
    d0 = (x0.unsqueeze(-2) - x0.unsqueeze(-1)).clamp(min=dl, max=du)
    D0 = (1 + (top + alpha * (d0 - du)).sum(-1)).clamp_min(1.0)
    const = 1 + (top - alpha * du).sum(-1)
    rowsum = alpha.sum(-1)
    zero = torch.zeros_like(x0)
    if log:
        scale = 1 / D0
        b = -torch.log(D0) + 1 - const * scale
        fallback = zl
    else:
        scale = 1 / D0 / D0
        b = 2 / D0 - const / D0 / D0
        fallback = torch.exp(zl)
    M = -alpha * scale.unsqueeze(-1)
    rel = SliceLinear(rowsum * scale, zero, zero, b, M)
    return _select(ok, rel, fallback)


def lower_relaxation(lower, upper, x0, zl, zu, log: bool, mode: str = "lse") -> SliceLinear:
    if mode == "lse":
        return lse_lower_relaxation(lower, upper, x0, zl, zu, log)
    if mode == "er":
        return er_lower_relaxation(lower, upper, x0, zl, zu, log)
    if mode != "best":
        raise ValueError(f"softmax_lower must be 'best', 'er' or 'lse', not {mode!r}")
    er = er_lower_relaxation(lower, upper, x0, zl, zu, log)
    lse = lse_lower_relaxation(lower, upper, x0, zl, zu, log)
    center = (lower + upper) / 2
    use_er = er.at(center) >= lse.at(center)
    M = torch.where(use_er.unsqueeze(-1), er.dense(), lse.dense())
    zero = torch.zeros_like(er.b)
    return SliceLinear(zero, zero, zero, torch.where(use_er, er.b, lse.b), M)


def slice_relaxations(lower, upper, x0, log: bool, mode: str = "lse") -> tuple[SliceLinear, SliceLinear]:
    """Lower and upper linear bounds of (log-)softmax along the last dim of ``(batch, *lead, n)``."""
    center = (lower + upper) / 2
    x0 = torch.where(torch.isfinite(center), center, torch.maximum(torch.minimum(x0, upper), lower))
    zl, zu = log_softmax_bounds(lower, upper)
    if x0.shape[-1] == 1:
        const = _constant(torch.zeros_like(x0) if log else torch.ones_like(x0))
        return const, const
    return (lower_relaxation(lower, upper, x0, zl, zu, log, mode),
            upper_relaxation(lower, upper, x0, zl, zu, log))


def _backward(call, log: bool):
    from ..algorithms.backward import BackwardOut  # noqa: PLC0415 - algorithms import rules

    x = call.args[0]
    if not isinstance(x, Var) or any(isinstance(a, Var) for a in call.args[1:]):
        raise NotImplementedError("softmax: only the input may be perturbed")
    dim = _dim_of(x, call.args[1])
    move = lambda t: t.movedim(dim, -1)  # noqa: E731
    mode = call.opts.get("softmax_lower", "lse")
    memo = call.memo if call.memo is not None else {}
    key = ("softmax", log, dim, mode)
    if key not in memo:  # the same for every walk through the node (its input interval's alone)
        memo[key] = slice_relaxations(move(x.bounds.lower), move(x.bounds.upper), move(x.value), log, mode)
    low, up = memo[key]
    new_l = new_u = None
    lbias = ubias = 0.0
    if call.lA is not None:
        A = call.lA.movedim(dim + 1, -1)
        pos, neg = A.clamp(min=0), A.clamp(max=0)
        new_l = (low.pull(pos) + up.pull(neg)).movedim(-1, dim + 1)
        lbias = low.bias(pos) + up.bias(neg)
    if call.uA is not None:
        A = call.uA.movedim(dim + 1, -1)
        pos, neg = A.clamp(min=0), A.clamp(max=0)
        new_u = (up.pull(pos) + low.pull(neg)).movedim(-1, dim + 1)
        ubias = up.bias(pos) + low.bias(neg)
    return BackwardOut([(x.name, new_l, new_u)], lbias, ubias)


@backward_rule(aten.softmax.int, aten._softmax.default)
def softmax_backward(call):
    """CROWN through softmax: the linear bounds of the module docstring, chosen by the sign of ``A``."""
    return _backward(call, log=False)


@backward_rule(aten.log_softmax.int, aten._log_softmax.default)
def log_softmax_backward(call):
    """CROWN through log-softmax: LSE tangent plane above, ER / sum-of-chords bound below."""
    return _backward(call, log=True)

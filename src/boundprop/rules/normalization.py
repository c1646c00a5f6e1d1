"""Layer normalisation ``aten.layer_norm`` (constant weight and bias).

Over the last ``k`` dimensions (``N`` entries, flattened here to one axis), with ``P = I - 11^T/N``::

    c = P x   (affine: exact)        v = mean(c^2)        r = (v + eps)^(-1/2)
    n = c * r                        y = n * weight + bias

IBP:

* ``c``: centre/radius through ``P`` (exact per entry): ``c_c = P x_c``,
  ``c_r = (1 - 2/N) x_r + sum(x_r)/N``;
* ``v <= mean(sq_U)`` from the interval squares of ``c``; ``v >= v_L``, the larger of
  ``mean(sq_L)`` and the box minimum of the variance (:func:`variance_lower`, nearly exact: a 1-D
  convex problem); ``r`` from ``v`` (decreasing);
* ``n``: the interval product of ``c`` and ``r``, intersected with a bound that uses the coupling
  of ``c_i`` and ``v``: since ``sum_j c_j = 0``,
  ``v >= V_i(c_i) = max(c_i^2/(N-1), (c_i^2 + Q_i)/N, v_L)`` with ``Q_i = sum_{j != i} sq_L_j``,
  so ``|n_i| <= h_i(|c_i|)`` where
  ``h_i(t) = t / sqrt(V_i(t) + eps)`` increases in ``t >= 0`` (hence ``|n_i| <= sqrt(N - 1)``).

Backward (CROWN): ``n_i = c_i r`` is a product of two bounded quantities; McCormick's planes
(lower: ``r_L c + c_L r - c_L r_L`` or ``r_U c + c_U r - c_U r_U``; upper: ``r_U c + c_L r - c_L r_U``
or ``r_L c + c_U r - c_U r_L``, the one tighter at the box centre chosen per entry) make it linear
in ``c`` and ``r``; ``r`` is then bounded linearly in ``c``:

* ``r >= h(v1) + h'(v1) (vbar(c) - v1)``: ``h(v) = (v + eps)^(-1/2)`` is convex and decreasing, and
  ``v <= vbar(c) = mean((c_L + c_U) c - c_L c_U)`` (chords of ``c_i^2``);
* ``r <= h(v_L) + s (vt(c) - v_L)``: the chord of ``h`` on ``[v_L, v_U]`` (slope ``s <= 0``) above
  ``h``, and ``v >= vt(c) = mean(c0^2) + (2/N) c0 . (c - c0)`` (tangent of the convex ``v``).

A plane (per entry) or a bound of ``r`` (per group) whose worst value over the box is more than
one IBP width beyond the constant IBP bound is replaced by that constant (with a small
``eps`` and a box containing near-constant vectors, ``r_U = eps^(-1/2)`` makes the planes useless,
while the coupled IBP bound stays within ``sqrt(N - 1)``). Coefficients of ``c`` map back to ``x``
through ``P`` (symmetric). Groups with an infinite input bound pass constant IBP bounds.

Shapes: ``x`` ``(batch, *lead, *normalized_shape)``; coefficients
``(batch, spec, *lead, *normalized_shape)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..domains import Interval
from ..syncs import possibly_any
from .curves import shrink_bracket
from .registry import Var, backward_rule, interval_rule, is_perturbed

aten = torch.ops.aten


def _parse(args: tuple, kwargs: dict):
    x, shape = args[0], args[1]
    rest = list(args[2:]) + [None] * 3
    weight = rest[0] if len(args) > 2 else kwargs.get("weight")
    bias = rest[1] if len(args) > 3 else kwargs.get("bias")
    eps = rest[2] if len(args) > 4 else kwargs.get("eps", 1e-5)
    if is_perturbed(weight) or is_perturbed(bias):
        raise NotImplementedError("layer_norm with perturbed weight or bias is not supported")
    if not eps > 0:
        raise NotImplementedError(f"layer_norm with eps={eps} <= 0 is not supported")
    return x, list(shape), weight, bias, float(eps)


def _flat(t: torch.Tensor, k: int) -> torch.Tensor:
    return t.flatten(-k) if k > 1 else t


def _h(v: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.rsqrt(v + eps)


@dataclass
class GroupBounds:
    """IBP quantities of one normalisation, each ``(batch, *lead, N)`` or ``(batch, *lead, 1)``."""

    c_l: torch.Tensor
    c_u: torch.Tensor
    v_l: torch.Tensor
    v_u: torch.Tensor
    r_l: torch.Tensor
    r_u: torch.Tensor
    n_l: torch.Tensor
    n_u: torch.Tensor


def _coupled(t: torch.Tensor, q: torch.Tensor, v_l: torch.Tensor, n: int, eps: float) -> torch.Tensor:
    """``h_i(t)`` for ``t >= 0`` (see the module docstring), finite for ``t = 0`` and ``t = inf``."""
    t2 = (t * t).clamp_min(torch.finfo(t.dtype).tiny)
    first = torch.full_like(t2, 1.0 / (n - 1)) if n > 1 else torch.zeros_like(t2)
    second = (1 + q / t2) / n
    out = torch.rsqrt(torch.maximum(torch.maximum(first, second), v_l / t2) + eps / t2)
    return torch.where(t > 0, out, torch.zeros_like(out))


def variance_lower(lower: torch.Tensor, upper: torch.Tensor, iters: int = 40) -> torch.Tensor:
    """A lower bound of ``min_{x in box} mean((x - mean(x))^2)`` along the last dim, ``(..., 1)``.

    ``var(x) = min_t mean((x - t)^2)``, so the minimum over the box is ``min_t phi(t)`` with the
    convex ``phi(t) = mean(dist(t, [l_i, u_i])^2)``. Bisection on ``phi'`` keeps the minimiser in
    ``[a, b]``; convexity then gives ``min phi >= phi(t) - |phi'(t)| (b - a)`` for ``t`` in ``[a, b]``.
    """
    a = lower.amin(-1, keepdim=True)
    b = upper.amax(-1, keepdim=True)

    def dphi(t):
        return 2 * ((t - upper).clamp_min(0) - (lower - t).clamp_min(0)).mean(-1, keepdim=True)

    # dphi(a) <= 0 <= dphi(b); the search keeps dphi <= 0 at a and > 0 at b (each evaluated), so a
    # minimiser stays in [a, b] (several points per round on small rows: :func:`shrink_bracket`)
    a, b = shrink_bracket(dphi, a, b, steps=iters, width=lower.shape[-1])
    t = (a + b) / 2
    dist = (t - upper).clamp_min(0) + (lower - t).clamp_min(0)
    bound = (dist * dist).mean(-1, keepdim=True) - dphi(t).abs() * (b - a)
    return torch.nan_to_num(bound, nan=0.0).clamp_min(0.0)


def group_bounds(lower: torch.Tensor, upper: torch.Tensor, eps: float) -> GroupBounds:
    """IBP of the normalisation along the last dimension of ``(batch, *lead, N)``."""
    n = lower.shape[-1]
    center, radius = (upper + lower) / 2, (upper - lower) / 2
    c_c = center - center.mean(-1, keepdim=True)
    c_r = radius * (1 - 2 / n) + radius.sum(-1, keepdim=True) / n
    c_l, c_u = c_c - c_r, c_c + c_r
    sq_l = torch.where((c_l <= 0) & (c_u >= 0), torch.zeros_like(c_l), torch.minimum(c_l * c_l, c_u * c_u))
    sq_u = torch.maximum(c_l * c_l, c_u * c_u)
    v_l, v_u = sq_l.mean(-1, keepdim=True), sq_u.mean(-1, keepdim=True)
    v_l = torch.minimum(torch.maximum(v_l, variance_lower(lower, upper)), v_u)
    r_l, r_u = _h(v_u, eps), _h(v_l, eps)
    n_l = torch.where(c_l < 0, c_l * r_u, c_l * r_l)
    n_u = torch.where(c_u > 0, c_u * r_u, c_u * r_l)
    q = sq_l.sum(-1, keepdim=True) - sq_l
    n_u = torch.where(c_u >= 0, torch.minimum(n_u, _coupled(c_u, q, v_l, n, eps)), n_u)
    n_l = torch.where(c_l <= 0, torch.maximum(n_l, -_coupled(-c_l, q, v_l, n, eps)), n_l)
    n_l = torch.nan_to_num(n_l, nan=-torch.inf)
    n_u = torch.nan_to_num(n_u, nan=torch.inf)
    return GroupBounds(c_l, c_u, v_l, v_u, r_l, r_u, n_l, n_u)


def _affine_out(n_l, n_u, weight, bias) -> tuple[torch.Tensor, torch.Tensor]:
    if weight is not None:
        w = weight.reshape(-1)
        n_l, n_u = torch.minimum(n_l * w, n_u * w), torch.maximum(n_l * w, n_u * w)
        n_l = torch.where(w == 0, torch.zeros_like(n_l), n_l)
        n_u = torch.where(w == 0, torch.zeros_like(n_u), n_u)
    if bias is not None:
        b = bias.reshape(-1)
        n_l, n_u = n_l + b, n_u + b
    return n_l, n_u


@interval_rule(aten.layer_norm.default)
def layer_norm_interval(args, kwargs) -> Interval:
    """IBP of layer norm (see the module docstring)."""
    x, shape, weight, bias, eps = _parse(args, kwargs)
    k = len(shape)
    g = group_bounds(_flat(x.lower, k), _flat(x.upper, k), eps)
    lo, hi = _affine_out(g.n_l, g.n_u, weight, bias)
    return Interval(lo.reshape(x.lower.shape), hi.reshape(x.upper.shape))


# --- backward ---------------------------------------------------------------------------------


@dataclass
class Plane:
    """``n_i (>= or <=) a_i c_i + b_i r + k_i`` (McCormick), all ``(batch, *lead, N)``."""

    a: torch.Tensor
    b: torch.Tensor
    k: torch.Tensor


@dataclass
class RLinear:
    """``r (>= or <=) q . c + k``: ``q`` ``(batch, *lead, N)``, ``k`` ``(batch, *lead, 1)``."""

    q: torch.Tensor
    k: torch.Tensor


def mccormick(g: GroupBounds, c0: torch.Tensor, r0: torch.Tensor) -> tuple[Plane, Plane]:
    """Lower and upper planes of ``c * r`` on the box, each the tighter one at ``(c0, r0)``."""
    r_l, r_u = g.r_l.expand_as(g.c_l), g.r_u.expand_as(g.c_l)
    lo1 = Plane(r_l, g.c_l, -g.c_l * r_l)
    lo2 = Plane(r_u, g.c_u, -g.c_u * r_u)
    up1 = Plane(r_u, g.c_l, -g.c_l * r_u)
    up2 = Plane(r_l, g.c_u, -g.c_u * r_l)
    at = lambda p: p.a * c0 + p.b * r0 + p.k  # noqa: E731
    use1 = at(lo1) >= at(lo2)
    lower = Plane(*(torch.where(use1, x, y) for x, y in ((lo1.a, lo2.a), (lo1.b, lo2.b), (lo1.k, lo2.k))))
    use1 = at(up1) <= at(up2)
    upper = Plane(*(torch.where(use1, x, y) for x, y in ((up1.a, up2.a), (up1.b, up2.b), (up1.k, up2.k))))
    return lower, upper


def r_relaxation(g: GroupBounds, c0: torch.Tensor, eps: float) -> tuple[RLinear, RLinear]:
    """Linear lower and upper bounds of ``r = (mean(c^2) + eps)^(-1/2)`` in ``c`` on the box."""
    n = c0.shape[-1]
    # lower: tangent of h at v1, applied to vbar(c) = mean((c_L + c_U) c - c_L c_U) >= v
    slope_c = (g.c_l + g.c_u) / n
    vbar_k = -(g.c_l * g.c_u).mean(-1, keepdim=True)
    v1 = ((slope_c * c0).sum(-1, keepdim=True) + vbar_k).clamp(min=g.v_l, max=g.v_u)
    h1 = _h(v1, eps)
    dh1 = -0.5 * h1 / (v1 + eps)
    lower = RLinear(dh1 * slope_c, h1 + dh1 * (vbar_k - v1))
    # upper: chord of h on [v_L, v_U] (slope s <= 0, anchored at v_L), applied to vt(c) <= v
    width = g.v_u - g.v_l
    tiny = ~(width > 1e-6 * (g.v_u + eps))
    s_chord = (g.r_l - g.r_u) / torch.where(tiny, torch.ones_like(width), width)
    s = torch.where(tiny, -0.5 * g.r_l / (g.v_u + eps), s_chord).clamp(max=0.0)  # h'(v_U) >= chord slope
    vt_q = 2 * c0 / n
    vt_k = -(c0 * c0).mean(-1, keepdim=True)
    upper = RLinear(s * vt_q, g.r_u + s * (vt_k - g.v_l))
    return lower, upper


@dataclass
class LayerNormRelaxation:
    lower: Plane
    upper: Plane
    r_lower: RLinear
    r_upper: RLinear
    ok: torch.Tensor  # (batch, *lead, 1): groups with finite bounds
    n_l: torch.Tensor
    n_u: torch.Tensor


#: A linear piece is replaced by its constant IBP bound when its worst value over the box is more
#: than this many IBP widths beyond that bound.
MARGIN = 1.0


def _or_constant(g: GroupBounds, plane_l: Plane, plane_u: Plane, r_lower: RLinear, r_upper: RLinear):
    """Per entry (planes) and per group (``r``), keep a linear bound only when it is not much looser
    over the box than the constant IBP bound; otherwise use the constant."""
    zero = torch.zeros_like(g.c_l)
    n_w = g.n_u - g.n_l
    prod_l = torch.minimum(g.c_l * g.r_l, g.c_l * g.r_u)  # min of either lower plane over the box
    prod_u = torch.maximum(g.c_u * g.r_l, g.c_u * g.r_u)
    keep = prod_l >= g.n_l - MARGIN * n_w
    plane_l = Plane(torch.where(keep, plane_l.a, zero), torch.where(keep, plane_l.b, zero),
                    torch.where(keep, plane_l.k, g.n_l))
    keep = prod_u <= g.n_u + MARGIN * n_w
    plane_u = Plane(torch.where(keep, plane_u.a, zero), torch.where(keep, plane_u.b, zero),
                    torch.where(keep, plane_u.k, g.n_u))
    c_c, c_r = (g.c_u + g.c_l) / 2, (g.c_u - g.c_l) / 2
    r_w = g.r_u - g.r_l
    r_min = (r_lower.q * c_c - r_lower.q.abs() * c_r).sum(-1, keepdim=True) + r_lower.k
    keep = r_min >= g.r_l - MARGIN * r_w
    r_lower = RLinear(torch.where(keep, r_lower.q, zero), torch.where(keep, r_lower.k, g.r_l))
    r_max = (r_upper.q * c_c + r_upper.q.abs() * c_r).sum(-1, keepdim=True) + r_upper.k
    keep = r_max <= g.r_u + MARGIN * r_w
    r_upper = RLinear(torch.where(keep, r_upper.q, zero), torch.where(keep, r_upper.k, g.r_u))
    return plane_l, plane_u, r_lower, r_upper


def relax(lower: torch.Tensor, upper: torch.Tensor, eps: float) -> LayerNormRelaxation:
    """All linear pieces for ``(batch, *lead, N)`` input bounds (see the module docstring)."""
    ok = (torch.isfinite(lower) & torch.isfinite(upper)).all(-1, keepdim=True)
    lo = torch.where(ok, lower, torch.zeros_like(lower))
    hi = torch.where(ok, upper, torch.zeros_like(upper))
    g = group_bounds(lo, hi, eps)
    x0 = (lo + hi) / 2
    c0 = x0 - x0.mean(-1, keepdim=True)
    r0 = _h((c0 * c0).mean(-1, keepdim=True), eps)
    plane_l, plane_u = mccormick(g, c0, r0)
    r_lower, r_upper = r_relaxation(g, c0, eps)
    plane_l, plane_u, r_lower, r_upper = _or_constant(g, plane_l, plane_u, r_lower, r_upper)
    full = g if not possibly_any(~ok) else group_bounds(lower, upper, eps)
    return LayerNormRelaxation(plane_l, plane_u, r_lower, r_upper, ok, full.n_l, full.n_u)


def _safe_dot(lam: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    value = value.expand_as(lam)
    return torch.where(lam == 0, torch.zeros_like(lam), lam * value)


def pull(rel: LayerNormRelaxation, lam: torch.Tensor, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Coefficients ``lam`` of ``n`` ``(batch, spec, *lead, N)`` -> (coefficients of ``x``, bias).

    ``side="lower"``: a lower bound of ``lam . n`` (``"upper"``: an upper bound).
    """
    e = lambda t: t.unsqueeze(1)  # noqa: E731
    first, second = (rel.lower, rel.upper) if side == "lower" else (rel.upper, rel.lower)
    r_first, r_second = (rel.r_lower, rel.r_upper) if side == "lower" else (rel.r_upper, rel.r_lower)
    pos, neg = lam.clamp(min=0), lam.clamp(max=0)
    coef_c = pos * e(first.a) + neg * e(second.a)
    bias = (pos * e(first.k) + neg * e(second.k)).sum(-1, keepdim=True)
    rho = (pos * e(first.b) + neg * e(second.b)).sum(-1, keepdim=True)
    rp, rn = rho.clamp(min=0), rho.clamp(max=0)
    coef_c = coef_c + rp * e(r_first.q) + rn * e(r_second.q)
    bias = bias + rp * e(r_first.k) + rn * e(r_second.k)
    coef_x = coef_c - coef_c.mean(-1, keepdim=True)
    ok = e(rel.ok)
    coef_x = torch.where(ok, coef_x, torch.zeros_like(coef_x))
    const = rel.n_l if side == "lower" else rel.n_u
    const_other = rel.n_u if side == "lower" else rel.n_l
    fallback = (_safe_dot(pos, e(const)) + _safe_dot(neg, e(const_other))).sum(-1, keepdim=True)
    bias = torch.where(ok, bias, fallback)
    return coef_x, bias.flatten(2).sum(-1)


@backward_rule(aten.layer_norm.default)
def layer_norm_backward(call):
    """CROWN through layer norm: ``A . y = (A w) . n + A . bias`` and ``n`` relaxed as documented."""
    from ..algorithms.backward import BackwardOut  # noqa: PLC0415 - algorithms import rules

    x, shape, weight, bias, eps = _parse(call.args, call.kwargs)
    if not isinstance(x, Var):
        raise NotImplementedError("layer_norm: the input must be the perturbed argument")
    k = len(shape)
    memo = call.memo if call.memo is not None else {}
    rel = memo.get(("layer_norm", k, eps))
    if rel is None:  # the same for every walk through the node (its input interval's alone)
        rel = memo[("layer_norm", k, eps)] = relax(_flat(x.bounds.lower, k), _flat(x.bounds.upper, k), eps)
    out_shape = call.lA.shape if call.lA is not None else call.uA.shape

    def side(A, which):
        if A is None:
            return None, 0.0
        A = _flat(A, k)
        bias_term = (A * bias.reshape(-1)).flatten(2).sum(-1) if bias is not None else 0.0
        lam = A * weight.reshape(-1) if weight is not None else A
        coef, b = pull(rel, lam, which)
        return coef.reshape(out_shape), b + bias_term

    new_l, lbias = side(call.lA, "lower")
    new_u, ubias = side(call.uA, "upper")
    return BackwardOut([(x.name, new_l, new_u)], lbias, ubias)

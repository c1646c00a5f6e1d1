"""Products and quotients of two perturbed tensors: ``x * y``, ``a / b``, and matrix products.

**McCormick.** For one product term ``x y`` with ``x in [lx, ux]``, ``y in [ly, uy]``, the four
inequalities ``(x - lx)(y - ly) >= 0``, ``(ux - x)(uy - y) >= 0``, ``(x - lx)(y - uy) <= 0`` and
``(ux - x)(y - ly) >= 0`` give two lower and two upper planes; convex combinations stay valid::

    x y >= t (ly x + lx y - lx ly) + (1 - t) (uy x + ux y - ux uy)        t in [0, 1]
    x y <= s (uy x + lx y - lx uy) + (1 - s) (ly x + ux y - ux ly)        s in [0, 1]

On the box, the lower plane ``P_t`` errs only at the corners ``(lx, ly)`` (by ``(1 - t) g``) and
``(ux, uy)`` (by ``t g``), ``g = (ux - lx)(uy - ly)``; the upper ``Q_s`` at ``(lx, uy)`` (by
``(1 - s) g``) and ``(ux, ly)`` (by ``s g``). The default (``opts["mul_relaxation"] = "box"``)
balances the two erring corners::

    t = clamp((ux uy - lx ly + g) / (2 g), 0, 1)        s = clamp((lx uy - ux ly + g) / (2 g), 0, 1)

(the lower plane's erring corners then sit at ``(ux ly + lx uy) / 2 >= min(ux ly, lx uy)``, the
upper's at ``(lx ly + ux uy) / 2 <= max(lx ly, ux uy)``), so each plane, minimised (maximised) over
the box, gives the product's exact range: on a product of two independent boxes CROWN is never
looser than IBP. ``"fixed"`` is auto_LiRPA's default
``t = s = 1``; ``"middle"`` (or auto_LiRPA's ``opts["mul"] = {"middle": True}``) is
``t = s = 1/2``.

**Square** ``x * x`` (both factors the same node): ``x^2`` is convex, so with a tangent point
``z = l + t (u - l)`` (default ``z = clamp(0, l, u)``, where ``x^2`` is smallest)::

    2 z x - z^2  <=  x^2  <=  (l + u) x - l u

**Division** ``a / b`` (``b`` perturbed): ``r = 1/b`` is bounded by the reciprocal relaxation of
:mod:`.convex`, ``lw b + lb <= r <= uw b + ub``, on ``r in [1/u, 1/l]``, and ``a r`` by McCormick on ``(a, r)``; the
coefficient of ``r`` (summed over broadcast copies) is passed on through the relaxation. If
``[l, u]`` contains 0 the quotient is unbounded: infinite bounds.

**Matrix products** ``out[.., i, j] = sum_k x[.., i, k] y[.., k, j]`` (``mm``, ``bmm``, ``matmul``;
``linear`` and ``addmm`` with a perturbed weight, ``linear`` as ``x @ W^T + b``): McCormick on every
term ``x_ik y_kj`` (planes of shape ``(batch, .., n, k, m)``), summed over ``k``::

    A_x[b, s, .., i, k] = sum_j A+[b, s, .., i, j] a_lo[b, .., i, k, j] + A-[..] a_up[..]   (einsum)

**Shapes.** ``A``: ``(batch, spec, *out)``. The coefficient of a batched operand is ``(batch, spec,
*operand.shape[1:])``, that of a perturbed parameter (no batch dimension) ``(batch, spec,
*param.shape)``; an operand broadcast in the product gets its coefficient summed over the
broadcast dimensions. Infinite bound ends (or products that overflow) give a ``-inf`` lower /
``+inf`` upper bias wherever the coefficient is nonzero, never NaN.

**alpha.** ``call.alpha_for(direction)`` may return ``(2, batch, [spec,] *terms)`` (``terms`` = out
for mul/div, ``(.., n, k, m)`` for matrix products; for a square only ``alpha[0]``, the tangent
point ``t``): ``alpha[0] = t``, ``alpha[1] = s``, clamped into [0, 1]; :func:`mul_alpha_init` gives
the default. (No :class:`AlphaSpec` is registered: alpha-CROWN's relaxation parameters are keyed
on a node's first input, which does not fit a product of two.)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..domains import Interval, Relaxation
from ..syncs import possibly_any
from .convex import reciprocal_interval, reciprocal_relaxation  # 1/x belongs to the convex family
from .registry import RelaxCall, Var, backward_rule, constant_tensor

aten = torch.ops.aten
_INF = float("inf")


def _sign_definite(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    return ((lo > 0) | (hi < 0)) & torch.isfinite(lo) & torch.isfinite(hi)


# --- McCormick planes ------------------------------------------------------------------------


@dataclass(frozen=True)
class Plane:
    """``ax * x + ay * y + c``, fields broadcast to the product terms (``ax``/``ay`` None: unused)."""

    ax: torch.Tensor | None
    ay: torch.Tensor | None
    c: torch.Tensor | None


def mccormick_weights(lx, ux, ly, uy, mode: str = "box") -> tuple[torch.Tensor, torch.Tensor]:
    """Default ``(t, s)`` of the module docstring for ``mode`` in box / fixed / middle."""
    shape = torch.broadcast_shapes(lx.shape, ux.shape, ly.shape, uy.shape)
    if mode in ("fixed", "middle"):
        value = 1.0 if mode == "fixed" else 0.5
        full = torch.full(shape, value, dtype=lx.dtype, device=lx.device)
        return full, full
    if mode != "box":
        raise ValueError(f"mul_relaxation={mode!r}: choose 'box', 'fixed' or 'middle'")
    finite = torch.isfinite(lx) & torch.isfinite(ux) & torch.isfinite(ly) & torch.isfinite(uy)
    lx, ux, ly, uy = (torch.where(finite, v, 0.0) for v in (lx, ux, ly, uy))
    gap = (ux - lx) * (uy - ly)
    ok = gap > 0
    den = 2 * torch.where(ok, gap, 1.0)
    t = torch.where(ok, (ux * uy - lx * ly + gap) / den, 1.0).clamp(0.0, 1.0)
    s = torch.where(ok, (lx * uy - ux * ly + gap) / den, 1.0).clamp(0.0, 1.0)
    return t.expand(shape), s.expand(shape)


def mul_alpha_init(lx, ux, ly, uy, opts: dict | None = None) -> torch.Tensor:
    """The default alpha ``stack(t, s)`` (shape ``(2, *terms)``) for the given term bounds."""
    return torch.stack(mccormick_weights(lx, ux, ly, uy, _mode(opts or {})))


def mccormick_planes(lx, ux, ly, uy, t, s) -> tuple[Plane, Plane, torch.Tensor]:
    """Lower and upper planes of ``x y`` on the box, and the mask of terms with non-finite data.

    Where a bound end is infinite, or the planes overflow, the planes are zeroed and the mask is
    set (the caller then makes the bias infinite there).
    """
    bad = ~(torch.isfinite(lx) & torch.isfinite(ux) & torch.isfinite(ly) & torch.isfinite(uy))
    if possibly_any(bad):
        lx, ux, ly, uy = (torch.where(bad, 0.0, v) for v in (lx, ux, ly, uy))
    lower = Plane(t * ly + (1 - t) * uy, t * lx + (1 - t) * ux, -(t * lx * ly + (1 - t) * ux * uy))
    upper = Plane(s * uy + (1 - s) * ly, s * lx + (1 - s) * ux, -(s * lx * uy + (1 - s) * ux * ly))
    overflow = ~(torch.isfinite(lower.c) & torch.isfinite(upper.c))
    if possibly_any(overflow):
        bad = bad | overflow
        lower, upper = (Plane(*(torch.where(bad, 0.0, f) for f in (p.ax, p.ay, p.c))) for p in (lower, upper))
    return lower, upper, bad


def _mode(opts: dict) -> str:
    if isinstance(opts.get("mul"), dict) and opts["mul"].get("middle"):
        return "middle"
    return opts.get("mul_relaxation", "box")


# --- operands ----------------------------------------------------------------------------------


@dataclass
class _Factor:
    """One operand in canonical form (rank ``R`` of the output, size-1 dims where broadcast).

    ``name`` is None for a constant (or an internal quantity such as ``1/b``); ``restore`` maps a
    coefficient ``(batch, spec, *value.shape[1:])`` back to the operand's own shape.
    """

    name: str | None
    value: torch.Tensor
    lower: torch.Tensor
    upper: torch.Tensor
    batched: bool
    restore: Callable[[torch.Tensor], torch.Tensor]

    @property
    def const(self) -> bool:
        return self.name is None and self.lower is self.upper


def _pad(t: torch.Tensor, rank: int) -> torch.Tensor:
    if t.dim() > rank:
        raise NotImplementedError(f"an operand of rank {t.dim()} in a product of rank {rank}")
    return t.reshape((1,) * (rank - t.dim()) + tuple(t.shape))


def _factor(arg, rank: int, view: Callable | None = None, restore: Callable | None = None) -> _Factor:
    """Canonical form of a node argument (a :class:`Var` or a constant) for a product of rank ``rank``."""
    view = view or (lambda t: t)
    if isinstance(arg, Var):
        if arg.bounds is None:
            raise RuntimeError(f"product rule: no interval for {arg.name}")
        own = tuple(arg.value.shape[1:]) if arg.batched else tuple(arg.value.shape)
        value = _pad(view(arg.value), rank)
        if arg.batched and view(arg.value).dim() != rank:
            raise NotImplementedError("a batched operand of lower rank than the product")
        return _Factor(arg.name, value, _pad(view(arg.bounds.lower), rank), _pad(view(arg.bounds.upper), rank),
                       arg.batched, restore or (lambda G: G.reshape(*G.shape[:2], *own)))
    value = _pad(view(constant_tensor(arg)), rank)
    return _Factor(None, value, value, value, True, lambda G: G)


def _sum_to(G: torch.Tensor, shape) -> torch.Tensor:
    """Sum ``G`` ``(batch, spec, *out)`` over the dims where a canonical ``shape`` (``(1 or batch, *)``) is 1.

    The batch dimension is never summed: a parameter's coefficient keeps one row per batch element.
    """
    dims = [2 + i for i, n in enumerate(shape[1:]) if n == 1 and G.shape[2 + i] != 1]
    return G.sum(dim=dims, keepdim=True) if dims else G


def _coefficient(G: torch.Tensor, f: _Factor) -> torch.Tensor:
    """The coefficient of factor ``f`` from its coefficient ``G`` broadcast to the product's shape."""
    if not f.batched and f.value.shape[0] != 1:
        raise NotImplementedError("a perturbed parameter broadcast along the batch dimension")
    return f.restore(_sum_to(G, f.value.shape))


def _lift(t: torch.Tensor, rank: int) -> torch.Tensor:
    """A relaxation field of rank ``rank`` (no spec dim) -> insert the spec dim; with spec: as is."""
    return t.unsqueeze(1) if t.dim() == rank else t


def _alpha(call, direction: str, shape_rank: int, mode: str, lx, ux, ly, uy):
    """``(t, s, spec)``: the plane weights for one side and whether they carry a spec dimension."""
    alpha = call.alpha_for(direction)
    if alpha is None:
        t, s = mccormick_weights(lx, ux, ly, uy, mode)
        return t, s, False
    t, s = alpha[0].clamp(0.0, 1.0), alpha[1].clamp(0.0, 1.0)
    return t, s, t.dim() == shape_rank + 1


def _sides(call):
    """``(A, sign, direction)`` for each side asked for: -1 = lower bound of ``A . out``."""
    if call.lA is not None:
        yield call.lA, -1, "lower"
    if call.uA is not None:
        yield call.uA, +1, "upper"


def _signed_parts(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A+, A-)``, split once per side for all the sums of :func:`_signed_sum`."""
    return A.clamp(min=0), A.clamp(max=0)


def _signed_sum(parts: tuple[torch.Tensor, torch.Tensor], sign: int, lo, up, contract):
    """``contract(A+, first) + contract(A-, second)`` (``parts`` = :func:`_signed_parts`), the planes
    picked by the side's sign."""
    first, second = (lo, up) if sign < 0 else (up, lo)
    return contract(parts[0], first) + contract(parts[1], second)


def _infinite_bias(cb: torch.Tensor, A: torch.Tensor, bad: torch.Tensor | None, sign: int) -> torch.Tensor:
    """Elementwise bias ``(batch, spec, *out)`` -> ``(batch, spec)``, infinite where ``bad`` and ``A != 0``."""
    if bad is not None and possibly_any(bad):
        cb = torch.where(bad & (A != 0), sign * _INF, cb)
    return cb.flatten(2).sum(-1)


def _out(A_list, lbias, ubias):
    from ..algorithms.backward import BackwardOut  # noqa: PLC0415 - algorithms import the rules

    return BackwardOut(A_list, lbias, ubias)


def _named(names: list[str | None], sides: dict) -> list:
    """``[(name, lA, uA)]`` for the perturbed factors, from per-side coefficient lists (None: constant)."""
    none = [None] * len(names)
    return [(name, sides.get("lower", none)[i], sides.get("upper", none)[i])
            for i, name in enumerate(names) if name is not None]


# --- element-wise products -------------------------------------------------------------------


def _elementwise_side(A, sign, X: _Factor, Y: _Factor, call, direction):
    """Coefficients ``(G_x, G_y)`` (on the output's shape) and bias of one side of ``A . (x * y)``."""
    rank = A.dim() - 1
    if X.const or Y.const:
        G = A * _lift(X.value if X.const else Y.value, rank)
        return (None, G) if X.const else (G, None), 0.0
    named = X.name is not None and Y.name is not None
    (lo, up, bad), _ = _planes(call, direction, rank, [X.lower, X.upper, Y.lower, Y.upper], named, "mul")
    mul = lambda field: lambda part, plane: part * _lift(getattr(plane, field), rank)
    parts = _signed_parts(A)
    gx = _signed_sum(parts, sign, lo, up, mul("ax"))
    gy = _signed_sum(parts, sign, lo, up, mul("ay"))
    cb = _signed_sum(parts, sign, lo, up, mul("c"))
    return (gx, gy), _infinite_bias(cb, A, _lift(bad, rank), sign)


def _planes(call, direction: str, rank: int, bounds: list, named: bool, kind: str):
    """``((lower, upper, bad), spec)``: McCormick planes of one side on ``bounds`` = ``[lx, ux, ly, uy]``
    (rank ``rank`` before any spec dimension), with alpha-CROWN's weights or the default ones.

    The default planes of two node inputs (``named``) depend on their intervals alone (the same for
    both sides and every walk through the node): they are kept in the node's memo under ``kind``.
    Not for derived factors, such as the reciprocal a division builds per side.
    """
    memo = call.memo if call.memo is not None and named and call.alpha_for(direction) is None else None
    key = (kind, rank)
    if memo is not None and key in memo:
        return memo[key]
    t, s, spec = _alpha(call, direction, rank, _mode(call.opts), *bounds)
    if spec:
        bounds = [b.unsqueeze(1) for b in bounds]
    planes = mccormick_planes(*bounds, t, s), spec
    if memo is not None:
        memo[key] = planes
    return planes


def _square_side(A, sign, X: _Factor, call, direction):
    """``A . x^2`` for one side: tangent below (at ``z``), chord above."""
    rank = A.dim() - 1
    lo, hi = X.lower, X.upper
    bad = ~(torch.isfinite(lo) & torch.isfinite(hi))
    if possibly_any(bad):
        lo, hi = torch.where(bad, 0.0, lo), torch.where(bad, 0.0, hi)
    alpha = call.alpha_for(direction)
    if alpha is None:
        z = torch.minimum(torch.maximum(torch.zeros_like(lo), lo), hi)
    else:
        t = alpha[0].clamp(0.0, 1.0)
        if t.dim() == rank + 1:
            lo, hi, bad = lo.unsqueeze(1), hi.unsqueeze(1), bad.unsqueeze(1)
        z = lo + t * (hi - lo)
    tangent = Plane(2 * z, None, -z * z)
    chord = Plane(lo + hi, None, -lo * hi)
    overflow = ~(torch.isfinite(tangent.c) & torch.isfinite(chord.c))
    if possibly_any(overflow):
        bad = bad | overflow
        tangent, chord = (Plane(torch.where(bad, 0.0, p.ax), None, torch.where(bad, 0.0, p.c))
                          for p in (tangent, chord))
    mul = lambda field: lambda part, plane: part * _lift(getattr(plane, field), rank)
    parts = _signed_parts(A)
    g = _signed_sum(parts, sign, tangent, chord, mul("ax"))
    cb = _signed_sum(parts, sign, tangent, chord, mul("c"))
    return g, _infinite_bias(cb, A, _lift(bad, rank), sign)


def square_alpha_init(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Default tangent position ``t`` (``z = l + t (u - l) = clamp(0, l, u)``) for ``x * x``."""
    width = hi - lo
    z = torch.minimum(torch.maximum(torch.zeros_like(lo), lo), hi)
    return torch.where(width > 0, (z - lo) / torch.where(width > 0, width, 1.0), 0.0)


@backward_rule(aten.mul.Tensor)
def mul_backward(call):
    """``x * y`` with both factors perturbed (McCormick; the square rule when ``x`` and ``y`` are one node)."""
    x, y = call.args[0], call.args[1]
    A0 = call.lA if call.lA is not None else call.uA
    rank = A0.dim() - 1
    if isinstance(x, Var) and isinstance(y, Var) and x.name == y.name:
        X = _factor(x, rank)
        res, bias = {}, {"lower": 0.0, "upper": 0.0}
        for A, sign, direction in _sides(call):
            g, bias[direction] = _square_side(A, sign, X, call, direction)
            res[direction] = _coefficient(g, X)
        return _out([(x.name, res.get("lower"), res.get("upper"))], bias["lower"], bias["upper"])
    X, Y = _factor(x, rank), _factor(y, rank)
    sides, bias = {}, {"lower": 0.0, "upper": 0.0}
    for A, sign, direction in _sides(call):
        (gx, gy), bias[direction] = _elementwise_side(A, sign, X, Y, call, direction)
        sides[direction] = [_coefficient(gx, X) if X.name else None, _coefficient(gy, Y) if Y.name else None]
    return _out(_named([X.name, Y.name], sides), bias["lower"], bias["upper"])


# --- division -------------------------------------------------------------------------------


def _through_relaxation(G: torch.Tensor, relax: Relaxation, sign: int, rank: int):
    """Pass ``G . r`` through ``lw b + lb <= r <= uw b + ub``: coefficient of ``b`` and bias (batch, spec).

    Terms with a zero coefficient contribute nothing, even where the relaxation is infinite.
    """
    pos, neg = _signed_parts(G)
    lw, lb, uw, ub = (_lift(f, rank) for f in (relax.lw, relax.lb, relax.uw, relax.ub))
    if sign < 0:
        w_pos, b_pos, w_neg, b_neg = lw, lb, uw, ub
    else:
        w_pos, b_pos, w_neg, b_neg = uw, ub, lw, lb
    coeff = torch.where(pos != 0, pos * w_pos, 0.0) + torch.where(neg != 0, neg * w_neg, 0.0)
    bias = torch.where(pos != 0, pos * b_pos, 0.0) + torch.where(neg != 0, neg * b_neg, 0.0)
    return coeff, bias.flatten(2).sum(-1)


def _reciprocal_parts(b: _Factor, opts: dict, direction: str):
    """Interval of ``1/b`` and the relaxation serving ``direction``; infinite where ``b``'s interval
    contains 0 (or the relaxation is not finite, e.g. overflow for tiny ``|b|``)."""
    box = reciprocal_interval((Interval(b.lower, b.upper),), {})
    relax = reciprocal_relaxation(b.lower, b.upper, RelaxCall(opts=opts, direction=direction))
    ok = _sign_definite(b.lower, b.upper)
    for field in (relax.lw, relax.lb, relax.uw, relax.ub):
        ok = ok & torch.isfinite(field)
    zero = torch.zeros_like(b.lower)
    relax = Relaxation(torch.where(ok, relax.lw, zero), torch.where(ok, relax.lb, -_INF),
                       torch.where(ok, relax.uw, zero), torch.where(ok, relax.ub, _INF))
    box = Interval(torch.where(ok, box.lower, -_INF), torch.where(ok, box.upper, _INF))
    return box, relax


@backward_rule(aten.div.Tensor)
def div_backward(call):
    """``a / b`` with ``b`` perturbed: ``a * r``, ``r = 1/b``: McCormick on ``(a, r)``, then 1/b's relaxation."""
    a, b = call.args[0], call.args[1]
    if not isinstance(b, Var):
        raise NotImplementedError("div backward rule: expected a perturbed divisor")
    A0 = call.lA if call.lA is not None else call.uA
    rank = A0.dim() - 1
    X, Bf = _factor(a, rank), _factor(b, rank)
    sides, bias = {}, {"lower": 0.0, "upper": 0.0}
    for A, sign, direction in _sides(call):
        box, relax = _reciprocal_parts(Bf, call.opts, direction)
        R = _Factor(None, torch.reciprocal(Bf.value), box.lower, box.upper, Bf.batched, lambda G: G)
        (gx, gr), product_bias = _elementwise_side(A, sign, X, R, call, direction)
        gr = _sum_to(gr, Bf.value.shape)
        gb, relax_bias = _through_relaxation(gr, relax, sign, rank)
        bias[direction] = product_bias + relax_bias
        sides[direction] = [_coefficient(gx, X) if X.name else None, Bf.restore(gb)]
    return _out(_named([X.name, Bf.name], sides), bias["lower"], bias["upper"])


# --- matrix products -------------------------------------------------------------------------

_EQ = {("x", False): "bs...ij,b...ikj->bs...ik", ("x", True): "bs...ij,bs...ikj->bs...ik",
       ("y", False): "bs...ij,b...ikj->bs...kj", ("y", True): "bs...ij,bs...ikj->bs...kj"}


def _matmul_side(A, sign, X: _Factor, Y: _Factor, call, direction):
    """``A . (X @ Y)`` for one side; ``A`` ``(batch, spec, .., n, m)``, X ``(.., n, k)``, Y ``(.., k, m)``."""
    rank = A.dim() - 1
    if X.const and Y.const:  # neither factor perturbed (only a bias is): the product is a constant term
        return (None, None), (A * (X.value @ Y.value).unsqueeze(1)).flatten(2).sum(-1)
    if X.const:
        return (None, X.value.unsqueeze(1).transpose(-1, -2) @ A), 0.0
    if Y.const:
        return (A @ Y.value.unsqueeze(1).transpose(-1, -2), None), 0.0
    bounds = [X.lower.unsqueeze(-1), X.upper.unsqueeze(-1), Y.lower.unsqueeze(-3), Y.upper.unsqueeze(-3)]
    named = X.name is not None and Y.name is not None
    (lo, up, bad), spec = _planes(call, direction, rank + 1, bounds, named, "matmul")
    contract = lambda which, field: lambda part, plane: torch.einsum(_EQ[which, spec], part, getattr(plane, field))
    parts = _signed_parts(A)
    gx = _signed_sum(parts, sign, lo, up, contract("x", "ax"))
    gy = _signed_sum(parts, sign, lo, up, contract("y", "ay"))
    bias_of = lambda part, plane: part * _lift(plane.c.sum(-2), rank)
    cb = _signed_sum(parts, sign, lo, up, bias_of)
    return (gx, gy), _infinite_bias(cb, A, _lift(bad.any(-2), rank), sign)


def _value(arg) -> torch.Tensor:
    return arg.value if isinstance(arg, Var) else constant_tensor(arg)


def _is_batched(arg) -> bool:
    return isinstance(arg, Var) and arg.batched


def _matmul_canonical(x, y, A: torch.Tensor):
    """Views making ``x @ y`` a batched product ``(B, .., n, k) @ (.., k, m)`` and ``A`` ``(B, S, .., n, m)``.

    1-D operands get a unit row/column (as ``torch.matmul``); a 2-D product whose rows are the
    batch (``(B, k) @ (k, m)``) gets a unit row dimension after the batch.
    """
    vx, vy = [], []
    xr, yr = _value(x).dim(), _value(y).dim()
    if yr == 1:
        vy.append(lambda t: t.unsqueeze(-1))
        A = A.unsqueeze(-1)
        yr = 2
    if xr == 1:
        vx.append(lambda t: t.unsqueeze(0))
        A = A.unsqueeze(-2)
        xr = 2
    if _is_batched(y) and yr < 3:
        raise NotImplementedError("matmul: a batched right operand must have a batch dimension of its own")
    if xr == 2 and yr == 2:
        vx.append(lambda t: t.unsqueeze(1))
        A = A.unsqueeze(2)
    compose = lambda views: (lambda t: _apply(views, t))
    return compose(vx), compose(vy), A


def _apply(views, t):
    for view in views:
        t = view(t)
    return t


@backward_rule(aten.mm.default, aten.bmm.default, aten.matmul.default)
def matmul_backward(call):
    """``x @ y`` with both operands perturbed, or a perturbed parameter times a constant."""
    x, y = call.args[0], call.args[1]
    A0 = call.lA if call.lA is not None else call.uA
    view_x, view_y, canon = _matmul_canonical(x, y, A0)
    rank = canon.dim() - 1
    X, Y = _factor(x, rank, view_x), _factor(y, rank, view_y)
    return _with_bias(call, X, Y, lambda A: _matmul_canonical(x, y, A)[2], None)


def _bias_term(bias, A: torch.Tensor, scale=1.0):
    """``scale * bias`` added to the output: its coefficient (perturbed) or its constant term."""
    if bias is None:
        return None, None, 0.0
    A = A * scale if scale != 1 else A
    if isinstance(bias, Var):
        f = _factor(bias, A.dim() - 1)
        return bias.name, _coefficient(A, f), 0.0
    b = constant_tensor(bias)
    return None, None, (A * b).flatten(2).sum(-1)


def _with_bias(call, X: _Factor, Y: _Factor, canon_A: Callable, bias, scale=1.0):
    """``A . (X @ Y + scale * bias)`` for each side; ``canon_A`` maps ``A`` to the canonical product shape."""
    sides, biases, extra = {}, {"lower": 0.0, "upper": 0.0}, {}
    for A, sign, direction in _sides(call):
        (gx, gy), biases[direction] = _matmul_side(canon_A(A), sign, X, Y, call, direction)
        sides[direction] = [_coefficient(gx, X) if X.name else None, _coefficient(gy, Y) if Y.name else None]
        name, coeff, constant = _bias_term(bias, A, scale)
        biases[direction] = biases[direction] + constant
        if name is not None:
            extra[direction] = coeff
    A_list = _named([X.name, Y.name], sides)
    if extra:
        A_list.append((bias.name, extra.get("lower"), extra.get("upper")))
    return _out(A_list, biases["lower"], biases["upper"])


@backward_rule(aten.linear.default)
def linear_backward(call):
    """``x W^T + b`` with a perturbed weight (weight perturbation): ``x @ W^T`` as a matrix product."""
    x, weight = call.args[0], call.args[1]
    bias = call.args[2] if len(call.args) > 2 else call.kwargs.get("bias")
    if _is_batched(weight):
        raise NotImplementedError("linear: a weight computed from the input is not supported")
    A0 = call.lA if call.lA is not None else call.uA
    row = _value(x).dim() == 2
    canon_A = (lambda A: A.unsqueeze(2)) if row else (lambda A: A)
    rank = canon_A(A0).dim() - 1
    X = _factor(x, rank, (lambda t: t.unsqueeze(1)) if row else None)
    if isinstance(weight, Var):
        shape = tuple(weight.value.shape)
        Y = _factor(weight, rank, lambda t: t.transpose(-1, -2),
                    lambda G: G.reshape(*G.shape[:2], shape[1], shape[0]).transpose(-1, -2))
    else:
        Y = _factor(weight, rank, lambda t: t.transpose(-1, -2))
    return _with_bias(call, X, Y, canon_A, bias)


@backward_rule(aten.addmm.default)
def addmm_backward(call):
    """``beta * bias + alpha * (a @ b)`` with ``a`` and ``b`` perturbed (or a perturbed parameter factor)."""
    bias, a, b = call.args[:3]
    beta, alpha = call.kwargs.get("beta", 1), call.kwargs.get("alpha", 1)
    A0 = call.lA if call.lA is not None else call.uA
    view_x, view_y, canon = _matmul_canonical(a, b, A0)
    rank = canon.dim() - 1
    X, Y = _factor(a, rank, view_x), _factor(b, rank, view_y)
    return _with_bias(call, X, Y, lambda A: _matmul_canonical(a, b, A * alpha)[2], bias, beta)

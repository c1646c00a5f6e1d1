"""Linear relaxations of smooth element-wise functions with piecewise one-signed curvature.

The smooth nonlinear families (:mod:`.sshaped`, :mod:`.convex`, :mod:`.periodic`,
:mod:`.activations`) describe their function as a :class:`Curve` (``f``, ``f'`` and where ``f``
changes curvature) and get their relaxation from :func:`curve_relaxation`. For one line, the lower
one (the upper one is minus the lower line of ``-f``), on ``[l, u]``:

1. Regions. The inflection points strictly inside ``(l, u)`` cut it into at most three regions
   on each of which ``f`` is convex or concave.
2. Slope ``s`` (only tightness depends on it; any slope gives a sound line, see 3):

   * one region, convex: the tangent slope ``f'(d)``, ``d = l + a (u - l)``;
   * one region, concave: the chord slope ``k = (f(u) - f(l)) / (u - l)``;
   * two regions (inflection ``c``): the chord if it lies below ``f`` (convex left of ``c``:
     ``f'(l) >= k``; convex right of it: ``f'(u) <= k``), else the tangent at ``d`` on the convex
     side, between the near endpoint and the point ``t`` whose tangent passes through the far
     endpoint. The tangent's gap at the far endpoint is monotone in ``t`` there, so ``t`` is found by
     a bracketing search (:func:`shrink_bracket`), keeping the side that is valid. ``d = t`` by default (``a = 1``);
   * three regions: the chord slope.

   ``a`` is 1/2 (one region) or 1 (two regions) by default, or alpha-CROWN's ``alpha`` in [0, 1]
   (one number per neuron moves the tangent point of whichever line has one).
3. Offset: ``b = min over [l, u] of h(x) = f(x) - s x`` (the largest sound one), region by region:
   on a concave region the minimum of ``h`` is at an end; on a convex region it is at least the
   tangent of ``h`` at any point ``x^`` of it, ``h(x^) + min over the ends of h'(x^) (x - x^)``,
   with ``x^`` the known tangent point or, for chord slopes, a search for ``f'(x^) = s``. The
   bound holds for every ``x^``, so soundness never rests on the accuracy of a root search.
   Gradients (alpha-CROWN, training through bounds) do not run through this minimum: where the line
   touches ``f`` at ``x*`` (the tangent point, or a chord's end) its derivative is that of
   ``f(x*) - s x*`` (envelope theorem), and that short expression carries it (:func:`_offset`).
4. Rounding: all this runs in float64; offsets are then moved outwards by a few units in the last
   place of the output dtype, relative to ``|w| max(|l|, |u|) + |b|`` (plus the smallest normal
   number), and cast back. A line that is not finite (an infinite end of the interval, overflow, a
   pole) becomes the constant given by the interval rule (``w = 0``, ``b`` = the IBP bound). Where
   that bound is infinite no finite line exists; the registered rules then raise
   NotImplementedError (:func:`require_bounded`).

Shapes: ``l``, ``u`` are ``(batch, *shape)``; with an alpha of shape ``(batch, spec, *shape)`` the
interval is lifted to ``(batch, 1, *shape)`` and the lines come out ``(batch, spec, *shape)``.

Only the lines' tangent points depend on alpha: the split, the chord, the searches for ``t`` and
the three-region lines depend on the interval alone (:func:`prepare_curve`), and alpha-CROWN's
walks from every start after a node share them through the call's memo (:func:`curve_relaxation`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..domains import Interval, Relaxation
from ..syncs import defer, possibly_any
from .registry import AlphaSpec, RelaxCall

INF = float("inf")
Fn = Callable[[torch.Tensor], torch.Tensor]
#: ``regions(l, u) -> (cuts, convex_first)``: inflection points (ascending tensors or floats) and
#: whether ``f`` is convex left of the first one (everywhere, without cuts).
Regions = Callable[[torch.Tensor, torch.Tensor], tuple[list, torch.Tensor]]

#: Bisection steps of the searches for tangent and stationary points (float64, vectorised): the
#: bracket shrinks by ``2**BISECTION_STEPS``.
BISECTION_STEPS = 24
#: Inner points per round of a ``K + 1``-ary search (:func:`shrink_bracket`; ``K + 1`` a power of two), used
#: while the bracket times ``K`` has at most ``SEARCH_ELEMENTS`` elements
SEARCH_POINTS, SEARCH_ELEMENTS = 15, 2**14


@dataclass(frozen=True)
class Curve:
    """A scalar function with known curvature pieces (all tensors float64).

    ``df`` may be a one-sided derivative at a kink, provided the kink is a cut or the function is
    convex (or concave) across it with ``df`` a sub- (super-) gradient there.
    """

    f: Fn
    df: Fn
    regions: Regions

    def negated(self) -> Curve:
        f, df, regions = self.f, self.df, self.regions

        def flipped(low, high):
            cuts, convex = regions(low, high)
            return cuts, ~convex

        return Curve(lambda x: -f(x), lambda x: -df(x), flipped)


def fixed_regions(cuts: tuple[float, ...] = (), convex_first: bool = True) -> Regions:
    """Regions of a function whose inflection points do not depend on the interval."""

    def regions(low, high):
        return list(cuts), torch.full_like(low, convex_first, dtype=torch.bool)

    return regions


def convex_curve(f: Fn, df: Fn) -> Curve:
    return Curve(f, df, fixed_regions((), True))


def concave_curve(f: Fn, df: Fn) -> Curve:
    return Curve(f, df, fixed_regions((), False))


# ------------------------------------------------------------------------------------------------
# the construction


def _finite(t: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """``t`` with NaN and infinite entries replaced by ``fill`` (and no gradient there)."""
    return torch.nan_to_num(t, nan=fill, posinf=fill, neginf=fill)


def _safe_mul(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``p * q`` with ``0 * inf = 0``."""
    return (p * q).masked_fill_(q == 0, 0.0)


@dataclass
class _Split:
    """``[l, u]`` cut at the inflection points inside it."""

    low: torch.Tensor
    high: torch.Tensor
    points: list[torch.Tensor]  # l, cuts clamped into [l, u], u
    convex: list[torch.Tensor]  # per region
    inside: list[torch.Tensor]  # per cut: strictly inside (l, u)
    n_inside: torch.Tensor
    convex_whole: torch.Tensor  # curvature of the region holding [l, u] when no cut is inside
    convex_left: torch.Tensor  # curvature left of the single inside cut (when there is one)
    cut: torch.Tensor  # the single inside cut (l elsewhere)

    def flipped(self) -> _Split:
        return _Split(self.low, self.high, self.points, [~c for c in self.convex], self.inside, self.n_inside,
                      ~self.convex_whole, ~self.convex_left, self.cut)


def split(curve: Curve, low: torch.Tensor, high: torch.Tensor) -> _Split:
    cuts, convex0 = curve.regions(low, high)
    convex0 = torch.broadcast_to(convex0, torch.broadcast_shapes(convex0.shape, low.shape, high.shape))
    points, convex, inside = [low], [convex0], []
    n_inside = torch.zeros_like(convex0, dtype=torch.int64)
    below = torch.zeros_like(n_inside)
    convex_left, cut_in = convex0.clone(), torch.zeros_like(low + high)
    for i, c in enumerate(cuts):
        c = torch.as_tensor(c, dtype=low.dtype, device=low.device)
        points.append(torch.minimum(torch.maximum(c, low), high))
        region_convex = convex0 if i % 2 == 0 else ~convex0
        convex.append(~region_convex)
        is_in = (c > low) & (c < high)
        inside.append(is_in)
        n_inside = n_inside + is_in
        below = below + (c <= low)
        convex_left = torch.where(is_in, region_convex, convex_left)
        cut_in = torch.where(is_in, c, cut_in)
    points.append(high)
    convex_whole = convex0 ^ (below % 2 == 1)
    return _Split(low, high, points, convex, inside, n_inside, convex_whole, convex_left,
                  torch.where(n_inside == 1, cut_in, low))


def shrink_bracket(h: Fn, lo: torch.Tensor, hi: torch.Tensor, steps: int = BISECTION_STEPS,
                   width: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Shrink a bracket ``[lo, hi]`` of the root of a non-decreasing ``h`` (``h(lo) <= 0 < h(hi)``)
    by a factor of ``2**steps``, keeping that sign pattern. Here the result only decides tightness
    (a relative loss of about ``2**-24``), never soundness; callers whose bounds rest on the
    bracket itself get the same sign pattern, evaluated.

    While ``K`` (:data:`SEARCH_POINTS`) times the bracket's number of elements times ``width`` (the
    elements ``h`` reads per bracket entry) is at most :data:`SEARCH_ELEMENTS`, the search is
    ``K + 1``-ary: each round evaluates ``h`` at ``K`` inner
    points at once (a leading dimension of ``K``) and keeps the cell between the last point of the
    leading run with ``h <= 0`` and the next.
    With ``K = 15`` six rounds give the precision of 24 halvings in about a quarter of the tensor
    operations; on the small tensors of a relaxation (a layer of an LSTM: tens of neurons) each
    operation's fixed cost is what counts. Larger brackets halve (less arithmetic in all).
    """
    lo, hi = torch.broadcast_tensors(lo, hi)
    k = SEARCH_POINTS
    if k > 1 and lo.numel() * width * k <= SEARCH_ELEMENTS:
        fractions = torch.arange(1, k + 1, dtype=lo.dtype, device=lo.device) / (k + 1)
        fractions = fractions.reshape(k, *[1] * lo.dim())
        done = 0
        while done < steps:
            points = lo + (hi - lo) * fractions  # (K, *shape)
            below = (h(points) <= 0).to(torch.int64).cumprod(0)  # leading run of points with h <= 0
            cell = below.sum(0, keepdim=True)  # 0..K: lo, the points, hi as one grid
            grid = torch.cat([lo.unsqueeze(0), points, hi.unsqueeze(0)])
            lo, hi = grid.gather(0, cell).squeeze(0), grid.gather(0, cell + 1).squeeze(0)
            done += (k + 1).bit_length() - 1
        return lo, hi
    for _ in range(steps):
        mid = (lo + hi) / 2
        right = h(mid) <= 0
        lo, hi = torch.where(right, mid, lo), torch.where(right, hi, mid)
    return lo, hi


@dataclass
class _Pieces:
    """The regions of a split interval stacked on a leading dimension ``R``: region ``r`` is
    ``[a[r], b[r]]``, with ``f`` there (``fa``, ``fb``) and its curvature (``convex``). They depend on
    the interval alone, so a memo shares them (:func:`curve_relaxation`)."""

    a: torch.Tensor
    b: torch.Tensor
    fa: torch.Tensor
    fb: torch.Tensor
    convex: torch.Tensor


def _pieces(curve: Curve, sp: _Split) -> _Pieces:
    points = torch.stack(torch.broadcast_tensors(*sp.points))  # (R + 1, *shape)
    f_points = curve.f(points)
    convex = torch.stack(torch.broadcast_tensors(*sp.convex))
    return _Pieces(points[:-1], points[1:], f_points[:-1], f_points[1:], convex)


def _min_offset(curve: Curve, s: torch.Tensor, pieces: _Pieces, hint: torch.Tensor,
                search: torch.Tensor | None = None) -> torch.Tensor:
    """``min over [l, u] of f(x) - s x`` (a lower bound of it), all regions at once (step 3).

    ``hint``: the stationary point of ``f - s x`` on the convex regions where it is known;
    ``search``: where it is not (a search on ``f' = s`` finds it; None: nowhere).
    """
    f, df = curve.f, curve.df
    a, b = pieces.a, pieces.b
    h_ends = torch.minimum(pieces.fa - s * a, pieces.fb - s * b)
    x = torch.minimum(torch.maximum(hint, a), b)
    if search is not None and possibly_any(search & pieces.convex & (b > a)):
        with torch.no_grad():
            lo, hi = shrink_bracket(lambda t: df(t) - s, a.detach() + 0 * s, b.detach() + 0 * s)
        x = torch.where(search, (lo + hi) / 2, x)
    slope = df(x) - s
    h_tan = f(x) - s * x + torch.minimum(_safe_mul(slope, a - x), _safe_mul(slope, b - x))
    return torch.where(pieces.convex, h_tan, h_ends).amin(0)


def _offset(curve: Curve, s: torch.Tensor, pieces: _Pieces, touch: torch.Tensor) -> torch.Tensor:
    """The offset of the line of slope ``s`` that touches ``f`` at ``touch``: the value of
    :func:`_min_offset` (sound whatever the accuracy of ``s`` and ``touch``), with the gradient of
    ``f(touch) - s touch``.

    Where the line does touch ``f`` at ``touch`` (``touch`` minimises ``f - s x`` on ``[l, u]``)
    the two are equal, and so are their derivatives by the envelope theorem:
    ``d/dθ min_x (f(x) - s x) = -x* ds/dθ`` at the minimiser ``x*``, which is also the derivative
    of ``f(touch) - s touch`` when ``s = f'(touch)`` (a tangent) or ``touch`` is a chord's end.
    So alpha-CROWN's gradient runs through a handful of operations instead of the region-by-region
    minimum, which is evaluated without autograd.
    """
    if not (torch.is_grad_enabled() and (s.requires_grad or touch.requires_grad)):
        return _min_offset(curve, s, pieces, touch)
    with torch.no_grad():
        value = _min_offset(curve, s, pieces, touch)
    closed = curve.f(touch) - s * touch
    return value + (closed - closed.detach())  # exactly 0 where finite; NaN (the constant line) elsewhere


@dataclass
class _LinePrep:
    """What the lower line takes from the interval alone (not from alpha), so that alpha-CROWN's
    walks from many starts can share it (:func:`curve_relaxation`'s memo).

    ``k``: the chord slope. On intervals over two regions (``two``), ``chord_ok``: where the chord
    is sound, and ``t``: the point whose tangent passes through the far end, where it is not
    (``need``; None where no interval needs it). ``three``: (mask, slope, offset) of the lines on
    intervals over three regions (they take no alpha), or None. ``pieces``: the regions.
    """

    pieces: _Pieces
    k: torch.Tensor
    two: torch.Tensor
    chord_ok: torch.Tensor | None
    need: torch.Tensor | None
    t: torch.Tensor | None
    three: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None


def _line_prep(curve: Curve, sp: _Split) -> _LinePrep:
    f, df = curve.f, curve.df
    low, high = sp.low, sp.high
    width = high - low
    wide = width > 0
    k = _finite(torch.where(wide, (f(high) - f(low)) / torch.where(wide, width, torch.ones_like(width)), df(low)))
    pieces = _pieces(curve, sp)
    two = sp.n_inside == 1
    chord_ok = need = t = three = None
    if possibly_any(two):
        cl = sp.convex_left
        chord_ok = torch.where(cl, df(low) >= k, df(high) <= k)
        need = two & ~chord_ok
        if possibly_any(need):
            with torch.no_grad():
                far = torch.where(cl, high, low).detach()
                sign = torch.where(cl, 1.0, -1.0).to(low.dtype)
                lo = torch.where(cl, low, sp.cut).detach()
                hi = torch.where(cl, sp.cut, high).detach()
                lo, hi = shrink_bracket(_tangent_gap(f, df, far, sign), lo, hi)
                t = torch.where(cl, lo, hi)  # the valid end of the bracket
    over_three = sp.n_inside >= 2
    if len(sp.convex) > 2 and possibly_any(over_three):  # a curve with three regions, and some interval over two
        three = (over_three, *_three_region_line(curve, sp, pieces, k))
    return _LinePrep(pieces, k, two, chord_ok, need, t, three)


def lower_line(curve: Curve, sp: _Split, prep: _LinePrep,
               alpha: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Slope and offset of the lower line of ``curve`` on the split interval (steps 2 and 3);
    ``prep``: :func:`_line_prep` of the same curve and split."""
    slope, touch = _slope_and_touch(curve, sp, prep, alpha)
    offset = _offset(curve, slope, prep.pieces, touch)
    if prep.three is not None:
        three, s3, b3 = prep.three
        slope, offset = torch.where(three, s3, slope), torch.where(three, b3, offset)
    return slope, offset


def _slope_and_touch(curve: Curve, sp: _Split, prep: _LinePrep,
                     alpha: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 2 (one or two regions): the lower line's slope and the point where it touches ``f``
    (the tangent point, or an end of the chord)."""
    df = curve.df
    low, high = sp.low, sp.high
    k = prep.k
    a_one = torch.full_like(low, 0.5) if alpha is None else alpha
    a_two = torch.ones_like(low) if alpha is None else alpha

    # one region: tangent (convex) or chord (concave)
    d_one = low + a_one * (high - low)
    slope = torch.where(sp.convex_whole, df(d_one), k)
    touch = torch.where(sp.convex_whole, d_one, low)

    # two regions: chord, or tangent between the near endpoint and t
    if prep.chord_ok is not None:
        cl = sp.convex_left
        if prep.t is not None:
            t = prep.t
            d_two = torch.where(cl, low + a_two * (t - low), high - a_two * (high - t))
            d_two = torch.where(prep.need, d_two, low)
        else:
            d_two = low + 0 * a_two
        slope = torch.where(prep.two, torch.where(prep.chord_ok, k, df(d_two)), slope)
        touch = torch.where(prep.two, torch.where(prep.chord_ok, torch.where(cl, low, high), d_two), touch)
    return _finite(slope), touch


def _tangent_gap(f: Fn, df: Fn, far: torch.Tensor, sign) -> Fn:
    """``t -> sign * (tangent of f at t, evaluated at far, minus f(far))``."""
    f_far = f(far)
    return lambda t: sign * (f(t) + df(t) * (far - t) - f_far)


def _three_region_line(curve: Curve, sp: _Split, pieces: _Pieces,
                       k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Lower line when two inflection points are inside: the best (highest at the midpoint, i.e. the
    least area between line and ``f``) of the chord slope and, when the middle region is convex,
    the tangents there through ``(u, f(u))`` and through ``(l, f(l))``."""
    f, df = curve.f, curve.df
    low, high = sp.low, sp.high
    mid = (low + high) / 2
    three = sp.n_inside >= 2
    best_s = k
    best_b = _min_offset(curve, k, pieces, low, three)
    middle_convex = three & sp.convex[1]
    if possibly_any(middle_convex):
        a, b = sp.points[1].detach(), sp.points[2].detach()
        with torch.no_grad():
            for far, sign in ((high, 1.0), (low, -1.0)):
                lo, hi = shrink_bracket(_tangent_gap(f, df, far, sign), a, b)
                t = lo if sign > 0 else hi
                s = _finite(df(t))
                off = _min_offset(curve, s, pieces, t)
                better = middle_convex & (s * mid + off > best_s * mid + best_b)
                best_s, best_b = torch.where(better, s, best_s), torch.where(better, off, best_b)
    return best_s, best_b


def relax_curve(curve: Curve, prep: tuple[_Split, _LinePrep, _LinePrep],
                alpha: torch.Tensor | None = None) -> tuple:
    """``(lw, lb, uw, ub)`` of ``curve`` on a finite float64 interval (before rounding guards), from
    its :func:`prepare_curve`."""
    sp, lower_prep, upper_prep = prep
    lw, lb = lower_line(curve, sp, lower_prep, alpha)
    nw, nb = lower_line(curve.negated(), sp.flipped(), upper_prep, alpha)
    return lw, lb, -nw, -nb


def prepare_curve(curve: Curve, low: torch.Tensor, high: torch.Tensor) -> tuple[_Split, _LinePrep, _LinePrep]:
    """The split of float64 ``[l, u]`` and the alpha-free parts of both lines (:class:`_LinePrep`)."""
    sp = split(curve, low, high)
    return sp, _line_prep(curve, sp), _line_prep(curve.negated(), sp.flipped())


def slack_factor(dtype: torch.dtype) -> float:
    """Relative outward move of offsets covering float64 evaluation and the cast to ``dtype``."""
    return 4 * torch.finfo(dtype).eps + 64 * torch.finfo(torch.float64).eps


#: Whether registered relaxation rules refuse intervals on which a side has no finite linear bound.
#: The walks multiply every offset by a coefficient that may be 0 (``0 * inf = NaN``), so they need
#: finite offsets; set to False once they treat ``0 * inf`` as 0, and such sides come out as the
#: constant lines ``0 x -+ inf``.
RAISE_ON_UNBOUNDED = True


def require_bounded(relax: Relaxation, low: torch.Tensor, high: torch.Tensor, what: str) -> Relaxation:
    """``relax`` if all its offsets are finite, else NotImplementedError (see :data:`RAISE_ON_UNBOUNDED`).
    Where the test would wait for a device, it is deferred to the end of the call (:func:`~boundprop.syncs.defer`)."""
    if not RAISE_ON_UNBOUNDED:
        return relax
    # one reduction: an infinite or NaN offset makes the sum non-finite (a sum that only overflowed
    # is told apart element by element below)
    with torch.no_grad():
        finite = torch.isfinite(relax.lb.sum() + relax.ub.sum())
    if defer(finite) or bool(finite):
        return relax
    bad = ~(torch.isfinite(relax.lb) & torch.isfinite(relax.ub))
    if not bool(bad.any()):
        return relax
    bad = torch.broadcast_to(bad, torch.broadcast_shapes(bad.shape, low.shape))
    index = bad.nonzero()[0]
    where = tuple(int(i) for i in index[:low.dim()])
    lo_x, hi_x = torch.broadcast_to(low, bad.shape)[tuple(index)], torch.broadcast_to(high, bad.shape)[tuple(index)]
    raise NotImplementedError(
        f"{what}: no finite linear bound exists on the input interval [{lo_x.item()}, {hi_x.item()}] "
        f"(element {where}): the function is unbounded there (a pole, log 0, overflow, or an infinite "
        f"input bound). Linear bound propagation needs finite relaxation offsets; use IBP, or tighten "
        f"the input set or the model (e.g. keep divisors and log/rsqrt arguments away from 0).")


def checked(what: str) -> Callable:
    """Decorator for registered relaxation rules: :func:`require_bounded` on their result."""

    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def rule(low: torch.Tensor, high: torch.Tensor, call: RelaxCall) -> Relaxation:
            return require_bounded(fn(low, high, call), low, high, what)

        return rule

    return wrap


def finish(lines: tuple, low: torch.Tensor, high: torch.Tensor, fallback: Interval, dtype: torch.dtype,
           constant: torch.Tensor | None = None) -> Relaxation:
    """Round float64 lines outwards, cast to ``dtype``; non-finite lines (or ``constant``) -> IBP constants.

    ``low``, ``high``: the finite float64 interval the lines were made on; ``fallback``: the interval
    rule's bounds through :func:`constant_lines` (possibly infinite: an unbounded side).
    """
    lw, lb, uw, ub = lines
    eps, tiny = slack_factor(dtype), torch.finfo(dtype).tiny
    with torch.no_grad():  # the slack's own gradient (relative size eps) is left out
        # a non-finite slope makes its slack non-finite (inf * 0 = NaN included), so its line falls back
        reach = torch.maximum(low.abs(), high.abs())
        slack_l = torch.addcmul(lb.abs(), lw.abs(), reach).mul_(eps).add_(tiny)
        slack_u = torch.addcmul(ub.abs(), uw.abs(), reach).mul_(eps).add_(tiny)
    lb, ub = lb - slack_l, ub + slack_u
    lw, lb, uw, ub = (t.to(dtype) for t in (lw, lb, uw, ub))
    with torch.no_grad():
        bad_l = ~(torch.isfinite(lw) & torch.isfinite(lb))
        bad_u = ~(torch.isfinite(uw) & torch.isfinite(ub))
        if constant is not None:
            bad_l, bad_u = bad_l | constant, bad_u | constant
    zero = torch.zeros((), dtype=dtype, device=lw.device)
    lb, ub = torch.where(bad_l, fallback.lower, lb), torch.where(bad_u, fallback.upper, ub)
    return Relaxation(torch.where(bad_l, zero, lw), lb, torch.where(bad_u, zero, uw), ub)


def constant_lines(fallback: Interval, dtype: torch.dtype) -> Interval:
    """The offsets of the constant lines :func:`finish` falls back to: the interval rule's bounds in
    ``dtype``, NaN read as unbounded."""
    lower, upper = fallback.lower.to(dtype), fallback.upper.to(dtype)
    return Interval(torch.where(torch.isnan(lower), -INF, lower), torch.where(torch.isnan(upper), INF, upper))


class _FiniteGrad(torch.autograd.Function):
    """Identity whose backward turns NaN/inf gradients into 0."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)


class _Fraction64(torch.autograd.Function):
    """alpha as a float64 fraction: NaN -> 1/2, clamped into [0, 1]. The backward is that of those
    steps (the gradient passes where ``0 <= alpha <= 1``) with NaN/inf gradients turned into 0
    (:func:`finite_grad`), as one autograd node instead of four."""

    @staticmethod
    def forward(ctx, alpha):
        inside = (alpha >= 0) & (alpha <= 1)
        ctx.save_for_backward(inside)
        ctx.dtype = alpha.dtype
        return torch.nan_to_num(alpha.to(torch.float64), nan=0.5).clamp(0.0, 1.0)

    @staticmethod
    def backward(ctx, grad):
        (inside,) = ctx.saved_tensors
        return torch.where(inside, torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0), 0.0).to(ctx.dtype)


def finite_grad(*tensors: torch.Tensor | None) -> tuple:
    """Guard the inputs of a relaxation (interval ends, alpha) for alpha-CROWN's gradients.

    Branches a ``torch.where`` discards (a pole, an infinite end, ``sqrt`` at 0) can have infinite
    local derivatives, and ``0 * inf`` makes the gradient reaching the inputs NaN. The relaxation is
    element-wise, so zeroing a non-finite gradient only drops the gradient of that one neuron.
    """
    return tuple(_FiniteGrad.apply(t) if torch.is_tensor(t) and t.requires_grad else t for t in tensors)


def lift(low: torch.Tensor, high: torch.Tensor, alpha: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(batch, *shape)`` -> ``(batch, 1, *shape)`` when alpha carries a spec dimension."""
    if alpha is not None and alpha.dim() > low.dim():
        return low.unsqueeze(1), high.unsqueeze(1)
    return low, high


def curve_relaxation(curve: Curve, low: torch.Tensor, high: torch.Tensor, call: RelaxCall,
                     bounds: Callable[[torch.Tensor, torch.Tensor], Interval],
                     domain: Callable | None = None, constant: Callable | None = None,
                     adjust: Callable | None = None, safe: float = 0.0) -> Relaxation:
    """The relaxation of an element-wise ``curve`` on ``[l, u]`` (steps 1-4).

    Arguments:
        bounds: the op's interval rule on ``(l, u)`` in their dtype (the constant fallback).
        domain: maps the float64 interval into the function's domain (e.g. ``max(l, 0)``).
        constant: ``(l, u) -> bool tensor`` of neurons that get the IBP constants regardless
            (e.g. a pole inside the interval); ``l``, ``u`` are passed in their own dtype.
        adjust: ``(lw, lb, uw, ub, l, u) -> (lw, lb, uw, ub)`` on the float64 lines before rounding
            (e.g. accounting for a known gap between ``f`` and torch's op).
        safe: a point of the domain standing in for the neurons that get constants (keeps the
            discarded lines, and their gradients, finite).

    ``call.memo`` (alpha-CROWN: one per node and interval) keeps everything but the alpha-dependent
    lines: the float64 interval, the IBP fallback and :func:`prepare_curve` (the split, chord
    slopes, tangent-point searches). The walks from every start after the node share them.
    """
    alpha = call.alpha
    lifted = alpha is not None and alpha.dim() > low.dim()
    memo = call.memo
    prepared = memo.get(("curve", lifted)) if memo is not None else None
    if prepared is None:
        low, high = lift(*finite_grad(low, high), alpha)
        fallback = constant_lines(bounds(low, high), low.dtype)
        finite = torch.isfinite(low) & torch.isfinite(high)
        const = ~finite if constant is None else (~finite | constant(low, high))
        stand_in = torch.full((), safe, dtype=torch.float64, device=low.device)
        l64 = torch.where(const, stand_in, low.to(torch.float64))
        u64 = torch.where(const, stand_in, high.to(torch.float64))
        if domain is not None:
            l64, u64 = domain(l64, u64)
        prepared = (l64, u64, fallback, const, low.dtype, prepare_curve(curve, l64, u64))
        if memo is not None:
            memo[("curve", lifted)] = prepared
    l64, u64, fallback, const, dtype, lines = prepared
    a64 = None if alpha is None else _Fraction64.apply(alpha)
    lw, lb, uw, ub = relax_curve(curve, lines, a64)
    if adjust is not None:
        lw, lb, uw, ub = adjust(lw, lb, uw, ub, l64, u64)
    return finish((lw, lb, uw, ub), l64, u64, fallback, dtype, const)


def curve_alpha(curve_of: Callable[[RelaxCall], Curve], domain: Callable | None = None) -> AlphaSpec:
    """alpha-CROWN's parameters for a curve rule: the tangent-point position ``a`` in [0, 1].

    ``init`` reproduces the default relaxation: 1 where one inflection point is inside the interval,
    1/2 elsewhere.
    """

    def init(low, high, call: RelaxCall | None = None):
        curve = curve_of(call if call is not None else RelaxCall())
        l64 = _finite(low.detach().to(torch.float64))
        u64 = _finite(high.detach().to(torch.float64))
        if domain is not None:
            l64, u64 = domain(l64, u64)
        sp = split(curve, l64, u64)
        return torch.where(sp.n_inside == 1, 1.0, 0.5).to(low.dtype)

    def project(alpha, low=None, high=None, call=None):
        return alpha.clamp(0.0, 1.0)

    return AlphaSpec(init=init, project=project)

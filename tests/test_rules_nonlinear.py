"""Element-wise nonlinear rules: S-shaped, convex/concave, periodic, smooth activations, piecewise.

For every op in :data:`CASES`, on hypothesis-generated and hand-picked intervals (wide, narrow,
degenerate, mixed sign, infinite ends, inside and outside the domain):

* the interval rule contains ``f`` on a dense grid of ``[l, u]`` (endpoints included);
* the relaxation's lines bound ``f`` there (1e-5 relative tolerance), never NaN, with and without
  alpha-CROWN parameters (random, with a spec dimension), and alpha's ``init`` reproduces the
  default relaxation;
* the lines are tight: each touches ``f`` (the offset is the optimal one for its slope), chords
  and tangents where the curvature is one-signed, tangents through the far endpoint on mixed
  S-shaped intervals;
* whole models (an MLP whose hidden layers apply every op) are sound under IBP, CROWN-IBP and
  CROWN (``tests/soundness.py``); per-op models, forward mode and alpha-CROWN are marked slow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from soundness import assert_sound

import boundprop
import boundprop.rules.curves as curves
from boundprop.domains import Interval
from boundprop.rules import RelaxCall, rules_for

aten = torch.ops.aten
INF = math.inf
TOL = 1e-5


@dataclass
class Case:
    name: str
    op: object
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    centers: tuple[float, float] = (-6.0, 6.0)  # where hypothesis puts interval centres
    smooth: bool = True  # relaxation from rules/curves.py (lines touch f)

    def f(self, x: torch.Tensor) -> torch.Tensor:
        """``f`` on grids ``(..., k, points)``; tensor arguments align with ``k``."""
        args = tuple(a.to(x.dtype).unsqueeze(-1) if torch.is_tensor(a) else a for a in self.args)
        return self.op(x, *args, **self.kwargs)

    def __str__(self) -> str:
        return self.name


CASES = [
    Case("sigmoid", aten.sigmoid.default),
    Case("tanh", aten.tanh.default),
    Case("atan", aten.atan.default),
    Case("erf", aten.erf.default),
    Case("exp", aten.exp.default, centers=(-10.0, 8.0)),
    Case("expm1", aten.expm1.default, centers=(-10.0, 8.0)),
    Case("log", aten.log.default, centers=(-1.0, 20.0)),
    Case("log1p", aten.log1p.default, centers=(-2.0, 20.0)),
    Case("sqrt", aten.sqrt.default, centers=(-1.0, 20.0)),
    Case("rsqrt", aten.rsqrt.default, centers=(-1.0, 20.0)),
    Case("reciprocal", aten.reciprocal.default),
    Case("pow2", aten.pow.Tensor_Scalar, (2,)),
    Case("pow3", aten.pow.Tensor_Scalar, (3,)),
    Case("pow4", aten.pow.Tensor_Scalar, (4,)),
    Case("pow-1", aten.pow.Tensor_Scalar, (-1,)),
    Case("pow-2", aten.pow.Tensor_Scalar, (-2,)),
    Case("pow-3", aten.pow.Tensor_Scalar, (-3,)),
    Case("pow0.5", aten.pow.Tensor_Scalar, (0.5,), centers=(-1.0, 20.0)),
    Case("pow1.5", aten.pow.Tensor_Scalar, (1.5,), centers=(-1.0, 20.0)),
    Case("pow-0.5", aten.pow.Tensor_Scalar, (-0.5,), centers=(-1.0, 20.0)),
    Case("pow0", aten.pow.Tensor_Scalar, (0,), smooth=False),
    Case("pow1", aten.pow.Tensor_Scalar, (1,), smooth=False),
    Case("square", aten.square.default),
    Case("sin", aten.sin.default, centers=(-10.0, 10.0)),
    Case("cos", aten.cos.default, centers=(-10.0, 10.0)),
    Case("gelu", aten.gelu.default),
    Case("gelu_tanh", aten.gelu.default, kwargs={"approximate": "tanh"}),
    Case("silu", aten.silu.default),
    Case("softplus", aten.softplus.default, (1.0, 20.0)),
    Case("softplus_b2_t3", aten.softplus.default, (2.0, 3.0)),
    Case("elu", aten.elu.default, (1.0,)),
    Case("selu", aten.elu.default, (1.6732632423543772, 1.0507009873554805)),
    Case("elu_scaled", aten.elu.default, (0.5, 2.0, 3.0)),
    Case("abs", aten.abs.default, smooth=False),
    Case("sign", aten.sign.default, smooth=False),
    Case("hardtanh", aten.hardtanh.default, smooth=False),
    Case("hardtanh_0_6", aten.hardtanh.default, (0.0, 6.0), smooth=False),
    Case("clamp", aten.clamp.default, (-0.5, 2.0), smooth=False),
    Case("clamp_min", aten.clamp.default, (0.2,), smooth=False),
    Case("clamp_max", aten.clamp.default, (None, 0.2), smooth=False),
    Case("clamp_crossed", aten.clamp.default, (1.0, -1.0), smooth=False),
    Case("clamp_min_op", aten.clamp_min.default, (0.1,), smooth=False),
    Case("clamp_max_op", aten.clamp_max.default, (-0.3,), smooth=False),
    Case("floor", aten.floor.default, smooth=False),
    Case("ceil", aten.ceil.default, smooth=False),
    Case("round", aten.round.default, smooth=False),
    Case("trunc", aten.trunc.default, smooth=False),
    Case("prelu_0.25", aten._prelu_kernel.default, (torch.tensor(0.25),), smooth=False),
    Case("prelu_negative", aten._prelu_kernel.default, (torch.tensor(-0.7),), smooth=False),
    Case("prelu_steep", aten._prelu_kernel.default, (torch.tensor(2.5),), smooth=False),
    Case("prelu_1", aten._prelu_kernel.default, (torch.tensor(1.0),), smooth=False),
    Case("clamp_tensor", aten.clamp.Tensor, (torch.tensor([-0.5, 0.0, 1.0]), torch.tensor([0.5, 2.0, 1.5])),
         smooth=False),
]

#: Hand-picked intervals: wide, narrow, degenerate, mixed sign, around inflection points and
#: domain edges, huge and infinite ends.
CORNERS = [(-3, -1), (1, 4), (-2, 3), (-0.1, 5), (-5, 0.1), (-1000, 1000), (-1000, -999), (999, 1000), (0.5, 0.5),
           (-1e-7, 1e-7), (0, 0), (0, 2), (-2, 0), (-INF, 2), (3, INF), (-INF, INF), (-8, 8), (1e-7, 2e-7),
           (1e-30, 1.0), (0.3, 0.3000001), (-1.5, 1.5), (-1.3, -1.2), (-4, 1), (-1, 6), (-6, -1), (1.4, 1.45),
           (2.3, 2.5), (-2.5, -2.3), (-3, 2.5), (19, 21), (4, 7), (-0.5, 3.6), (3, 9), (-20, 30), (6.2, 6.4),
           (-1.1, -0.9), (-1, 1), (0.9, 1.1), (100, 200)]


@pytest.fixture
def unbounded_allowed(monkeypatch):
    """Let registered rules return the constant lines ``0 x -+ inf`` instead of raising."""
    monkeypatch.setattr(curves, "RAISE_ON_UNBOUNDED", False)


def _grid(low: torch.Tensor, high: torch.Tensor, n: int) -> torch.Tensor:
    """``(..., n + 2)`` float64 points of each ``[l, u]`` (infinite ends clipped to 1e4), ends included."""
    lo = low.double().clamp(-1e4, 1e4)
    hi = torch.maximum(high.double().clamp(-1e4, 1e4), lo)
    t = torch.linspace(0, 1, n, dtype=torch.float64)
    return torch.cat([lo.unsqueeze(-1), lo.unsqueeze(-1) + t * (hi - lo).unsqueeze(-1), hi.unsqueeze(-1)], -1)


def _below(a: torch.Tensor, b: torch.Tensor, fx: torch.Tensor) -> torch.Tensor:
    """``a <= b`` up to TOL relative to ``|f(x)|`` (exact where ``f`` is infinite)."""
    tol = torch.where(torch.isfinite(fx), TOL * (1 + fx.abs()), torch.zeros_like(fx))
    return a <= b + tol


def check_case(case: Case, low: torch.Tensor, high: torch.Tensor, n: int = 257, alpha: torch.Tensor | None = None):
    """IBP and relaxation of ``case`` on the intervals ``[low, high]`` (shape ``(batch, k)``) contain ``f``."""
    entry = rules_for(case.op)
    box = entry.interval((Interval(low, high), *case.args), dict(case.kwargs))
    call = RelaxCall(tuple(case.args), dict(case.kwargs), {}, alpha)
    if alpha is not None:
        low, high = low.unsqueeze(1), high.unsqueeze(1)
    relax = entry.relaxation(low, high, call)
    for t in (box.lower, box.upper, relax.lw, relax.lb, relax.uw, relax.ub):
        assert not torch.isnan(t).any(), f"{case}: NaN"
    for t in (relax.lw, relax.lb, relax.uw, relax.ub):
        torch.broadcast_shapes(t.shape, torch.broadcast_shapes(low.shape, *(() if alpha is None else (alpha.shape,))))
    xs = _grid(low, high, n)
    fx = case.f(xs)
    overflow = torch.isinf(case.f(xs.to(low.dtype)).double()) & torch.isfinite(fx)  # inf in the model's dtype
    defined = ~torch.isnan(fx) & ~overflow
    lo_box = (box.lower.unsqueeze(1) if alpha is not None else box.lower).double().unsqueeze(-1)
    hi_box = (box.upper.unsqueeze(1) if alpha is not None else box.upper).double().unsqueeze(-1)
    ok = _below(lo_box, fx, fx) & _below(fx, hi_box, fx) | ~defined
    assert bool(ok.all()), f"{case}: IBP misses f at x={float(xs[~ok][0])}, f={float(fx[~ok][0])}"
    lw, lb, uw, ub = (t.double().unsqueeze(-1) for t in (relax.lw, relax.lb, relax.uw, relax.ub))
    lower = torch.where(lw == 0, lb, lw * xs + lb)
    upper = torch.where(uw == 0, ub, uw * xs + ub)
    ok = (_below(lower, fx, fx) & _below(fx, upper, fx)) | ~defined
    if not bool(ok.all()):
        i = (~ok).nonzero()[0].tolist()
        raise AssertionError(f"{case}: relaxation misses f at x={float(xs[tuple(i)])} on "
                             f"[{float(low.flatten()[0])}, ...]: f={float(fx[tuple(i)])}, "
                             f"lines=[{float(lower[tuple(i)])}, {float(upper[tuple(i)])}]")
    return box, relax, xs, fx


# ------------------------------------------------------------------------------------------------
# dense grids on hand-picked intervals


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_corner_intervals_sound(case, dtype, unbounded_allowed):
    low = torch.tensor([[a for a, _ in CORNERS]], dtype=dtype)
    high = torch.tensor([[b for _, b in CORNERS]], dtype=dtype)
    if case.op == aten.clamp.Tensor:
        low, high = low.reshape(-1, 1).expand(-1, 3), high.reshape(-1, 1).expand(-1, 3)
    check_case(case, low, high, n=2049)


def _alpha_corners(case: Case):
    """``(alpha spec, low, high)`` on the corner intervals for an op with alpha parameters (else skip)."""
    spec = rules_for(case.op).alpha
    if spec is None:
        pytest.skip("no alpha parameters")
    low = torch.tensor([[a for a, _ in CORNERS]])
    high = torch.tensor([[b for _, b in CORNERS]])
    if case.op == aten.clamp.Tensor:
        low, high = low.reshape(-1, 1).expand(-1, 3), high.reshape(-1, 1).expand(-1, 3)
    return spec, low, high


@pytest.mark.parametrize("case", CASES, ids=str)
def test_alpha_sound_and_default(case, unbounded_allowed):
    """Any alpha in the projected set gives a sound relaxation; init reproduces the default one."""
    spec, low, high = _alpha_corners(case)
    gen = torch.Generator().manual_seed(0)
    call = RelaxCall(tuple(case.args), dict(case.kwargs))
    init = spec.init(low, high, call)
    assert init.shape == low.shape
    raw = torch.rand((low.shape[0], 4, *low.shape[1:]), generator=gen) * 3 - 1
    alpha = spec.project(raw, low.unsqueeze(1), high.unsqueeze(1), call)
    check_case(case, low, high, n=513, alpha=alpha)
    default = rules_for(case.op).relaxation(low, high, call)
    lifted = rules_for(case.op).relaxation(low.unsqueeze(1), high.unsqueeze(1),
                                           RelaxCall(call.args, call.kwargs, {}, init.unsqueeze(1).expand_as(raw)))
    for name in ("lw", "lb", "uw", "ub"):
        a, b = getattr(default, name), getattr(lifted, name)
        assert torch.allclose(torch.broadcast_to(a.unsqueeze(1), b.shape), b, rtol=1e-6, atol=1e-6, equal_nan=False)


@pytest.mark.parametrize("case", [c for c in CASES if c.smooth], ids=str)
def test_memo_shares_only_what_alpha_leaves_alone(case, unbounded_allowed):
    """A rule's memo (one per node and interval, as alpha-CROWN hands it to the walks from every start)
    gives the lines of a call without one, for every alpha and direction that meets it."""
    spec, low, high = _alpha_corners(case)
    gen = torch.Generator().manual_seed(1)
    relax = rules_for(case.op).relaxation
    memo: dict = {}
    for spec_rows, direction in ((4, "lower"), (2, "upper"), (4, "upper")):
        raw = torch.rand((low.shape[0], spec_rows, *low.shape[1:]), generator=gen)
        alpha = spec.project(raw, low.unsqueeze(1), high.unsqueeze(1), RelaxCall(tuple(case.args), dict(case.kwargs)))
        lifted = low.unsqueeze(1), high.unsqueeze(1)
        alone = relax(*lifted, RelaxCall(tuple(case.args), dict(case.kwargs), {}, alpha, direction))
        shared = relax(*lifted, RelaxCall(tuple(case.args), dict(case.kwargs), {}, alpha, direction, memo))
        for name in ("lw", "lb", "uw", "ub"):
            torch.testing.assert_close(getattr(shared, name), getattr(alone, name), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("points", [1, 3, 15])
def test_searches_of_every_arity_bracket_the_root(monkeypatch, points):
    """:func:`~boundprop.rules.curves.shrink_bracket` keeps ``h(lo) <= 0 < h(hi)`` and shrinks the bracket
    ``2**24``-fold, halving or ``points + 1``-ary."""
    monkeypatch.setattr(curves, "SEARCH_POINTS", points)
    gen = torch.Generator().manual_seed(2)
    far = torch.rand(3, 1, 40, generator=gen, dtype=torch.float64) * 8 + 0.01
    near = -torch.rand(3, 1, 40, generator=gen, dtype=torch.float64) * 8 - 0.01
    gap = curves._tangent_gap(torch.tanh, lambda x: 1 - torch.tanh(x) ** 2, far, torch.ones_like(far))
    lo0, hi0 = torch.zeros_like(far) + near, torch.zeros_like(far)  # tangent points left of 0 through far
    valid = (gap(lo0) <= 0) & (gap(hi0) > 0)
    lo, hi = curves.shrink_bracket(gap, lo0, hi0)
    assert bool(((gap(lo) <= 0) & (gap(hi) > 0) | ~valid).all())
    assert bool(((hi - lo) <= (hi0 - lo0) * 2.0**-23).all())


def test_alpha_gradients_finite(unbounded_allowed):
    """alpha-CROWN differentiates the lines with respect to alpha and to the interval ends (both are
    optimised): finite on every finite corner interval, and nonzero somewhere."""
    finite = [(a, b) for a, b in CORNERS if math.isfinite(a) and math.isfinite(b)]
    for case in CASES:
        if case.op == aten.clamp.Tensor:
            continue
        low = torch.tensor([[a for a, _ in finite]], requires_grad=True)
        high = torch.tensor([[b for _, b in finite]], requires_grad=True)
        alpha = torch.rand(1, 3, len(finite), requires_grad=True) if rules_for(case.op).alpha else None
        lifted = (low.unsqueeze(1), high.unsqueeze(1)) if alpha is not None else (low, high)
        relax = rules_for(case.op).relaxation(*lifted, RelaxCall(tuple(case.args), dict(case.kwargs), {}, alpha))
        parts = [torch.where(torch.isfinite(t), t, 0.0) * (1 + torch.arange(t.numel()).reshape(t.shape) % 3)
                 for t in (relax.lw, relax.lb, relax.uw, relax.ub) if t.requires_grad]
        if not parts:
            continue
        inputs = [t for t in (low, high, alpha) if t is not None]
        grads = torch.autograd.grad(sum(p.sum() for p in parts), inputs, allow_unused=True)
        for g in grads:
            assert g is None or bool(torch.isfinite(g).all()), case.name
        if alpha is not None and case.smooth:
            assert bool((grads[-1] != 0).any()), case.name


def test_alpha_fraction_is_one_node_for_four():
    """``curves._Fraction64`` (alpha to a float64 fraction in one autograd node) gives the values and
    gradients of its four steps: the guard, the cast, NaN -> 1/2 and the clamp into [0, 1]."""
    raw = torch.tensor([-0.5, 0.0, 0.3, 1.0, 1.5, math.nan, 0.7])
    upstream = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, INF], dtype=torch.float64)
    a, b = raw.clone().requires_grad_(), raw.clone().requires_grad_()
    one = curves._Fraction64.apply(a)
    (four,) = curves.finite_grad(b)
    four = torch.nan_to_num(four.to(torch.float64), nan=0.5).clamp(0.0, 1.0)
    torch.testing.assert_close(one, four, rtol=0, atol=0)
    (ga,), (gb,) = torch.autograd.grad(one, a, upstream), torch.autograd.grad(four, b, upstream)
    torch.testing.assert_close(ga, gb, rtol=0, atol=0)
    assert ga.tolist() == [0.0, 2.0, 3.0, 4.0, 0.0, 0.0, 0.0]


def _line_gradients(case: Case, low: torch.Tensor, high: torch.Tensor, alpha: torch.Tensor):
    """The relaxation of ``case`` with alpha and the gradient of a weighted sum of its lines with
    respect to ``(low, high, alpha)`` (zeros where unused)."""
    inputs = [t.clone().requires_grad_() for t in (low, high, alpha)]
    relax = rules_for(case.op).relaxation(inputs[0].unsqueeze(1), inputs[1].unsqueeze(1),
                                          RelaxCall(tuple(case.args), dict(case.kwargs), {}, inputs[2]))
    lines = (relax.lw, relax.lb, relax.uw, relax.ub)
    total = sum((torch.where(torch.isfinite(t), t, 0.0) * (1 + i + torch.arange(t.numel()).reshape(t.shape) % 3)).sum()
                for i, t in enumerate(lines))
    grads = torch.autograd.grad(total, inputs, allow_unused=True)
    return lines, [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs)]


@pytest.mark.parametrize("case", [c for c in CASES if c.smooth and rules_for(c.op).alpha], ids=str)
def test_offset_gradient_is_that_of_the_minimum(case, monkeypatch, unbounded_allowed):
    """The offsets' values come from the region-by-region minimum evaluated without autograd, their
    gradient from ``f(touch) - s touch`` (``curves._offset``). Both are the same function where the line
    touches ``f``, so the gradients equal those of differentiating the minimum itself. (On intervals
    that reach a domain edge with an infinite derivative, differentiating the minimum meets ``inf * 0``
    and the input guard drops that neuron's gradient; the envelope form keeps a finite one.)"""
    gen = torch.Generator().manual_seed(3)
    lo_c, hi_c = case.centers
    centre = lo_c + (hi_c - lo_c) * torch.rand(1, 96, generator=gen, dtype=torch.float64)
    radius = 2.0 ** (torch.rand(1, 96, generator=gen, dtype=torch.float64) * 8 - 6)  # 1/64 .. 4
    low, high = centre - radius, centre + radius
    xs = _grid(low, high, 64).requires_grad_()  # keep intervals where f and f' are finite (off poles and domain edges)
    (dfx,) = torch.autograd.grad(case.f(xs).sum(), xs)
    inside = (torch.isfinite(case.f(xs.detach())) & torch.isfinite(dfx)).all(-1)[0]
    low, high = low[:, inside], high[:, inside]
    assert low.shape[1] >= 40, case.name
    alpha = 0.05 + 0.9 * torch.rand(1, 3, low.shape[1], generator=gen, dtype=torch.float64)  # off the ties at 0, 1
    lines, grads = _line_gradients(case, low, high, alpha)
    monkeypatch.setattr(curves, "_offset", lambda curve, s, pieces, touch: curves._min_offset(curve, s, pieces, touch))
    ref_lines, ref_grads = _line_gradients(case, low, high, alpha)
    for a, b in zip(lines, ref_lines):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    for g, ref in zip(grads, ref_grads):
        torch.testing.assert_close(g, ref, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------------
# hypothesis-generated intervals


def _intervals(case: Case):
    lo, hi = case.centers
    width = st.one_of(st.just(0.0), st.floats(1e-7, 1e-4), st.floats(0.0, 2.0), st.floats(0.0, 20.0),
                      st.floats(100.0, 1000.0))
    pair = st.tuples(st.floats(lo, hi), width)
    return st.lists(pair, min_size=1, max_size=24)


def _hypothesis_test(case: Case):
    @settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(pairs=_intervals(case), with_alpha=st.booleans())
    def run(pairs, with_alpha):
        curves_raise = curves.RAISE_ON_UNBOUNDED
        curves.RAISE_ON_UNBOUNDED = False
        try:
            c = torch.tensor([p[0] for p in pairs])
            w = torch.tensor([p[1] for p in pairs])
            low, high = (c - w / 2).unsqueeze(0), (c + w / 2).unsqueeze(0)
            if case.op == aten.clamp.Tensor:
                low, high = low.reshape(-1, 1).expand(-1, 3), high.reshape(-1, 1).expand(-1, 3)
            alpha = None
            spec = rules_for(case.op).alpha
            if with_alpha and spec is not None:
                raw = torch.rand((low.shape[0], 2, *low.shape[1:])) * 3 - 1
                call = RelaxCall(tuple(case.args), dict(case.kwargs))
                alpha = spec.project(raw, low.unsqueeze(1), high.unsqueeze(1), call)
            check_case(case, low, high, n=129, alpha=alpha)
        finally:
            curves.RAISE_ON_UNBOUNDED = curves_raise

    return run


@pytest.mark.parametrize("case", CASES, ids=str)
def test_hypothesis_intervals_sound(case):
    _hypothesis_test(case)()


# ------------------------------------------------------------------------------------------------
# tightness


BOUNDED = [(-3, -1), (1, 4), (-2, 3), (-0.1, 5), (-5, 0.1), (0.5, 0.8), (0, 2), (-2, 0), (-8, 8), (-1.5, 1.5),
           (-1.3, -1.2), (-4, 1), (-1, 6), (-6, -1), (1.4, 1.45), (2.3, 2.5), (-3, 2.5), (4, 7), (-0.5, 3.6)]


@pytest.mark.parametrize("case", [c for c in CASES if c.smooth], ids=str)
def test_lines_touch_f(case, unbounded_allowed):
    """Each finite line is as high (low) as its slope allows: it touches ``f`` on the interval."""
    low = torch.tensor([a for a, _ in BOUNDED], dtype=torch.float64)
    high = torch.tensor([b for _, b in BOUNDED], dtype=torch.float64)
    _, relax, xs, fx = check_case(case, low, high, n=20001)
    defined = torch.isfinite(fx)
    for w, b, sign in ((relax.lw, relax.lb, 1), (relax.uw, relax.ub, -1)):
        line = w.unsqueeze(-1) * xs + b.unsqueeze(-1)
        gap = torch.where(defined, sign * (fx - line), torch.full_like(fx, INF)).amin(-1)
        scale = 1 + torch.where(defined, fx.abs(), torch.zeros_like(fx)).amax(-1)
        usable = torch.isfinite(b) & defined.any(-1)
        assert bool((gap[usable] <= 1e-4 * scale[usable]).all()), (case.name, gap[usable].max())


def _f64(values):
    return torch.tensor(values, dtype=torch.float64)


def test_convex_chord_above_tangent_below():
    """exp (convex): upper line = chord, lower line = tangent at the midpoint (CROWN's defaults)."""
    low, high = _f64([-3.0, 0.0, 1.0]), _f64([-1.0, 2.0, 4.0])
    relax = rules_for(aten.exp.default).relaxation(low, high, RelaxCall())
    chord = (high.exp() - low.exp()) / (high - low)
    assert torch.allclose(relax.uw, chord, rtol=1e-12)
    assert torch.allclose(relax.uw * low + relax.ub, low.exp(), rtol=1e-12)
    mid = (low + high) / 2
    assert torch.allclose(relax.lw, mid.exp(), rtol=1e-12)
    assert torch.allclose(relax.lw * mid + relax.lb, mid.exp(), rtol=1e-12)


def test_sshaped_mixed_uses_tangent_through_far_end():
    """sigmoid on [-2, 3]: the lower line passes through (u, f(u)) and touches f on x < 0 (auto_LiRPA's
    construction); the upper one through (l, f(l)) and touches f on x > 0."""
    low, high = _f64([-2.0]), _f64([3.0])
    relax = rules_for(aten.sigmoid.default).relaxation(low, high, RelaxCall())
    assert torch.allclose(relax.lw * high + relax.lb, torch.sigmoid(high), atol=1e-9)
    assert torch.allclose(relax.uw * low + relax.ub, torch.sigmoid(low), atol=1e-9)
    xs = torch.linspace(-2, 3, 200001, dtype=torch.float64)
    gap_low = torch.sigmoid(xs) - (relax.lw * xs + relax.lb)
    gap_up = relax.uw * xs + relax.ub - torch.sigmoid(xs)
    assert float(gap_low.min()) > -1e-12 and float(xs[gap_low[:150000].argmin()]) < 0
    assert float(gap_up.min()) > -1e-12 and float(xs[50000 + gap_up[50000:].argmin()]) > 0
    # chord where the chord is sound: [-0.1, 5] lower line, [-5, 0.1] upper line
    relax = rules_for(aten.sigmoid.default).relaxation(_f64([-0.1, -5.0]), _f64([5.0, 0.1]), RelaxCall())
    fl, fu = torch.sigmoid(_f64([-0.1, -5.0])), torch.sigmoid(_f64([5.0, 0.1]))
    chord = (fu - fl) / _f64([5.1, 5.1])
    assert torch.allclose(relax.lw[0], chord[0], rtol=1e-9) and torch.allclose(relax.uw[1], chord[1], rtol=1e-9)


def test_crown_tighter_than_ibp_on_smooth_mlp():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 16), nn.Sigmoid(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))
    x = torch.randn(2, 4)
    res = assert_sound(model, x, eps=0.3, pgd=False, n_random=64, graph=_quick_capture(model, x))
    assert float((res["CROWN"].upper - res["CROWN"].lower).mean()) < float((res["IBP"].upper - res["IBP"].lower).mean())


# ------------------------------------------------------------------------------------------------
# unbounded sides, domains, the division rule's entry points


def test_unbounded_side_raises_clearly():
    low, high = torch.tensor([[-1.0, 0.5]]), torch.tensor([[2.0, 1.0]])
    with pytest.raises(NotImplementedError, match="no finite linear bound"):
        rules_for(aten.reciprocal.default).relaxation(low, high, RelaxCall())


def test_bounded_check_reads_one_sum_and_survives_its_overflow():
    """``require_bounded`` tests the sum of the offsets; finite offsets whose sum overflows pass."""
    from boundprop.domains import Relaxation

    big = torch.full((1, 4), 3e38)
    relax = Relaxation(torch.zeros(1, 4), big, torch.zeros(1, 4), big)
    assert curves.require_bounded(relax, -big, big, "x") is relax
    with pytest.raises(NotImplementedError, match="element \\(0, 2\\)"):
        bad = big.clone()
        bad[0, 2] = INF
        curves.require_bounded(Relaxation(torch.zeros(1, 4), -big, torch.zeros(1, 4), bad), -big, big, "x")


def test_reciprocal_entry_points_for_division():
    from boundprop.rules.arith import div_interval
    from boundprop.rules.convex import reciprocal_interval, reciprocal_relaxation

    b = Interval(torch.tensor([[-1.0, 0.5, -4.0, 0.0]]), torch.tensor([[2.0, 1.0, -2.0, 0.0]]))
    box = reciprocal_interval((b,), {})
    assert box.lower.tolist() == [[-INF, 1.0, -0.5, -INF]] and box.upper.tolist() == [[INF, 2.0, -0.25, INF]]
    relax = reciprocal_relaxation(b.lower, b.upper, RelaxCall())  # the division rule's call: no raise
    assert relax.lb[0, 0] == -INF and relax.ub[0, 0] == INF and relax.lw[0, 0] == 0 and relax.uw[0, 0] == 0
    assert not any(torch.isnan(t).any() for t in (relax.lw, relax.lb, relax.uw, relax.ub))
    q = div_interval((Interval(torch.ones(1, 4), 2 * torch.ones(1, 4)), b), {})
    assert q.lower[0, 1] == 1.0 and q.upper[0, 1] == 4.0 and q.upper[0, 0] == INF


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("op", [aten.floor.default, aten.ceil.default, aten.round.default, aten.trunc.default])
def test_rounding_steps_guard_an_ulp_of_error(op, dtype):
    """An interval end one ulp short of a step (as rounding leaves a computed bound) still covers the
    value past the step: one ulp of error must not become an error of 1."""
    steps = torch.tensor([1.0, -2.0, 0.5, 2.5, 3.0], dtype=dtype)
    for toward in (-INF, INF):
        ends = torch.nextafter(steps, torch.full_like(steps, toward))
        low, high = (ends - 0.3, ends) if toward == -INF else (ends, ends + 0.3)
        past = steps  # the true value the ulp of error may hide
        iv = rules_for(op).interval((Interval(low, high),), {})
        assert (iv.lower <= op(past)).all() and (iv.upper >= op(past)).all(), (op, toward)
        relax = rules_for(op).relaxation(low, high, RelaxCall())
        assert (relax.lw * past + relax.lb <= op(past)).all() and (relax.uw * past + relax.ub >= op(past)).all()


def test_domain_edges():
    """log / sqrt / rsqrt at and below 0: infinite sides where unbounded, never NaN."""
    low, high = torch.tensor([[0.0, -1.0, 0.0, -2.0]]), torch.tensor([[1.0, 4.0, 0.0, -1.0]])
    log = rules_for(aten.log.default).interval((Interval(low, high),), {})
    assert log.lower[0, :3].tolist() == [-INF] * 3 and log.upper[0, 0] == 0.0 and log.upper[0, 3] == INF
    sqrt = rules_for(aten.sqrt.default).interval((Interval(low, high),), {})
    assert sqrt.lower.tolist() == [[0.0, 0.0, 0.0, 0.0]] and sqrt.upper[0, 1] == 2.0
    rsqrt = rules_for(aten.rsqrt.default).interval((Interval(low, high),), {})
    assert rsqrt.upper[0, 0] == INF and rsqrt.lower[0, 0] == 1.0
    relax = rules_for(aten.sqrt.default).relaxation(low, high, RelaxCall())
    assert torch.isfinite(relax.lb).all() and torch.isfinite(relax.ub).all()


# ------------------------------------------------------------------------------------------------
# whole models


class Branches(nn.Module):
    """Applies ``fns[i]`` to the i-th block of ``width`` features."""

    def __init__(self, fns, width):
        super().__init__()
        self.fns, self.width = fns, width

    def forward(self, x):
        return torch.cat([f(x[:, i * self.width:(i + 1) * self.width]) for i, f in enumerate(self.fns)], 1)


#: The ops in a model, with the pre-transforms keeping domain-restricted ones in their domain.
MODEL_FNS = {
    "sigmoid": torch.sigmoid, "tanh": torch.tanh, "atan": torch.atan, "erf": torch.erf,
    "exp": lambda h: torch.exp(h.clamp(max=4.0)), "expm1": torch.expm1,
    "log": lambda h: torch.log(h ** 2 + 0.5), "log1p": lambda h: torch.log1p(h.abs()),
    "sqrt": lambda h: torch.sqrt(h.abs() + 0.1), "rsqrt": lambda h: torch.rsqrt(h.abs() + 0.5),
    "reciprocal": lambda h: torch.reciprocal(h ** 2 + 1.0), "pow3": lambda h: h ** 3,
    "pow-2": lambda h: (h.abs() + 1.0) ** -2, "pow1.5": lambda h: h.abs() ** 1.5, "square": torch.square,
    "sin": torch.sin, "cos": torch.cos, "abs": torch.abs, "sign": torch.sign,
    "hardtanh": nn.Hardtanh(), "relu6": nn.ReLU6(), "clamp": lambda h: h.clamp(-0.3, 0.7),
    "clamp_min": lambda h: h.clamp(min=0.1), "gelu": nn.GELU(), "gelu_tanh": nn.GELU("tanh"), "silu": nn.SiLU(),
    "softplus": nn.Softplus(), "softplus_b": nn.Softplus(beta=2.0, threshold=3.0), "elu": nn.ELU(), "selu": nn.SELU(),
    "elu_0.4": nn.ELU(0.4), "celu": nn.CELU(0.6), "prelu": nn.PReLU(init=-0.3), "prelu_steep": nn.PReLU(init=1.8),
    "floor": lambda h: torch.floor(4 * h), "ceil": lambda h: torch.ceil(4 * h), "round": lambda h: torch.round(4 * h),
    "trunc": lambda h: torch.trunc(4 * h),
}


def _mlp(fns, width=4, seed=0):
    torch.manual_seed(seed)
    n = width * len(fns)
    return nn.Sequential(nn.Linear(3, n), Branches(fns, width), nn.Linear(n, n), Branches(fns, width),
                         nn.Linear(n, 4))


def _quick_capture(model, x):
    """make_fx capture (about 10x faster than torch.export for this many small ops); export otherwise."""
    try:
        from boundprop.graph.capture import _from_make_fx  # noqa: PLC0415
    except ImportError:
        return boundprop.capture(model, x)
    return _from_make_fx(model.eval(), (x,))


def test_model_with_every_op_sound():
    model = _mlp(list(MODEL_FNS.values()), width=2)
    x = torch.randn(2, 3)
    res = assert_sound(model, x, eps=0.15, methods=("IBP", "CROWN-IBP", "CROWN"), n_random=64,
                       graph=_quick_capture(model, x))
    width = {m: float((r.upper - r.lower).mean()) for m, r in res.items()}
    assert width["CROWN"] <= width["IBP"] + 1e-6


def test_prelu_cnn_sound_in_every_layout():
    """Per-channel slopes (convex, concave, decreasing) through patches, dense specs and alpha-CROWN's
    spec-dependent parameters: the slopes must meet their channel in each layout."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.PReLU(3), nn.Conv2d(3, 3, 3, stride=2), nn.PReLU(3),
                          nn.Flatten(), nn.Linear(12, 3))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([-0.4, 0.3, 1.8]))
        model[3].weight.copy_(torch.tensor([2.2, 0.0, -1.0]))
    x = torch.randn(2, 2, 5, 5)
    graph = boundprop.capture(model, x)
    assert [n.target for n in graph.nodes].count(aten._prelu_kernel.default) == 2
    opts = {"optimize_bound_args": {"iteration": 5}}
    assert_sound(model, x, eps=0.2, methods=("IBP", "CROWN", "forward", "alpha-CROWN"), graph=graph, opts=opts)
    assert_sound(model, x, eps=0.2, methods=("CROWN", "alpha-CROWN"), graph=graph,
                 opts={**opts, "conv_mode": "matrix"})


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODEL_FNS), ids=str)
def test_single_op_mlp_sound(name):
    model = _mlp([MODEL_FNS[name]], width=12, seed=1)
    x = torch.randn(2, 3)
    assert_sound(model, x, eps=0.3)


@pytest.mark.slow
def test_model_forward_and_alpha_crown_sound():
    model = _mlp(list(MODEL_FNS.values()), width=1)
    x = torch.randn(1, 3)
    graph = _quick_capture(model, x)
    res = assert_sound(model, x, eps=0.1, methods=("CROWN", "forward", "forward+backward"), graph=graph, n_random=64)
    ptb = {graph.inputs[0]: boundprop.PerturbationLpNorm(0.1)}
    alpha = boundprop.compute_bounds(graph, (x,), ptb, method="alpha-CROWN",
                                     opts={"optimize_bound_args": {"iteration": 4}})
    with torch.no_grad():
        pts = x + 0.1 * (2 * torch.rand(256, 3) - 1)
        out = model(pts)
    assert bool((out >= alpha.lower - 1e-4).all() & (out <= alpha.upper + 1e-4).all())
    assert bool((alpha.lower >= res["CROWN"].lower - 1e-5).all() & (alpha.upper <= res["CROWN"].upper + 1e-5).all())

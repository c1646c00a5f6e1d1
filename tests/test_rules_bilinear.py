"""Products and quotients of two perturbed tensors (:mod:`boundprop.rules.bilinear`).

Op level: the backward rules are called directly with random boxes (wide, narrow, degenerate,
infinite) and a random coefficient ``A``; the linear bounds they return must hold at points sampled
in the boxes (corners included), in float64. Whole models: :func:`soundness.assert_sound`, and a
sampled check for weight perturbation; CROWN is compared with IBP.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st
from soundness import assert_sound

import boundprop
from boundprop import PerturbationLpNorm, compute_bounds
from boundprop.algorithms.backward import BackwardCall
from boundprop.algorithms.ibp import _guard_nan
from boundprop.domains import Interval
from boundprop.rules import Var, rules_for
from boundprop.rules import bilinear as bl
from boundprop.rules.arith import div_interval, mul_interval
from boundprop.rules.linear import addmm_interval, linear_interval

aten = torch.ops.aten
DT = torch.float64
B, S = 2, 3
SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)
KINDS = ("normal", "wide", "narrow", "degenerate", "mixed")


# --- helpers ---------------------------------------------------------------------------------


def random_box(shape, gen, kind: str, sign: int = 0) -> Interval:
    """A box of the given kind; ``sign`` +1/-1 makes it strictly positive/negative."""
    scale = {"wide": 1e3, "narrow": 1.0, "degenerate": 1.0}.get(kind, 2.0)
    center = torch.randn(shape, generator=gen, dtype=DT) * scale
    width = torch.rand(shape, generator=gen, dtype=DT) * scale
    if kind == "narrow":
        width = width * 1e-7
    if kind == "degenerate":
        width = torch.zeros(shape, dtype=DT)
    if kind == "mixed":
        pick = torch.rand(shape, generator=gen)
        width = torch.where(pick < 0.25, 0.0, width)
        width = torch.where(pick > 0.75, width * 500, torch.where(pick > 0.5, width * 1e-7, width))
    lower = center - width / 2
    if sign:
        lower = lower.abs() + 0.05 * scale
        lower = lower if sign > 0 else -(lower + width)
    return Interval(lower, lower + width)


def sample(box: Interval, n: int, gen) -> torch.Tensor:
    """``n`` points of the box, a third of the coordinates snapped to a corner."""
    u = torch.rand((n, *box.lower.shape), generator=gen, dtype=DT)
    snap = torch.rand((n, *box.lower.shape), generator=gen) < 0.35
    u = torch.where(snap, u.round(), u)
    pts = box.lower + u * (box.upper - box.lower)
    return torch.minimum(torch.maximum(pts, box.lower), box.upper)


def call_rule(op, args, A, kwargs=None, alpha=None, opts=None) -> object:
    return rules_for(op).backward(BackwardCall(None, tuple(args), kwargs or {}, A, A, opts or {},
                                               alpha or (lambda direction: None)))


def var(name, box: Interval, batched=True) -> Var:
    return Var(name, box.center, box, batched)


def linear_value(out, vars_pts: dict, batched: dict, coeff_idx: int) -> torch.Tensor:
    """``bias + sum coeff . point`` per sample: ``(n, B, S)``."""
    total = out.lbias if coeff_idx == 0 else out.ubias
    total = torch.as_tensor(total, dtype=DT)
    for name, lA, uA in out.A:
        coeff = lA if coeff_idx == 0 else uA
        pts = vars_pts[name]  # (n, *shape)
        p = pts.unsqueeze(2) if batched[name] else pts.unsqueeze(1).unsqueeze(1)
        total = total + (coeff.unsqueeze(0) * p).flatten(3).sum(-1)
    return total


def check_bounds(op, args, names, boxes, batched, A, gen, kwargs=None, alpha=None, opts=None, n=48, fn=None):
    """Sample the perturbed arguments and check lower <= A.f <= upper for every sample."""
    out = call_rule(op, args, A, kwargs, alpha, opts)
    pts = {name: sample(boxes[name], n, gen) for name in names}
    fn = fn or (lambda *a: op(*a, **(kwargs or {})))
    lower = linear_value(out, pts, batched, 0)
    upper = linear_value(out, pts, batched, 1)
    assert not torch.isnan(lower).any() and not torch.isnan(upper).any()
    for i in range(n):
        concrete = [pts[a.name][i] if isinstance(a, Var) else a for a in args]
        y = fn(*concrete)
        exact = (A * y.unsqueeze(1)).flatten(2).sum(-1)
        tol = 1e-8 * (1 + (A.abs() * y.abs().unsqueeze(1)).flatten(2).sum(-1)) + 1e-9 * _magnitude(out)
        assert (lower[i] <= exact + tol).all(), float((lower[i] - exact).max())
        assert (upper[i] >= exact - tol).all(), float((exact - upper[i]).max())
    return out


def _magnitude(out) -> float:
    m = 0.0
    for _, lA, uA in out.A:
        m = max(m, float(lA.abs().max()), float(uA.abs().max()))
    return 1.0 + m * 1e3


# --- McCormick planes ------------------------------------------------------------------------


@SETTINGS
@given(st.integers(0, 10_000), st.sampled_from(KINDS))
def test_mccormick_planes_bound_product_on_grid(seed, kind):
    gen = torch.Generator().manual_seed(seed)
    bx, by = random_box((6,), gen, kind), random_box((6,), gen, kind)
    t, s = torch.rand(6, generator=gen, dtype=DT), torch.rand(6, generator=gen, dtype=DT)
    for weights in [(t, s), bl.mccormick_weights(bx.lower, bx.upper, by.lower, by.upper),
                    bl.mccormick_weights(bx.lower, bx.upper, by.lower, by.upper, "fixed")]:
        lo, up, bad = bl.mccormick_planes(bx.lower, bx.upper, by.lower, by.upper, *weights)
        assert not bad.any()
        g = torch.linspace(0, 1, 21, dtype=DT)
        x = bx.lower[:, None, None] + g[None, :, None] * (bx.upper - bx.lower)[:, None, None]
        y = by.lower[:, None, None] + g[None, None, :] * (by.upper - by.lower)[:, None, None]
        xy = x * y
        tol = 1e-10 * (1 + xy.abs())
        plane = [p.ax[:, None, None] * x + p.ay[:, None, None] * y + p.c[:, None, None] for p in (lo, up)]
        assert (plane[0] <= xy + tol).all() and (plane[1] >= xy - tol).all()


@SETTINGS
@given(st.integers(0, 10_000), st.sampled_from(KINDS))
def test_default_planes_are_exact_on_the_box(seed, kind):
    """The default planes, minimised (maximised) over the box, give the product's exact range."""
    gen = torch.Generator().manual_seed(seed)
    bx, by = random_box((8,), gen, kind), random_box((8,), gen, kind)
    t, s = bl.mccormick_weights(bx.lower, bx.upper, by.lower, by.upper)
    lo, up, _ = bl.mccormick_planes(bx.lower, bx.upper, by.lower, by.upper, t, s)
    corners = torch.stack([bx.lower * by.lower, bx.lower * by.upper, bx.upper * by.lower, bx.upper * by.upper])
    box_min = lambda p: (p.ax.clamp(min=0) * bx.lower + p.ax.clamp(max=0) * bx.upper
                         + p.ay.clamp(min=0) * by.lower + p.ay.clamp(max=0) * by.upper + p.c)
    box_max = lambda p: (p.ax.clamp(min=0) * bx.upper + p.ax.clamp(max=0) * bx.lower
                         + p.ay.clamp(min=0) * by.upper + p.ay.clamp(max=0) * by.lower + p.c)
    tol = 1e-9 * (1 + corners.abs().amax(0))
    assert (box_min(lo) - corners.amin(0)).abs().le(tol).all()
    assert (box_max(up) - corners.amax(0)).abs().le(tol).all()


def test_infinite_ends_give_infinite_bias_not_nan():
    gen = torch.Generator().manual_seed(0)
    bx, by = random_box((B, 4), gen, "normal"), random_box((B, 4), gen, "normal")
    bx = Interval(bx.lower.clone(), bx.upper.clone())
    bx.lower[0, 1] = -math.inf
    by.upper[1, 2] = math.inf
    A = torch.randn(B, S, 4, generator=gen, dtype=DT)
    A[:, 0, 1] = 0.0  # a zero coefficient on an unbounded term contributes nothing
    A[:, 0, 2] = 0.0
    out = call_rule(aten.mul.Tensor, [var("x", bx), var("y", by)], A)
    for _, lA, uA in out.A:
        assert torch.isfinite(lA).all() and torch.isfinite(uA).all()
    assert torch.isneginf(out.lbias[:, 1:]).all() and torch.isposinf(out.ubias[:, 1:]).all()
    assert torch.isfinite(out.lbias[:, 0]).all() and torch.isfinite(out.ubias[:, 0]).all()


# --- element-wise products -------------------------------------------------------------------

MUL_SHAPES = [((B, 3, 4), (B, 3, 4), True), ((B, 3, 1), (B, 3, 4), True), ((B, 1, 4), (B, 3, 1), True),
              ((B, 5), (B, 5), True), ((B, 3, 4), (4,), False), ((B, 3, 4), (3, 1), False),
              ((B, 3, 4), (1, 3, 4), False)]


@SETTINGS
@given(st.integers(0, 10_000), st.sampled_from(KINDS), st.sampled_from(MUL_SHAPES), st.booleans())
def test_mul_backward_sound(seed, kind, shapes, use_alpha):
    gen = torch.Generator().manual_seed(seed)
    sx, sy, y_batched = shapes
    boxes = {"x": random_box(sx, gen, kind), "y": random_box(sy, gen, kind)}
    out_shape = torch.broadcast_shapes(sx, sy)
    A = torch.randn(B, S, *out_shape[1:], generator=gen, dtype=DT)
    alpha = None
    if use_alpha:  # random plane weights, with a spec dimension
        w = torch.rand(2, B, S, *out_shape[1:], generator=gen, dtype=DT) * 1.4 - 0.2
        alpha = lambda direction: w
    args = [var("x", boxes["x"]), var("y", boxes["y"], y_batched)]
    out = check_bounds(aten.mul.Tensor, args, ["x", "y"], boxes, {"x": True, "y": y_batched}, A, gen, alpha=alpha)
    shapes_out = {name: lA.shape for name, lA, _ in out.A}
    assert shapes_out["x"] == (B, S, *sx[1:])
    assert shapes_out["y"] == ((B, S, *sy[1:]) if y_batched else (B, S, *sy))


@SETTINGS
@given(st.integers(0, 10_000), st.sampled_from(KINDS), st.booleans())
def test_square_backward_sound_and_tighter_than_mccormick(seed, kind, use_alpha):
    gen = torch.Generator().manual_seed(seed)
    box = random_box((B, 6), gen, kind)
    A = torch.randn(B, S, 6, generator=gen, dtype=DT)
    alpha = None
    if use_alpha:
        w = torch.rand(2, B, 6, generator=gen, dtype=DT)
        alpha = lambda direction: w
    x = var("x", box)
    out = check_bounds(aten.mul.Tensor, [x, x], ["x"], {"x": box}, {"x": True}, A, gen, alpha=alpha)
    assert len(out.A) == 1
    if not use_alpha:  # as tight as the exact range on the box, so at least as tight as McCormick's
        general = call_rule(aten.mul.Tensor, [x, var("y", box)], A)
        lo_sq = out.lbias + (out.A[0][1].clamp(min=0) * box.lower.unsqueeze(1)
                             + out.A[0][1].clamp(max=0) * box.upper.unsqueeze(1)).sum(-1)
        lo_mc = general.lbias + sum((lA.clamp(min=0) * box.lower.unsqueeze(1)
                                     + lA.clamp(max=0) * box.upper.unsqueeze(1)).sum(-1) for _, lA, _ in general.A)
        assert (lo_sq >= lo_mc - 1e-9 * (1 + lo_mc.abs())).all()


# --- division -------------------------------------------------------------------------------

DIV_SHAPES = [((B, 3, 4), (B, 3, 4)), ((B, 3, 4), (B, 3, 1)), ((B, 3, 1), (B, 3, 4))]


@SETTINGS
@given(st.integers(0, 10_000), st.sampled_from(("normal", "wide", "narrow", "degenerate", "mixed")),
       st.sampled_from(DIV_SHAPES), st.sampled_from((1, -1)), st.booleans())
def test_div_backward_sound(seed, kind, shapes, sign, const_numerator):
    gen = torch.Generator().manual_seed(seed)
    sa, sb = shapes
    boxes = {"a": random_box(sa, gen, kind), "b": random_box(sb, gen, kind, sign=sign)}
    out_shape = torch.broadcast_shapes(sa, sb)
    A = torch.randn(B, S, *out_shape[1:], generator=gen, dtype=DT)
    if const_numerator:
        a = torch.randn(sa, generator=gen, dtype=DT)
        check_bounds(aten.div.Tensor, [a, var("b", boxes["b"])], ["b"], boxes, {"b": True}, A, gen)
    else:
        check_bounds(aten.div.Tensor, [var("a", boxes["a"]), var("b", boxes["b"])], ["a", "b"], boxes,
                     {"a": True, "b": True}, A, gen)


def test_div_by_interval_containing_zero_is_unbounded_not_nan():
    gen = torch.Generator().manual_seed(1)
    a = random_box((B, 4), gen, "normal")
    b = Interval(torch.tensor([[-1.0, 0.0, 0.5, 1.0]] * B, dtype=DT),
                 torch.tensor([[1.0, 2.0, 1.0, 3.0]] * B, dtype=DT))
    A = torch.zeros(B, S, 4, dtype=DT)
    A[:, 0, 0] = 1.0  # (-1, 1): unbounded
    A[:, 1, 1] = -2.0  # [0, 2]: unbounded
    A[:, 2, 2:] = 1.0  # positive divisors: finite
    for num in (var("a", a), torch.ones(B, 4, dtype=DT)):
        out = call_rule(aten.div.Tensor, [num, var("b", b)], A)
        assert torch.isneginf(out.lbias[:, :2]).all() and torch.isposinf(out.ubias[:, :2]).all()
        assert torch.isfinite(out.lbias[:, 2]).all() and torch.isfinite(out.ubias[:, 2]).all()
        for _, lA, uA in out.A:
            assert not torch.isnan(lA).any() and not torch.isnan(uA).any()


# --- matrix products -------------------------------------------------------------------------

MATMUL_CASES = [  # op, x shape, x batched, y shape, y batched
    (aten.bmm.default, (B, 3, 4), True, (B, 4, 5), True),
    (aten.matmul.default, (B, 3, 4), True, (B, 4, 2), True),
    (aten.matmul.default, (B, 2, 3, 4), True, (B, 2, 4, 3), True),
    (aten.matmul.default, (B, 3, 4), True, (4, 5), False),
    (aten.matmul.default, (B, 2, 3, 4), True, (1, 4, 5), False),
    (aten.matmul.default, (B, 3, 4), True, (4,), False),
    (aten.matmul.default, (3, 4), False, (B, 4, 5), True),
    (aten.matmul.default, (4,), False, (B, 4, 5), True),
    (aten.mm.default, (B, 4), True, (4, 5), False),
]


@SETTINGS
@given(st.integers(0, 10_000), st.sampled_from(KINDS), st.sampled_from(MATMUL_CASES), st.booleans())
def test_matmul_backward_sound(seed, kind, case, use_alpha):
    op, sx, x_batched, sy, y_batched = case
    gen = torch.Generator().manual_seed(seed)
    boxes = {"x": random_box(sx, gen, kind), "y": random_box(sy, gen, kind)}
    out_shape = op(boxes["x"].lower, boxes["y"].lower).shape
    A = torch.randn(B, S, *out_shape[1:], generator=gen, dtype=DT)
    alpha = None
    if use_alpha and op is aten.bmm.default:
        w = torch.rand(2, B, S, 3, 4, 5, generator=gen, dtype=DT)
        alpha = lambda direction: w
    args = [var("x", boxes["x"], x_batched), var("y", boxes["y"], y_batched)]
    out = check_bounds(op, args, ["x", "y"], boxes, {"x": x_batched, "y": y_batched}, A, gen, alpha=alpha, n=32)
    shapes_out = {name: lA.shape for name, lA, _ in out.A}
    assert shapes_out["x"] == ((B, S, *sx[1:]) if x_batched else (B, S, *sx))
    assert shapes_out["y"] == ((B, S, *sy[1:]) if y_batched else (B, S, *sy))


def test_matmul_with_constant_operand_is_exact():
    gen = torch.Generator().manual_seed(3)
    w = random_box((4, 5), gen, "normal")
    x = torch.randn(B, 3, 4, generator=gen, dtype=DT)
    A = torch.randn(B, S, 3, 5, generator=gen, dtype=DT)
    out = call_rule(aten.matmul.default, [x, var("w", w, False)], A)
    (_, lA, uA), = out.A
    assert torch.allclose(lA, uA) and torch.allclose(lA, torch.einsum("bsij,bik->bskj", A, x))


LINEAR_CASES = [  # x shape, x perturbed, weight perturbed, bias: None / const / perturbed
    ((B, 4), True, True, "perturbed"), ((B, 3, 4), True, True, "const"), ((B, 4), False, True, "const"),
    ((B, 2, 3, 4), True, True, None), ((B, 4), False, True, "perturbed"), ((B, 3, 4), True, False, "perturbed"),
]


@SETTINGS
@given(st.integers(0, 10_000), st.sampled_from(KINDS), st.sampled_from(LINEAR_CASES))
def test_linear_with_perturbed_weight_or_bias_sound(seed, kind, case):
    sx, x_perturbed, w_perturbed, bias_kind = case
    gen = torch.Generator().manual_seed(seed)
    boxes = {"x": random_box(sx, gen, kind), "w": random_box((5, 4), gen, kind), "b": random_box((5,), gen, kind)}
    A = torch.randn(B, S, *sx[1:-1], 5, generator=gen, dtype=DT)
    x = var("x", boxes["x"]) if x_perturbed else torch.randn(sx, generator=gen, dtype=DT)
    w = var("w", boxes["w"], False) if w_perturbed else torch.randn(5, 4, generator=gen, dtype=DT)
    bias = {None: None, "const": torch.randn(5, generator=gen, dtype=DT), "perturbed": var("b", boxes["b"], False)}
    names = [n for n, on in (("x", x_perturbed), ("w", w_perturbed), ("b", bias_kind == "perturbed")) if on]
    out = check_bounds(aten.linear.default, [x, w, bias[bias_kind]], names, boxes, {"x": True, "w": False, "b": False},
                       A, gen, n=32)
    shapes = {name: lA.shape for name, lA, _ in out.A}
    assert shapes.get("w", (B, S, 5, 4)) == (B, S, 5, 4) and shapes.get("b", (B, S, 5)) == (B, S, 5)


@SETTINGS
@given(st.integers(0, 10_000), st.sampled_from(KINDS), st.booleans())
def test_addmm_sound(seed, kind, bias_perturbed):
    gen = torch.Generator().manual_seed(seed)
    boxes = {"x": random_box((B, 4), gen, kind), "w": random_box((4, 5), gen, kind), "b": random_box((5,), gen, kind)}
    A = torch.randn(B, S, 5, generator=gen, dtype=DT)
    bias = var("b", boxes["b"], False) if bias_perturbed else torch.randn(5, generator=gen, dtype=DT)
    kwargs = {"beta": 0.5, "alpha": -2.0}
    names = ["x", "w"] + (["b"] if bias_perturbed else [])
    check_bounds(aten.addmm.default, [bias, var("x", boxes["x"]), var("w", boxes["w"], False)], names, boxes,
                 {"x": True, "w": False, "b": False}, A, gen, kwargs=kwargs, n=32)


# --- IBP rules of the both-perturbed cases (arith.py, linear.py) ------------------------------

IBP_CASES = [
    ("mul", lambda a, b: a * b, (B, 3, 4), (B, 3, 1)),
    ("div", lambda a, b: a / b, (B, 3, 4), (B, 3, 4)),
    ("bmm", lambda a, b: torch.bmm(a, b), (B, 3, 4), (B, 4, 2)),
    ("matmul", lambda a, b: torch.matmul(a, b), (B, 2, 3, 4), (B, 2, 4, 3)),
    ("linear", lambda a, b: torch.nn.functional.linear(a, b), (B, 3, 4), (5, 4)),
    ("addmm", lambda a, b: torch.addmm(torch.ones(5, dtype=DT), a, b), (B, 4), (4, 5)),
]
_IBP_RULE = {"mul": lambda a, b: mul_interval((a, b), {}), "div": lambda a, b: div_interval((a, b), {}),
             "bmm": lambda a, b: rules_for(aten.bmm.default).interval((a, b), {}),
             "matmul": lambda a, b: rules_for(aten.matmul.default).interval((a, b), {}),
             "linear": lambda a, b: linear_interval((a, b), {}),
             "addmm": lambda a, b: addmm_interval((torch.ones(5, dtype=DT), a, b), {})}


@SETTINGS
@given(st.integers(0, 10_000), st.sampled_from(KINDS), st.sampled_from(IBP_CASES))
def test_ibp_rules_of_products_sound(seed, kind, case):
    name, fn, sa, sb = case
    gen = torch.Generator().manual_seed(seed)
    a = random_box(sa, gen, kind)
    b = random_box(sb, gen, kind, sign=1 if name == "div" else 0)
    iv = _guard_nan(_IBP_RULE[name](a, b))
    pa, pb = sample(a, 64, gen), sample(b, 64, gen)
    for i in range(64):
        y = fn(pa[i], pb[i])
        tol = 1e-9 * (1 + y.abs())
        assert (iv.lower <= y + tol).all() and (iv.upper >= y - tol).all()


@pytest.mark.parametrize("name", [c[0] for c in IBP_CASES])
def test_ibp_rules_of_products_no_nan_on_infinite_ends(name):
    _, _, sa, sb = next(c for c in IBP_CASES if c[0] == name)
    a = Interval(torch.full(sa, -math.inf, dtype=DT), torch.ones(sa, dtype=DT))
    b = Interval(torch.zeros(sb, dtype=DT), torch.full(sb, math.inf, dtype=DT))
    iv = _guard_nan(_IBP_RULE[name](a, b))
    assert not torch.isnan(iv.lower).any() and not torch.isnan(iv.upper).any()
    assert (iv.lower <= iv.upper).all()


def test_nan_guard_keeps_finite_ends_and_maps_nan_to_the_infinite_end():
    """Finite intervals come back as they are (also when their sum overflows); a NaN lower end
    becomes -inf and a NaN upper end +inf; infinite ends stay."""
    finite = Interval(torch.tensor([-1.0, 0.0]), torch.tensor([2.0, 3.0]))
    assert _guard_nan(finite) is finite
    huge = Interval(torch.full((4,), 3e38), torch.full((4,), 3e38))  # float32 sum overflows to inf
    out = _guard_nan(huge)
    assert torch.equal(out.lower, huge.lower) and torch.equal(out.upper, huge.upper)
    bad = Interval(torch.tensor([math.nan, -math.inf, 1.0]), torch.tensor([math.nan, 2.0, math.inf]))
    out = _guard_nan(bad)
    assert torch.equal(out.lower, torch.tensor([-math.inf, -math.inf, 1.0]))
    assert torch.equal(out.upper, torch.tensor([math.inf, 2.0, math.inf]))


# --- whole models ----------------------------------------------------------------------------


class TwoBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.out = nn.Linear(4, 6), nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.out(self.a(x) * self.b(x))


class Square(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.out = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = self.a(x)
        return self.out(h * h)


class Attention(nn.Module):
    """Single-head self-attention on ``(batch, T, D)``; ``softmax`` optional."""

    def __init__(self, d=4, softmax=False):
        super().__init__()
        self.q, self.k, self.v, self.o = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, 2)
        self.softmax, self.scale = softmax, 1 / math.sqrt(d)

    def forward(self, x):
        scores = self.q(x) @ self.k(x).transpose(-2, -1) * self.scale
        if self.softmax:
            scores = torch.softmax(scores, dim=-1)
        return self.o(torch.bmm(scores, self.v(x))).flatten(1)


class Ratio(nn.Module):
    """``a(x) / (b(x)^2 + 1)`` and ``a(x) / (relu(c(x)) + 0.5)``, broadcast divisor."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 5), nn.Linear(4, 5), nn.Linear(4, 1)

    def forward(self, x):
        b = self.b(x)
        return torch.cat([self.a(x) / (b * b + 1), self.a(x) / (torch.relu(self.c(x)) + 0.5)], dim=-1)


def _widths(results):
    return {m: float((r.upper - r.lower).mean()) for m, r in results.items()}


@pytest.mark.parametrize("make,shape,eps", [(TwoBranch, (2, 4), 0.1), (Square, (2, 4), 0.2),
                                            (lambda: Attention(), (2, 3, 4), 0.05), (Ratio, (2, 4), 0.1)])
def test_models_sound_and_crown_tighter_than_ibp(make, shape, eps):
    torch.manual_seed(0)
    model = make().eval()
    x = torch.randn(shape)
    results = assert_sound(model, x, eps, methods=("IBP", "CROWN-IBP", "CROWN"))
    widths = _widths(results)
    assert widths["CROWN"] <= widths["IBP"] * (1 + 1e-5)
    if make in (TwoBranch, Square):  # affine -> product -> affine: CROWN is elementwise no looser than IBP
        ibp, crown = results["IBP"], results["CROWN"]
        assert (crown.lower >= ibp.lower - 1e-5).all() and (crown.upper <= ibp.upper + 1e-5).all()


def test_attention_with_softmax_sound():
    if rules_for(aten._softmax.default) is None or rules_for(aten._softmax.default).backward is None:
        pytest.skip("no softmax rules in this tree")
    torch.manual_seed(1)
    model = Attention(softmax=True).eval()
    results = assert_sound(model, torch.randn(2, 3, 4), 0.05, methods=("IBP", "CROWN"))
    widths = _widths(results)
    assert widths["CROWN"] <= widths["IBP"] * (1 + 1e-5)


def test_division_by_interval_containing_zero_model():
    class M(nn.Module):
        def forward(self, x):
            return x[:, :2] / x[:, 2:]

    x = torch.tensor([[1.0, 2.0, 0.05, 3.0]])
    g = boundprop.capture(M(), x)
    for method in ("IBP", "CROWN"):
        r = compute_bounds(g, (x,), {g.inputs[0]: PerturbationLpNorm(0.1)}, method=method)
        assert not torch.isnan(r.lower).any() and not torch.isnan(r.upper).any()
        assert torch.isneginf(r.lower[0, 0]) and torch.isposinf(r.upper[0, 0])
        assert torch.isfinite(r.lower[0, 1]) and torch.isfinite(r.upper[0, 1])
        assert r.lower[0, 1] <= 2 / 3 <= r.upper[0, 1]


class WeightNet(nn.Module):
    def __init__(self, hidden=True):
        super().__init__()
        self.hidden = hidden
        self.fc1, self.fc = nn.Linear(4, 5), nn.Linear(5 if hidden else 4, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.fc1(x)) if self.hidden else x)


@pytest.fixture(scope="module")
def weight_nets():
    """One capture per architecture, shared by the weight-perturbation tests."""
    out = {}
    for hidden in (False, True):
        torch.manual_seed(int(hidden))
        model = WeightNet(hidden).eval()
        x = torch.randn(3, 4)
        out[hidden] = (model, x, boundprop.capture(model, x))
    return out


def _weight_check(model, x, g, ptbs: dict, methods, n=300, tol=1e-4):
    """Bounds must hold for sampled inputs/weights in the boxes (corners included)."""
    leaf = {q: g.inputs[0] if q == "x" else g.param_by_qualname(q) for q in ptbs}
    results = {m: compute_bounds(g, (x,), {leaf[q]: ptb for q, ptb in ptbs.items()}, method=m) for m in methods}
    params = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for i in range(n):
            over = {}
            for q, ptb in ptbs.items():
                base = x if q == "x" else params[q]
                box = ptb.interval(base)
                u = torch.rand(base.shape, generator=gen)
                u = torch.where(torch.rand(base.shape, generator=gen) < 0.5, u.round(), u) if i % 2 else u.round()
                over[q] = box.lower + u * (box.upper - box.lower)
            xi = over.pop("x", x)
            y = torch.func.functional_call(model, {**params, **over}, (xi,))
            for m, r in results.items():
                scale = tol * (1 + y.abs())
                assert (r.lower <= y + scale).all(), (m, float((r.lower - y).max()))
                assert (r.upper >= y - scale).all(), (m, float((y - r.upper).max()))
    return results


def test_weight_perturbation_single_layer_crown_exact_on_box_and_sound(weight_nets):
    model, x, g = weight_nets[False]
    ptbs = {"x": PerturbationLpNorm(0.1), "fc.weight": PerturbationLpNorm(0.05), "fc.bias": PerturbationLpNorm(0.02)}
    results = _weight_check(model, x, g, ptbs, ("IBP", "CROWN"))
    ibp, crown = results["IBP"], results["CROWN"]
    assert (crown.lower >= ibp.lower - 1e-5).all() and (crown.upper <= ibp.upper + 1e-5).all()


@pytest.mark.parametrize("which", [("x", "fc.weight"), ("fc1.weight",), ("x", "fc1.weight", "fc.weight", "fc1.bias")])
def test_weight_perturbation_two_layers_sound(weight_nets, which):
    model, x, g = weight_nets[True]
    eps = {"x": 0.05, "fc1.weight": 0.02, "fc.weight": 0.05, "fc1.bias": 0.05}
    results = _weight_check(model, x, g, {q: PerturbationLpNorm(eps[q]) for q in which}, ("IBP", "CROWN-IBP", "CROWN"))
    assert all(math.isfinite(w) for w in _widths(results).values())


def test_weight_perturbation_only_weight_is_exact(weight_nets):
    """With a constant input, ``x W^T`` is linear in ``W``: CROWN's interval is exact (equal to IBP's)."""
    model, x, g = weight_nets[False]
    ptb = {g.param_by_qualname("fc.weight"): PerturbationLpNorm(0.1)}
    ibp = compute_bounds(g, (x,), ptb, method="IBP")
    crown = compute_bounds(g, (x,), ptb, method="CROWN")
    assert torch.allclose(ibp.lower, crown.lower, atol=1e-5) and torch.allclose(ibp.upper, crown.upper, atol=1e-5)
    with torch.no_grad():
        exact = model(x)
    radius = 0.1 * x.abs().sum(-1, keepdim=True)
    assert torch.allclose(crown.lower, exact - radius, atol=1e-5)
    assert torch.allclose(crown.upper, exact + radius, atol=1e-5)

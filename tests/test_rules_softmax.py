"""Softmax / log-softmax rules: exact IBP, sound linear relaxations (every mode), whole models."""

import math

import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st
from op_bounds import check_op, one_node_graph, random_box
from soundness import assert_sound

from boundprop.graph.ir import Ref
from boundprop.rules.softmax import exp_chord_slope, log_softmax_bounds, slice_relaxations, softmax_interval

aten = torch.ops.aten

boxes = dict(n=st.integers(1, 6), seed=st.integers(0, 2**16), scale=st.floats(-7, 3),
             degenerate=st.booleans(), spread=st.sampled_from([0.5, 3.0, 30.0]))


def _box(n, seed, scale, degenerate, spread, batch=3):
    x, r = random_box((batch, n), seed, scale, degenerate, spread)
    return x - r, x + r


def _samples(lower, upper, seed, count=3000):
    gen = torch.Generator().manual_seed(seed)
    pts = lower + torch.rand((count, *lower.shape), generator=gen) * (upper - lower)
    corners = torch.where(torch.rand((300, *lower.shape), generator=gen) < 0.5, lower, upper)
    return torch.cat([pts, corners, lower[None], upper[None]])


@settings(max_examples=60, deadline=None)
@given(**boxes)
def test_interval_exact_and_sound(n, seed, scale, degenerate, spread):
    lower, upper = _box(n, seed, scale, degenerate, spread)
    zl, zu = log_softmax_bounds(lower, upper)
    pts = _samples(lower, upper, seed)
    z = torch.log_softmax(pts, -1)
    tol = 1e-5 * (1 + z.abs())
    assert (z >= zl - tol).all() and (z <= zu + tol).all()
    # exact: attained at the corner (x_i = l_i, others u) and (x_i = u_i, others l)
    eye = torch.eye(n, dtype=torch.bool)
    at_low = torch.log_softmax(torch.where(eye, lower[:, None], upper[:, None]), -1).diagonal(dim1=-2, dim2=-1)
    at_up = torch.log_softmax(torch.where(eye, upper[:, None], lower[:, None]), -1).diagonal(dim1=-2, dim2=-1)
    assert torch.allclose(at_low, zl, atol=1e-4, rtol=1e-4) and torch.allclose(at_up, zu, atol=1e-4, rtol=1e-4)


@settings(max_examples=60, deadline=None)
@given(**boxes, log=st.booleans(), mode=st.sampled_from(["lse", "er", "best"]))
def test_relaxations_sound_on_samples(n, seed, scale, degenerate, spread, log, mode):
    lower, upper = _box(n, seed, scale, degenerate, spread)
    x0 = (lower + upper) / 2
    low, up = slice_relaxations(lower, upper, x0, log, mode)
    pts = _samples(lower, upper, seed)
    f = torch.log_softmax(pts, -1) if log else torch.softmax(pts, -1)
    vl = (low.dense() * pts.unsqueeze(-2)).sum(-1) + low.b
    vu = (up.dense() * pts.unsqueeze(-2)).sum(-1) + up.b
    assert not torch.isnan(vl).any() and not torch.isnan(vu).any()
    # float32 rounding of a linear function of |x| ~ 1e3 entries: allow 1e-7 relative to |x|
    tol = 1e-5 * (1 + f.abs()) + 2e-7 * pts.abs().amax(-1, keepdim=True) * (1 + low.dense().abs().sum(-1))
    assert (vl <= f + tol).all(), float((vl - f).max())
    assert (vu >= f - tol).all(), float((f - vu).max())


def test_chord_slope_is_never_above_the_chord():
    lo = torch.tensor([-3.0, 0.0, -1e-9, -50.0, -2000.0, 1.0])
    hi = torch.tensor([-3.0, 1e-7, 0.0, 0.0, 0.0, 30.5])
    s = exp_chord_slope(lo, hi)
    t = lo[:, None] + torch.linspace(0, 1, 101)[None] * (hi - lo)[:, None]
    line = torch.exp(hi)[:, None] + s[:, None] * (t - hi[:, None])
    assert torch.isfinite(s).all()
    # float32: the line is evaluated from exp(hi), so its rounding error is relative to exp(hi)
    assert (line >= torch.exp(t) - 1e-6 * torch.exp(hi)[:, None]).all()


def test_infinite_and_huge_bounds_give_no_nan():
    lower = torch.tensor([[-math.inf, 0.0, -1e3], [-1e3, -1e3, -1e3]])
    upper = torch.tensor([[1.0, math.inf, 1e3], [1e3, 1e3, 1e3]])
    out = softmax_interval((__import__("boundprop").domains.Interval(lower, upper), 1), {})
    assert not torch.isnan(out.lower).any() and not torch.isnan(out.upper).any()
    assert (out.lower >= 0).all() and (out.upper <= 1).all()
    for log in (False, True):
        for mode in ("lse", "er", "best"):
            low, up = slice_relaxations(lower, upper, torch.zeros_like(lower), log, mode)
            for rel in (low, up):
                assert not torch.isnan(rel.dense()).any() and not torch.isnan(rel.b).any()


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**16), scale=st.floats(-6, 1.5), degenerate=st.booleans(),
       dim=st.sampled_from([1, 2, -1]), log=st.booleans())
def test_op_level_any_dim(seed, scale, degenerate, dim, log):
    target = aten.log_softmax.int if log else aten.softmax.int
    fn = (lambda t: torch.log_softmax(t, dim)) if log else (lambda t: torch.softmax(t, dim))
    graph = one_node_graph(target, (Ref("x"), dim))
    x, r = random_box((2, 3, 4), seed, scale, degenerate, 2.0)
    check_op(graph, fn, x, r, methods=("IBP", "CROWN-IBP", "CROWN"), seed=seed)


def test_op_level_modes_and_dtype_arg():
    x, r = random_box((2, 5), 3, -0.5, True, 2.0)
    for mode in ("er", "best"):
        check_op(one_node_graph(aten.softmax.int, (Ref("x"), 1)), lambda t: torch.softmax(t, 1), x, r,
                 opts={"softmax_lower": mode})
    check_op(one_node_graph(aten.softmax.int, (Ref("x"), -1, torch.float32)), lambda t: torch.softmax(t, -1), x, r)


class Block(nn.Module):
    """linear -> softmax over the last dim -> linear (attention-like weights)."""

    def __init__(self):
        super().__init__()
        self.q = nn.Linear(6, 6)
        self.o = nn.Linear(6, 3)

    def forward(self, x):
        return self.o(torch.softmax(self.q(x), -1) * 3)


class Attention(nn.Module):
    """Token scores softmaxed over tokens, mixing the values; log-softmax head."""

    def __init__(self, d=4, t=3):
        super().__init__()
        self.a = nn.Linear(d, t)
        self.values = nn.Parameter(torch.randn(t, d))
        self.o = nn.Linear(t * d, 3)

    def forward(self, x):  # x: (batch, tokens, d)
        w = torch.softmax(self.a(x), dim=1)  # (batch, t, t): weights over tokens
        mixed = w.transpose(1, 2) @ self.values
        return torch.log_softmax(self.o(mixed.flatten(1)), -1)


def _widths(results):
    return {m: float((r.upper - r.lower).mean()) for m, r in results.items()}


def test_transformer_like_block_sound_and_crown_tighter():
    torch.manual_seed(0)
    model = Block()
    for eps in (0.02, 0.3):
        w = _widths(assert_sound(model, torch.randn(2, 6), eps=eps))
        assert w["CROWN"] <= w["IBP"] + 1e-6, w


def test_softmax_over_tokens_and_log_softmax_model():
    torch.manual_seed(1)
    model = Attention()
    w = _widths(assert_sound(model, torch.randn(2, 3, 4), eps=0.05))
    assert w["CROWN"] <= w["IBP"] + 1e-6, w

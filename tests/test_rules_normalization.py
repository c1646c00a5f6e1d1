"""Layer-norm rules: sound IBP (with the variance coupling), sound backward pieces, whole models."""

import math

import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st
from op_bounds import check_op, one_node_graph, random_box
from soundness import assert_sound

from boundprop.domains import Interval
from boundprop.graph.ir import Ref
from boundprop.rules.normalization import group_bounds, layer_norm_interval, pull, relax, variance_lower

aten = torch.ops.aten

boxes = dict(n=st.integers(1, 6), seed=st.integers(0, 2**16), scale=st.floats(-7, 3),
             degenerate=st.booleans(), spread=st.sampled_from([0.3, 1.0, 20.0]),
             eps=st.sampled_from([1e-5, 1e-2, 1.0]))


def _box(n, seed, scale, degenerate, spread, batch=3):
    x, r = random_box((batch, n), seed, scale, degenerate, spread)
    return x - r, x + r


def _samples(lower, upper, seed, count=3000):
    gen = torch.Generator().manual_seed(seed)
    pts = lower + torch.rand((count, *lower.shape), generator=gen) * (upper - lower)
    corners = torch.where(torch.rand((300, *lower.shape), generator=gen) < 0.5, lower, upper)
    return torch.cat([pts, corners, lower[None], upper[None], ((lower + upper) / 2)[None]])


@settings(max_examples=60, deadline=None)
@given(**boxes)
def test_interval_sound(n, seed, scale, degenerate, spread, eps):
    lower, upper = _box(n, seed, scale, degenerate, spread)
    g = group_bounds(lower, upper, eps)
    pts = _samples(lower, upper, seed)
    f = torch.nn.functional.layer_norm(pts, (n,), eps=eps)
    tol = 1e-4 * (1 + f.abs())
    assert (f >= g.n_l - tol).all() and (f <= g.n_u + tol).all()
    assert (g.n_u <= math.sqrt(max(n - 1, 0)) + 1e-5).all() and (g.n_l >= -math.sqrt(max(n - 1, 0)) - 1e-5).all()
    var = pts.var(-1, unbiased=False, keepdim=True)
    assert (var >= g.v_l - 1e-4 * (1 + var)).all() and (var <= g.v_u + 1e-4 * (1 + var)).all()


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 5), seed=st.integers(0, 2**16), scale=st.floats(-3, 1))
def test_variance_lower_is_the_minimum(n, seed, scale):
    """Sound, and nearly attained: a box minimiser is ``clip(t*, l, u)``; check against a fine t-grid."""
    lower, upper = _box(n, seed, scale, False, 1.0)
    bound = variance_lower(lower, upper)
    t = torch.linspace(-5, 5, 20001)[:, None, None]
    best = torch.minimum(torch.maximum(t, lower), upper).var(-1, unbiased=False, keepdim=True).amin(0)
    assert (bound <= best + 1e-5).all()
    assert (bound >= best - 1e-3 * (1 + best)).all()


@settings(max_examples=60, deadline=None)
@given(**boxes)
def test_backward_pieces_sound(n, seed, scale, degenerate, spread, eps):
    lower, upper = _box(n, seed, scale, degenerate, spread)
    rel = relax(lower, upper, eps)
    pts = _samples(lower, upper, seed)
    f = torch.nn.functional.layer_norm(pts, (n,), eps=eps)
    lam = torch.randn(lower.shape[0], 5, n, generator=torch.Generator().manual_seed(seed))
    target = (lam.unsqueeze(0) * f.unsqueeze(2)).sum(-1)  # (points, batch, spec)
    for side in ("lower", "upper"):
        coef, bias = pull(rel, lam, side)
        val = (coef.unsqueeze(0) * pts.unsqueeze(2)).sum(-1) + bias
        assert not torch.isnan(val).any()
        err = val - target if side == "lower" else target - val
        tol = 1e-4 * (1 + target.abs()) + 1e-6 * pts.abs().amax(-1, keepdim=True) * coef.abs().sum(-1)
        assert (err <= tol).all(), (side, float(err.max()))


def test_infinite_bounds_give_no_nan():
    lower = torch.tensor([[-math.inf, 0.0, 1.0], [-1e3, -1e3, -1e3]])
    upper = torch.tensor([[1.0, 2.0, 3.0], [1e3, 1e3, 1e3]])
    out = layer_norm_interval((Interval(lower, upper), [3], None, None, 1e-5), {})
    assert not torch.isnan(out.lower).any() and not torch.isnan(out.upper).any()
    rel = relax(lower, upper, 1e-5)
    for side in ("lower", "upper"):
        coef, bias = pull(rel, torch.randn(2, 4, 3), side)
        assert not torch.isnan(coef).any() and not torch.isnan(bias).any()


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16), scale=st.floats(-6, 0.5), degenerate=st.booleans(), affine=st.booleans())
def test_op_level_two_normalized_dims(seed, scale, degenerate, affine):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(3, 4, generator=gen) if affine else None
    bias = torch.randn(3, 4, generator=gen) if affine else None
    params = {"w": weight, "b": bias} if affine else {}
    args = (Ref("x"), [3, 4], Ref("w") if affine else None, Ref("b") if affine else None, 1e-3)
    graph = one_node_graph(aten.layer_norm.default, args, params)
    fn = lambda t: torch.nn.functional.layer_norm(t, [3, 4], weight, bias, 1e-3)  # noqa: E731
    x, r = random_box((2, 2, 3, 4), seed, scale, degenerate, 1.0)
    check_op(graph, fn, x, r, methods=("IBP", "CROWN-IBP", "CROWN"), seed=seed)


def _ln_mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 8), nn.LayerNorm(8),
                          nn.ReLU(), nn.Linear(8, 3))
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model


def test_layernorm_relu_mlp_sound_and_crown_tighter():
    model = _ln_mlp()
    x = torch.randn(2, 5)
    for eps in (0.01, 0.05):
        res = assert_sound(model, x, eps=eps)
        w = {m: float((r.upper - r.lower).mean()) for m, r in res.items()}
        assert w["CROWN"] <= w["IBP"] + 1e-6, w
    assert_sound(model, x, eps=1.0, methods=("IBP", "CROWN"), pgd=False)  # wide: still sound
